"""The single-machine HTCondor pool of scripts/htcondor_pool.sh, used for real.

The pool (Debian 13's minicondor in a trixie chroot) is built beforehand, by CI
or by hand: ``scripts/htcondor_pool.sh build`` (as root, a few minutes). Without
a built pool these tests are skipped on a developer machine and fail under CI
(CI=true). They start the pool when it is down and stop it again afterwards; a
pool that was already running is left running.

Jobs are submitted by the job user (``ckptuser``) through ``htcondor_pool.sh exec``
from a per-test folder under ``<repo>/.pool-tmp/``, which the pool bind-mounts
(the repository is bind-mounted at the same path).
"""
from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import subprocess
import textwrap
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
POOL_SH = REPO / "scripts" / "htcondor_pool.sh"
POOL_DIR = Path(os.environ.get("CKPT_TASKS_POOL_DIR", "/var/cache/ckpt_tasks/htcondor-pool"))
STAMP = POOL_DIR / ".ckpt_tasks-pool-built"
POOL_TMP = REPO / ".pool-tmp"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
JOB_USER = "ckptuser"
IN_CI = os.environ.get("CI", "").lower() == "true"
JOB_TIMEOUT = 180  # seconds a job may take from submission to done


def unavailable(reason: str):
    """Skip on a developer machine; fail under CI, where the pool must be there."""
    if IN_CI:
        pytest.fail(f"CI=true and the HTCondor pool is unavailable: {reason}")
    pytest.skip(reason)


def pool(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """``htcondor_pool.sh ARGS...``; output captured as text."""
    result = subprocess.run(
        ["bash", str(POOL_SH), *args],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )
    if check and result.returncode != 0:
        pytest.fail(
            f"htcondor_pool.sh {' '.join(args)} exited {result.returncode}\n"
            f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
        )
    return result


def pool_exec(script: str, *, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """Run a bash script inside the pool as the job user."""
    return pool("exec", script, timeout=timeout, check=check)


@pytest.fixture(scope="module")
def htcondor_pool():
    if os.geteuid() != 0:
        unavailable("the HTCondor pool needs root (chroot, mounts)")
    if shutil.which("chroot") is None or not POOL_SH.is_file():
        unavailable("chroot or scripts/htcondor_pool.sh missing")
    if not STAMP.is_file():
        unavailable(f"no built pool in {POOL_DIR}; run: scripts/htcondor_pool.sh build")
    was_up = pool("status", timeout=120, check=False).returncode == 0
    if not was_up:
        pool("start", timeout=240)
    yield POOL_DIR
    if not was_up:
        pool("stop", timeout=180)


@pytest.fixture
def pool_tmp(htcondor_pool):
    """A fresh folder under the repository, visible in the pool, owned by the job user."""
    user = pwd.getpwnam(JOB_USER)
    folder = POOL_TMP / uuid.uuid4().hex
    folder.mkdir(parents=True)
    os.chmod(POOL_TMP, 0o755)
    os.chown(folder, user.pw_uid, user.pw_gid)
    if pool_exec(f"test -w {shlex.quote(str(folder))}", check=False).returncode != 0:
        shutil.rmtree(folder)
        pytest.fail(f"{folder} is not writable by {JOB_USER} inside the pool "
                    f"(is {REPO} bind-mounted? see CKPT_TASKS_POOL_BINDS)")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)
    try:
        POOL_TMP.rmdir()
    except OSError:
        pass  # other tests' folders still there


def write_as_job_user(path: Path, text: str, mode: int = 0o644) -> Path:
    user = pwd.getpwnam(JOB_USER)
    path.write_text(textwrap.dedent(text).lstrip())
    os.chmod(path, mode)
    os.chown(path, user.pw_uid, user.pw_gid)
    return path


def submit_and_wait(folder: Path, submit_file: str) -> int:
    """condor_submit in ``folder``, wait for the job to leave the queue; return its cluster."""
    out = pool_exec(f"cd {shlex.quote(str(folder))} && condor_submit {submit_file}").stdout
    match = re.search(r"submitted to cluster (\d+)", out)
    assert match, f"no cluster id in condor_submit's output:\n{out}"
    cluster = int(match.group(1))
    try:
        waited = pool_exec(
            f"cd {shlex.quote(str(folder))} && condor_wait -wait {JOB_TIMEOUT} job.log {cluster}",
            timeout=JOB_TIMEOUT + 30, check=False,
        )
        if waited.returncode != 0:
            analyze = pool_exec(f"condor_q -better-analyze {cluster}", check=False)
            files = "\n".join(
                f"--- {p.name} ---\n{p.read_text(errors='replace')}"
                for p in sorted(folder.iterdir()) if p.is_file()
            )
            pytest.fail(
                f"job {cluster} not done after {JOB_TIMEOUT} s\n{waited.stdout}{waited.stderr}\n"
                f"{analyze.stdout}{analyze.stderr}\n{files}"
            )
    finally:
        pool_exec(f"condor_rm {cluster} >/dev/null 2>&1 || true", check=False)
    history = pool_exec(f"condor_history {cluster} -limit 1 -af JobStatus ExitCode", check=False).stdout.split()
    assert history[:2] == ["4", "0"], f"job {cluster}: JobStatus, ExitCode = {history} (want 4 0)"
    return cluster


def test_trivial_job_runs_as_job_user(pool_tmp):
    write_as_job_user(pool_tmp / "job.sh", """
        #!/bin/sh
        echo "hello from $(id -un)" > result.txt
    """, mode=0o755)
    write_as_job_user(pool_tmp / "job.sub", """
        universe = vanilla
        executable = job.sh
        should_transfer_files = YES
        when_to_transfer_output = ON_EXIT
        transfer_output_files = result.txt
        output = job.out
        error = job.err
        log = job.log
        request_cpus = 1
        request_memory = 64MB
        request_disk = 10MB
        queue
    """)
    submit_and_wait(pool_tmp, "job.sub")
    result = pool_tmp / "result.txt"
    assert result.read_text() == f"hello from {JOB_USER}\n"
    # Same UID on both sides of the bind mount.
    assert result.stat().st_uid == pwd.getpwnam(JOB_USER).pw_uid


def test_checkpoint_submit_commands_become_job_attributes(pool_tmp):
    write_as_job_user(pool_tmp / "ckpt.sub", """
        universe = vanilla
        executable = /bin/true
        transfer_executable = false
        should_transfer_files = YES
        checkpoint_exit_code = 85
        transfer_checkpoint_files = ckpt.txt
        log = job.log
        queue
    """)
    # -dry-run - prints the job ClassAd to stdout, one "Name=value" a line
    # (23.9.6 writes no spaces around "=").
    out = pool_exec(f"cd {shlex.quote(str(pool_tmp))} && condor_submit -dry-run - ckpt.sub").stdout
    ad = dict(
        (name.strip(), value.strip())
        for name, sep, value in (line.partition("=") for line in out.splitlines())
        if sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name.strip())
    )
    assert ad.get("SuccessCheckpointExitCode") == "85", out
    assert ad.get("TransferCheckpoint") == '"ckpt.txt"', out
    assert ad.get("WantFTOnCheckpoint", "").lower() == "true", out


def test_project_venv_runs_in_pool_as_job_user(pool_tmp):
    if not VENV_PYTHON.exists():
        unavailable(f"{VENV_PYTHON} missing (source setup.sh first)")
    write_as_job_user(pool_tmp / "venv.sub", f"""
        universe = vanilla
        executable = {VENV_PYTHON}
        transfer_executable = false
        arguments = "-c 'import ckpt_tasks, torch, getpass; print(""ok"", getpass.getuser())'"
        should_transfer_files = YES
        output = job.out
        error = job.err
        log = job.log
        request_cpus = 1
        request_memory = 512MB
        queue
    """)
    submit_and_wait(pool_tmp, "venv.sub")
    err = (pool_tmp / "job.err").read_text()
    assert (pool_tmp / "job.out").read_text().split() == ["ok", JOB_USER], err
