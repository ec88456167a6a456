"""The job environment: scratch directory, sandbox, job identity, the job ad (parsed by classad2)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from ckpt_tasks import jobenv
from ckpt_tasks.errors import JobAdError

AD = ('ClusterId = 4711\nProcId = 3\nNumJobStarts = 2\nGlobalJobId = "schedd.example#4711.3#17"\n'
      "JobCurrentStartDate = 1750000400\nLastVacateTime = 1750000350\n")


@pytest.fixture
def plain(monkeypatch):
    monkeypatch.delenv("_CONDOR_SCRATCH_DIR", raising=False)
    monkeypatch.delenv("_CONDOR_JOB_AD", raising=False)


def test_a_plain_process(plain, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = jobenv.current()
    assert env.batch_system is None and env.scratch is None and env.job_ad_path is None
    assert env.sandbox == tmp_path == jobenv.sandbox_dir() and jobenv.scratch_dir() is None
    assert env.identity() is None
    workdir = env.make_workdir("ckpt-")
    assert workdir.parent == Path(tempfile.gettempdir())
    workdir.rmdir()
    with pytest.raises(JobAdError, match="not running inside an HTCondor job"):
        env.job_ad()


def test_inside_an_htcondor_job(plain, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / ".job.ad").write_text(AD)
    monkeypatch.setenv("_CONDOR_SCRATCH_DIR", str(scratch))
    monkeypatch.setenv("_CONDOR_JOB_AD", str(scratch / ".job.ad"))
    monkeypatch.chdir(tmp_path)  # the sandbox is the scratch directory, not the cwd
    env = jobenv.current()
    assert env.batch_system == "htcondor" and env.sandbox == scratch == jobenv.scratch_dir()
    workdir = env.make_workdir("ckpt-")
    assert workdir.parent == scratch and workdir.name.startswith("ckpt-")
    assert env.identity() == {"job_id": "4711.3", "cluster_id": 4711, "proc_id": 3, "num_job_starts": 2,
                              "global_job_id": "schedd.example#4711.3#17",
                              "job_current_start_date": 1750000400, "last_vacate_time": 1750000350}
    assert env.job_ad().get("globaljobid") == "schedd.example#4711.3#17"  # names are case-insensitive


def test_the_identity_follows_a_rewritten_ad(plain, tmp_path, monkeypatch):
    """HTCondor writes a new ad when the job starts again in the same sandbox."""
    ad = tmp_path / ".job.ad"
    ad.write_text(AD)
    monkeypatch.setenv("_CONDOR_JOB_AD", str(ad))
    assert jobenv.current().identity()["num_job_starts"] == 2
    ad.write_text(AD.replace("NumJobStarts = 2", "NumJobStarts = 3"))
    os.utime(ad, (os.stat(ad).st_atime, os.stat(ad).st_mtime + 5))
    assert jobenv.current().identity()["num_job_starts"] == 3


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_an_unreadable_ad_gives_no_identity_and_a_warning(plain, tmp_path, monkeypatch, caplog, kind):
    ad = tmp_path / f"{kind}.ad"
    if kind == "directory":
        ad.mkdir()
    monkeypatch.setenv("_CONDOR_JOB_AD", str(ad))
    with caplog.at_level(logging.WARNING, logger="ckpt_tasks.jobenv"):
        assert jobenv.current().identity() is None
    assert f"cannot read the job ad {ad}" in caplog.text
    with pytest.raises(JobAdError, match="cannot (read|parse) the job ClassAd"):
        jobenv.current().job_ad()


def test_the_job_environment_imports_neither_law_nor_the_storage():
    # ckpt_tasks/__init__ imports the Checkpointer, and with it the storage: load the
    # package without its __init__ to see what the job environment itself imports.
    code = textwrap.dedent("""
        import importlib.util, sys, types
        package = types.ModuleType("ckpt_tasks")
        package.__path__ = importlib.util.find_spec("ckpt_tasks").submodule_search_locations
        sys.modules["ckpt_tasks"] = package
        import ckpt_tasks.jobenv
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("law", "luigi", "torch")
                     or m.startswith(("ckpt_tasks.storage", "ckpt_tasks.htcondor", "ckpt_tasks.tasks"))))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
