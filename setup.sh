#!/usr/bin/env bash
# Sets up ckpt_tasks in this checkout. Source it from the repository root:
#     source setup.sh
# Creates .venv (when missing), installs torch, the project (editable, with test
# extras) and law's task index. Idempotent: a second run only checks and exports.
#
# GPU machines: install your CUDA build of torch into .venv before sourcing, e.g.
#     python3 -m venv .venv && .venv/bin/pip install torch --index-url <your CUDA index>
# setup.sh keeps any torch that is already installed. CKPT_TASKS_TORCH overrides
# the pinned CPU version used otherwise.

_ckpt_tasks_setup() {
    local root
    root="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")" && pwd)"
    local venv="${root}/.venv"
    local python="${CKPT_TASKS_PYTHON:-python3}"
    local torch_spec="${CKPT_TASKS_TORCH:-torch==2.13.0}"

    if [ ! -x "${venv}/bin/python" ]; then
        echo "ckpt_tasks: creating ${venv}"
        "${python}" -m venv "${venv}" || return 1
        "${venv}/bin/python" -m pip install --quiet --upgrade pip || return 1
    fi

    # torch first and pinned: a bare requirement would pull a CUDA build of several GB.
    if ! "${venv}/bin/python" -c "import torch" >/dev/null 2>&1; then
        echo "ckpt_tasks: installing ${torch_spec}"
        "${venv}/bin/python" -m pip install --quiet "${torch_spec}" || return 1
    fi

    # Reinstall only when pyproject.toml changed since the last install.
    local stamp="${venv}/.ckpt_tasks-installed"
    if [ ! -f "${stamp}" ] || [ "${root}/pyproject.toml" -nt "${stamp}" ]; then
        echo "ckpt_tasks: installing the project (editable, with test extras)"
        "${venv}/bin/python" -m pip install --quiet -e "${root}[test]" || return 1
        touch "${stamp}"
    fi

    export CKPT_TASKS_ROOT="${root}"
    export CKPT_TASKS_DATA="${CKPT_TASKS_DATA:-${root}/data}"
    export LAW_HOME="${root}/.law"
    export LAW_CONFIG_FILE="${root}/law.cfg"
    case ":${PYTHONPATH:-}:" in
        *":${root}:"*) ;;
        *) export PYTHONPATH="${root}${PYTHONPATH:+:${PYTHONPATH}}" ;;
    esac
    case ":${PATH}:" in
        *":${venv}/bin:"*) ;;
        *) export PATH="${venv}/bin:${PATH}" ;;
    esac
    export VIRTUAL_ENV="${venv}"

    law index --quiet || return 1
    echo "ckpt_tasks: ready (law tasks indexed; run 'law run TrainTask --branch 0')"
}

_ckpt_tasks_setup
_ckpt_tasks_status=$?
unset -f _ckpt_tasks_setup
if [ "${_ckpt_tasks_status}" -ne 0 ]; then
    echo "ckpt_tasks: setup failed (exit ${_ckpt_tasks_status})" >&2
fi
# 'return' when sourced, 'exit' when run as a script.
return "${_ckpt_tasks_status}" 2>/dev/null || exit "${_ckpt_tasks_status}"
