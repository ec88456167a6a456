"""Small helpers shared by the subprocess tests."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def wait_until(predicate, timeout: float = 60, what: str = "condition", interval: float = 0.05):
    """Poll ``predicate`` until it returns something truthy; return that, or fail the test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def default_signals() -> None:
    """A ``preexec_fn`` giving a child default SIGINT/SIGTERM dispositions.

    A test run started in the background by a non-interactive shell inherits SIGINT
    as ignored, and bash cannot trap a signal ignored at its start; HTCondor starts
    jobs with default dispositions, so the tests do too.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``ckpt-tasks ARGS`` (the installed console script when there is one)."""
    script = Path(sys.executable).with_name("ckpt-tasks")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "ckpt_tasks.cli"]
    return subprocess.run(command + list(args), capture_output=True, text=True, timeout=timeout)


def run_python(*args: str, timeout: float = 120, cwd: Path | None = None) -> str:
    """Run this interpreter with ``args``; its stdout, or fail the test on a hang or a non-zero exit."""
    try:
        done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"hung for {timeout} s: {hung.stdout} {hung.stderr}")
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout
