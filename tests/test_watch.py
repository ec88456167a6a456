"""``ckpt-tasks watch`` around real non-Python programs (bash), with real signals.

The watcher runs as a subprocess (``python -m ckpt_tasks.watch``, the same
handler as ``ckpt-tasks watch``); the tests signal the watcher's PID only, as
HTCondor does, and read back what the store committed, locally and on a real
XRootD server.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from waiting import default_signals, wait_until

from ckpt_tasks import watch
from ckpt_tasks.storage.store import CheckpointStore, RetryPolicy

REPO = Path(__file__).resolve().parents[1]
COUNTER = REPO / "examples" / "watch_example" / "counter.sh"
TIMEOUT = 60


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), str(REPO / "tests"), env.get("PYTHONPATH")]))
    return env


_started: list["Watch"] = []


@pytest.fixture(autouse=True)
def _no_watcher_outlives_its_test():
    """A failed test must not leave its watcher and program running (they would load the machine)."""
    yield
    while _started:
        proc = _started.pop().proc
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


class Watch:
    """The watcher in the background, in a session of its own; output in files under ``workdir``."""

    def __init__(self, workdir: Path, target: str, command: list[str], *options: str, python: list[str] | None = None,
                 interval: float = 0.2):
        self.workdir = workdir
        tag = uuid.uuid4().hex[:6]
        self.stdout, self.stderr = workdir / f"watch-{tag}.out", workdir / f"watch-{tag}.err"
        argv = (python or [sys.executable, "-m", "ckpt_tasks.cli", "watch"]) + [
            "--file", "state", "--target", target, "--interval", str(interval), "--deadline", "20",
            *options, "--", *command]
        with self.stdout.open("w") as out, self.stderr.open("w") as err:
            self.proc = subprocess.Popen(argv, cwd=workdir, env=_env(), stdout=out, stderr=err,
                                         preexec_fn=default_signals, start_new_session=True)
        _started.append(self)

    def out(self) -> str:
        return self.stdout.read_text()

    def err(self) -> str:
        return self.stderr.read_text()

    def finish(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"watcher did not end in {timeout} s\n{self.out()}\n{self.err()}")


def store_of(target: str, keep_last: int = 100) -> CheckpointStore:
    return CheckpointStore(target, keep_last=keep_last, retry=RetryPolicy(deadline=10, initial_delay=0.2))


def contents(store: CheckpointStore, tmp_path: Path) -> list[tuple[int, str]]:
    """(step, text) of every committed version, fetched and verified against its manifest."""
    out = []
    for checkpoint in store.list():
        dest = tmp_path / f"fetched-{checkpoint.name}"
        store.fetch(checkpoint, dest)
        out.append((checkpoint.step, dest.read_text()))
    return out


def parse_counter(text: str) -> int:
    """The count of a complete counter.sh state; fails on a torn one."""
    lines = text.splitlines()
    assert len(lines) == 3 and lines[2] == "end", f"torn state: {text!r}"
    count, total = int(lines[0].removeprefix("count=")), int(lines[1].removeprefix("sum="))
    assert total == count * (count + 1) // 2, f"inconsistent state: {text!r}"
    return count


@pytest.fixture(params=["local", "xrootd"])
def target(request, tmp_path):
    name = f"watch-{uuid.uuid4().hex[:8]}"
    if request.param == "local":
        return str(tmp_path / "store" / name)
    server = request.getfixturevalue("xrootd_server")
    return f"{server.url}//watch/{name}"


def test_bash_counter_sigterm_then_resume(target, tmp_path):
    """SIGTERM to the watcher reaches the bash program, whose last state is committed; exit 85;
    the next watcher restores it and the program continues to the end."""
    store = store_of(target)
    first = Watch(tmp_path, target, ["bash", str(COUNTER), "state", "100000", "0.05"], "--keep-last", "100")
    wait_until(lambda: len(store.list()) >= 3, what="three committed versions")
    first.proc.send_signal(signal.SIGTERM)
    assert first.finish() == 85, first.err()
    assert "counter.sh: SIGTERM at step" in first.out()
    stopped_at = int(first.out().split("SIGTERM at step ")[1].split(",")[0])

    versions = contents(store, tmp_path)
    counts = [parse_counter(text) for _, text in versions]  # every committed version is complete
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    assert counts[-1] == stopped_at == parse_counter((tmp_path / "state").read_text())
    latest = store.latest()
    assert latest.metadata["reason"] == "signal" and latest.metadata["watch"]["file"] == "state"
    assert latest.metadata["lineage"]["step"] == latest.step

    (tmp_path / "state").unlink()  # a fresh sandbox: only the store has the state
    second = Watch(tmp_path, target, ["bash", str(COUNTER), "state", str(stopped_at + 5), "0.05"],
                   "--keep-last", "100")
    assert second.finish() == 0, second.err()
    assert f"counter.sh: resuming from {stopped_at}" in second.out()
    versions2 = contents(store, tmp_path)
    assert [s for s, _ in versions2] == sorted(s for s, _ in versions2)
    assert parse_counter(versions2[-1][1]) == stopped_at + 5
    assert store.latest().metadata["reason"] == "final"
    assert all(parse_counter(text) for _, text in versions2)

    from ckpt_tasks import history

    timeline = history.build_timeline(store.list(), target)
    assert len(timeline.runs) == 2
    assert timeline.interruptions[0].basis == "checkpoint at exit (signal)"
    assert timeline.interruptions[0].lost_seconds == 0


def test_sigint_is_relayed_too(tmp_path):
    target = str(tmp_path / "store")
    run = Watch(tmp_path, target, ["bash", str(COUNTER), "state", "100000", "0.05"])
    wait_until(lambda: (tmp_path / "state").exists(), what="the state file")
    run.proc.send_signal(signal.SIGINT)
    assert run.finish() == 85, run.err()
    assert "counter.sh: SIGINT at step" in run.out()
    committed = contents(store_of(target), tmp_path)[-1][1]
    assert committed == (tmp_path / "state").read_text() and parse_counter(committed) >= 1


IN_PLACE_WRITER = textwrap.dedent("""\
    # Rewrites "state" in place, slowly (11 lines, 30 ms apart), then rests: a half-written
    # version exists on disk for 0.3 s of every 1.1 s. No trap: SIGTERM kills it mid-write.
    v=0
    while :; do
        v=$((v + 1))
        : > state
        for i in 1 2 3 4 5 6 7 8 9 10; do echo "version $v line $i" >> state; sleep 0.03; done
        echo end >> state
        sleep 0.8
    done
""")


def test_in_place_writer_is_never_committed_half_written(tmp_path):
    target = str(tmp_path / "store")
    store = store_of(target)
    run = Watch(tmp_path, target, ["bash", "-c", IN_PLACE_WRITER], "--keep-last", "100", "--stable-polls", "3",
                interval=0.1)
    wait_until(lambda: len(store.list()) >= 3, what="three versions")
    # Stop it while it writes: the watcher must not commit that last, torn version.
    wait_until(lambda: (tmp_path / "state").read_text().count("\n") < 11, what="a write in progress")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 85, run.err()
    versions = [text for _, text in contents(store, tmp_path)]
    assert len(versions) >= 3
    for text in versions:
        lines = text.splitlines()
        assert len(lines) == 11 and lines[-1] == "end", f"half-written version committed: {text!r}"
    numbers = [int(text.split()[1]) for text in versions]
    assert numbers == sorted(set(numbers))


def test_exit_codes_pass_through(tmp_path):
    target = str(tmp_path / "store")
    failing = Watch(tmp_path, target, ["bash", "-c", "printf 'count=1\\nsum=1\\nend\\n' > t && mv t state; exit 3"])
    assert failing.finish() == 3, failing.err()
    assert store_of(target).latest().metadata["reason"] == "final"  # the last version still committed
    killed = Watch(tmp_path, target, ["bash", "-c", "kill -KILL $$"])
    assert killed.finish() == 128 + 9, killed.err()
    missing = Watch(tmp_path, target, ["/nonexistent/program"])
    assert missing.finish() == 127


def test_restores_before_starting(tmp_path):
    target = str(tmp_path / "store")
    seed = tmp_path / "seed"
    seed.write_text("count=5\nsum=15\nend\n")
    store_of(target).save(seed, 7)
    run = Watch(tmp_path, target, ["bash", str(COUNTER), "state", "8", "0.02"])
    assert run.finish() == 0, run.err()
    assert "counter.sh: resuming from 5" in run.out()
    latest = store_of(target).latest()
    assert latest.step >= 8 and parse_counter(contents(store_of(target), tmp_path)[-1][1]) == 8


def test_storage_down_at_start_never_starts_the_program(tmp_path):
    """An outage is not "no checkpoint": the program must not start from scratch."""
    run = Watch(tmp_path, "root://127.0.0.1:1//nothing/here", ["bash", str(COUNTER), "state", "3", "0.01"],
                "--deadline", "2")
    code = run.finish()
    assert code not in (0, 85), run.err()
    assert not (tmp_path / "state").exists()
    assert "127.0.0.1:1" in run.err()


SLOW_UPLOADS = textwrap.dedent("""\
    # The watcher with every upload slowed down to 1.5 s, and each logged to MARKS.
    import os, sys, time
    from ckpt_tasks.storage import local
    marks = os.environ["MARKS"]
    original = local.LocalFileInterface.upload
    def slow_upload(self, src, dst, adler32=None, span=None, on_sent=None):
        with open(marks, "a") as f: f.write(f"start {time.time()}\\n")
        time.sleep(1.5)
        try:
            return original(self, src, dst, adler32, span, on_sent)
        finally:
            with open(marks, "a") as f: f.write(f"end {time.time()}\\n")
    local.LocalFileInterface.upload = slow_upload
    from ckpt_tasks import cli
    sys.exit(cli.main(["watch", *sys.argv[1:]]))
""")


def test_signal_during_a_commit_is_relayed_at_once_and_the_commit_completes(tmp_path, monkeypatch):
    driver = tmp_path / "slow_watch.py"
    driver.write_text(SLOW_UPLOADS)
    marks = tmp_path / "marks"
    monkeypatch.setenv("MARKS", str(marks))
    target = str(tmp_path / "store")
    run = Watch(tmp_path, target, ["bash", str(COUNTER), "state", "100000", "0.05"], "--keep-last", "100",
                python=[sys.executable, str(driver)])
    wait_until(lambda: marks.exists() and "start" in marks.read_text(), what="an upload in progress")
    sent = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "SIGTERM at step" in run.out(), timeout=10, what="the program to get SIGTERM")
    relayed_after = time.monotonic() - sent
    log = marks.read_text().split()
    assert relayed_after < 1.0, f"the signal waited for the commit ({relayed_after:.2f} s)"
    assert log.count("start") > log.count("end"), "the upload had already ended: nothing was tested"
    run.proc.send_signal(signal.SIGTERM)  # a second one, during the last commit: harmless
    assert run.finish() == 85, run.err()
    store = store_of(target)
    for checkpoint in store.list():
        store.verify(checkpoint)
    assert parse_counter(contents(store, tmp_path)[-1][1]) == parse_counter((tmp_path / "state").read_text())


def test_parser_registration():
    parser = argparse.ArgumentParser(prog="ckpt-tasks")
    commands = parser.add_subparsers(dest="command", required=True)
    watch.add_parser(commands)
    args = parser.parse_args(["watch", "--file", "s.dat", "--target", "root://h:1//p", "--interval", "2",
                              "--exit-code", "86", "--", "./sim", "--steps", "5", "-v"])
    assert args.func is watch.run_watch
    assert (args.file, args.target, args.interval, args.exit_code) == ("s.dat", "root://h:1//p", 2.0, 86)
    assert [a for a in args.command if a != "--"] == ["./sim", "--steps", "5", "-v"]
