"""A test double: an in-memory storage backend for ``mem://name/path`` locations.

It exists to show that a new backend is one module with the operations of
``ckpt_tasks.storage.backend.StorageBackend`` plus one ``register_backend`` line
(``tests/test_backend_contract.py`` registers it for its tests only). Every location
of one process shares one dictionary, so two stores on one location see each other.
``fail_next(error, count)`` makes the next calls raise ``error``: the faults a real
storage shows only with luck (an outage that ends, a refusal).
"""
from __future__ import annotations

import os
import stat as stat_module
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Callable

from ckpt_tasks.errors import StorageError, StorageNotFound, VerificationError
from ckpt_tasks.storage.registry import OpenedLocation

SCHEME = "mem"


@dataclass(frozen=True)
class MemoryStat:
    st_size: int
    st_mode: int
    st_mtime: float


class MemoryBackend:
    """Files and directories in a dictionary, with the backend contract's errors."""

    def __init__(self):
        self._files: dict[str, tuple[bytes, float]] = {}
        self._dirs: set[str] = set()
        self._lock = threading.Lock()
        self._faults: list[StorageError] = []
        self.calls = 0

    def fail_next(self, error: StorageError, count: int = 1) -> None:
        """Raise ``error`` from the next ``count`` operations."""
        self._faults.extend([error] * count)

    def _enter(self, path: str) -> None:
        self.calls += 1
        if self._faults:
            raise self._faults.pop(0)
        if not path.startswith(f"{SCHEME}://"):
            raise StorageError(f"not a {SCHEME}:// path: {path}", path)

    def _missing(self, path: str) -> StorageNotFound:
        return StorageNotFound(f"no such file or directory: {path}", path)

    def _add_parents(self, path: str) -> None:
        parent = path.rsplit("/", 1)[0]
        while parent.count("/") > 2 and parent not in self._dirs:
            self._dirs.add(parent)
            parent = parent.rsplit("/", 1)[0]

    def exists(self, path: str) -> bool:
        self._enter(path)
        return path in self._files or path in self._dirs

    def stat(self, path: str) -> MemoryStat:
        self._enter(path)
        with self._lock:
            if path in self._dirs:
                return MemoryStat(0, stat_module.S_IFDIR | 0o755, time.time())
            if path not in self._files:
                raise self._missing(path)
            data, mtime = self._files[path]
            return MemoryStat(len(data), stat_module.S_IFREG | 0o644, mtime)

    def listdir(self, path: str) -> list[str]:
        self._enter(path)
        with self._lock:
            if path not in self._dirs:
                raise self._missing(path)
            prefix = path.rstrip("/") + "/"
            children = {p[len(prefix):] for p in [*self._files, *self._dirs] if p.startswith(prefix)}
            return sorted(c for c in children if c and "/" not in c)

    def mkdir_rec(self, path: str) -> None:
        self._enter(path)
        with self._lock:
            self._dirs.add(path.rstrip("/"))
            self._add_parents(path.rstrip("/"))

    def upload(self, local: str | os.PathLike, path: str, adler32: int | None = None,
               span: tuple[int, int] | None = None, on_sent: Callable[[], None] | None = None) -> int:
        self._enter(path)
        with open(local, "rb") as source:
            if span is not None:
                source.seek(span[0])
            data = source.read() if span is None else source.read(span[1])
        with self._lock:
            self._files[path] = (data, time.time())
            self._add_parents(path)
        if on_sent is not None:
            on_sent()
        sent = zlib.adler32(data)
        if adler32 is not None and adler32 != sent:
            raise VerificationError(f"adler32 of {path} is {sent:08x}, expected {adler32:08x}", path)
        return sent

    def download(self, path: str, local: str | os.PathLike, adler32: int | None = None,
                 at: int | None = None) -> None:
        data = self.read_bytes(path)
        with open(local, "wb" if at is None else "r+b") as target:
            target.seek(at or 0)
            target.write(data)
        if adler32 is not None and zlib.adler32(data) != adler32:
            raise VerificationError(f"adler32 of {path} is {zlib.adler32(data):08x}, expected {adler32:08x}", path)

    def read_bytes(self, path: str) -> bytes:
        self._enter(path)
        with self._lock:
            if path not in self._files:
                raise self._missing(path)
            return self._files[path][0]

    def checksum(self, path: str) -> int:
        return zlib.adler32(self.read_bytes(path))

    compute_checksum = checksum

    def rename(self, src: str, dst: str) -> None:
        self._enter(src)
        with self._lock:
            if src not in self._files:
                raise self._missing(src)
            self._files[dst] = self._files.pop(src)

    def remove(self, path: str, silent: bool = True) -> bool:
        self._enter(path)
        with self._lock:
            prefix = path.rstrip("/") + "/"
            doomed = [p for p in self._files if p == path or p.startswith(prefix)]
            dirs = [d for d in self._dirs if d == path or d.startswith(prefix)]
            if not doomed and not dirs:
                if silent:
                    return False
                raise self._missing(path)
            for name in doomed:
                del self._files[name]
            self._dirs.difference_update(dirs)
            return True


#: the one storage of this process
STORAGE = MemoryBackend()


def open_memory(location: str, deadline: float) -> OpenedLocation:
    """The registry's factory: ``mem://name/path``."""
    if not location.startswith(f"{SCHEME}://") or len(location) <= len(f"{SCHEME}://"):
        raise ValueError(f"expected {SCHEME}://name/path")
    return OpenedLocation(STORAGE, location.rstrip("/"))
