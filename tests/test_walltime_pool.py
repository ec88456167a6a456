"""HTCondor's ``allowed_execute_duration`` on the real pool: every run commits and exits 85
before the limit, the job is requeued (not held), and the branch completes bit-identically.

The pool (scripts/htcondor_pool.sh, HTCondor 23.9) enforces the limit: a job still running
when it is reached is held with code 47 (a plain ``sleep`` under a 30 s limit was held at
32 s). So a job that is never held and whose runs all ended with exit 85 stopped in time.
"""
from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

from test_train_task import weights_digest
from test_htcondor_workflow import (ROOT, condor_jobs, htcondor_pool, in_pool_env, job_logs,  # noqa: F401
                                    local_reference, mine, pool, start_in_pool, submission_attempts, workdir)

from ckpt_tasks.history import build_timeline
from ckpt_tasks.storage.store import CheckpointStore
from waiting import wait_until

LIMIT = 55   # seconds: allowed_execute_duration, counted by HTCondor from the start of execution
MARGIN = 30  # --walltime-margin: each run stops ~25 s in, leaving the start-up room
# 2 epochs of 45 steps at 0.3 s: 27 s of training, more than one run's share
TRAIN = ("--epochs", "2", "--checkpoint-every", "10", "--step-delay", "0.3")


def config_with_submit_command(workdir: Path, key: str, value: object) -> Path:
    """A copy of law.cfg whose [ckpt_tasks_htcondor] section adds the submit command ``key``."""
    text = (ROOT / "law.cfg").read_text()
    section = "[ckpt_tasks_htcondor]\n"
    assert section in text
    config = workdir / "law.cfg"
    config.write_text(text.replace(section, f"{section}{key}: {value}\n"))
    return config


def run_durations(user_log: str) -> list[tuple[float, str]]:
    """(seconds, how it ended) of every run in an HTCondor job log: from "Job executing"
    to the next termination, eviction or hold."""
    events = re.findall(r"^(\d{3}) \(\S+\) (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) (.*)$", user_log, re.M)
    runs, started = [], None
    for code, stamp, text in events:
        when = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").timestamp()
        if code == "001":
            started = when
        elif code in ("004", "005", "012", "009") and started is not None:
            runs.append((when - started, text))
            started = None
    return runs


def test_the_limit_counts_from_this_start_after_a_requeue(tmp_path):
    # The start dates of the sandbox ad HTCondor 23.9 wrote at the second start of a job that
    # had exited 85 and been requeued (seen in the test pool): JobCurrentStartDate is this
    # start's, JobCurrentStartExecutingDate still the first start's.
    from ckpt_tasks.jobenv.htcondor import read_job_ad
    from ckpt_tasks.jobenv.limits import read_site_limits

    path = tmp_path / ".job.ad"
    path.write_text("AllowedExecuteDuration = 100\nJobCurrentStartDate = 1796185843\n"
                    "JobCurrentStartExecutingDate = 1796185839\nJobLastStartDate = 1796185838\n"
                    "NumJobStarts = 1\n")
    limits = read_site_limits(read_job_ad(path), process_start=1796185844.0)
    assert limits.deadline == 1796185843 + 100 and limits.source == "AllowedExecuteDuration"


def test_allowed_execute_duration_is_never_reached(htcondor_pool, workdir, tmp_path):
    config = config_with_submit_command(workdir, "allowed_execute_duration", LIMIT)
    command = (in_pool_env(workdir).replace(f"LAW_CONFIG_FILE={ROOT}/law.cfg", f"LAW_CONFIG_FILE={config}")
               + f"law index --quiet && law run TrainTask --workflow htcondor --branches 0 {' '.join(TRAIN)} "
               f"--store {workdir}/ckpt --walltime-margin {MARGIN} "
               f"--poll-interval 0.05 --retries 0 --request-memory 500MB --request-disk 200MB")
    runner = start_in_pool(command, workdir)
    try:
        (job,) = wait_until(lambda: condor_jobs(workdir), 120, "the submitted job")
        runner.wait(timeout=300)
    finally:
        if runner.poll() is None:
            runner.kill()
    law_log = (workdir / "law.log").read_text()
    assert runner.returncode == 0, law_log[-5000:]
    job_id = f"{job['ClusterId']}.{job['ProcId']}"

    # The schedd: one job, started more than once, never held, completed; it carried the limit.
    ad = pool("exec", f"condor_history {job_id} -limit 1 -af AllowedExecuteDuration NumJobStarts "
                      f"NumHolds JobStatus ExitCode").split()
    assert ad[0] == str(LIMIT) and int(ad[1]) >= 2, ad
    assert ad[2] in ("undefined", "0") and ad[3:] == ["4", "0"], ad
    clusters = pool("exec", f"condor_history -constraint '{mine(workdir)}' -af ClusterId").split()
    assert clusters == [str(job["ClusterId"])], clusters
    attempts = submission_attempts(workdir)["attempts"]
    assert not any(int(n) for n in attempts.values()), attempts  # law never resubmitted it

    # HTCondor's job log: every run but the last was requeued, which the submit file's
    # on_exit_remove does for exit 85 only; each ended before the limit, and the requeued
    # ones about --walltime-margin before it, counted from their own start (not an earlier one).
    (user_log,) = [p.read_text() for p in workdir.glob("data/htcondor/TrainTask/*/log*")]
    assert "Job was held" not in user_log, user_log[-3000:]
    runs = run_durations(user_log)
    assert len(runs) >= 2 and runs[-1][1] == "Job terminated.", runs
    assert user_log.count("Job terminated and was requeued") == len(runs) - 1, user_log[-3000:]
    assert all(seconds < LIMIT for seconds, _ in runs), runs
    assert all(LIMIT - MARGIN - 6 <= seconds for seconds, _ in runs[:-1]), runs

    # The last run's own output (HTCondor truncates stdout and stderr at every start): it read
    # the limit from its ad, and resumed.
    out = job_logs(workdir)[0]
    assert re.search(r"resuming from step [1-9]", out), out[-3000:]
    (err,) = [p.read_text(errors="replace") for p in workdir.glob("data/htcondor/TrainTask/*/stderr*")]
    assert "site limits: AllowedExecuteDuration ends the job at" in err, err[-3000:]

    # The store: each stop committed its last step (a stop commit, not the interval's) and the
    # next run resumed exactly there: no work lost to the limit.
    (location,) = workdir.glob("ckpt/TrainTask/*/branch-0")
    timeline = build_timeline(CheckpointStore(str(location)).list())
    assert len(timeline.runs) == len(runs), timeline.runs
    for run, interruption in zip(timeline.runs, timeline.interruptions):
        assert run.points[-1].reason == "site limit", run.points[-1]
        assert interruption.resumed_step == run.points[-1].step and interruption.lost_seconds == 0
        assert interruption.kind == "site limit", interruption  # the job stopped itself: no eviction
    assert timeline.evictions == []

    (model,) = workdir.glob("data/TrainTask/*/branch-0/model.pt")
    assert weights_digest(model) == local_reference(tmp_path, 0, *TRAIN[:4])
