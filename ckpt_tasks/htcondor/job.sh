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

project="{{ckpt_tasks_root}}"
export CKPT_TASKS_ROOT="${project}"
export CKPT_TASKS_DATA="{{ckpt_tasks_data}}"
export LAW_CONFIG_FILE="${project}/law.cfg"
export LAW_HOME="${_CONDOR_SCRATCH_DIR:-${PWD}}/.law"
export PYTHONPATH="${project}${PYTHONPATH:+:${PYTHONPATH}}"
export PATH="${project}/.venv/bin:${PATH}"
# HTCondor restores the spooled checkpoints into the sandbox after an eviction (spool mode);
# the name comes from workflow.py (SPOOL_DIR), rendered in at submission.
mkdir -p "{{ckpt_spool_dir}}"

echo "ckpt_tasks job: ${task_module}.${task_class} branches ${branches} on $(hostname) in ${PWD}"
if [ -f "${_CONDOR_JOB_AD:-}" ]; then
    echo "ckpt_tasks job: $(grep -E '^(ClusterId|ProcId|NumJobStarts) =' "${_CONDOR_JOB_AD}" | tr '\n' ' ')"
fi

child=""
relay() {
    [ -n "${child}" ] && kill -s "$1" "${child}" 2>/dev/null
}
trap 'relay TERM' TERM
trap 'relay INT' INT

for branch in ${branches}; do
    # bash starts background jobs with SIGINT ignored; restore the defaults for law.
    eval "( trap - INT TERM; exec law run ${task_module}.${task_class} ${task_params} --branch=${branch} ) &"
    child=$!
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
