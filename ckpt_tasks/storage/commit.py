"""The one place where a file is published to storage: complete or absent.

Every writer (the Checkpointer's ``shared`` and ``xrootd`` modes, and the
checkpoint store) publishes through ``publish_file``:

1. take the size of the local file;
2. upload it under a temporary name beside the destination, computing its
   adler32 on the way;
3. check that the storage holds exactly those bytes (the storage's adler32 of
   the stored file equals the one of the bytes sent, size compared with the
   storage's ``stat``);
4. rename the temporary file to the destination, atomically.

A reader therefore sees the old file or the new one, never half of one. A
writer killed at any moment leaves at most a stray temporary file.
"""
from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from ckpt_tasks.errors import StorageError, VerificationError

logger = logging.getLogger(__name__)

PARTIAL_MARKER = ".partial-"


class FileInterface(Protocol):
    """What ``publish_file`` needs from a storage (local directory or XRootD)."""

    def upload(self, local, path, adler32: int | None = None, span: tuple[int, int] | None = None,
               on_sent: Callable[[], None] | None = None) -> int: ...
    def stat(self, path): ...
    def rename(self, src, dst) -> None: ...
    def remove(self, path, silent: bool = True) -> bool: ...


@dataclass(frozen=True)
class PublishedFile:
    """A file that is complete on the storage."""

    path: str
    size: int
    adler32: int


def temporary_name(dest: str | os.PathLike) -> str:
    """A unique name in the destination's directory, so the final rename is atomic."""
    # Plain string surgery: a URL's "//" must survive, which PurePosixPath would collapse.
    directory, _, name = str(dest).rpartition("/")
    tag = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    partial = f".{name}{PARTIAL_MARKER}{tag}"
    return f"{directory}/{partial}" if directory or str(dest).startswith("/") else partial


def _remove_quietly(files: FileInterface, temporary: str) -> None:
    # Interrupted or failed: the destination is untouched; tidy up if the storage lets us.
    try:
        files.remove(temporary, silent=True)
    except StorageError as cleanup_error:
        logger.warning("could not remove temporary file %s: %s", temporary, cleanup_error)


def publish_file(files: FileInterface, local: str | os.PathLike, dest: str | os.PathLike,
                 span: tuple[int, int] | None = None, on_sent: Callable[[], None] | None = None) -> PublishedFile:
    """Publish ``local`` (or its ``span``, ``(offset, length)``) at ``dest`` on ``files``,
    complete or not at all. ``on_sent`` is called once the bytes are on the storage,
    before they are checked."""
    local = Path(local)
    size = span[1] if span is not None else local.stat().st_size
    temporary = temporary_name(dest)
    try:
        # The storage checks what it stored against the adler32 of the bytes sent, which
        # the upload computes while sending them: no separate pass over the file.
        adler32 = files.upload(local, temporary, span=span, on_sent=on_sent)
        stored_size = files.stat(temporary).st_size
        if stored_size != size:
            raise VerificationError(
                f"{temporary} holds {stored_size} bytes after upload, expected {size}", str(dest))
        files.rename(temporary, dest)
    except StorageError as error:
        _remove_quietly(files, temporary)
        raise type(error)(f"publishing {local} to {dest} failed: {error}", str(dest)) from error
    except BaseException:
        _remove_quietly(files, temporary)
        raise
    logger.debug("published %s (%d bytes, adler32 %08x)", dest, size, adler32)
    return PublishedFile(str(dest), size, adler32)
