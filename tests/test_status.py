"""``ckpt-tasks status``: every branch of a workflow, from the store and the schedd."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_history import T0, assert_png, save_crafted

from ckpt_tasks import status
from ckpt_tasks.storage.store import CheckpointStore

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def workflow(tmp_path, monkeypatch):
    """A workflow's checkpoint directory: branch 0 with the crafted history of test_history
    (one eviction), branch 1 with one plain checkpoint; law's submission file for branches 0-2."""
    root = tmp_path / "ckpt" / "TrainTask" / "abc123"
    save_crafted(str(root / "branch-0"), tmp_path, monkeypatch)
    monkeypatch.undo()
    (tmp_path / "state.bin").write_bytes(b"x" * 10)
    CheckpointStore(str(root / "branch-1")).save(tmp_path / "state.bin", 40)
    jobs = tmp_path / "htcondor"
    jobs.mkdir()
    (jobs / "htcondor_jobs_0To3.json").write_text(json.dumps({"jobs": {
        "1": {"job_id": "7.0", "branches": [0]}, "2": {"job_id": "9.0", "branches": [1]},
        "3": {"job_id": "10.0", "branches": [2]}, "4": {"job_id": "dummy_job_id", "branches": [3]}}}))
    return root, jobs


ADS = {"7.0": {"ClusterId": 7, "ProcId": 0, "JobStatus": 2, "NumJobStarts": 2, "NumHolds": 0},
       "9.0": {"ClusterId": 9, "ProcId": 0, "JobStatus": 5, "NumJobStarts": 1, "NumHolds": 1,
               "HoldReasonCode": 34, "HoldReasonSubCode": 0, "HoldReason": "memory usage exceeded"},
       # idle after two evictions during start-up: nothing in the store says so, the schedd does
       "10.0": {"ClusterId": 10, "ProcId": 0, "JobStatus": 1, "NumJobStarts": 2, "NumJobCompletions": 0,
                "CommittedTime": 0, "RemoteWallClockTime": 95.0}}


def test_status_of_every_branch(workflow):
    root, jobs = workflow
    asked = []

    def query(ids):
        asked.append(ids)
        return ADS

    rows = status.collect(str(root), jobs, total=800, now=T0 + 1202.0, query=query)
    assert asked == [["10.0", "7.0", "9.0"]]
    assert [r.branch for r in rows] == [0, 1, 2]  # a job without an id (branch 3) is no job
    zero, one, two = rows
    assert (zero.step, zero.total, zero.job_id, zero.job_state, zero.job_starts) == (700, 800, "7.0", "running", 2)
    assert zero.checkpoint_age == pytest.approx(100.0)  # committed at T0+1102
    assert zero.evictions == 1 and zero.lost_seconds == pytest.approx(346.0)
    assert 0 < zero.goodput < 1
    assert one.step == 40 and one.job_state == "held" and one.hold_temporary is False
    assert "memory usage exceeded" in one.hold_reason and "code 34/0" in one.hold_reason
    assert two.step is None and two.job_state == "idle" and two.location.endswith("branch-2")
    assert (two.job_evictions, two.evictions, two.committed_seconds, two.wall_seconds) == (2, 2, 0, 95.0)
    assert (zero.job_evictions, one.job_evictions) == (1, 0)  # one run ended by an eviction; one by the hold
    text = status.format_status(rows)
    assert "700/800 (88%)" in text and "held" in text and "permanent, not resubmitted" in text


def test_status_command_json(workflow):
    root, _ = workflow
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-m", "ckpt_tasks.cli", "status", str(root), "--json"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [(b["branch"], b["step"], b["evictions"]) for b in data] == [(0, 700, 1), (1, 40, 0)]
    assert data[0]["job_state"] is None and data[0]["startup_seconds"] >= 0
    assert [step for _, step in data[0]["progress"]] == [100, 200, 300, 400, 500, 600, 700]
    plot = root.parent / "status.png"
    text = subprocess.run([sys.executable, "-m", "ckpt_tasks.cli", "status", str(root), "--plot", str(plot)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert text.returncode == 0 and "branch" in text.stdout and "700" in text.stdout, text.stderr
    assert_png(plot)


def test_evictions_from_the_schedds_counters():
    evictions = status.schedd_evictions
    assert evictions({"NumJobStarts": 3, "NumVacates": 1, "JobStatus": 2}) == 1  # where the schedd counts them
    assert evictions({"NumJobStarts": 1, "NumJobCompletions": 1, "JobStatus": 4}) == 0  # ran once, done
    assert evictions({"NumJobStarts": 3, "NumJobCompletions": 2, "JobStatus": 4}) == 1  # a requeued exit too
    assert evictions({"NumJobStarts": 2, "NumHolds": 1, "JobStatus": 2}) == 0  # held while running, released
    assert evictions({"NumJobStarts": 3, "JobStatus": 2}) == 2  # the run going on has not ended
    assert evictions({"JobStatus": 1}) is None


def test_status_of_an_empty_directory(tmp_path):
    assert status.collect(str(tmp_path)) == []
    assert status.format_status([]) == "no branches found\n"
