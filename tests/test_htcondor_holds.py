"""Spool mode's SIGTERM save, held jobs and crash loops on the real HTCondor pool.

The pool is the chroot of scripts/htcondor_pool.sh (see test_htcondor_workflow.py);
holds are made on purpose with ``periodic_hold`` expressions, since this pool's
HTCondor does not enforce the site limits themselves.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from test_htcondor_workflow import (POOL_DIR, assert_resumed_in_a_new_sandbox, condor_jobs,  # noqa: F401
                                    htcondor_pool, in_pool_env, job_logs, local_reference, pool,
                                    render_job_files, start_in_pool, workdir)
from test_train_task import weights_digest

from ckpt_tasks.history import build_timeline
from ckpt_tasks.storage.store import CheckpointStore
from waiting import wait_until

# 4 epochs of 45 steps at 0.2 s: long enough to evict the job in the middle of it.
SLOW = ("--epochs", "4", "--checkpoint-every", "10", "--step-delay", "0.2")


def test_spool_mode_sends_the_spool_directory_back_at_eviction(tmp_path, monkeypatch):
    from ckpt_tasks.htcondor.workflow import SPOOL_DIR

    monkeypatch.setenv("CKPT_TASKS_DATA", str(tmp_path))
    submit, _, _ = render_job_files("spool")
    assert "when_to_transfer_output = ON_EXIT_OR_EVICT" in submit
    assert f"transfer_output_files = {SPOOL_DIR}" in submit
    store_submit, _, _ = render_job_files("store")
    assert "when_to_transfer_output" not in store_submit


def sandbox_steps(cluster: int, branch: int) -> list[int]:
    """The committed steps in the running job's sandbox (the chroot's execute directory,
    found by the ClusterId in the sandbox's job ad)."""
    steps = []
    for ad in (POOL_DIR / "var/lib/condor/execute").glob("dir_*/.job.ad"):
        try:
            if not re.search(rf"^ClusterId = {cluster}$", ad.read_text(), re.M):
                continue
        except OSError:
            continue
        for manifest in ad.parent.glob(f"ckpt_spool/TrainTask/*/branch-{branch}/step-*.json"):
            if match := re.match(r"step-(\d+)-", manifest.name):
                steps.append(int(match.group(1)))
    return sorted(steps)


def test_spool_mode_resumes_at_the_step_committed_at_sigterm(htcondor_pool, workdir, tmp_path):
    # No checkpoint exits (--checkpoint-exit-interval 0): HTCondor's SPOOL never holds a
    # checkpoint of its own, so whatever the next sandbox resumes from came back at eviction.
    command = (in_pool_env(workdir) + f"law index --quiet && law run TrainTask --workflow htcondor "
               f"--branches 3 {' '.join(SLOW)} --checkpoint-mode spool --checkpoint-exit-interval 0 "
               f"--poll-interval 0.05 --retries 0 --request-memory 500MB --request-disk 200MB")
    runner = start_in_pool(command, workdir)
    try:
        (job,) = wait_until(lambda: condor_jobs(workdir, "JobStatus == 2"), 180, "a running job")
        cluster = job["ClusterId"]
        wait_until(lambda: [s for s in sandbox_steps(cluster, 3) if s >= 20], 180, "step 20 in the sandbox")
        before = max(sandbox_steps(cluster, 3))
        pool("exec", f"condor_vacate_job {cluster}.{job['ProcId']}")
        runner.wait(timeout=600)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.returncode == 0, (workdir / "law.log").read_text()[-5000:]
    log = job_logs(workdir)[3]
    assert_resumed_in_a_new_sandbox(log)
    after = log[log.rindex("NumJobStarts = 1"):]
    resumed = int(re.search(r"resuming from step (\d+)", after).group(1))
    assert resumed >= before > 0, (before, resumed, log[-3000:])
    # At the job's end the spool directory comes back to the initialdir: its lineage says
    # the first run's last checkpoint was the one made on the signal, and the next run
    # resumed from it.
    (location,) = workdir.glob("data/htcondor/TrainTask/*/ckpt_spool/TrainTask/*/branch-3")
    timeline = build_timeline(CheckpointStore(str(location)).list())
    first, second = timeline.runs[:2]
    assert first.points[-1].reason == "signal" and first.points[-1].step == resumed, first.points[-1]
    assert timeline.interruptions[0].kind == "eviction" and timeline.interruptions[0].resumed_step == resumed
    (model,) = workdir.glob("data/TrainTask/*/branch-3/model.pt")
    assert weights_digest(model) == local_reference(tmp_path, 3, *SLOW[:4])
