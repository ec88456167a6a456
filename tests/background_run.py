"""A subprocess whose output a thread reads line by line, for tests that signal it mid-run."""
from __future__ import annotations

import os
import queue
import re
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class BackgroundRun:
    """``command`` running in the background; ``wait_for`` a line, then signal or finish it."""

    timeout = 120

    def __init__(self, command: list[str], cwd: Path, env: dict | None = None):
        environment = dict(os.environ, PYTHONUNBUFFERED="1",
                           PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        environment.update(env or {})
        self.proc = subprocess.Popen(command, cwd=cwd, env=environment, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float | None = None) -> re.Match:
        """Read lines until one matches ``pattern``; kill the process and fail otherwise."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            if match := re.search(pattern, line):
                return match
        self.proc.kill()
        raise AssertionError(f"never saw {pattern!r}:\n" + self.output[-4000:])

    def finish(self, timeout: float | None = None) -> int:
        self.proc.wait(timeout or self.timeout)
        while (line := self._queue.get(timeout=10)) is not None:
            self.lines.append(line)
        return self.proc.returncode

    @property
    def output(self) -> str:
        return "\n".join(self.lines)
