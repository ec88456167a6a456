"""Spool mode's SIGTERM save, held jobs and crash loops on the real HTCondor pool.

The pool is the chroot of scripts/htcondor_pool.sh (see test_htcondor_workflow.py);
holds are made on purpose with ``periodic_hold`` expressions, which give each test the
hold it needs at the moment it needs it (the site limit itself: test_walltime_pool.py).
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from test_htcondor_workflow import (POOL_DIR, ROOT, assert_resumed_in_a_new_sandbox, condor_jobs,  # noqa: F401
                                    htcondor_pool, in_pool_env, job_logs, local_reference, mine, pool,
                                    render_job_files, start_in_pool, workdir)
from test_train_task import weights_digest

from ckpt_tasks.history import build_timeline
from ckpt_tasks.storage.store import CheckpointStore
from waiting import wait_until

# 4 epochs of 45 steps at 0.2 s: long enough to evict the job in the middle of it.
SLOW = ("--epochs", "4", "--checkpoint-every", "10", "--step-delay", "0.2")
SHORT = ("--epochs", "2", "--checkpoint-every", "10", "--step-delay", "0.2")


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


# -- hold reasons, crash loops and resubmissions, without a pool ----------------------------------

@pytest.mark.parametrize("code, subcode, temporary", [
    (13, 110, True),   # input transfer: connection timed out
    (12, 0, True),     # output transfer, no errno from the plugin
    (13, 2, False),    # input file missing
    (12, 13, False),   # output not writable
    (21, 0, True),     # the machine held it
    (47, 0, True),     # allowed_execute_duration: resumes from its checkpoint
    (3, 86, False),    # policy expression (our crash-loop hold)
    (34, 0, False),    # out of resources: it would meet them again
    (46, 0, False),    # allowed_job_duration
    (1, 0, False),     # condor_hold by a person
    (None, None, False),
])
def test_hold_reasons_are_temporary_or_permanent(code, subcode, temporary):
    from ckpt_tasks.htcondor.holds import classify_hold

    hold = classify_hold(code, subcode, " why ")
    assert hold.temporary is temporary and hold.reason == "why"
    assert ("temporary" if temporary else "permanent, not resubmitted") in hold.describe()


def checkpoint_by(job_id: str | None, starts: int | None, step: int = 10, completions: int | None = None):
    from ckpt_tasks.storage.store import Checkpoint

    job = None if job_id is None else {"job_id": job_id, "num_job_starts": starts}
    if completions is not None:
        job["num_job_completions"] = completions
    return Checkpoint(step=step, name="x", size=1, adler32="1", created="", path="x",
                      metadata={"lineage": {"htcondor": job}})


def test_starts_without_progress():
    from ckpt_tasks.htcondor.holds import starts_without_progress

    me = {"job_id": "7.0", "num_job_starts": 3}
    assert starts_without_progress(None, None) is None
    assert starts_without_progress({"job_id": "7.0", "num_job_starts": None}, None) is None
    assert starts_without_progress(me, None) == 3                      # never committed
    assert starts_without_progress(me, checkpoint_by("7.0", 1)) == 2   # committed at start 1
    assert starts_without_progress(me, checkpoint_by("7.0", 3)) == 0   # this very start committed
    assert starts_without_progress(me, checkpoint_by("6.0", 5)) == 3   # an earlier job's checkpoint
    assert starts_without_progress(me, checkpoint_by(None, None)) == 3


def test_only_requeued_exits_without_progress_are_crash_restarts():
    from ckpt_tasks.htcondor.holds import crash_restarts

    assert crash_restarts(None, None) is None
    # three earlier starts, all evicted or held and released (no requeued exit): no crash
    assert crash_restarts({"job_id": "7.0", "num_job_starts": 3, "num_holds": 1}, None) == 0
    # three earlier starts, two of them ended by exits HTCondor requeued, nothing committed
    failing = {"job_id": "7.0", "num_job_starts": 3, "num_job_completions": 2}
    assert crash_restarts(failing, None) == 2
    assert crash_restarts(failing, checkpoint_by("6.0", 5, completions=0)) == 2  # another job's commit
    # committed at start 1 (after 0 requeued exits): its own exit 85 is no crash, the next one is
    assert crash_restarts(failing, checkpoint_by("7.0", 1, completions=0)) == 1
    assert crash_restarts(failing, checkpoint_by("7.0", 2, completions=1)) == 0
    assert crash_restarts(failing, checkpoint_by("7.0", 1)) == 1  # a lineage written before the counter


def test_released_exit_holds_are_no_crash_restarts():
    # As the test pool's schedd counts a job that exited 86 under on_exit_hold: NumJobCompletions 1
    # and NumHolds 1 (seen with condor_q after `exit 86`). Released by a person, it is no crash.
    from ckpt_tasks.htcondor.holds import crash_restarts

    held_then_released = {"job_id": "7.0", "num_job_starts": 2, "num_job_completions": 1, "num_holds": 1}
    assert crash_restarts(held_then_released, None) == 0
    # three credential holds (exit 88) released, then two real crashes: two
    renewed = {"job_id": "7.0", "num_job_starts": 6, "num_job_completions": 5, "num_holds": 3}
    assert crash_restarts(renewed, None) == 2


def test_an_eviction_during_start_up_is_no_crash_restart(tmp_path, monkeypatch):
    # The ads HTCondor (23.9, test pool) writes into the sandbox at the next start: after
    # two vacates (one graceful, one -fast) and after a hold and a release, NumJobStarts grew
    # but NumJobCompletions did not; after two exits requeued by on_exit_remove it did.
    from ckpt_tasks import jobenv
    from ckpt_tasks.htcondor.holds import crash_restarts

    def identity(text: str) -> dict:
        ad = tmp_path / f"{len(list(tmp_path.iterdir()))}.job.ad"
        ad.write_text(f"ClusterId = 7\nProcId = 0\n{text}\n")
        monkeypatch.setenv("_CONDOR_JOB_AD", str(ad))
        return jobenv.current().identity()

    evicted = identity("NumJobStarts = 2\nNumJobCompletions = 0\nLastVacateTime = 1796181468")
    released = identity("NumJobStarts = 3\nNumJobCompletions = 0\nNumHolds = 1")
    requeued = identity("NumJobStarts = 2\nNumJobCompletions = 2\nExitCode = 85")
    assert (evicted["num_job_starts"], evicted["num_job_completions"]) == (2, 0)
    assert crash_restarts(evicted, None) == 0 and crash_restarts(released, None) == 0
    assert crash_restarts(requeued, None) == 2


def test_resubmission_removes_the_old_job_first_and_skips_permanent_holds(monkeypatch):
    from law.workflow.remote import BaseRemoteWorkflowProxy

    from ckpt_tasks.htcondor.holds import CheckpointingWorkflowProxy

    calls = []

    class Manager:
        def cancel(self, job_ids, silent=False):
            calls.append(("condor_rm", sorted(job_ids)))

    class JobData:
        dummy_job_id = "dummy"
        jobs = {1: {"job_id": "11.0", "branches": [0], "extra": {}},
                2: {"job_id": "12.0", "branches": [1], "extra": {"hold": {
                    "code": 34, "subcode": 0, "reason": "memory", "temporary": False}}},
                3: {"job_id": "dummy", "branches": [2], "extra": {}}}

    monkeypatch.setattr(BaseRemoteWorkflowProxy, "submit",
                        lambda self, retry_jobs=None: calls.append(("submit", sorted(retry_jobs or {}))))
    proxy = object.__new__(CheckpointingWorkflowProxy)
    proxy.job_data, proxy.job_manager = JobData(), Manager()
    proxy.submit({1: [0], 2: [1], 3: [2]})
    # job 11.0 is removed before its branch goes in again; the permanently held 12.0 stays
    # held and its branch is not resubmitted; a job that never got an id has nothing to remove
    assert calls == [("condor_rm", ["11.0"]), ("submit", [1, 3])]
    calls.clear()
    proxy.submit(None)
    assert calls == [("submit", [])]


# -- a hold and a release, a crash loop held: on the pool ------------------------------------------

FLAKY_SERVER = """
import http.server, os, sys
flag = sys.argv[2]
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # 503 until the flag file exists: a storage that is down for a while
        body = b"hello from the input\\n"
        self.send_response(200 if os.path.exists(flag) else 503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if os.path.exists(flag):
            self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


@pytest.fixture
def flaky_http(tmp_path):
    """An HTTP server on the loopback that answers 503 until ``flag`` exists."""
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    flag = tmp_path / "up"
    server = subprocess.Popen([sys.executable, "-c", FLAKY_SERVER, str(port), str(flag)])
    yield port, flag
    server.kill()
    server.wait()


def test_a_temporary_hold_is_pending_for_the_workflow_and_released(htcondor_pool, workdir, flaky_http):
    import json
    import os
    import pwd

    from ckpt_tasks.htcondor.holds import submit_commands

    port, flag = flaky_http
    jobdir = workdir / "hold"  # the jobs of the workdir are those with an Iwd below it
    jobdir.mkdir()
    (jobdir / "job.sh").write_text("#!/bin/bash\ncat input.txt\n")
    (jobdir / "job.sh").chmod(0o755)
    policy = "\n".join(f"{key} = {value}" for key, value in submit_commands(delay=1))
    (jobdir / "job.sub").write_text(
        f"executable = job.sh\ntransfer_input_files = http://127.0.0.1:{port}/input.txt\n"
        f"should_transfer_files = YES\noutput = out.txt\nerror = err.txt\nlog = log.txt\n"
        f"request_memory = 100MB\nrequest_disk = 100MB\n{policy}\nqueue\n")
    user = pwd.getpwnam("ckptuser")
    for path in (jobdir, *jobdir.iterdir()):
        os.chown(path, user.pw_uid, user.pw_gid)
    out = pool("exec", f"cd {jobdir} && condor_submit job.sub")
    cluster = int(re.search(r"submitted to cluster (\d+)", out).group(1))

    def held():
        return condor_jobs(workdir, "JobStatus == 5")

    wait_until(held, 120, "the input transfer to fail and the job to be held")
    codes = pool("exec", f"condor_q {cluster}.0 -af HoldReasonCode HoldReasonSubCode").split()
    assert codes[0] == "13", codes  # a real input transfer failure (HTTP 503)
    # the workflow's job manager reads this hold as temporary: the job is pending, not failed
    query = pool("exec", f"cd {ROOT} && .venv/bin/python -c 'import json; "
                         f"from ckpt_tasks.htcondor.workflow import CheckpointingJobManager as M; "
                         f"print(json.dumps(M().query(\"{cluster}.0\")))'")
    status = json.loads(query.strip().splitlines()[-1])
    assert status["status"] == "pending" and status["extra"]["hold"]["temporary"] is True, status
    flag.touch()  # the storage is back; periodic_release (evaluated every 60 s here) lets it run
    wait_until(lambda: not condor_jobs(workdir), 240, "the released job to complete")
    assert (jobdir / "out.txt").read_text() == "hello from the input\n"
    log = (jobdir / "log.txt").read_text()
    assert "Job was held" in log and "Job was released" in log, log


def test_evictions_during_start_up_are_no_crash_loop(htcondor_pool, workdir):
    # Two evictions while the job starts (a graceful vacate, then a hard one), before any
    # training step: with --crash-loop-starts 2 the third start must train on, not be held.
    command = (in_pool_env(workdir) + f"law index --quiet && law run TrainTask --workflow htcondor "
               f"--branches 1 {' '.join(SHORT)} --store {workdir}/ckpt --crash-loop-starts 2 "
               f"--poll-interval 0.05 --retries 0 --request-memory 500MB --request-disk 200MB")
    runner = start_in_pool(command, workdir)
    try:
        for start, how in ((1, ""), (2, "-fast ")):
            (job,) = wait_until(lambda: condor_jobs(workdir, f"JobStatus == 2 && NumJobStarts >= {start}"),
                                180, f"job start {start}")
            pool("exec", f"condor_vacate_job {how}{job['ClusterId']}.{job['ProcId']}")
        runner.wait(timeout=600)
    finally:
        if runner.poll() is None:
            runner.kill()
    law_log = (workdir / "law.log").read_text()
    assert runner.returncode == 0, law_log[-3000:]
    ad = pool("exec", f"condor_history {job['ClusterId']}.{job['ProcId']} -limit 1 -af NumJobStarts "
                      f"NumHolds JobStatus").split()
    assert int(ad[0]) >= 3 and ad[1] in ("undefined", "0") and ad[2] == "4", ad  # never held, completed
    # the third start saw its two starts without a commit, and no failure among them
    outputs = "".join(path.read_text(errors="replace") for path in workdir.glob("data/htcondor/TrainTask/*/std*"))
    assert "crash loop" not in outputs, outputs[-3000:]
    assert "2 starts since its last commit, 0 of them after a failure (the limit is 2)" in outputs, outputs[-3000:]


def site_config_retrying_failures(workdir: Path) -> Path:
    """law.cfg with a site's policy that restarts a failed job in place (``on_exit_remove``,
    as ``max_retries`` does), so a job that fails at every start loops inside one job."""
    text = (ROOT / "law.cfg").read_text()
    assert "[ckpt_tasks_htcondor]\n" in text
    config = workdir / "law.cfg"
    section = "[ckpt_tasks_htcondor]\n"
    config.write_text(text.replace(section, section + "on_exit_remove: ExitCode =?= 0\n"))
    return config


def test_a_crash_loop_is_held_and_not_resubmitted(htcondor_pool, workdir):
    # A real failure at every start (--device cuda on a worker without CUDA: create_state
    # raises); the site's policy requeues the failed job. The third start finds 2 crash
    # restarts without a checkpoint and exits 86, which the submit file holds.
    config = site_config_retrying_failures(workdir)
    command = (in_pool_env(workdir).replace(f"LAW_CONFIG_FILE={ROOT}/law.cfg", f"LAW_CONFIG_FILE={config}")
               + f"law index --quiet && law run TrainTask --workflow htcondor --branches 1 {' '.join(SLOW)} "
               f"--device cuda --store {workdir}/ckpt --crash-loop-starts 2 "
               f"--poll-interval 0.05 --retries 1 --request-memory 500MB --request-disk 200MB")
    runner = start_in_pool(command, workdir)
    try:
        (job,) = wait_until(lambda: condor_jobs(workdir, "JobStatus == 5"), 400, "the crash-loop hold")
        runner.wait(timeout=300)
    finally:
        if runner.poll() is None:
            runner.kill()
    law_log = (workdir / "law.log").read_text()
    assert runner.returncode != 0, law_log[-3000:]
    ad = pool("exec", f"condor_q {job['ClusterId']}.{job['ProcId']} -af HoldReasonCode HoldReasonSubCode "
                      f"NumJobStarts NumJobCompletions").split()
    assert ad[:2] == ["3", "86"] and int(ad[2]) >= 3 and int(ad[3]) >= 2, ad
    # reported with the reason, and never submitted again (one job in the queue and history)
    assert "crash loop" in law_log and "permanent, not resubmitted" in law_log, law_log[-3000:]
    clusters = pool("exec", f"condor_history -constraint '{mine(workdir)}' -af ClusterId; "
                            f"condor_q -allusers -constraint '{mine(workdir)}' -af ClusterId").split()
    assert set(clusters) == {str(job["ClusterId"])}, clusters
    # the job said why, in its own output
    outputs = "".join(path.read_text(errors="replace") for path in workdir.glob("data/htcondor/TrainTask/*/std*"))
    assert "crash loop: job" in outputs and "restarted 2 times after failing" in outputs, outputs[-3000:]
    # HTCondor's job log: the earlier runs failed (law's exit code of an exception in a task, 40)
    # and the site's policy requeued them
    user_log = "".join(path.read_text(errors="replace") for path in workdir.glob("data/htcondor/TrainTask/*/log*"))
    assert user_log.count("Job terminated and was requeued") >= 2, user_log[-3000:]
    assert user_log.count("Normal termination (return value 40)") >= 2, user_log[-3000:]


def test_status_of_a_four_branch_workflow_with_one_branch_held(htcondor_pool, workdir):
    import json

    command = (in_pool_env(workdir) + f"law index --quiet && law run TrainTask --workflow htcondor "
               f"--branches 0,1,2,3 --epochs 3 --checkpoint-every 10 --step-delay 0.1 --store {workdir}/ckpt "
               f"--poll-interval 0.05 --retries 1 --request-memory 500MB --request-disk 200MB")
    runner = start_in_pool(command, workdir)
    try:
        def submitted():
            for path in workdir.glob("data/htcondor/TrainTask/*/htcondor_jobs_*.json"):
                jobs = json.loads(path.read_text()).get("jobs", {}).values()
                ids = {b: j["job_id"] for j in jobs for b in j["branches"] if re.match(r"\d+\.\d", str(j["job_id"]))}
                if len(ids) == 4:
                    return ids
            return None

        ids = wait_until(submitted, 180, "four submitted jobs")
        pool("exec", f"condor_hold {ids[3]}")
        # branch 0 is evicted hard once: the schedd counts it, whatever the store saw of it
        cluster0 = ids[0].split(".")[0]
        wait_until(lambda: condor_jobs(workdir, f"ClusterId == {cluster0} && JobStatus == 2"), 240,
                   "branch 0 running")
        pool("exec", f"condor_vacate_job -fast {ids[0]}")
        wait_until(lambda: [j["JobStatus"] for j in condor_jobs(workdir)] == [5], 300,
                   "branches 0-2 done, branch 3 held")
        (jobs_dir,) = {p.parent for p in workdir.glob("data/htcondor/TrainTask/*/htcondor_jobs_*.json")}
        (location,) = workdir.glob("ckpt/TrainTask/*")
        out = pool("exec", f"cd {ROOT} && .venv/bin/python -m ckpt_tasks.cli status {location} "
                           f"--jobs {jobs_dir} --total 135 --json")
        text = pool("exec", f"cd {ROOT} && .venv/bin/python -m ckpt_tasks.cli status {location} "
                            f"--jobs {jobs_dir} --total 135")
        runner.wait(timeout=120)
    finally:
        if runner.poll() is None:
            runner.kill()
    rows = {row["branch"]: row for row in json.loads(out)}
    assert sorted(rows) == [0, 1, 2, 3], out
    for branch in (0, 1, 2):
        # the newest checkpoint is the last one before the training's end (135 steps)
        assert rows[branch]["step"] >= 130 and rows[branch]["job_state"] == "completed", rows[branch]
        assert rows[branch]["job_id"] == ids[branch] and rows[branch]["goodput"] is not None
        # the schedd's counters: CommittedTime is the run time not lost to evictions
        assert 0 < rows[branch]["committed_seconds"] <= rows[branch]["wall_seconds"], rows[branch]
    assert rows[0]["job_starts"] >= 2 and rows[0]["job_evictions"] == 1 and rows[0]["evictions"] >= 1, rows[0]
    assert rows[0]["committed_seconds"] < rows[0]["wall_seconds"], rows[0]  # the evicted run's time is lost
    assert rows[1]["job_evictions"] == 0 and rows[1]["job_starts"] == 1, rows[1]
    held = rows[3]
    assert held["job_state"] == "held" and held["hold_temporary"] is False, held
    assert "condor_hold" in held["hold_reason"] and "code 1/" in held["hold_reason"], held
    assert "/135 (9" in text and "held by the user" in text, text
    # the workflow did not resubmit the held branch: its only job is still the held one
    assert [f"{j['ClusterId']}.{j['ProcId']}" for j in condor_jobs(workdir)] == [ids[3]]


def test_a_spooled_checkpoint_survives_a_hold_and_release(htcondor_pool, workdir, tmp_path):
    # A hold kills the job at once (no SIGTERM); released, it starts in a new sandbox from
    # what HTCondor spooled at its last checkpoint exit.
    command = (in_pool_env(workdir) + f"law index --quiet && law run TrainTask --workflow htcondor "
               f"--branches 0 {' '.join(SHORT)} --checkpoint-mode spool --checkpoint-exit-interval 6 "
               f"--poll-interval 0.05 --retries 0 --request-memory 500MB --request-disk 200MB")
    runner = start_in_pool(command, workdir)
    try:
        (job,) = wait_until(lambda: condor_jobs(workdir, "JobStatus == 2 && CheckpointNumber >= 1"), 180,
                            "a spooled checkpoint")
        job_id = f"{job['ClusterId']}.{job['ProcId']}"
        pool("exec", f"condor_hold {job_id}")
        wait_until(lambda: condor_jobs(workdir, "JobStatus == 5"), 60, "the hold")
        pool("exec", f"condor_release {job_id}")
        wait_until(lambda: not condor_jobs(workdir), 400, "the released job to complete")
    finally:
        if runner.poll() is None:
            runner.kill()
    log = job_logs(workdir)[0]
    assert "NumJobStarts = 1" in log, log  # the release started it in a new sandbox
    assert_resumed_in_a_new_sandbox(log)
    (model,) = workdir.glob("data/TrainTask/*/branch-0/model.pt")
    assert weights_digest(model) == local_reference(tmp_path, 0, *SHORT[:4])
