#!/usr/bin/env bash
# A long "computation" in bash that keeps its whole state in one file.
#
#   counter.sh STATE_FILE [TARGET] [DELAY]
#
# Counts from the value in STATE_FILE (0 when there is none) to TARGET
# (default 100), one step every DELAY seconds (default 0.5). After every step
# it writes its state to a temporary file and renames it over STATE_FILE, so
# the file is always complete: this is what `ckpt-tasks watch` commits.
#
# On SIGTERM or SIGINT it finishes the step, writes its state once more and
# exits with 85 ("checkpointed, start me again"). It knows nothing about
# storage, HTCondor or Python.
set -u

state=${1:?usage: counter.sh STATE_FILE [TARGET] [DELAY]}
target=${2:-100}
delay=${3:-0.5}

count=0
sum=0
if [ -f "$state" ]; then
    # The format has a trailer line: a torn file would show up here.
    count=$(sed -n 's/^count=//p' "$state")
    sum=$(sed -n 's/^sum=//p' "$state")
    if [ "$(tail -n 1 "$state")" != "end" ] || [ -z "$count" ] || [ -z "$sum" ]; then
        echo "counter.sh: $state is incomplete" >&2
        exit 3
    fi
    echo "counter.sh: resuming from $count"
fi

save() {
    local tmp="$state.tmp.$$"
    printf 'count=%d\nsum=%d\nend\n' "$count" "$sum" > "$tmp"
    mv -f "$tmp" "$state"    # atomic: readers see the old state or the new one
}

stop=""
trap 'stop=TERM' TERM
trap 'stop=INT' INT

while [ "$count" -lt "$target" ]; do
    # `sleep & wait`: a trapped signal interrupts `wait` at once, not after the sleep.
    sleep "$delay" &
    wait $! 2>/dev/null
    count=$((count + 1))
    sum=$((sum + count))
    save
    echo "counter.sh: step $count"
    if [ -n "$stop" ]; then
        echo "counter.sh: SIG$stop at step $count, state saved"
        exit 85
    fi
done
echo "counter.sh: done at $count"
