"""The backend contract: what the checkpoint store needs of a storage.

Every storage (a local directory, XRootD, a test double) is one class with the
operations of :class:`StorageBackend`; ``ckpt_tasks.storage.registry`` maps a
location's URL scheme to a factory of it. ``CheckpointStore``, ``publish_file``
and the seed's transfer modes use nothing else.

Paths are full paths or URLs of the storage (``/data/ckpt/LATEST``,
``root://host:1094//data/ckpt/LATEST``), built by joining a location's root and a
name with ``/``.

Error contract, the same for every operation and every backend:

- **absent**: ``exists`` answers ``False``; every other operation on an absent path
  raises :class:`~ckpt_tasks.errors.StorageNotFound` (a ``FileNotFoundError``), except
  ``remove(silent=True)``, which answers ``False``.
- **outage** (connection refused, timeouts, a restarting or overloaded server, a
  stale handle): :class:`~ckpt_tasks.errors.StorageUnavailable`. It is transient:
  the store retries it within its timeout. "The server did not answer" is never
  ``False`` or an empty listing.
- **refusals no retry can change**, raised at once and never retried, subclasses of
  :class:`~ckpt_tasks.errors.PermanentStorageError`: permission denied
  (``StoragePermissionDenied``), authentication failed
  (``StorageAuthenticationFailed``), an invalid path or URL (``InvalidStoragePath``),
  no space or quota left (``StorageFull``), a read-only file system or export
  (``StorageReadOnly``).
- **mismatch**: what the storage holds differs from the bytes sent or the checksum
  expected: :class:`~ckpt_tasks.errors.VerificationError`.
- anything else the backend cannot classify: a plain
  :class:`~ckpt_tasks.errors.StorageError` (not retried), naming the path and the cause.

A backend is used from several threads at once (parts are published two at a time,
independent requests go out together to save round trips). A backend whose ``upload``
compares the stored size with the bytes sent itself sets ``upload_checks_size = True``
and ``publish_file`` skips its own ``stat``.
"""
from __future__ import annotations

import os
from typing import Callable, Protocol, runtime_checkable


@runtime_checkable
class StorageBackend(Protocol):
    """The operations of a storage, with the module's error contract."""

    def exists(self, path: str) -> bool:
        """True when ``path`` (a file or a directory) exists, False when the storage says it
        does not; an outage raises."""

    def stat(self, path: str) -> os.stat_result:
        """An object with ``st_size``, ``st_mode`` and ``st_mtime`` of ``path``."""

    def listdir(self, path: str) -> list[str]:
        """The names in the directory ``path``, sorted."""

    def mkdir_rec(self, path: str) -> None:
        """Create the directory ``path`` and its parents; an existing one is fine."""

    def upload(self, local: str | os.PathLike, path: str, adler32: int | None = None,
               span: tuple[int, int] | None = None, on_sent: Callable[[], None] | None = None) -> int:
        """Write the local file (or its ``span``, ``(offset, length)``) to ``path``, replacing it,
        creating missing directories; call ``on_sent`` once the bytes are on the storage; then
        check what the storage holds against the adler32 of the bytes sent (and ``adler32``
        when given) and return it. ``publish_file`` uploads under a temporary name only."""

    def download(self, path: str, local: str | os.PathLike, adler32: int | None = None,
                 at: int | None = None) -> None:
        """Copy ``path`` to the local file (with ``at``, into the existing file from that
        offset on); with ``adler32``, check the bytes received against it."""

    def read_bytes(self, path: str) -> bytes:
        """The whole content of a small file (manifests, the ``LATEST`` pointer)."""

    def checksum(self, path: str) -> int:
        """The storage's adler32 of ``path`` (it may come from a cache on the storage)."""

    def compute_checksum(self, path: str) -> int:
        """The adler32 of the bytes the storage returns for ``path`` now (never a cached one)."""

    def rename(self, src: str, dst: str) -> None:
        """Rename ``src`` to ``dst``, atomically replacing ``dst``."""

    def remove(self, path: str, silent: bool = True) -> bool:
        """Remove a file or a directory tree; True when something was removed. An absent path
        answers False when ``silent``, else raises ``StorageNotFound``."""
