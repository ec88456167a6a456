"""StagingFile: the local file of a checkpoint, readable in parts while it is still written.

``CheckpointStore.save_streaming`` lets a serialiser (``torch.save``) write into a
``StagingFile`` while the parts already written go up to the storage, so
serialising one part overlaps uploading the one before; writing the whole file
first made every save wait for the two in turn. The bytes stay in a local file
until the commit ends: a part that fails is sent again from it, and no copy of
the checkpoint is held in memory.

A file that is already complete (``CheckpointStore.save``) is a ``StagingFile``
that has finished, so both kinds of save share one commit path.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path


class StagingAbandoned(Exception):
    """Raised into the writer when the commit gave up: there is no point in writing on."""


class StagingFile:
    """A local file one writer appends to, and uploads read once their bytes are there.

    The writer uses it as a binary stream (``write``, ``flush``) and calls
    :meth:`finish` or :meth:`fail` at the end; readers call :meth:`wait_for` and then
    read the bytes it promised straight from :attr:`path`.
    """

    def __init__(self, path: str | os.PathLike, *, complete: bool = False):
        self.path = Path(path)
        self._changed = threading.Condition()
        self._error: BaseException | None = None
        self._abandoned = False
        if complete:
            self._fd = None
            self._size = self.path.stat().st_size
            self._finished = True
        else:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            self._size = 0
            self._finished = False

    @classmethod
    def of_complete(cls, path: str | os.PathLike) -> "StagingFile":
        """A file that is already written in full."""
        return cls(path, complete=True)

    # -- the writer's side ------------------------------------------------------------------

    def write(self, data) -> int:
        """Append ``data`` (bytes or any buffer, e.g. the memoryview torch.save passes)."""
        if self._abandoned:
            raise StagingAbandoned(f"the commit of {self.path} gave up; stopped writing it")
        if self._fd is None:
            raise ValueError(f"{self.path} is complete; it takes no more writes")
        view = memoryview(data).cast("B")
        written = 0
        while written < len(view):  # os.write may write less than asked
            written += os.write(self._fd, view[written:])
        with self._changed:
            self._size += written
            self._changed.notify_all()
        return written

    def flush(self) -> None:
        """Nothing to flush: every write went to the file already (torch.save calls it)."""

    def finish(self) -> None:
        """The writer is done: every byte is in the file."""
        self._close_fd()
        with self._changed:
            self._finished = True
            self._changed.notify_all()

    def fail(self, error: BaseException) -> None:
        """The writer failed with ``error``; readers waiting for bytes get it raised."""
        self._close_fd()
        with self._changed:
            self._error = error
            self._changed.notify_all()

    def abandon(self) -> None:
        """The commit gave up: the writer's next write raises ``StagingAbandoned``."""
        self._abandoned = True

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- the readers' side ------------------------------------------------------------------

    def wait_for(self, end: int | None) -> int:
        """Wait until the file holds at least ``end`` bytes (None: until it is complete) or is
        complete with fewer; return how many bytes it holds. Raises the writer's error."""
        with self._changed:
            self._changed.wait_for(lambda: self._error is not None or self._finished
                                   or (end is not None and self._size >= end))
            if self._error is not None:
                raise self._error
            return self._size

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def size(self) -> int:
        """Bytes written so far (the whole size once finished)."""
        return self._size
