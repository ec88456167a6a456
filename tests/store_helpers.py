"""The CheckpointStore tests' location: a local directory or a sub-directory of the
session's XRootD server, and the directory on disk behind it."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ckpt_tasks.storage import CheckpointStore, RetryPolicy
from ckpt_tasks.storage.store import LATEST
from helpers.store_writer import content_for

WRITER = Path(__file__).parent / "helpers" / "store_writer.py"
FAST = RetryPolicy(deadline=5, initial_delay=0.1, max_delay=0.5)


class Location:
    """Where a test's store lives: its URL or path, and the directory on disk behind it."""

    def __init__(self, kind: str, url: str, on_disk: Path):
        self.kind, self.url, self.on_disk = kind, url, on_disk

    def store(self, **kwargs) -> CheckpointStore:
        kwargs.setdefault("retry", FAST)
        return CheckpointStore(self.url, **kwargs)

    def names(self) -> list[str]:
        return sorted(os.listdir(self.on_disk)) if self.on_disk.exists() else []

    def __iter__(self):
        """``url, on_disk = location``, for tests that need only the two."""
        return iter((self.url, self.on_disk))


def make_file(directory: Path, step: int, size: int | None = None) -> Path:
    path = directory / f"state-{step}.bin"
    path.write_bytes(content_for(step) if size is None else content_for(step)[:size])
    return path


def read_latest(location: Location) -> dict:
    return json.loads((location.on_disk / LATEST).read_text())
