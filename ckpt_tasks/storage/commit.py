"""The one place where a file is published to storage: complete or absent.

Every writer (the Checkpointer's ``shared`` and ``xrootd`` modes, and the
checkpoint store) publishes through ``publish_file``, on any backend of the
contract in ``ckpt_tasks.storage.backend``:

1. take the size of the local file;
2. upload it under a temporary name beside the destination, computing its
   adler32 on the way;
3. check that the storage holds exactly those bytes (the storage's adler32 of
   the stored file equals the one of the bytes sent, size compared with the
   storage's ``stat``);
4. rename the temporary file to the destination, atomically.

A reader therefore sees the old file or the new one, never half of one. A
writer killed at any moment leaves at most a stray temporary file.

``stage_file`` does steps 1 to 3 and hands back a :class:`StagedFile` whose
``commit()`` is step 4, so a writer can stage several files at once and rename
them in the order its protocol needs (the checkpoint store: data, manifest, LATEST).

``publish_parts`` publishes a checkpoint larger than one part as parts, each
through ``publish_file``, as soon as its bytes are staged.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from ckpt_tasks.errors import StorageError, VerificationError
from ckpt_tasks.storage.backend import StorageBackend
from ckpt_tasks.storage.records import StoredFile
from ckpt_tasks.storage.retry import RetryPolicy
from ckpt_tasks.storage.staging import StagingFile

logger = logging.getLogger(__name__)

PARTIAL_MARKER = ".partial-"
#: parts published at once: one uploading while the storage checks the previous one
PARTS_IN_FLIGHT = 2


def temporary_name(dest: str | os.PathLike) -> str:
    """A unique name in the destination's directory, so the final rename is atomic."""
    # Plain string surgery: a URL's "//" must survive, which PurePosixPath would collapse.
    directory, _, name = str(dest).rpartition("/")
    tag = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    partial = f".{name}{PARTIAL_MARKER}{tag}"
    return f"{directory}/{partial}" if directory or str(dest).startswith("/") else partial


def _remove_quietly(files: StorageBackend, temporary: str) -> None:
    # Interrupted or failed: the destination is untouched; tidy up if the storage lets us.
    try:
        files.remove(temporary, silent=True)
    except StorageError as cleanup_error:
        logger.warning("could not remove temporary file %s: %s", temporary, cleanup_error)


@dataclass
class StagedFile:
    """A file complete and checked on the storage under a temporary name, not yet published:
    ``commit()`` renames it to its destination, ``discard()`` removes it."""

    files: StorageBackend
    temporary: str
    stored: StoredFile  # with the destination's path

    def commit(self) -> StoredFile:
        """Rename the file into place, atomically; what ``publish_file`` returns."""
        try:
            self.files.rename(self.temporary, self.stored.path)
        except StorageError as error:
            _remove_quietly(self.files, self.temporary)
            raise type(error)(f"publishing {self.stored.path} failed: {error}", self.stored.path) from error
        except BaseException:
            _remove_quietly(self.files, self.temporary)
            raise
        logger.debug("published %s (%d bytes, adler32 %08x)", self.stored.path, self.stored.size, self.stored.adler32)
        return self.stored

    def discard(self) -> None:
        """Remove the temporary file (the commit it belonged to failed)."""
        _remove_quietly(self.files, self.temporary)


def stage_file(files: StorageBackend, local: str | os.PathLike, dest: str | os.PathLike,
               span: tuple[int, int] | None = None, on_sent: Callable[[], None] | None = None,
               adler32: int | None = None) -> StagedFile:
    """Steps 1 to 3 of the protocol: ``local`` (or its ``span``) complete and checked on
    ``files`` under a temporary name beside ``dest`` (with ``adler32``, also checked against
    it: the caller wrote it into a manifest before the upload). Step 4 is ``commit()``."""
    local = Path(local)
    size = span[1] if span is not None else local.stat().st_size
    temporary = temporary_name(dest)
    try:
        # The storage checks what it stored against the adler32 of the bytes sent, which
        # the upload computes while sending them: no separate pass over the file.
        sent = files.upload(local, temporary, adler32=adler32, span=span, on_sent=on_sent)
        # A backend whose upload compares the stored size itself saves this round trip.
        if not getattr(files, "upload_checks_size", False):
            stored_size = files.stat(temporary).st_size
            if stored_size != size:
                raise VerificationError(
                    f"{temporary} holds {stored_size} bytes after upload, expected {size}", str(dest))
    except StorageError as error:
        _remove_quietly(files, temporary)
        raise type(error)(f"publishing {local} to {dest} failed: {error}", str(dest)) from error
    except BaseException:
        _remove_quietly(files, temporary)
        raise
    return StagedFile(files, temporary, StoredFile(str(dest), size, sent))


def publish_file(files: StorageBackend, local: str | os.PathLike, dest: str | os.PathLike,
                 span: tuple[int, int] | None = None, on_sent: Callable[[], None] | None = None) -> StoredFile:
    """Publish ``local`` (or its ``span``, ``(offset, length)``) at ``dest`` on ``files``,
    complete or not at all. ``on_sent`` is called once the bytes are on the storage,
    before they are checked."""
    return stage_file(files, local, dest, span=span, on_sent=on_sent).commit()


class _SendingTurn:
    """One part sends at a time: the storage checks the part just sent while the next
    goes up. (Two sending at once share the bandwidth, then wait for their checks together.)"""

    def __init__(self, lock: threading.Lock):
        lock.acquire()
        self._lock, self._held = lock, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._lock.release()


def _remove_published(files: StorageBackend, futures: list) -> BaseException | None:
    """Remove the parts that were published; return the error of the first that failed."""
    started = [future for future in futures if not future.cancelled()]
    for future in started:
        if future.exception() is None:
            with contextlib.suppress(StorageError):  # else an orphan, removed by retention later
                files.remove(future.result().path, silent=True)
    return next((f.exception() for f in started if f.exception() is not None), None)


def publish_parts(files: StorageBackend, retry: RetryPolicy, source: StagingFile, part_size: int,
                  part_path: Callable[[int], str]) -> list[StoredFile]:
    """Publish ``source`` as parts of ``part_size`` bytes at ``part_path(index)``, each as
    soon as its bytes are written, ``PARTS_IN_FLIGHT`` at a time, one of them sending while
    the others are checked; return them with their offsets.

    All or none: when a part fails for good, the parts already published are removed.
    """
    sending = threading.Lock()

    def publish(index: int, span: tuple[int, int]) -> StoredFile:
        dest = part_path(index)

        def attempt() -> StoredFile:
            turn = _SendingTurn(sending)
            try:
                return publish_file(files, source.path, dest, span=span, on_sent=turn.release)
            finally:
                turn.release()

        try:
            published = retry.run(attempt, f"uploading {dest}")
        except BaseException:
            source.abandon()  # the commit has failed: a writer still writing stops
            raise
        source.release(*span)  # stored for good: the writer may reuse its memory
        return replace(published, offset=span[0])

    with ThreadPoolExecutor(PARTS_IN_FLIGHT, thread_name_prefix="ckpt-part") as pool:
        futures = []
        try:
            offset = 0
            while (written := source.wait_for(offset + part_size)) > offset:
                length = min(part_size, written - offset)
                futures.append(pool.submit(publish, len(futures), (offset, length)))
                offset += length
            return [future.result() for future in futures]
        except BaseException as error:
            source.abandon()
            for future in futures:
                future.cancel()
            cause = _remove_published(files, futures)
            # A part that failed for good stopped the writer: its error is the one to tell.
            if cause is not None and cause is not error:
                raise cause from None
            raise


def discard_on_error(outcomes: list[tuple[Any, BaseException | None]]) -> None:
    """Raise the first error of ``outcomes``, after discarding the files the others staged."""
    error = next((e for _, e in outcomes if e is not None), None)
    if error is None:
        return
    for result, _ in outcomes:
        if isinstance(result, StagedFile):
            result.discard()
    raise error
