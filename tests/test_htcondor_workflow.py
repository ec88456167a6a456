"""`law run TrainTask --workflow htcondor` on a real HTCondor pool, with evictions.

The pool is Debian 13's minicondor in a chroot (scripts/htcondor_pool.sh); law
runs inside it as the job user, the jobs run the project from this checkout, and
checkpoints go to a real XRootD server on the host's loopback.
"""
from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from conftest import unavailable
from waiting import wait_until
from test_train_task import law_env, weights_digest

ROOT = Path(__file__).resolve().parents[1]
POOL = ROOT / "scripts" / "htcondor_pool.sh"
POOL_DIR = Path(os.environ.get("CKPT_TASKS_POOL_DIR", "/var/cache/ckpt_tasks/htcondor-pool"))
JOB_USER = "ckptuser"


def pool(*args: str, timeout: float = 120, check: bool = True, env: dict | None = None) -> str:
    result = subprocess.run(["bash", str(POOL), *args], capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"htcondor_pool.sh {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result.stdout


@pytest.fixture(scope="module")
def htcondor_pool():
    if os.geteuid() != 0:
        unavailable("the HTCondor test pool needs root (chroot, mounts)")
    started = subprocess.run(["bash", str(POOL), "start"], capture_output=True, text=True, timeout=300)
    if started.returncode != 0:
        unavailable(f"the HTCondor pool does not start (build it with scripts/htcondor_pool.sh build):\n"
                    f"{started.stdout[-2000:]}\n{started.stderr[-2000:]}")
    yield


@pytest.fixture
def workdir():
    """A folder inside the checkout (so the chroot sees it), writable by the job user."""
    path = ROOT / ".pool-tmp" / uuid.uuid4().hex[:8]
    (path / "data").mkdir(parents=True)
    user = pwd.getpwnam(JOB_USER)
    for directory in (path, path / "data"):
        os.chown(directory, user.pw_uid, user.pw_gid)
    yield path
    # Nothing a failed test left may run on; jobs of others sharing the pool are left alone.
    pool("exec", f"condor_rm -constraint '{mine(path)}'", check=False)
    shutil.rmtree(path, ignore_errors=True)


def in_pool_env(workdir: Path) -> str:
    """Shell exports for law inside the pool."""
    return (f"export CKPT_TASKS_ROOT={ROOT} CKPT_TASKS_DATA={workdir}/data LAW_HOME={workdir}/law "
            f"LAW_CONFIG_FILE={ROOT}/law.cfg PYTHONPATH={ROOT} PATH={ROOT}/.venv/bin:$PATH; cd {ROOT}; ")


def start_in_pool(command: str, workdir: Path) -> subprocess.Popen:
    """Run ``command`` in the pool in the background; its output goes to workdir/law.log
    (a pipe nobody reads while law polls for minutes would fill up and block it)."""
    with open(workdir / "law.log", "w") as log:
        return subprocess.Popen(["bash", str(POOL), "exec", command], stdout=log, stderr=subprocess.STDOUT)


def mine(workdir: Path) -> str:
    """A ClassAd constraint: the jobs of the workflow in ``workdir`` (law sets their initialdir
    there), not those of others sharing the pool."""
    return f'regexp("^{workdir}/", Iwd)'


def condor_jobs(workdir: Path, constraint: str = "true") -> list[dict]:
    out = pool("exec", f"condor_q -allusers -constraint '({constraint}) && {mine(workdir)}' -json "
                       "-attributes ClusterId,ProcId,JobStatus,NumJobStarts,CheckpointNumber")
    return json.loads(out) if out.strip() else []


def local_reference(tmp_path: Path, branch: int, *args: str) -> str:
    data = tmp_path / f"reference-{branch}"
    # HTCondor sets OMP_NUM_THREADS to the job's request_cpus (1); with another thread
    # count, float reductions run in another order and the weights differ in the last bits.
    env = {**law_env(data), "OMP_NUM_THREADS": "1"}
    subprocess.run([str(ROOT / ".venv" / "bin" / "law"), "run", "TrainTask", "--branch", str(branch), *args],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    (model,) = data.glob(f"TrainTask/*/branch-{branch}/model.pt")
    return weights_digest(model)


def job_logs(workdir: Path) -> dict[int, str]:
    """stdout of every job, by branch, read from the workflow's output directory."""
    logs = {}
    for path in workdir.glob("data/htcondor/TrainTask/*/stdout*"):
        match = re.search(r"_(\d+)To\d+", path.name)
        if match:
            logs[int(match.group(1))] = path.read_text(errors="replace")
    return logs


def assert_resumed_in_a_new_sandbox(log: str) -> None:
    """The job's last start came after an eviction (NumJobStarts >= 1 in the new sandbox's
    job ad) and resumed from a checkpoint above step 0."""
    starts = [int(n) for n in re.findall(r"NumJobStarts = (\d+)", log)]
    assert starts and max(starts) >= 1, log[-3000:]
    after = log[log.rindex(f"NumJobStarts = {max(starts)}"):]
    resumed = [int(n) for n in re.findall(r"resuming from step (\d+)", after)]
    assert resumed and resumed[0] > 0, log[-3000:]


def submission_attempts(workdir: Path) -> dict:
    (submission,) = workdir.glob("data/htcondor/TrainTask/*/htcondor_jobs_*.json")
    data = json.loads(submission.read_text())
    return data


TRAIN = ("--epochs", "3", "--checkpoint-every", "10", "--step-delay", "0.05")


def test_generated_submit_file_passes_condor_submit_dry_run(htcondor_pool, workdir):
    """HTCondor itself parses the submit file the workflow generates (both modes)."""
    script = (in_pool_env(workdir) + "python - <<'EOF'\n"
              "from workflows.train import TrainTask\n"
              "from luigi.cmdline_parser import CmdlineParser\n"
              "from law.job.dashboard import NoJobDashboard\n"
              "for mode in ('store', 'spool'):\n"
              "    with CmdlineParser.global_instance(['TrainTask', '--workflow', 'htcondor']):\n"
              "        task = TrainTask(workflow='htcondor', checkpoint_mode=mode, request_gpus=1)\n"
              "        proxy = task.workflow_proxy\n"
              "        proxy.job_file_factory = proxy.create_job_file_factory()\n"
              "        proxy.dashboard = NoJobDashboard()\n"
              "        print('JOBFILE', proxy.create_job_file(0, [0])['job'])\n"
              "EOF\n")
    out = pool("exec", script)
    job_files = re.findall(r"JOBFILE (\S+)", out)
    assert len(job_files) == 2, out
    ads = []
    for job_file in job_files:
        directory = os.path.dirname(job_file)
        ads.append(pool("exec", f"cd {directory} && condor_submit -dry-run - {job_file}"))
    store_ad, spool_ad = ({k: v for k, v in re.findall(r"^(\w+) ?= ?(.*)$", ad, re.M)} for ad in ads)
    for ad in (store_ad, spool_ad):
        assert ad["RequestGPUs"] == "1" and ad["KillSig"] == '"SIGTERM"', ad
        assert ad["RequestMemory"] and ad["RequestDisk"]
    assert "SuccessCheckpointExitCode" not in store_ad
    assert spool_ad["SuccessCheckpointExitCode"] == "85"
    assert spool_ad["TransferCheckpoint"] == '"ckpt_spool"'
    assert spool_ad["PreserveRelativePaths"] == "true"


def render_job_files(mode: str, *args: str) -> tuple[str, str, list[str]]:
    """The submit file and job script that the workflow makes for branch 0, and the job's
    ``law run`` arguments; built here, as law does at submission, without a pool."""
    import base64
    import shlex

    from law.job.dashboard import NoJobDashboard
    from luigi.cmdline_parser import CmdlineParser

    import workflows.train  # noqa: F401  (registers TrainTask)

    with CmdlineParser.global_instance(["TrainTask", "--workflow", "htcondor", "--checkpoint-mode", mode, *args]) \
            as parser:
        proxy = parser.get_task_obj().workflow_proxy
        proxy.job_file_factory = proxy.create_job_file_factory()
        proxy.dashboard = NoJobDashboard()
        submit = Path(proxy.create_job_file(0, [0])["job"])
    (script,) = submit.parent.glob("job_*.sh")
    arguments = re.search(r"^arguments = \S+ \S+ (\S+)", submit.read_text(), re.M).group(1)
    return submit.read_text(), script.read_text(), shlex.split(base64.b64decode(arguments).decode())


def test_the_job_script_gets_the_spool_directory_rendered_in(tmp_path, monkeypatch):
    from ckpt_tasks.htcondor.workflow import SPOOL_DIR

    monkeypatch.setenv("CKPT_TASKS_DATA", str(tmp_path))
    submit, script, arguments = render_job_files("spool")
    assert "{{" not in script and f'mkdir -p "{SPOOL_DIR}"' in script
    assert f"transfer_checkpoint_files = {SPOOL_DIR}" in submit
    assert f"--store=$_CONDOR_SCRATCH_DIR/{SPOOL_DIR}" in arguments
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_jobs_get_the_store_resolved_at_submission(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_TASKS_DATA", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    _, _, arguments = render_job_files("store", "--store", "relative/ckpt")
    # a job starts in its own sandbox: a relative path there would be another directory
    assert f"--store={tmp_path}/relative/ckpt" in arguments, arguments


@pytest.mark.xrootd
def test_store_mode_survives_graceful_and_hard_evictions_bit_identically(htcondor_pool, workdir, tmp_path,
                                                                        make_xrootd_server):
    server = make_xrootd_server()
    store = f"{server.url}//ckpt"
    command = (in_pool_env(workdir) + f"law index --quiet && law run TrainTask --workflow htcondor "
               f"--branches 0,1 {' '.join(TRAIN)} --store {store} --poll-interval 0.05 --retries 0 "
               f"--request-memory 500MB --request-disk 200MB")
    runner = start_in_pool(command, workdir)
    try:
        def checkpoint_of(branch: int, above: int = 0):
            found = [int(m.group(1)) for p in server.data_dir.glob(f"ckpt/TrainTask/*/branch-{branch}/*.json")
                     if (m := re.match(r"step-(\d+)-", p.name))]
            return max(found) if found and max(found) > above else None

        wait_until(lambda: checkpoint_of(0, 10) and checkpoint_of(1, 10), 180, "checkpoints of both branches")
        wait_until(lambda: len(condor_jobs(workdir, "JobStatus == 2")) == 2, 60, "two running jobs")
        ids = sorted(f"{j['ClusterId']}.{j['ProcId']}" for j in condor_jobs(workdir))
        assert len(ids) == 2, ids
        # graceful eviction of one job, hard kill of the other
        pool("exec", f"condor_vacate_job {ids[0]}")
        pool("exec", f"condor_vacate_job -fast {ids[1]}")
        runner.wait(timeout=600)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.returncode == 0, (workdir / "law.log").read_text()[-5000:]

    logs = job_logs(workdir)
    assert set(logs) == {0, 1}, logs.keys()
    for log in logs.values():
        assert_resumed_in_a_new_sandbox(log)
    # With --retries 0 the workflow fails on the first job law reads as failed. It succeeded:
    # law never resubmitted a job, so no branch ever had two jobs, let alone at once.
    submission = submission_attempts(workdir)
    assert not any(int(n) for n in submission["attempts"].values()), submission["attempts"]
    assert sorted(b for job in submission["jobs"].values() for b in job["branches"]) == [0, 1]

    for branch in (0, 1):
        (model,) = workdir.glob(f"data/TrainTask/*/branch-{branch}/model.pt")
        assert weights_digest(model) == local_reference(tmp_path, branch, *TRAIN[:4])


def test_spool_mode_resumes_from_the_checkpoint_htcondor_transferred(htcondor_pool, workdir, tmp_path):
    command = (in_pool_env(workdir) + f"law index --quiet && law run TrainTask --workflow htcondor "
               f"--branches 2 {' '.join(TRAIN)} --checkpoint-mode spool --checkpoint-exit-interval 2 "
               f"--poll-interval 0.05 --retries 0 --request-memory 500MB --request-disk 200MB")
    runner = start_in_pool(command, workdir)
    try:
        # Wait until HTCondor has spooled a checkpoint (CheckpointNumber counts the uploads
        # after exit 85), then evict: the job starts again in a new, empty sandbox.
        def spooled_and_running():
            return [j for j in condor_jobs(workdir, "JobStatus == 2 && CheckpointNumber >= 1")]

        (job,) = wait_until(spooled_and_running, 180, "a spooled checkpoint")
        pool("exec", f"condor_vacate_job {job['ClusterId']}.{job['ProcId']}")
        runner.wait(timeout=600)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.returncode == 0, (workdir / "law.log").read_text()[-5000:]
    log = job_logs(workdir)[2]
    assert_resumed_in_a_new_sandbox(log)
    (model,) = workdir.glob("data/TrainTask/*/branch-2/model.pt")
    assert weights_digest(model) == local_reference(tmp_path, 2, *TRAIN[:4])


def test_jobs_get_the_submitters_proxy_and_one_cpu_per_rank(tmp_path, monkeypatch, test_pki):
    monkeypatch.setenv("CKPT_TASKS_DATA", str(tmp_path))
    proxy = test_pki.proxy(test_pki.user("submitter"), tmp_path / "x509up_test")
    monkeypatch.setenv("X509_USER_PROXY", str(proxy))
    submit, _, _ = render_job_files("store", "--ranks", "2")
    assert f"x509userproxy = {proxy}" in submit
    assert re.search(r"^request_cpus = 2$", submit, re.M), submit
    # store mode: a voluntary exit 85 requeues the job instead of ending it as failed
    assert "on_exit_remove = (ExitBySignal =?= true) || (ExitCode =!= 85)" in submit
    assert "PRIVATE KEY" not in submit
    monkeypatch.setenv("X509_USER_PROXY", str(tmp_path / "missing"))
    submit, _, _ = render_job_files("store")
    assert "x509userproxy" not in submit and re.search(r"^request_cpus = 1$", submit, re.M)


def test_a_local_store_is_refused_where_workers_do_not_share_the_file_system(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_TASKS_DATA", str(tmp_path))
    with pytest.raises(ValueError, match="--store=.* is a local path, but --software=bundle"):
        render_job_files("store", "--software", "bundle", "--store", str(tmp_path / "ckpt"))
