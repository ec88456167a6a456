#!/usr/bin/env bash
# HTCondor job wrapper for a self-checkpointing payload.
#
#   run.sh [ARGS...]          runs  ${PYTHON:-python3} counter.py ARGS...
#   run.sh -- COMMAND [ARGS]  runs  COMMAND ARGS...  (any other payload)
#
# HTCondor signals only the job's top process, this script: on eviction it
# sends SIGTERM (or the submit file's kill_sig) and hard-kills the whole
# process tree when the vacate time is over. The payload can only write its
# last checkpoint if the signal reaches it, and HTCondor can only see the
# payload's exit code (85 = "checkpointed, start me again") if this script
# passes it on. So this wrapper:
#   1. starts the payload in the background,
#   2. relays SIGTERM and SIGINT to it,
#   3. waits until the payload has really ended, not just until a signal
#      interrupted `wait`, and
#   4. exits with the payload's exit code.
#
# No `set -e`: `wait` returns non-zero whenever the payload does or a signal
# arrives, and that must not end this script.
set -u

log() { echo "run.sh: $*" >&2; }

if [ "${1:-}" = "--" ]; then
    shift
    if [ "$#" -eq 0 ]; then
        log "no command after --"
        exit 2
    fi
    payload=("$@")
else
    payload=("${PYTHON:-python3}" "$(dirname "$0")/counter.py" "$@")
fi

# Set up the payload's environment here (activate a virtual environment,
# unpack inputs, ...). Keep it before the traps: until the payload runs, a
# signal should just end this script.

child=""
pending=""   # a signal that came before the payload's PID was known

relay() {
    if [ -n "$child" ]; then
        log "relaying SIG$1 to PID $child"
        kill -s "$1" "$child" 2>/dev/null
    else
        pending="$1"
    fi
}
trap 'relay TERM' TERM
trap 'relay INT' INT

# Without job control, bash starts background commands with SIGINT and
# SIGQUIT ignored, and an ignored SIGINT would make the relayed one a no-op
# for any payload that does not install its own handler: restore the default
# dispositions in the subshell before exec'ing the payload.
( trap - INT QUIT TERM; exec "${payload[@]}" ) &
child=$!
log "started PID $child: ${payload[*]}"
if [ -n "$pending" ]; then
    relay "$pending"
fi

# A trapped signal makes `wait` return at once with 128+signal although the
# payload is still running (and may be writing its checkpoint): wait again for
# as long as it lives.
while :; do
    wait "$child"
    status=$?
    kill -0 "$child" 2>/dev/null || break
done
# The last `wait` may still have been cut short by a signal just before the
# payload ended (and bash reaped it in the meantime). bash keeps the exit
# status of its ended background jobs, so ask once more; 127 means it has no
# status to give, and the one we have is the payload's.
wait "$child" 2>/dev/null
final=$?
if [ "$final" -ne 127 ]; then
    status=$final
fi

log "payload exited with $status"
exit "$status"
