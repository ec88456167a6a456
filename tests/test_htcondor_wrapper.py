"""examples/htcondor_example/run.sh, the job wrapper, run for real.

HTCondor signals only the job's top process (the wrapper). These tests signal
the wrapper's PID, never the payload's, and check that the payload got the
signal, that the wrapper waited for the payload to really end, and that the
wrapper's exit code is the payload's.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from waiting import default_signals, wait_until

REPO = Path(__file__).resolve().parents[1]
RUN_SH = REPO / "examples" / "htcondor_example" / "run.sh"
COUNTER = REPO / "examples" / "basic_usage" / "counter.py"
CHECKPOINT_EXIT_CODE = 85
TIMEOUT = 60


class Wrapper:
    """``run.sh -- <payload>`` in the background; its output goes to files in ``workdir``."""

    def __init__(self, workdir: Path, *payload: str):
        self.workdir = workdir
        self.stdout = workdir / "wrapper.out"
        self.stderr = workdir / "wrapper.err"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        with self.stdout.open("w") as out, self.stderr.open("w") as err:
            self.proc = subprocess.Popen(["bash", str(RUN_SH), "--", *payload], cwd=workdir, env=env,
                                         stdout=out, stderr=err, preexec_fn=default_signals)

    def finish(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the wrapper still runs after {timeout} s\n{self.logs}")

    def kill(self) -> None:
        for pid in children_of(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)

    def child(self) -> int:
        """The payload's PID (the wrapper's only child), once it has started."""
        children = wait_until(lambda: children_of(self.proc.pid), what="the payload to start")
        assert len(children) == 1, children
        return children[0]

    @property
    def logs(self) -> str:
        return f"stdout:\n{self.stdout.read_text()}\nstderr:\n{self.stderr.read_text()}"


def children_of(pid: int) -> list[int]:
    """PIDs whose parent is ``pid``, from /proc (no psutil needed)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        fields = text[text.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def wrappers():
    """Start wrappers through this, so that a failing test leaves nothing running."""
    started: list[Wrapper] = []

    def start(workdir: Path, *payload: str) -> Wrapper:
        wrapper = Wrapper(workdir, *payload)
        started.append(wrapper)
        return wrapper

    yield start
    for wrapper in started:
        wrapper.kill()


def read_int(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_the_wrapper_checkpoints_the_payload_and_exits_85(tmp_path, wrappers, signum):
    checkpoint = tmp_path / "checkpoint.txt"
    steps = 1000
    wrapper = wrappers(tmp_path, sys.executable, str(COUNTER), "--steps", str(steps),
                       "--sleep", "0.05", "--file", str(checkpoint))
    child = wrapper.child()
    wait_until(lambda: (read_int(checkpoint) or 0) >= 3, what="the counter to reach 3")

    wrapper.proc.send_signal(signum)  # the wrapper, not the payload
    assert wrapper.finish() == CHECKPOINT_EXIT_CODE, wrapper.logs

    reached = read_int(checkpoint)
    assert reached is not None and 3 <= reached < steps - 1
    # The checkpoint holds the last value the payload stepped to.
    printed = [int(line.split()[1]) for line in wrapper.stdout.read_text().splitlines()
               if line.startswith("step ")]
    assert reached - printed[-1] in (0, 1)
    assert not is_alive(child), "the payload outlived the wrapper"
    assert f"relaying {signal.Signals(signum).name} to PID {child}" in wrapper.stderr.read_text()


@pytest.mark.parametrize("code", [0, 3, CHECKPOINT_EXIT_CODE])
def test_wrapper_exits_with_the_payloads_exit_code(tmp_path, wrappers, code):
    wrapper = wrappers(tmp_path, sys.executable, "-c", f"import sys; sys.exit({code})")
    assert wrapper.finish() == code, wrapper.logs


SLOW_TO_STOP = textwrap.dedent("""\
    # Takes 2 s to stop after the first SIGTERM, like a training writing a big
    # checkpoint, and counts the SIGTERMs it gets.
    import signal, sys, time
    from pathlib import Path

    received = []
    signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    Path("ready").touch()
    while not received:
        time.sleep(0.01)
    time.sleep(2)
    Path("terms").write_text(str(len(received)))
    sys.exit(85)
    """)


@pytest.mark.parametrize("signals", [1, 2])
def test_wrapper_waits_for_a_payload_that_is_slow_to_stop(tmp_path, wrappers, signals):
    """The seed's wrapper returned from ``wait`` as soon as the signal came, and exited 143.

    With two signals, the second arrives while the wrapper is already waiting again.
    """
    (tmp_path / "slow.py").write_text(SLOW_TO_STOP)
    wrapper = wrappers(tmp_path, sys.executable, "slow.py")
    child = wrapper.child()
    wait_until((tmp_path / "ready").exists, what="the payload's signal handler")

    start = time.monotonic()
    wrapper.proc.send_signal(signal.SIGTERM)
    for _ in range(signals - 1):
        time.sleep(0.5)
        wrapper.proc.send_signal(signal.SIGTERM)
    assert wrapper.finish() == CHECKPOINT_EXIT_CODE, wrapper.logs
    elapsed = time.monotonic() - start

    assert elapsed >= 1.9, f"the wrapper ended {elapsed:.2f} s after the signal, before the payload"
    assert (tmp_path / "terms").read_text() == str(signals)  # every signal was relayed
    assert not is_alive(child)


def test_signal_reaches_a_payload_without_its_own_sigint_handler(tmp_path, wrappers):
    """Background commands of a non-interactive bash start with SIGINT ignored; run.sh undoes that."""
    wrapper = wrappers(tmp_path, sys.executable, "-c",
                       "import pathlib, time; pathlib.Path('ready').touch(); time.sleep(60)")
    wrapper.child()
    wait_until((tmp_path / "ready").exists, what="the payload")
    wrapper.proc.send_signal(signal.SIGINT)
    # Python's default SIGINT handler raises KeyboardInterrupt, and Python then
    # ends itself with SIGINT: the wrapper reports 128 + 2.
    assert wrapper.finish(timeout=20) == 128 + signal.SIGINT, wrapper.logs
    assert "KeyboardInterrupt" in wrapper.stderr.read_text()


def test_wrapper_without_a_command_after_the_separator_fails(tmp_path):
    result = subprocess.run(["bash", str(RUN_SH), "--"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=TIMEOUT)
    assert result.returncode == 2
    assert "no command" in result.stderr
