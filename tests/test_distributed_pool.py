"""A 2-rank branch on the real HTCondor pool: evicted gracefully, then hard, resumed, identical.

``law run TrainTask --workflow htcondor --ranks 2`` inside the pool (scripts/htcondor_pool.sh)
submits one job that requests 2 CPUs; its ``law run`` is the parent of 2 gloo ranks
(ckpt_tasks.distributed.launch). ``condor_vacate_job`` sends SIGTERM to the job's top
process only: the ranks must agree on one step, commit it and exit 85. ``condor_vacate_job
-fast`` SIGKILLs every process of the job: the next start resumes from the last committed
checkpoint. Checkpoints go to a real XRootD server on the host's loopback. The weights at
the end equal those of the same training run locally on 2 ranks.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from test_htcondor_workflow import (ROOT, assert_resumed_in_a_new_sandbox, condor_jobs, htcondor_pool,  # noqa: F401
                                    in_pool_env, pool, start_in_pool, submission_attempts, workdir)
from test_train_task import law_env, weights_digest
from waiting import wait_until

from ckpt_tasks.storage.store import CheckpointStore

TRAIN = ("--epochs", "4", "--checkpoint-every", "10", "--ranks", "2")
DELAY = ("--step-delay", "0.15")  # 92 steps: long enough to evict twice


def job_output(workdir: Path) -> str:
    """The job's stdout, then its stderr (where the ranks log), from the workflow's output directory."""
    files = sorted(workdir.glob("data/htcondor/TrainTask/*/std*"), key=lambda p: (not p.name.startswith("stdout"),
                                                                                   p.name))
    assert files, list(workdir.glob("data/htcondor/TrainTask/*/*"))
    return "\n".join(p.read_text(errors="replace") for p in files)


def local_two_rank_reference(tmp_path: Path) -> str:
    """The same branch trained here on 2 ranks, with the thread count the job's ranks get
    (HTCondor sets OMP_NUM_THREADS to request_cpus; the launcher keeps a value it finds)."""
    data = tmp_path / "reference"
    env = {**law_env(data), "OMP_NUM_THREADS": "2"}
    subprocess.run([str(ROOT / ".venv" / "bin" / "law"), "run", "TrainTask", "--branch", "0", *TRAIN],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    (model,) = data.glob("TrainTask/*/branch-0/model.pt")
    return weights_digest(model)


@pytest.mark.xrootd
def test_a_two_rank_branch_survives_a_graceful_and_a_hard_eviction_with_identical_weights(
        htcondor_pool, workdir, tmp_path, make_xrootd_server):  # noqa: F811
    server = make_xrootd_server()
    store = f"{server.url}//ckpt"
    command = (in_pool_env(workdir) + f"law index --quiet && law run TrainTask --workflow htcondor --branches 0 "
               f"{' '.join(TRAIN + DELAY)} --store {store} --poll-interval 0.05 --retries 0 "
               f"--request-memory 1GB --request-disk 200MB")
    runner = start_in_pool(command, workdir)

    def checkpoints() -> list:
        locations = list(server.data_dir.glob("ckpt/TrainTask/*/branch-0"))
        if not locations:
            return []
        (location,) = locations
        return CheckpointStore(f"{server.url}//{location.relative_to(server.data_dir)}").list()

    def newest(above: int = 0):
        found = checkpoints()
        return found[-1] if found and found[-1].step > above else None

    def the_running_job() -> dict | None:
        jobs = condor_jobs(workdir, "JobStatus == 2")
        return jobs[0] if jobs else None

    try:
        wait_until(lambda: newest(10), 240, "a checkpoint above step 10")
        job = wait_until(the_running_job, 60, "the running job")
        job_id = f"{job['ClusterId']}.{job['ProcId']}"
        requested = pool("exec", f"condor_q {job_id} -af RequestCpus").split()
        assert requested == ["2"], requested  # one CPU per rank
        # graceful: SIGTERM to the top process; the ranks agree, commit and exit 85
        before = newest().step
        pool("exec", f"condor_vacate_job {job_id}")
        graceful = wait_until(lambda: next((c for c in checkpoints() if c.step > before
                                            and c.metadata.get("reason") == "signal"), None),
                              120, "the checkpoint of the agreed stop")
        # it starts again (a new sandbox), resumes and commits further: then a hard kill
        wait_until(lambda: newest(graceful.step + 10), 240, "a checkpoint after the resume")
        wait_until(the_running_job, 60, "the running job again")
        pool("exec", f"condor_vacate_job -fast {job_id}")
        runner.wait(timeout=600)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.returncode == 0, (workdir / "law.log").read_text()[-5000:]

    log = job_output(workdir)
    assert_resumed_in_a_new_sandbox(log)
    assert re.search(r"started 2 ranks", log), log[-3000:]
    resumed = [int(n) for n in re.findall(r"rank 1 resuming from step (\d+)", log)]
    assert resumed and resumed[-1] > graceful.step, log[-3000:]
    # law never resubmitted the job (--retries 0 and the workflow succeeded): one job, three starts
    submission = submission_attempts(workdir)
    assert not any(int(n) for n in submission["attempts"].values()), submission["attempts"]
    history = pool("exec", f"condor_history {job_id} -limit 1 -af NumJobStarts ExitCode").split()
    assert history and int(history[0]) >= 3 and history[1] == "0", history

    (model,) = workdir.glob("data/TrainTask/*/branch-0/model.pt")
    assert weights_digest(model) == local_two_rank_reference(tmp_path)
