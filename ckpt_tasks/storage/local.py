"""Local (or shared, mounted) directories: the ``file`` backend of the registry.

``OSError``s are classified by errno into the backend contract's errors
(``ckpt_tasks.storage.backend``): a missing path, a permanent refusal (permission,
full disk, read-only, bad path) or a transient outage of a mounted file system.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Callable

from ckpt_tasks.errors import (InvalidStoragePath, StorageError, StorageFull, StorageNotFound,
                               StoragePermissionDenied, StorageReadOnly, StorageUnavailable,
                               VerificationError)
from ckpt_tasks.progress import transfer_progress
from ckpt_tasks.storage.checksum import adler32, adler32_of_file
from ckpt_tasks.storage.registry import OpenedLocation

_ERRNO_CLASSES: dict[int, type[StorageError]] = {
    errno.ENOENT: StorageNotFound,
    errno.EACCES: StoragePermissionDenied, errno.EPERM: StoragePermissionDenied,
    errno.ENOSPC: StorageFull, errno.EDQUOT: StorageFull,
    errno.EROFS: StorageReadOnly,
    errno.ENOTDIR: InvalidStoragePath, errno.ENAMETOOLONG: InvalidStoragePath,
    errno.EINVAL: InvalidStoragePath, errno.ELOOP: InvalidStoragePath, errno.EISDIR: InvalidStoragePath,
    # A mounted file system (NFS, CephFS, a FUSE mount of XRootD) that hiccups: retried.
    **dict.fromkeys((errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.EBUSY, errno.EINTR,
                     errno.ENOTCONN, errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTDOWN,
                     errno.EHOSTUNREACH, errno.ENETDOWN, errno.ENETUNREACH, errno.ENOLCK),
                    StorageUnavailable),
}


def classify_os_error(error: OSError, what: str, path: str | os.PathLike) -> StorageError:
    """The contract's error for ``error`` raised while doing ``what`` on ``path``; errnos not
    listed become a plain StorageError, which is not retried."""
    cls = _ERRNO_CLASSES.get(error.errno, StorageError)
    reason = error.strerror or str(error)
    return cls(f"cannot {what} {path}: {reason}", str(path))


def open_local(location: str, deadline: float) -> OpenedLocation:
    """The registry's factory for local paths (``location`` is absolute, validated)."""
    del deadline  # local calls return or fail by themselves
    return OpenedLocation(LocalFileInterface(), location)


def _fsync_dir(directory: Path) -> None:
    # Makes a rename durable: without it a crash can forget the new directory entry.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_with_adler32(src: str | os.PathLike, dst: str | os.PathLike, sync: bool = False,
                       span: tuple[int, int] | None = None, at: int | None = None) -> int:
    """Copy ``src`` (or its ``span``, ``(offset, length)``) to ``dst`` in one pass and return
    the adler32 of the bytes copied. With ``at`` they go to that offset of the existing ``dst``."""
    value = 1
    with open(src, "rb") as source, open(dst, "wb" if at is None else "r+b") as target:
        offset, left = span if span is not None else (0, os.fstat(source.fileno()).st_size)
        source.seek(offset)
        target.seek(at or 0)
        with transfer_progress(left, f"copy {Path(src).name}") as advance:
            while left and (chunk := source.read(min(8 << 20, left))):
                value = adler32(chunk, value)
                target.write(chunk)
                advance(len(chunk))
                left -= len(chunk)
        if left:
            raise OSError(errno.EIO, f"{src} ended {left} bytes early")
        if sync:
            target.flush()
            os.fsync(target.fileno())
    return value


class LocalFileInterface:
    """The backend contract (``StorageBackend``) on a local or mounted file system (also the
    ``shared`` mode's storage)."""

    def exists(self, path: str | os.PathLike) -> bool:
        try:
            os.stat(path)
        except FileNotFoundError:
            return False
        except OSError as error:
            # ENOENT is "absent"; a stale NFS handle or EACCES is not.
            raise classify_os_error(error, "stat", path) from error
        return True

    def stat(self, path: str | os.PathLike) -> os.stat_result:
        try:
            return os.stat(path)
        except OSError as error:
            raise classify_os_error(error, "stat", path) from error

    def listdir(self, path: str | os.PathLike) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except OSError as error:
            raise classify_os_error(error, "list", path) from error

    def mkdir_rec(self, path: str | os.PathLike) -> None:
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise classify_os_error(error, "create directory", path) from error

    def remove(self, path: str | os.PathLike, silent: bool = True) -> bool:
        try:
            if Path(path).is_dir():
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except FileNotFoundError as error:
            if silent:
                return False
            raise classify_os_error(error, "remove", path) from error
        except OSError as error:
            raise classify_os_error(error, "remove", path) from error
        return True

    def upload(self, local: str | os.PathLike, path: str | os.PathLike, adler32: int | None = None,
               span: tuple[int, int] | None = None, on_sent: Callable[[], None] | None = None) -> int:
        """Copy ``local`` (or its ``span``, ``(offset, length)``) to ``path`` durably, re-read what
        was stored and verify it against ``adler32`` or, without it, the adler32 computed while
        copying; return it. ``on_sent`` is called after the copy, before the check."""
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            sent = _copy_with_adler32(local, path, sync=True, span=span)
        except OSError as error:
            raise classify_os_error(error, "write", path) from error
        if on_sent is not None:
            on_sent()
        expected = sent if adler32 is None else adler32
        stored = adler32_of_file(path)[1]
        if stored != expected:
            raise VerificationError(
                f"adler32 of {path} is {stored:08x} after writing, expected {expected:08x}", str(path))
        return expected

    def download(self, path: str | os.PathLike, local: str | os.PathLike, adler32: int | None = None,
                 at: int | None = None) -> None:
        """Copy ``path`` to ``local`` (with ``at``, to that offset of the existing ``local``);
        with ``adler32``, check the bytes while copying them."""
        try:
            received = _copy_with_adler32(path, local, at=at)
        except OSError as error:
            raise classify_os_error(error, f"copy to {local}", path) from error
        if adler32 is not None and received != adler32:
            raise VerificationError(
                f"adler32 of {path} is {received:08x}, expected {adler32:08x}", str(path))

    def read_bytes(self, path: str | os.PathLike) -> bytes:
        """The whole content of a small file (manifests, pointers); FileNotFoundError when absent."""
        try:
            return Path(path).read_bytes()
        except OSError as error:
            raise classify_os_error(error, "read", path) from error

    def checksum(self, path: str | os.PathLike) -> int:
        try:
            return adler32_of_file(path)[1]
        except OSError as error:
            raise classify_os_error(error, "read", path) from error

    #: reading the file is what ``checksum`` does already
    compute_checksum = checksum

    def rename(self, src: str | os.PathLike, dst: str | os.PathLike) -> None:
        """Atomically replace ``dst`` with ``src`` (same file system)."""
        try:
            os.replace(src, dst)
            _fsync_dir(Path(dst).parent)
        except OSError as error:
            raise classify_os_error(error, f"rename {src} to", dst) from error
