"""The examples under examples/ run as real programs, get stopped, and resume.

Each test starts an example with ``sys.executable`` in ``tmp_path``, reads its
progress lines as they come, signals it at a known point, and checks both the
exit code and what the rerun restores.
"""
from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
CHECKPOINT_EXIT_CODE = 85
TIMEOUT = 60  # seconds for any one wait on an example; torch alone takes seconds to import


def example_env() -> dict[str, str]:
    """The test's environment, with the repository importable even without ``pip install -e``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Example:
    """An example running in the background, its stdout read line by line as it comes."""

    #: every example started and not yet cleaned up by the fixture below
    started: list["Example"] = []

    def __init__(self, script: Path, *args: str, cwd: Path):
        self.command = [sys.executable, str(script), *args]
        self.proc = subprocess.Popen(
            self.command, cwd=cwd, env=example_env(), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        Example.started.append(self)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        # A thread reads the pipe so that waiting for a line can time out.
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)  # end of output

    def wait_for_line(self, pattern: str, timeout: float = TIMEOUT) -> re.Match:
        """Read lines until one matches ``pattern`` (re.fullmatch); fail on timeout or exit."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                pytest.fail(f"no line matching {pattern!r} within {timeout} s:\n{self.output}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait(TIMEOUT)
                pytest.fail(f"exited with {self.proc.returncode} before a line matched {pattern!r}:\n"
                            f"{self.output}")
            self.lines.append(line)
            match = regex.fullmatch(line)
            if match:
                return match

    def finish(self, timeout: float = TIMEOUT) -> int:
        """Wait for the exit and the rest of the output; return the exit code."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.command} still running after {timeout} s:\n{self.output}")
        while (line := self._queue.get(timeout=TIMEOUT)) is not None:
            self.lines.append(line)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def ints(self, prefix: str) -> list[int]:
        """The numbers of all lines ``"<prefix> <int>"``, in order."""
        return [int(m.group(1)) for line in self.lines if (m := re.fullmatch(rf"{prefix} (\d+)", line))]


def first_line(example: Example, prefix: str) -> str:
    """The first output line starting with ``prefix`` (log lines may come before it)."""
    return next((line for line in example.lines if line.startswith(prefix)), "")


def run_to_end(script: Path, *args: str, cwd: Path, timeout: float = TIMEOUT) -> Example:
    """Run an example to completion and check that it succeeded."""
    example = Example(script, *args, cwd=cwd)
    code = example.finish(timeout)
    assert code == 0, f"exit code {code}:\n{example.output}"
    return example


@pytest.fixture(autouse=True)
def _kill_leftover_examples():
    """Kill what a failing test left running."""
    yield
    while Example.started:
        Example.started.pop().kill()


# -- basic_usage/counter.py ---------------------------------------------------------------------

COUNTER = EXAMPLES / "basic_usage" / "counter.py"


def test_counter_runs_to_the_end_and_a_rerun_restores_the_final_value(tmp_path):
    first = run_to_end(COUNTER, "--steps", "5", "--sleep", "0", cwd=tmp_path)
    assert first.ints("restored") == [0]
    assert first.ints("step") == [0, 1, 2, 3, 4]
    assert (tmp_path / "checkpoint.txt").read_text() == "4"

    second = run_to_end(COUNTER, "--steps", "5", "--sleep", "0", cwd=tmp_path)
    assert second.ints("restored") == [4]
    assert second.ints("step") == [4]  # only the last step is repeated


def test_counter_writes_on_calls_1_n_plus_1_2n_plus_1(tmp_path):
    checkpoint = tmp_path / "every4.txt"
    run_to_end(COUNTER, "--steps", "10", "--sleep", "0", "--checkpoint-every", "4",
               "--file", str(checkpoint), cwd=tmp_path)
    # steps 0..9, written at the 1st, 5th and 9th call: values 0, 4, 8
    assert checkpoint.read_text() == "8"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("every", [1, 1000])
def test_counter_stopped_by_a_signal_resumes(tmp_path, signum, every):
    steps = 40
    checkpoint = tmp_path / "state" / "counter.txt"
    args = ["--steps", str(steps), "--checkpoint-every", str(every), "--file", str(checkpoint)]
    first = Example(COUNTER, *args, "--sleep", "0.1", cwd=tmp_path)
    first.wait_for_line("step 5")
    first.proc.send_signal(signum)
    assert first.finish() == CHECKPOINT_EXIT_CODE, first.output

    # With every=1000 only step 0 was written by step(): the value in the file
    # comes from the checkpoint that the signal triggered.
    stopped_at = int(checkpoint.read_text())
    assert 5 <= stopped_at < steps - 1
    # the last value given to step(): printed, or (signal right after step()) about to be
    assert stopped_at - first.ints("step")[-1] in (0, 1)

    second = run_to_end(COUNTER, *args, "--sleep", "0", cwd=tmp_path)
    assert second.ints("restored") == [stopped_at]
    assert second.ints("step") == list(range(stopped_at, steps))
    if every == 1:
        assert checkpoint.read_text() == str(steps - 1)


# -- pytorch_usage/train.py ---------------------------------------------------------------------

TRAIN = EXAMPLES / "pytorch_usage" / "train.py"


def test_pytorch_training_resumed_after_sigterm_ends_with_the_same_weights(tmp_path):
    torch = pytest.importorskip("torch")
    common = ["--epochs", "2", "--batches", "8"]

    reference = run_to_end(TRAIN, *common, "--sleep", "0", "--file", str(tmp_path / "ref.pt"),
                           "--output", str(tmp_path / "ref_model.pt"), cwd=tmp_path)
    assert first_line(reference, "restored") == "restored epoch 0 batch 0"

    # Interrupted run, checkpoint kept on "shared" storage.
    shared = tmp_path / "shared" / "train.pt"
    first = Example(TRAIN, *common, "--sleep", "0.1", "--file", str(tmp_path / "a" / "local.pt"),
                    "--mode", "shared", "--target", str(shared), cwd=tmp_path)
    first.wait_for_line(r"epoch 0 batch 3 loss \S+")
    first.proc.send_signal(signal.SIGTERM)
    assert first.finish() == CHECKPOINT_EXIT_CODE, first.output

    state = torch.load(shared, weights_only=True)
    position = (state["epoch"], state["batch"])
    assert (0, 4) <= position < (2, 0), position

    # Resume in another directory: the state can only come from the shared target.
    other = tmp_path / "b"
    other.mkdir()
    second = run_to_end(TRAIN, *common, "--sleep", "0", "--file", str(other / "local.pt"),
                        "--mode", "shared", "--target", str(shared),
                        "--output", str(tmp_path / "resumed_model.pt"), cwd=other)
    assert first_line(second, "restored") == f"restored epoch {position[0]} batch {position[1]}"
    trained = [line for line in second.lines if line.startswith("epoch ")]
    assert len(trained) == 2 * 8 - (8 * position[0] + position[1])  # no batch twice, none skipped

    final = torch.load(shared, weights_only=True)
    assert (final["epoch"], final["batch"]) == (2, 0)
    resumed_weights = torch.load(tmp_path / "resumed_model.pt", weights_only=True)
    reference_weights = torch.load(tmp_path / "ref_model.pt", weights_only=True)
    assert resumed_weights.keys() == reference_weights.keys()
    for name, tensor in reference_weights.items():
        assert torch.equal(resumed_weights[name], tensor), name  # bit for bit
    assert torch.equal(final["model"]["weight"], reference_weights["weight"])


# -- luigi_example/task.py ----------------------------------------------------------------------

LUIGI_TASK = EXAMPLES / "luigi_example" / "task.py"


def luigi_args(tmp_path: Path, steps: int = 8) -> list[str]:
    return ["--steps", str(steps), "--sleep", "0",
            "--checkpoint-target", str(tmp_path / "shared" / "count.txt"),
            "--output", str(tmp_path / "out" / "count.result")]


def test_luigi_task_completes_and_writes_its_output(tmp_path):
    run = run_to_end(LUIGI_TASK, *luigi_args(tmp_path), cwd=tmp_path)
    assert run.ints("step") == list(range(8))
    assert (tmp_path / "out" / "count.result").read_text() == "8\n"
    assert (tmp_path / "shared" / "count.txt").read_text() == "7"

    # Complete: luigi does not run it again.
    again = run_to_end(LUIGI_TASK, *luigi_args(tmp_path), cwd=tmp_path)
    assert again.ints("step") == []


def test_luigi_task_that_failed_resumes_on_rerun(tmp_path):
    output = tmp_path / "out" / "count.result"
    failed = Example(LUIGI_TASK, *luigi_args(tmp_path), "--fail-at-step", "3", cwd=tmp_path)
    assert failed.finish() == 1, failed.output
    assert "simulated failure at step 3" in failed.output
    assert not output.exists()
    assert (tmp_path / "shared" / "count.txt").read_text() == "3"

    rerun = run_to_end(LUIGI_TASK, *luigi_args(tmp_path), cwd=tmp_path)
    assert rerun.ints("restored") == [3]
    assert rerun.ints("step") == [3, 4, 5, 6, 7]
    assert output.read_text() == "8\n"


def test_luigi_task_fails_with_failure_probability_one(tmp_path):
    failed = Example(LUIGI_TASK, *luigi_args(tmp_path), "--fail-probability", "1.0", cwd=tmp_path)
    assert failed.finish() == 1, failed.output
    assert "simulated failure at step 0" in failed.output
    assert not (tmp_path / "out" / "count.result").exists()


# -- xrootd_usage/counter.py --------------------------------------------------------------------

XROOTD_COUNTER = EXAMPLES / "xrootd_usage" / "counter.py"


@pytest.mark.xrootd
def test_xrootd_counter_stores_on_the_server_and_resumes_after_sigterm(xrootd_server, tmp_path):
    # The server is shared by the session: a directory of this test's own.
    remote_dir = f"/examples/{tmp_path.name}"
    target = f"{remote_dir}/counter.txt"
    on_server = xrootd_server.data_dir / remote_dir.lstrip("/") / "counter.txt"
    steps = 40
    args = ["--server", xrootd_server.url, "--target", target, "--steps", str(steps)]

    first_dir = tmp_path / "first"
    first_dir.mkdir()
    first = Example(XROOTD_COUNTER, *args, "--sleep", "0.1", cwd=first_dir)
    assert first.wait_for_line(r"restored (\d+)").group(1) == "0"
    first.wait_for_line("step 3")
    assert int(on_server.read_text()) >= 3  # uploaded as it goes
    first.wait_for_line("step 5")
    first.proc.send_signal(signal.SIGTERM)
    assert first.finish() == CHECKPOINT_EXIT_CODE, first.output

    stopped_at = int(on_server.read_text())
    assert stopped_at - first.ints("step")[-1] in (0, 1)
    assert 5 <= stopped_at < steps - 1
    # complete or absent: no temporary upload left beside it
    assert [p.name for p in on_server.parent.iterdir()] == ["counter.txt"]

    # A fresh directory, as on another machine: only the server has the value.
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    second = run_to_end(XROOTD_COUNTER, *args, "--sleep", "0", cwd=second_dir)
    assert second.ints("restored") == [stopped_at]
    assert second.ints("step") == list(range(stopped_at, steps))
    assert on_server.read_text() == str(steps - 1)
