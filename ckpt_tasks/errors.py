"""The exceptions of ckpt_tasks.

Storage errors are loud by design: "the server did not answer" must never be
read as "there is no checkpoint" (see DESIGN.md, "Loud storage errors").
"""
from __future__ import annotations


class CkptTasksError(Exception):
    """Base class of every error raised by ckpt_tasks."""


class StorageError(CkptTasksError):
    """A storage operation failed; the message names the location and the cause."""

    def __init__(self, message: str, location: str | None = None):
        self.location = location
        super().__init__(f"{message}" if location is None or location in message
                         else f"{message} ({location})")


class StorageUnavailable(StorageError):
    """The storage did not answer (connection refused, timeout, server error): transient,
    retried within the store's timeout."""


class StorageNotFound(StorageError, FileNotFoundError):
    """The storage answered that the path does not exist (also a ``FileNotFoundError``)."""


class PermanentStorageError(StorageError):
    """The storage answered with a refusal that no retry can change: raised at once."""


class StoragePermissionDenied(PermanentStorageError):
    """The storage refused the operation for lack of a permission."""


class StorageAuthenticationFailed(PermanentStorageError):
    """The storage did not accept who we are (missing, expired or refused credentials)."""


class InvalidStoragePath(PermanentStorageError):
    """The path or URL cannot name a file there (not a directory, too long, malformed)."""


class StorageFull(PermanentStorageError):
    """The storage has no space left, or the quota is exhausted."""


class StorageReadOnly(PermanentStorageError):
    """The storage, or the part of it the path lies in, is read-only."""


class VerificationError(StorageError):
    """What the storage holds differs from what was written (size or adler32)."""


class JobAdError(CkptTasksError):
    """The HTCondor job ClassAd is missing or lacks a required attribute."""


class FingerprintMismatch(CkptTasksError):
    """A checkpoint was made by a training with other parameters."""
