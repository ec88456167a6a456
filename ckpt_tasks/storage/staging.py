"""StagingFile: a checkpoint's bytes, readable in parts while they are still being written.

``CheckpointStore.save_streaming`` lets a serialiser (``torch.save``) write into a
``StagingFile`` while the parts already written go up to the storage, so
serialising one part overlaps uploading the one before; writing the whole file
first made every save wait for the two in turn.

By default the bytes are staged in memory (a Linux ``memfd``), not on disk: a
background thread serialising 384 MiB into a disk file took about 0.25 s from a
one-thread CPU training beside it, through the kernel's writeback of pages that
were deleted moments later; into memory, about 0.03 s (benchmarks/README.md).
Memory stays bounded: once a part is published its pages
are freed, and the writer waits while ``capacity`` bytes are still unpublished.
A part that fails is sent again from the bytes it still holds.

A file that is already complete (``CheckpointStore.save``) is a ``StagingFile``
that has finished, so both kinds of save share one commit path.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import tempfile
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

# Writes are cut into slices of at most this size, so a writer that hands over a
# whole tensor at once still waits for room between slices.
_SLICE = 8 << 20


class StagingAbandoned(Exception):
    """Raised into the writer when the commit gave up: there is no point in writing on."""


class StagingFile:
    """Bytes that one writer appends and uploads read once they are there.

    The writer uses it as a binary stream (``write``, ``flush``) and calls
    :meth:`finish` or :meth:`fail` at the end; readers call :meth:`wait_for`, then
    read the bytes it promised from :attr:`path`, and :meth:`release` them once
    they are stored for good. Make one with :meth:`in_memory`, :meth:`in_directory`
    or :meth:`of_complete`; :meth:`close` frees it.
    """

    def __init__(self, path: Path, fd: int | None, *, size: int = 0, finished: bool = False,
                 capacity: int | None = None, remove: bool = False):
        self.path = path
        self.capacity = capacity
        self._fd = fd
        self._remove = remove
        self._size = size
        self._released = 0
        self._finished = finished
        self._error: BaseException | None = None
        self._abandoned = False
        self._changed = threading.Condition()

    @classmethod
    def of_complete(cls, path: str | os.PathLike) -> "StagingFile":
        """A local file that is already written in full (it is left in place)."""
        path = Path(path)
        return cls(path, None, size=path.stat().st_size, finished=True)

    @classmethod
    def in_memory(cls, capacity: int | None = None, directory: str | os.PathLike | None = None) -> "StagingFile":
        """Staged in memory, at most ``capacity`` unreleased bytes at a time (None: no bound).

        Where the system has no ``memfd`` (outside Linux, or a sandbox that forbids
        it), a temporary file in ``directory`` stands in for it.
        """
        try:
            fd = os.memfd_create("ckpt-staging")
        except (AttributeError, OSError) as error:  # no memfd here, or a sandbox forbids it
            logger.debug("staging on disk instead of in memory: %s", error)
            return cls.in_directory(directory, capacity)
        # Readers (threads of this process) open it by this path, as they would open a file.
        return cls(Path(f"/proc/self/fd/{fd}"), fd, capacity=capacity)

    @classmethod
    def in_directory(cls, directory: str | os.PathLike | None = None,
                     capacity: int | None = None) -> "StagingFile":
        """Staged in a temporary file in ``directory`` (default: the system's), removed by close."""
        fd, name = tempfile.mkstemp(prefix=".ckpt-staging-", dir=directory)
        return cls(Path(name), fd, capacity=capacity, remove=True)

    def close(self) -> None:
        """Free the staged bytes (a complete file given to ``of_complete`` stays)."""
        if self._fd is not None and self._size:
            # A process forked meanwhile (a DataLoader worker) holds the descriptor too: without
            # this the bytes would live as long as that process.
            _punch_hole(self._fd, 0, self._size)
        self._close_fd()
        if self._remove:
            self.path.unlink(missing_ok=True)

    # -- the writer's side ------------------------------------------------------------------

    def write(self, data) -> int:
        """Append ``data`` (bytes or any buffer, e.g. the memoryview torch.save passes); waits
        while ``capacity`` bytes are unreleased."""
        view = memoryview(data).cast("B")
        start = 0
        while start < len(view):
            piece = view[start:start + min(_SLICE, self._wait_for_room())]
            written = 0
            while written < len(piece):  # os.write may write less than asked
                written += os.write(self._fd, piece[written:])
            with self._changed:
                self._size += written
                self._changed.notify_all()
            start += written
        return len(view)

    def _wait_for_room(self) -> int:
        """Bytes the writer may write now (at least one)."""
        if self._fd is None:
            raise ValueError(f"{self.path} takes no more writes")
        with self._changed:
            self._changed.wait_for(lambda: self._abandoned or self.capacity is None
                                   or self.unreleased < self.capacity)
            if self._abandoned:
                raise StagingAbandoned("the commit gave up; stopped staging its checkpoint")
            return _SLICE if self.capacity is None else self.capacity - self.unreleased

    def flush(self) -> None:
        """Nothing to flush: every write went to the file already (torch.save calls it)."""

    def finish(self) -> None:
        """The writer is done: every byte is there."""
        with self._changed:
            self._finished = True
            self._changed.notify_all()

    def fail(self, error: BaseException) -> None:
        """The writer failed with ``error``; readers waiting for bytes get it raised."""
        with self._changed:
            self._error = error
            self._changed.notify_all()

    def abandon(self) -> None:
        """The commit gave up: the writer's next write raises ``StagingAbandoned``."""
        with self._changed:
            self._abandoned = True
            self._changed.notify_all()

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- the readers' side ------------------------------------------------------------------

    def wait_for(self, end: int | None) -> int:
        """Wait until there are at least ``end`` bytes (None: until the writer finished) or the
        writer finished with fewer; return how many there are. Raises the writer's error, or
        ``StagingAbandoned`` once the commit gave up."""
        with self._changed:
            self._changed.wait_for(lambda: self._error is not None or self._finished or self._abandoned
                                   or (end is not None and self._size >= end))
            if self._error is not None:
                raise self._error
            if self._abandoned and not self._finished:
                raise StagingAbandoned("the commit gave up; no more bytes will come")
            return self._size

    def release(self, offset: int, length: int) -> None:
        """The bytes of ``(offset, length)`` are stored for good: free them, make room for more."""
        if self._fd is not None:
            _punch_hole(self._fd, offset, length)
        with self._changed:
            self._released += length
            self._changed.notify_all()

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def unreleased(self) -> int:
        """Bytes written and not yet released: what the staging holds now."""
        return self._size - self._released

    @property
    def size(self) -> int:
        """Bytes written so far (the whole size once finished)."""
        return self._size


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def _find_fallocate():
    """Linux's ``fallocate`` (64-bit offsets), or None where the C library has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        function = getattr(libc, "fallocate64", None) or libc.fallocate
    except (AttributeError, OSError, TypeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return function


_fallocate = _find_fallocate()


def _punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the pages of a byte range; where the system cannot, they are freed with the file."""
    if _fallocate is None:
        return
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        logger.debug("could not free staged bytes: %s", os.strerror(ctypes.get_errno()))
