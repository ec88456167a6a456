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

# check_and_unpack FILE SIZE SHA256 DIR: the bundle as HTCondor transferred it, size and
# checksum checked before a byte of it is unpacked.
check_and_unpack() {
    # An in-place restart (exit 85 in spool mode) finds the tree unpacked, the bundle removed.
    local marker="$4/.unpacked-$3"
    [ -f "${marker}" ] && return 0
    [ -f "$1" ] || fail_input "$1" "missing from the sandbox (not transferred)"
    local size sha
    size="$(stat -c %s "$1")"
    [ "${size}" = "$2" ] || fail_input "$1" "has ${size} bytes, expected $2 (truncated or replaced)"
    sha="$(sha256sum "$1" | cut -d' ' -f1)"
    [ "${sha}" = "$3" ] || fail_input "$1" "sha256 ${sha}, expected $3 (corrupt)"
    mkdir -p "$4"
    tar -xzf "$1" -C "$4" || fail_input "$1" "cannot be unpacked"
    touch "${marker}"
    rm -f "$1"  # the unpacked tree is what counts; spare the sandbox the copy
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
        check_and_unpack "{{ckpt_code_bundle}}" "{{ckpt_code_bundle_size}}" "{{ckpt_code_bundle_sha256}}" "${project}"
        if [ "${software}" = bundle ]; then
            check_and_unpack "{{ckpt_env_bundle}}" "{{ckpt_env_bundle_size}}" "{{ckpt_env_bundle_sha256}}" \
                "${sandbox}/ckpt_software"
            python="${sandbox}/ckpt_software/env/bin/python"
        else
            python="$(command -v python3)" || fail_input "image" "has no python3 on PATH"
        fi
        echo "ckpt_tasks job: software (${software}) checked and unpacked in" \
             "$(echo "$(date +%s.%N) - ${started}" | awk '{printf "%.1f", $1 - $3}') s"
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
