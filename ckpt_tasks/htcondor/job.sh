#!/usr/bin/env bash
# The HTCondor job of a ckpt_tasks workflow branch (replaces law's law_job.sh).
#
# Arguments, as law passes them to every job: task module, task class, task
# parameters (base64), branches (base64), workers, auto-retry, dashboard data.
#
# Why a job script of our own: law's turns every failing exit code into 60 and
# relays no signal. Here SIGTERM/SIGINT (eviction) reach `law run`, which commits
# a checkpoint and exits 85, and that code reaches HTCondor unchanged.
set -u

task_module="$1"
task_class="$2"
task_params="$(echo "$3" | base64 --decode)"
branches="$(echo "$4" | base64 --decode)"

software="{{ckpt_software}}"
sandbox="${_CONDOR_SCRATCH_DIR:-${PWD}}"

# fail_input FILE WHY: a bundle that cannot be used; exit {{ckpt_software_exit_code}} names the cause in the job's log.
fail_input() {
    echo "ckpt_tasks job: error: software bundle $1: $2" >&2
    exit {{ckpt_software_exit_code}}
}

# check_bundle FILE SIZE SHA256: the bundle's size and checksum, before a byte of it is used.
check_bundle() {
    [ -f "$1" ] || fail_input "$1" "missing from the sandbox (not transferred)"
    local size sha
    size="$(stat -c %s "$1")"
    [ "${size}" = "$2" ] || fail_input "$1" "has ${size} bytes, expected $2 (truncated or replaced)"
    sha="$(sha256sum "$1" | cut -d' ' -f1)"
    [ "${sha}" = "$3" ] || fail_input "$1" "sha256 ${sha}, expected $3 (corrupt)"
}

# check_and_unpack FILE SIZE SHA256 DIR: the bundle, checked, unpacked into DIR (in the sandbox).
check_and_unpack() {
    # An in-place restart (exit 85 in spool mode) finds the tree unpacked, the bundle removed.
    local marker="$4/.unpacked-$3"
    [ -f "${marker}" ] && return 0
    fetch_bundle "$1"
    check_bundle "$1" "$2" "$3"
    mkdir -p "$4"
    tar -xzf "$1" -C "$4" || fail_input "$1" "cannot be unpacked"
    touch "${marker}"
    rm -f "$1"  # the unpacked tree is what counts; spare the sandbox the copy
}

# Bundles on the store (law.cfg bundle_store): the job fetches what its worker lacks, and
# HTCondor transfers nothing. Empty: HTCondor's file transfer brought them.
bundle_store="{{ckpt_bundle_store}}"

# fetch_bundle NAME: NAME from the bundle store into the sandbox, by the worker's xrdcp or,
# once an environment is there, its XRootD client. Checked by check_bundle after.
fetch_bundle() {
    { [ -n "${bundle_store}" ] && [ ! -f "$1" ]; } || return 0
    local url="${bundle_store}/$1" out
    if command -v xrdcp >/dev/null 2>&1; then
        out="$(xrdcp --nopbar --force "${url}" "$1.part" 2>&1)" ||
            fail_input "$1" "cannot be fetched from ${bundle_store}: $(echo "${out}" | tail -n 1)"
    elif [ -n "${python:-}" ]; then
        out="$("${python}" -c '
import sys
from XRootD import client
job = client.CopyProcess()
job.add_job(sys.argv[1], sys.argv[2], force=True)
status = job.prepare()
if status.ok:
    status, results = job.run()
    if status.ok and results and not results[0]["status"].ok:
        status = results[0]["status"]
sys.exit(None if status.ok else status.message.strip())' "${url}" "$1.part" 2>&1)" ||
            fail_input "$1" "cannot be fetched from ${bundle_store}: $(echo "${out}" | tail -n 1)"
    else
        fail_input "$1" "cannot be fetched from ${bundle_store}: no XRootD client (xrdcp) on this worker"
    fi
    mv -f "$1.part" "$1"
}

# The worker's cache of unpacked environments, shared by this account's jobs on the worker
# (law.cfg worker_cache, else $CKPT_TASKS_WORKER_CACHE, else the XDG cache): one entry per
# environment bundle, env-<sha256[:16]>/, complete when its marker holds the full sha256.
# ($VARs in it are the worker's; one it lacks is empty, not an error of set -u)
set +u; eval "worker_cache=\"{{ckpt_worker_cache}}\""; set -u
worker_cache="${worker_cache:-${CKPT_TASKS_WORKER_CACHE:-${XDG_CACHE_HOME:-${HOME:-/nonexistent}/.cache}/ckpt_tasks/envs}}"
readonly cache_marker=".ckpt_tasks-complete"

# have_flock: the worker has flock. Without it no lock keeps a tree in use from being
# replaced or pruned by another job, so the worker cache is not used at all (sandbox).
have_flock() { command -v flock >/dev/null 2>&1; }

# safe_chain DIR: DIR and every directory above it up to / are root's or this account's, and
# none may be written by group or others unless sticky (as /tmp): else another account could
# rename a directory on the way and put a tree of its own in the cache's place.
safe_chain() {
    local dir="$1" me owner mode
    me="$(id -u)" || return 1
    while :; do
        read -r owner mode < <(stat -L -c '%u %a' "${dir}" 2>/dev/null) || return 1
        { [ "${owner}" = 0 ] || [ "${owner}" = "${me}" ]; } || return 1
        if (( 8#${mode} & 8#022 )) && ! (( 8#${mode} & 8#1000 )); then return 1; fi
        [ "${dir}" = / ] && return 0
        dir="$(dirname "${dir}")"
    done
}

# usable_cache DIR: DIR exists (made if missing, with every new directory on the way 700), is
# this account's, and no other may write it nor any directory above it (a tree someone else
# could change must never run).
usable_cache() {
    have_flock || return 1
    case "$1" in /*) ;; *) return 1 ;; esac  # a relative path would depend on the sandbox
    ( umask 077 && mkdir -p "$1" ) 2>/dev/null || return 1
    [ -O "$1" ] && [ -w "$1" ] && [ -z "$(find "$1" -maxdepth 0 -perm /022)" ] || return 1
    # the path as given (symlinks in it included) and the directories it resolves to
    safe_chain "$1" && safe_chain "$(readlink -f "$1")"
}

complete_entry() { [ "$(cat "$1/${cache_marker}" 2>/dev/null)" = "$2" ]; }

# env_from_cache FILE SIZE SHA256: sets env_dir to the worker cache's tree of that bundle,
# unpacked there first when missing (once per worker: the first job unpacks under an
# exclusive lock, the others wait and use its tree); returns 1 when the cache is unusable,
# a lock included (the caller then unpacks into the sandbox: the cache is never changed unlocked).
env_from_cache() {
    local file="$1" size="$2" sha="$3" entry="${worker_cache}/env-${3:0:16}" tmp
    usable_cache "${worker_cache}" || return 1
    # fd 8 ("in use"): a shared lock for the job's life, so that no retention removes a tree
    # in use. Never made exclusive: a job unpacking would wait for every job using the entry.
    exec 8>>"${entry}.lock" || return 1
    flock -s -w 1800 8 || return 1
    if ! complete_entry "${entry}" "${sha}"; then
        # fd 7: unpacking, exclusive, on a file of its own; held only while unpacking.
        exec 7>>"${entry}.unpack.lock" || return 1
        flock -x -w 1800 7 || { exec 7>&-; return 1; }
        if ! complete_entry "${entry}" "${sha}"; then
            fetch_bundle "${file}"
            check_bundle "${file}" "${size}" "${sha}"
            # whatever a killed job left half unpacked is never used: under the lock, remove it
            rm -rf "${worker_cache}/.unpacking-${sha:0:16}-"* "${entry}"
            tmp="$(mktemp -d "${worker_cache}/.unpacking-${sha:0:16}-XXXXXX")" || { exec 7>&-; return 1; }
            if ! tar -xzf "${file}" -C "${tmp}" || [ ! -x "${tmp}/env/bin/python" ]; then
                rm -rf "${tmp}"
                exec 7>&-
                return 1  # the cache's disk, most likely: unpack in the sandbox instead
            fi
            echo "${sha}" > "${tmp}/env/${cache_marker}"
            mv -T "${tmp}/env" "${entry}" && rmdir "${tmp}" || { exec 7>&-; return 1; }
            env_source="unpacked into the worker cache ${worker_cache}"
        fi
        exec 7>&-
    fi
    touch "${entry}/${cache_marker}"  # its last use, for the retention
    rm -f "${file}"
    env_dir="${entry}"
}

# prune_worker_cache KEEP MINUTES DAYS: entries other than ours that are neither among the
# KEEP last used nor used within MINUTES (DAYS, for the log) go, each only while no job holds
# its "in use" lock. Never without flock: nothing would tell a tree in use.
prune_worker_cache() {
    have_flock || return 0
    local n=0 entry
    find "${worker_cache}" -mindepth 2 -maxdepth 2 -name "${cache_marker}" -printf '%T@ %h\n' 2>/dev/null |
        sort -rn | cut -d' ' -f2- | while read -r entry; do
            n=$((n + 1))
            [ "${entry}" = "${env_dir}" ] && continue
            [ "${n}" -le "$1" ] && continue
            [ -n "$(find "${entry}/${cache_marker}" -mmin "+$2")" ] || continue
            (
                flock -x -n 9 || exit 0
                # the lock file stays: a job waiting on it must lock the same file as the next one
                rm -f "${entry}/${cache_marker}" && rm -rf "${entry}"
                echo "ckpt_tasks job: removed ${entry} from the worker cache (unused for $3 days)"
            ) 9>>"${entry}.lock"
        done
}

case "${software}" in
    shared)
        project="{{ckpt_tasks_root}}"
        export CKPT_TASKS_DATA="{{ckpt_tasks_data}}"
        export PATH="${project}/.venv/bin:${PATH}"
        python="${project}/.venv/bin/python"
        ;;
    bundle | container)
        started=$(date +%s.%N)
        # Outputs go into the sandbox; HTCondor brings the directory back to the submit side
        # (made first: it is an output even of a job that fails here).
        export CKPT_TASKS_DATA="${sandbox}/{{ckpt_job_data_dir}}"
        mkdir -p "${CKPT_TASKS_DATA}"
        project="${sandbox}/ckpt_software/code"
        env_source="image"
        if [ "${software}" = bundle ]; then
            env_bundle=("{{ckpt_env_bundle}}" "{{ckpt_env_bundle_size}}" "{{ckpt_env_bundle_sha256}}")
            env_source="worker cache ${worker_cache} (hit)"
            if ! env_from_cache "${env_bundle[@]}"; then
                exec 8>&-
                env_source="sandbox (worker cache ${worker_cache} not usable)"
                check_and_unpack "${env_bundle[@]}" "${sandbox}/ckpt_software"
                env_dir="${sandbox}/ckpt_software/env"
            fi
            python="${env_dir}/bin/python"
        else
            python="$(command -v python3)" || fail_input "image" "has no python3 on PATH"
        fi
        check_and_unpack "{{ckpt_code_bundle}}" "{{ckpt_code_bundle_size}}" "{{ckpt_code_bundle_sha256}}" "${project}"
        echo "ckpt_tasks job: software (${software}) checked and unpacked in" \
             "$(echo "$(date +%s.%N) - ${started}" | awk '{printf "%.1f", $1 - $3}') s; environment: ${env_source}"
        if [ "${software}" = bundle ] && [ "${env_dir}" != "${sandbox}/ckpt_software/env" ]; then
            prune_worker_cache "{{ckpt_worker_cache_keep}}" "{{ckpt_worker_cache_minutes}}" "{{ckpt_worker_cache_days}}"
        fi
        ;;
    *)
        echo "ckpt_tasks job: error: unknown software route '${software}'" >&2
        exit {{ckpt_software_exit_code}}
        ;;
esac
export CKPT_TASKS_ROOT="${project}"
export LAW_CONFIG_FILE="${project}/law.cfg"
export LAW_HOME="${sandbox}/.law"
export PYTHONPATH="${project}${PYTHONPATH:+:${PYTHONPATH}}"
# Credentials (ckpt_tasks/htcondor/credentials.py). The token route: HTCondor's credmon keeps
# $_CONDOR_CREDS/<service>.use fresh, where the XRootD client does not look by itself.
token_service="{{ckpt_token_service}}"
if [ -n "${token_service}" ]; then
    if [ -n "${BEARER_TOKEN_FILE:-}" ]; then
        echo "ckpt_tasks job: bearer token from BEARER_TOKEN_FILE=${BEARER_TOKEN_FILE} (set for the job)"
    elif [ -f "${_CONDOR_CREDS:-}/${token_service}.use" ]; then
        export BEARER_TOKEN_FILE="${_CONDOR_CREDS}/${token_service}.use"
        echo "ckpt_tasks job: bearer token from BEARER_TOKEN_FILE=${BEARER_TOKEN_FILE}"
    else
        echo "ckpt_tasks job: warning: no ${token_service}.use in _CONDOR_CREDS=${_CONDOR_CREDS:-(unset)}" \
             "(use_oauth_services needs a credmon on the access point)" >&2
    fi
fi
# The least lifetime the branch's preflight asks of a credential (--credential-min-lifetime).
min_lifetime="{{ckpt_credential_min_lifetime}}"
[ -n "${min_lifetime}" ] && export {{ckpt_min_lifetime_variable}}="${min_lifetime}"
# An environment that cannot run the task fails here, named, not somewhere inside law.
if ! import_error="$("${python}" -c "import torch, law, luigi" 2>&1)"; then
    fail_input "environment" "${python} cannot import torch, law and luigi: $(echo "${import_error}" | tail -n 1)"
fi
# HTCondor restores the spooled checkpoints into the sandbox after an eviction (spool mode);
# the name comes from workflow.py (SPOOL_DIR), rendered in at submission.
mkdir -p "{{ckpt_spool_dir}}"

echo "ckpt_tasks job: ${task_module}.${task_class} branches ${branches} on $(hostname) in ${PWD}"
if [ -f "${_CONDOR_JOB_AD:-}" ]; then
    echo "ckpt_tasks job: $(grep -E '^(ClusterId|ProcId|NumJobStarts) =' "${_CONDOR_JOB_AD}" | tr '\n' ' ')"
fi

child=""
pending=""
# A signal with no branch running (between branches, or before `child` is set) is kept:
# it is relayed to the branch just started, or ends the job before the next one.
relay() {
    if [ -n "${child}" ]; then kill -s "$1" "${child}" 2>/dev/null; else pending="$1"; fi
}
trap 'relay TERM' TERM
trap 'relay INT' INT

for branch in ${branches}; do
    if [ -n "${pending}" ]; then
        echo "ckpt_tasks job: SIG${pending} before branch ${branch} started; stopping"
        exit $((128 + $(kill -l "${pending}")))
    fi
    # bash starts background jobs with SIGINT ignored; restore the defaults for law.
    eval "( trap - INT TERM; exec \"\${python}\" -m law run ${task_module}.${task_class} ${task_params} --branch=${branch} ) &"
    child=$!
    [ -n "${pending}" ] && kill -s "${pending}" "${child}" 2>/dev/null
    # A trapped signal interrupts `wait` while `law run` still commits its checkpoint:
    # wait again for as long as it lives, then take its real exit code.
    while :; do
        wait "${child}"
        code=$?
        kill -0 "${child}" 2>/dev/null || break
    done
    wait "${child}" 2>/dev/null
    last=$?
    [ "${last}" -ne 127 ] && code=${last}
    child=""
    echo "ckpt_tasks job: branch ${branch} exited with ${code}"
    if [ "${code}" -ne 0 ]; then
        exit "${code}"
    fi
done
exit 0
