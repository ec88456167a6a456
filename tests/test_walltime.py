"""A site's time limit in the job ad: `law run` commits and exits 85 before it, and resumes."""
from __future__ import annotations

import re
import time

from ckpt_tasks.storage.store import CheckpointStore
from test_train_task import ARGS, LawRun, law_index, model_file, run_to_end, uninterrupted, weights_digest  # noqa: F401


def test_exit_85_before_the_site_limit_then_resume_bit_identically(tmp_path, monkeypatch, uninterrupted):
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    ad = sandbox / ".job.ad"
    # CERN-style +MaxRuntime of 40 s from now, 30 s of margin: the stop comes ~10 s in.
    ad.write_text(f"ClusterId = 7\nProcId = 0\nJobCurrentStartDate = {time.time():.0f}\nMaxRuntime = 40\n"
                  "JobMaxVacateTime = 100\n")
    monkeypatch.setenv("_CONDOR_JOB_AD", str(ad))
    monkeypatch.setenv("_CONDOR_SCRATCH_DIR", str(sandbox))
    started = time.monotonic()
    run = LawRun(tmp_path, *ARGS, "--step-delay", "0.2", "--walltime-margin", "30")
    code = run.finish()
    elapsed = time.monotonic() - started
    assert code == 85, run.output[-3000:]
    assert "checkpoint exit before the site's limit" in run.output
    assert re.search(r"site limits: MaxRuntime ends the job at .*vacate time 100 s", run.output), run.output[-3000:]
    assert elapsed < 40, f"ran {elapsed:.0f} s, past the site's limit"
    (location,) = tmp_path.glob("checkpoints/TrainTask/*/branch-0")
    newest = CheckpointStore(location).latest()
    stopped_at = newest.step
    assert 0 < stopped_at < 135
    assert newest.metadata["reason"] == "site limit", newest.metadata  # history tells it from an eviction

    monkeypatch.delenv("_CONDOR_JOB_AD")
    monkeypatch.delenv("_CONDOR_SCRATCH_DIR")
    resumed = run_to_end(tmp_path, *ARGS)
    assert f"resuming from step {stopped_at}" in resumed.output
    assert weights_digest(model_file(tmp_path, 0)) == uninterrupted


def test_a_stop_at_a_step_whose_save_is_due_is_recorded_as_the_stop(tmp_path, monkeypatch):
    # --checkpoint-every 1: every step's save is due, so the step at which the site's limit is
    # met commits through its due save; that checkpoint must still say why the run stopped.
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    ad = sandbox / ".job.ad"
    ad.write_text(f"ClusterId = 7\nProcId = 0\nJobCurrentStartDate = {time.time():.0f}\nMaxRuntime = 36\n")
    monkeypatch.setenv("_CONDOR_JOB_AD", str(ad))
    monkeypatch.setenv("_CONDOR_SCRATCH_DIR", str(sandbox))
    run = LawRun(tmp_path, *ARGS, "--step-delay", "0.2", "--walltime-margin", "30", "--checkpoint-every", "1")
    assert run.finish() == 85, run.output[-3000:]
    (location,) = tmp_path.glob("checkpoints/TrainTask/*/branch-0")
    newest = CheckpointStore(location).latest()
    assert newest.metadata["reason"] == "site limit", newest.metadata
