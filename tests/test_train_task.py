"""`law run TrainTask` for real: interrupt it, resume it, compare with an uninterrupted run."""
from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ckpt_tasks.storage.store import CheckpointStore

ROOT = Path(__file__).resolve().parents[1]
LAW = str(Path(sys.executable).with_name("law"))


def law_env(data: Path) -> dict:
    env = dict(os.environ)
    env.update(CKPT_TASKS_DATA=str(data), LAW_HOME=str(ROOT / ".law"), LAW_CONFIG_FILE=str(ROOT / "law.cfg"),
               PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module", autouse=True)
def law_index(tmp_path_factory):
    """law finds tasks through its index; build it as setup.sh does."""
    env = law_env(tmp_path_factory.mktemp("index"))
    subprocess.run([LAW, "index", "--quiet"], cwd=ROOT, env=env, check=True, timeout=120)


class LawRun:
    """``law run TrainTask ...`` as a subprocess whose output is read line by line."""

    def __init__(self, data: Path, *args: str):
        command = [LAW, "run", "TrainTask", *args]
        self.process = subprocess.Popen(command, cwd=ROOT, env=law_env(data), text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            self.lines.append(line.rstrip())
            match = re.search(pattern, line)
            if match:
                return match
        raise AssertionError(f"never saw {pattern!r}; output:\n" + "\n".join(self.lines[-60:]))

    def finish(self, timeout: float = 300) -> int:
        out, _ = self.process.communicate(timeout=timeout)
        self.lines.extend(out.splitlines())
        return self.process.returncode

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


def run_to_end(data: Path, *args: str) -> LawRun:
    run = LawRun(data, *args)
    code = run.finish()
    assert code == 0, run.output[-4000:]
    return run


def model_file(data: Path, branch: int) -> Path:
    (path,) = data.glob(f"TrainTask/*/branch-{branch}/model.pt")
    return path


def weights_digest(path: Path) -> str:
    payload = torch.load(path, weights_only=True)
    digest = hashlib.sha256()
    for name, tensor in sorted(payload["model"].items()):
        digest.update(name.encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


ARGS = ("--branch", "0", "--epochs", "3", "--checkpoint-every", "20")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> str:
    data = tmp_path_factory.mktemp("uninterrupted")
    run = run_to_end(data, *ARGS)
    assert "starting from scratch" in run.output
    assert re.search(r"test accuracy 0\.\d+ after 135 steps", run.output)
    return weights_digest(model_file(data, 0))


def test_first_run_trains_and_writes_model_and_checkpoints(tmp_path, uninterrupted):
    run_to_end(tmp_path, *ARGS)
    payload = torch.load(model_file(tmp_path, 0), weights_only=True)
    assert payload["steps"] == 135 and 0.5 < payload["test_accuracy"] <= 1.0
    assert weights_digest(model_file(tmp_path, 0)) == uninterrupted  # deterministic
    (location,) = tmp_path.glob("checkpoints/TrainTask/*/branch-0")
    steps = [c.step for c in CheckpointStore(location).list()]
    assert steps == [81, 101, 121]  # every 20 steps from 1, newest 3 kept
    # a rerun after completion does nothing
    again = run_to_end(tmp_path, *ARGS)
    assert "complete ones were encountered" in again.output
    assert "starting from scratch" not in again.output


def test_print_status_and_output_show_progress(tmp_path):
    run_to_end(tmp_path, "--branch", "0", "--epochs", "1", "--checkpoint-every", "10")
    status = run_to_end(tmp_path, "--branch", "0", "--epochs", "1", "--print-status", "0")
    assert re.search(r"checkpoint at step 41 of 45", status.output), status.output
    output = run_to_end(tmp_path, "--branch", "0", "--epochs", "1", "--print-output", "0")
    assert "model.pt" in output.output and "checkpoints/TrainTask" in output.output


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_commits_exits_85_and_rerun_resumes_bit_identically(tmp_path, uninterrupted, signum):
    run = LawRun(tmp_path, *ARGS, "--step-delay", "0.02")
    run.wait_for(r"starting from scratch")
    time.sleep(1.0)
    run.process.send_signal(signum)
    assert run.finish() == 85, run.output[-3000:]
    (location,) = tmp_path.glob("checkpoints/TrainTask/*/branch-0")
    stopped_at = CheckpointStore(location).latest().step
    assert 0 < stopped_at < 135
    assert not list(tmp_path.glob("TrainTask/*/branch-0/model.pt"))  # not complete

    resumed = run_to_end(tmp_path, *ARGS)
    assert f"resuming from step {stopped_at}" in resumed.output
    assert weights_digest(model_file(tmp_path, 0)) == uninterrupted


def test_sigkill_loses_at_most_the_steps_since_the_last_checkpoint(tmp_path, uninterrupted):
    run = LawRun(tmp_path, *ARGS, "--step-delay", "0.02")
    run.wait_for(r"committed checkpoint of step 41")
    run.process.kill()
    run.finish()
    (location,) = tmp_path.glob("checkpoints/TrainTask/*/branch-0")
    assert CheckpointStore(location).latest().step >= 41
    resumed = run_to_end(tmp_path, *ARGS)
    match = re.search(r"resuming from step (\d+)", resumed.output)
    assert match and int(match.group(1)) >= 41
    assert weights_digest(model_file(tmp_path, 0)) == uninterrupted


def test_several_random_interruptions_end_bit_identical(tmp_path, uninterrupted):
    """SIGTERM and SIGKILL at random moments, mid-epoch and during saves, then resume."""
    import random

    rng = random.Random(5)
    for attempt, signum in enumerate([signal.SIGTERM, signal.SIGKILL, signal.SIGTERM, signal.SIGKILL,
                                      signal.SIGTERM]):
        run = LawRun(tmp_path, "--branch", "0", "--epochs", "3", "--checkpoint-every", "7",
                     "--step-delay", "0.01")
        run.wait_for(r"starting from scratch|resuming from step")
        time.sleep(rng.uniform(0.1, 0.5))
        run.process.send_signal(signum)
        code = run.finish()
        # After "training complete" the handlers are given back; a signal then just ends law.
        done = "training complete" in run.output
        assert code in (85, -signal.SIGKILL) or (done and code in (0, -signal.SIGTERM)), run.output[-3000:]
        if done:
            break
    final = run_to_end(tmp_path, "--branch", "0", "--epochs", "3", "--checkpoint-every", "7")
    assert weights_digest(model_file(tmp_path, 0)) == uninterrupted, final.output[-2000:]


def test_checkpoint_of_other_parameters_is_refused(tmp_path):
    first = LawRun(tmp_path, "--branch", "0", "--epochs", "3", "--step-delay", "0.02")
    first.wait_for("starting from scratch")
    time.sleep(0.5)
    first.process.send_signal(signal.SIGTERM)
    assert first.finish() == 85
    # Same location (same task parameters and branch), but the checkpoint claims other
    # parameters: the situation of an edited branch map or a copied location.
    (location,) = tmp_path.glob("checkpoints/TrainTask/*/branch-0")
    (other,) = (tmp_path / "checkpoints" / "TrainTask").glob("*")
    target = other / "branch-1"
    os.rename(location, target)
    refused = LawRun(tmp_path, "--branch", "1", "--epochs", "3")
    assert refused.finish() != 0
    assert "other parameters" in refused.output and "seed" in refused.output, refused.output[-3000:]
    assert not list(tmp_path.glob("TrainTask/*/branch-1/model.pt"))


def test_more_epochs_continue_the_same_training(tmp_path):
    run_to_end(tmp_path, "--branch", "2", "--epochs", "1", "--checkpoint-every", "5")
    longer = run_to_end(tmp_path, "--branch", "2", "--epochs", "2", "--checkpoint-every", "5")
    assert re.search(r"resuming from step 4[1-5]", longer.output), longer.output[-2000:]


@pytest.mark.xrootd
def test_xrootd_store_resume_and_outage(tmp_path, make_xrootd_server, uninterrupted):
    server = make_xrootd_server()
    store = f"{server.url}//ckpt"
    run = LawRun(tmp_path, *ARGS, "--store", store, "--step-delay", "0.02")
    run.wait_for("starting from scratch")
    time.sleep(1.0)
    run.process.send_signal(signal.SIGTERM)
    assert run.finish() == 85, run.output[-3000:]
    assert list(server.data_dir.glob("ckpt/TrainTask/*/branch-0/LATEST"))

    # The server is down at start: the task fails loudly instead of training from scratch.
    server.stop()
    down = LawRun(tmp_path, *ARGS, "--store", store, "--storage-timeout", "5")
    assert down.finish() != 0
    assert "starting from scratch" not in down.output
    assert re.search(r"XRootD .* failed for root://127\.0\.0\.1:\d+", down.output), down.output[-3000:]

    server.start()
    time.sleep(3)  # the client avoids a failed server for a few seconds
    resumed = run_to_end(tmp_path, *ARGS, "--store", store)
    assert "resuming from step" in resumed.output
    assert weights_digest(model_file(tmp_path, 0)) == uninterrupted
