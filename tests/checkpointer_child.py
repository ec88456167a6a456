"""Helpers to run a Checkpointer loop in a real subprocess and signal it."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

PRELUDE = """
import os, sys, time, signal
from pathlib import Path
from ckpt_tasks import Checkpointer

def say(*words):
    print(*words, flush=True)

def write_text(path, value):
    Path(path).write_text(str(value))

def read_int(path):
    return int(Path(path).read_text())
"""


class Child:
    """A Python child running ``body`` after PRELUDE; read its lines with ``wait_for``."""

    def __init__(self, body: str, cwd: Path, env: dict | None = None):
        script = cwd / "child.py"
        script.write_text(PRELUDE + textwrap.dedent(body))
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.process = subprocess.Popen([sys.executable, str(script)], cwd=cwd, env=full_env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []

    def wait_for(self, prefix: str, timeout: float = 30.0) -> str:
        """Read lines until one starts with ``prefix``; fail with the output so far otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            self.lines.append(line.rstrip("\n"))
            if line.startswith(prefix):
                return line.strip()
        raise AssertionError(f"child never printed {prefix!r}; output:\n" + "\n".join(self.lines))

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def finish(self, timeout: float = 60.0) -> int:
        out, _ = self.process.communicate(timeout=timeout)
        self.lines.extend(out.splitlines())
        return self.process.returncode

    @property
    def output(self) -> str:
        return "\n".join(self.lines)
