"""``law run TrainTask --ranks 2``: two gloo ranks under luigi's worker, stopped and resumed."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
LAW = str(Path(sys.executable).with_name("law"))
ARGS = ["--branch", "0", "--ranks", "2", "--epochs", "1", "--checkpoint-every", "5"]
STOPPED = re.compile(r"rank (\d) stopped after step (\d+); exit 85")


def law_run(tmp: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, CKPT_TASKS_DATA=str(tmp / "data"), LAW_HOME=str(ROOT / ".law"),
               LAW_CONFIG_FILE=str(ROOT / "law.cfg"), PYTHONUNBUFFERED="1",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.Popen([LAW, "run", "TrainTask", *ARGS, "--store", str(tmp / "store"), *extra], cwd=ROOT,
                            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def model_weights(tmp: Path) -> dict:
    (path,) = (tmp / "data").glob("TrainTask/*/branch-0/model.pt")
    return torch.load(path, weights_only=True)["model"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("ranks-reference")
    process = law_run(tmp)
    out, _ = process.communicate(timeout=180)
    assert process.returncode == 0, out
    return model_weights(tmp)


def test_sigterm_to_law_run_stops_both_ranks_exits_85_and_resumes_identically(tmp_path, reference):
    process = law_run(tmp_path, "--step-delay", "0.1")
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        lines.append(line)
        if "committed checkpoint of step 5" in line or not line:
            break
    process.send_signal(signal.SIGTERM)  # the top process only, as HTCondor does
    out, _ = process.communicate(timeout=120)
    out = "".join(lines) + out
    assert process.returncode == 85, out
    stops = {int(m.group(1)): int(m.group(2)) for m in STOPPED.finditer(out)}
    assert set(stops) == {0, 1} and stops[0] == stops[1], out
    assert 5 <= stops[0] < 23, out  # one epoch of 1438 samples is 23 steps of 32 per rank
    resumed = law_run(tmp_path)
    out, _ = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, out
    assert f"rank 1 resuming from step {stops[0]}" in out
    weights = model_weights(tmp_path)
    assert weights.keys() == reference.keys()
    for key in weights:
        assert weights[key].numpy().tobytes() == reference[key].numpy().tobytes(), key
