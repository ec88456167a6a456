"""The local checkpoint: a file or a directory, replaced as a whole or not at all.

A checkpoint function is given a temporary path beside the final one, with the
final name's full suffix (Keras' ``save_weights`` insists on ``*.weights.h5``), and
the result is swapped in:

- a file by one ``rename`` (atomic);
- a directory by two: the old one is moved aside under a ``.previous`` name first.
  A crash between the two leaves the old directory there, and :meth:`recover`
  puts it back.

A checkpoint function that ignores the path it is given and writes the final path
itself (the seed's Keras callback does) still works: the old checkpoint is moved
aside under a ``.before-write`` name first, and removed once the function returned.
A crash while it writes leaves that name behind, so :meth:`recover` knows the final
path may be torn and puts the old checkpoint back.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Callable

from ckpt_tasks.errors import CkptTasksError

logger = logging.getLogger(__name__)

#: a temporary path this old (seconds since its last change) of a dead writer is removed
STALE_PARTIAL_SECONDS = 3600

#: seconds between two looks for them beside one checkpoint: recover() runs at every save,
#: a listing of the checkpoint's directory need not
_SWEEP_INTERVAL = 60.0
_last_sweep: dict[Path, float] = {}  # checkpoint path -> time.monotonic() of its last look

# What partial() puts between the prefix and the suffix: host, process id, a random tag.
_PARTIAL_TAG = re.compile(r"(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class LocalCheckpointPath:
    """Writes and swaps in the checkpoint at ``path`` (a file or a directory)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def _previous(self) -> Path:
        return self.path.with_name(f".{self.path.name}.previous")

    @property
    def _before_write(self) -> Path:
        return self.path.with_name(f".{self.path.name}.before-write")

    def _partial_prefix(self) -> tuple[str, str]:
        name = self.path.name
        stem, dot, suffixes = name.partition(".") if not name.startswith(".") else (name, "", "")
        return f".{stem}.partial-", f"{dot}{suffixes}"

    def partial(self) -> Path:
        """A new temporary path beside the final one, ending with its full suffix."""
        prefix, suffix = self._partial_prefix()
        tag = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        return self.path.with_name(f"{prefix}{tag}{suffix}")

    def remove_stale_partials(self) -> list[Path]:
        """Remove the temporary paths that a killed process of this host left behind.

        A partial path names its host and process; those of a process that still runs
        (another writer), of another host (a shared file system), or younger than
        :data:`STALE_PARTIAL_SECONDS` (a container's process ids are not this host's) are
        left alone.
        """
        prefix, _ = self._partial_prefix()
        host = socket.gethostname()
        removed = []
        if not self.path.parent.is_dir():
            return removed
        for candidate in self.path.parent.iterdir():
            if not candidate.name.startswith(prefix):
                continue
            writer = _PARTIAL_TAG.match(candidate.name[len(prefix):])
            if writer is None or writer["host"] != host or _process_alive(int(writer["pid"])):
                continue
            try:
                if time.time() - candidate.lstat().st_mtime < STALE_PARTIAL_SECONDS:
                    continue  # maybe a writer in another PID namespace of this host, still at work
                _remove(candidate)
            except FileNotFoundError:
                continue  # another process cleaned it up first
            removed.append(candidate)
        if removed:
            logger.info("removed %d temporary file(s) of killed writers beside %s", len(removed), self.path)
        return removed

    def exists(self) -> bool:
        """Whether a complete checkpoint is there (after :meth:`recover`)."""
        self.recover()
        return self.path.exists()

    def recover(self) -> None:
        """Undo what a crash in the middle of a swap or an in-place write left behind."""
        now = time.monotonic()
        if now - _last_sweep.get(self.path, -_SWEEP_INTERVAL) >= _SWEEP_INTERVAL:
            _last_sweep[self.path] = now
            self.remove_stale_partials()
        if self._before_write.exists() or self._before_write.is_symlink():
            logger.warning("%s may be torn (a write was interrupted); the checkpoint before it is put back",
                           self.path)
            if self.path.exists():
                _remove(self.path)
            os.replace(self._before_write, self.path)
        if self._previous.exists():
            if self.path.exists():
                _remove(self._previous)  # the swap had finished
            else:
                os.replace(self._previous, self.path)

    def swap_in(self, partial: Path) -> None:
        """Make ``partial`` (a complete file or directory) the checkpoint."""
        self.recover()
        if partial.is_dir() or self.path.is_dir():
            if self.path.exists():
                os.replace(self.path, self._previous)
            os.replace(partial, self.path)
            if self._previous.exists():
                _remove(self._previous)
        else:
            os.replace(partial, self.path)

    def write(self, writer: Callable[[Path], object]) -> None:
        """Run ``writer(partial)`` and swap the result in: complete or absent.

        Raises when the writer wrote neither to the path it was given nor to the final
        path. An exception from the writer leaves the previous checkpoint in place.
        """
        self.recover()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.partial()
        if self.path.exists():
            os.replace(self.path, self._before_write)
        try:
            writer(partial)
            if not partial.exists() and not self.path.exists():
                raise CkptTasksError(
                    f"checkpoint_function wrote nothing to the path it was given ({partial}) "
                    f"nor to {self.path}; it must write the checkpoint to the path it is given")
        except BaseException:
            if partial.exists():
                _remove(partial)
            if self._before_write.exists():
                if self.path.exists():
                    _remove(self.path)
                os.replace(self._before_write, self.path)
            raise
        # The new checkpoint is complete: from here the old one is only ".previous", which
        # recover() removes once the final path exists (a kill in between loses nothing new).
        if self._before_write.exists():
            os.replace(self._before_write, self._previous)
        if partial.exists():
            if self.path.exists():  # the writer wrote both: the path it was given wins
                _remove(self.path)
            os.replace(partial, self.path)
        else:
            logger.debug("checkpoint_function wrote %s itself, not the temporary path", self.path)
        if self._previous.exists():
            _remove(self._previous)
