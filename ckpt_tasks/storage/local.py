"""Local (or shared, mounted) directories with the same operations as XRootD storage."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Callable

from ckpt_tasks.errors import StorageError, StorageUnavailable, VerificationError
from ckpt_tasks.progress import transfer_progress
from ckpt_tasks.storage.checksum import adler32, adler32_of_file


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
    """File operations on a local or mounted file system (the ``shared`` mode's storage)."""

    def exists(self, path: str | os.PathLike) -> bool:
        try:
            os.stat(path)
        except FileNotFoundError:
            return False
        except OSError as error:
            # ENOENT is "absent"; a stale NFS handle or EACCES is not.
            raise StorageUnavailable(f"cannot stat {path}: {error.strerror}", str(path)) from error
        return True

    def stat(self, path: str | os.PathLike) -> os.stat_result:
        try:
            return os.stat(path)
        except OSError as error:
            raise StorageError(f"cannot stat {path}: {error.strerror}", str(path)) from error

    def listdir(self, path: str | os.PathLike) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except OSError as error:
            raise StorageError(f"cannot list {path}: {error.strerror}", str(path)) from error

    def mkdir_rec(self, path: str | os.PathLike) -> None:
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StorageError(f"cannot create directory {path}: {error.strerror}", str(path)) from error

    def remove(self, path: str | os.PathLike, silent: bool = True) -> bool:
        try:
            if Path(path).is_dir():
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            if silent:
                return False
            raise StorageError(f"cannot remove {path}: no such file or directory", str(path))
        except OSError as error:
            raise StorageError(f"cannot remove {path}: {error.strerror}", str(path)) from error
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
            kind = "the disk is full" if error.errno == errno.ENOSPC else error.strerror
            raise StorageError(f"cannot write {path}: {kind}", str(path)) from error
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
            raise StorageError(f"cannot copy {path} to {local}: {error.strerror}", str(path)) from error
        if adler32 is not None and received != adler32:
            raise VerificationError(
                f"adler32 of {path} is {received:08x}, expected {adler32:08x}", str(path))

    def read_bytes(self, path: str | os.PathLike) -> bytes:
        """The whole content of a small file (manifests, pointers); FileNotFoundError when absent."""
        try:
            return Path(path).read_bytes()
        except FileNotFoundError:
            raise
        except OSError as error:
            raise StorageError(f"cannot read {path}: {error.strerror}", str(path)) from error

    def checksum(self, path: str | os.PathLike) -> int:
        try:
            return adler32_of_file(path)[1]
        except OSError as error:
            raise StorageError(f"cannot read {path}: {error.strerror}", str(path)) from error

    #: reading the file is what ``checksum`` does already
    compute_checksum = checksum

    def rename(self, src: str | os.PathLike, dst: str | os.PathLike) -> None:
        """Atomically replace ``dst`` with ``src`` (same file system)."""
        try:
            os.replace(src, dst)
            _fsync_dir(Path(dst).parent)
        except OSError as error:
            raise StorageError(f"cannot rename {src} to {dst}: {error.strerror}", str(dst)) from error
