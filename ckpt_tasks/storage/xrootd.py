"""XRootD storage through the ``xrootd`` Python client: the ``root``/``roots`` backend.

``XRootDFileInterface`` implements the backend contract (``ckpt_tasks.storage.backend``):
upload with an adler32 check by the server, server-side checksum and rename, and
the rest. ``ckpt_tasks.storage.targets`` puts law's remote-target API on top of it.

Errors are loud: ``exists()`` answers False only when the server says "no such
file"; refusals (permission, authentication, bad path, no space, read-only) raise
the contract's permanent errors at once, everything else ``StorageUnavailable``
naming the URL and the server's message (see ``xrootd_client``).
"""
from __future__ import annotations

import contextlib
import math
import os
import stat as stat_module
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ckpt_tasks.errors import StorageError, StorageFull, StorageNotFound, StorageUnavailable, VerificationError
from ckpt_tasks.progress import XRootDProgress, transfer_progress
from ckpt_tasks.storage.checksum import adler32 as adler32_of
from ckpt_tasks.storage.location import XRootDURL, parse_xrootd_url
from ckpt_tasks.storage.parallel import together
from ckpt_tasks.storage.registry import OpenedLocation
from ckpt_tasks.storage.xrootd_client import XRD_NOT_FOUND as _XRD_NOT_FOUND
from ckpt_tasks.storage.xrootd_client import CHUNK as _CHUNK
from ckpt_tasks.storage.xrootd_client import classify_status, pipelined, gated as _gated
from ckpt_tasks.storage.xrootd_client import client as _client

#: the longest a single client call may wait (the client's own default)
CALL_TIMEOUT = 30


def open_xrootd(location: str, deadline: float) -> OpenedLocation:
    """The registry's factory for ``root://`` and ``roots://`` locations."""
    url = parse_xrootd_url(location)
    # A single call must not outlast the store's retry deadline.
    timeout = max(1, min(CALL_TIMEOUT, math.ceil(deadline)))
    return OpenedLocation(XRootDFileInterface(url.server, timeout=timeout), url.url)


@dataclass(frozen=True)
class XRootDStat:
    """What ``stat`` returns, shaped like ``os.stat_result`` for law."""

    st_size: int
    st_mode: int
    st_mtime: float


class XRootDFileInterface:
    """The backend contract over the XRootD Python client.

    ``base`` is ``root://host[:port]`` or ``root://host[:port]//prefix``; paths
    given to the methods are relative to it (law's convention), absolute URLs
    (``root://...``) are taken as they are.
    """

    #: ``upload`` compares the stored size itself (``commit.stage_file`` need not stat again)
    upload_checks_size = True

    def __init__(self, base: str, timeout: int = CALL_TIMEOUT):
        parse_xrootd_url(base)  # validate early, with a clear message
        self.base = [os.path.expandvars(str(base))]  # a list, as law keeps it
        self.timeout = timeout
        self._filesystems: dict[str, object] = {}
        _client()  # imported in this thread, before requests go out from several

    def uri(self, path, base: str | None = None, **kwargs) -> str:
        """``path`` joined to the base (law's convention: a leading "/" is inside the base)."""
        return os.path.join(base or self.base[0], str(path).lstrip("/")).rstrip("/")

    # -- helpers ---------------------------------------------------------------------

    def resolve(self, path: str, base: str | None = None) -> XRootDURL:
        """The validated URL of ``path`` (relative to the base, or a full root:// URL)."""
        text = str(path)
        if not text.startswith(("root://", "roots://")):
            text = self.uri(text, base=base)
        return parse_xrootd_url(text)

    def _fs(self, url: XRootDURL):
        fs = self._filesystems.get(url.server)
        if fs is None:
            fs = self._filesystems[url.server] = _client().FileSystem(url.server)
        return fs

    @staticmethod
    def _fail(status, what: str, url) -> StorageError:
        return classify_status(status, what, url)

    @_gated
    def _stat_url(self, url: XRootDURL):
        return self._stat_ungated(url)

    def _stat_ungated(self, url: XRootDURL):
        # For threads working inside an operation already gated by another thread: entering
        # the gate again would wait for a fork that waits for that operation (a deadlock).
        status, info = self._fs(url).stat(url.path, timeout=self.timeout)
        if status.ok:
            return info
        if status.errno == _XRD_NOT_FOUND:
            return None
        raise self._fail(status, "stat", url)

    # -- the backend contract (and law's RemoteFileInterface, with targets.py) -------------

    def exists(self, path, base=None, stat=False, **kwargs):
        info = self._stat_url(self.resolve(path, base))
        if info is None:
            return None if stat else False
        return self._to_stat(info) if stat else True

    def stat(self, path, base=None, **kwargs):
        url = self.resolve(path, base)
        info = self._stat_url(url)
        if info is None:
            raise StorageNotFound(f"no such file or directory: {url}", str(url))
        return self._to_stat(info)

    @staticmethod
    def _to_stat(info) -> XRootDStat:
        from XRootD.client.flags import StatInfoFlags

        is_dir = bool(info.flags & StatInfoFlags.IS_DIR)
        mode = (stat_module.S_IFDIR | 0o755) if is_dir else (stat_module.S_IFREG | 0o644)
        return XRootDStat(st_size=int(info.size), st_mode=mode, st_mtime=float(info.modtime))

    def unlink(self, path, base=None, silent=True, **kwargs):
        return self._remove_entry("rm", path, base, silent)

    def rmdir(self, path, base=None, silent=True, **kwargs):
        return self._remove_entry("rmdir", path, base, silent)

    @_gated
    def _remove_entry(self, operation: str, path, base, silent: bool) -> bool:
        """One ``rm`` or ``rmdir``; an absent path is False when ``silent``."""
        url = self.resolve(path, base)
        status, _ = getattr(self._fs(url), operation)(url.path, timeout=self.timeout)
        if status.ok:
            return True
        if status.errno == _XRD_NOT_FOUND and silent:
            return False
        raise self._fail(status, operation, url)

    def remove(self, path, base=None, silent=True, **kwargs):
        url = self.resolve(path, base)
        # A file (what the store removes) goes in one request; a directory, or any refusal,
        # takes the path below, which stats first and answers with the contract's errors.
        try:
            return self._remove_entry("rm", url.url, None, silent)
        except StorageUnavailable:
            raise
        except StorageError:
            pass
        info = self._stat_url(url)
        if info is None:
            if silent:
                return False
            raise StorageNotFound(f"cannot remove {url}: no such file or directory", str(url))
        if self._to_stat(info).st_mode & stat_module.S_IFDIR == stat_module.S_IFDIR:
            for name in self.listdir(url.url):
                self.remove(url.child(name).url, silent=silent)
            return self.rmdir(url.url, silent=silent)
        return self.unlink(url.url, silent=silent)

    def mkdir_rec(self, path, perm=0o755, base=None, **kwargs):
        return self._mkdir(path, base, recursive=True, silent=True)

    @_gated
    def _mkdir(self, path, base, recursive: bool, silent: bool) -> bool:
        from XRootD.client.flags import MkDirFlags

        url = self.resolve(path, base)
        flags = MkDirFlags.MAKEPATH if recursive else MkDirFlags.NONE
        status, _ = self._fs(url).mkdir(url.path, flags, timeout=self.timeout)
        if status.ok:
            return True
        # An existing directory is fine when silent; anything else is an error.
        if silent:
            info = self._stat_url(url)
            if info is not None and stat_module.S_ISDIR(self._to_stat(info).st_mode):
                return False
        raise self._fail(status, "mkdir", url)

    @_gated
    def listdir(self, path, base=None, **kwargs):
        url = self.resolve(path, base)
        status, listing = self._fs(url).dirlist(url.path, timeout=self.timeout)
        if not status.ok:
            raise self._fail(status, "dirlist", url)
        return sorted(entry.name for entry in listing)

    # -- what the commit protocol needs ------------------------------------------------------

    @_gated
    def upload(self, local: str | os.PathLike, path: str, adler32: int | None = None,
               base: str | None = None, span: tuple[int, int] | None = None,
               on_sent: Callable[[], None] | None = None) -> int:
        """Copy a local file (or its ``span``, ``(offset, length)``) to ``path``, overwriting, and
        return the adler32 the server verified. ``on_sent`` is called once every byte is
        on the server, before the checks.

        Chunks go out ``xrootd_client.IN_FLIGHT`` at a time while the adler32 of the bytes sent is
        computed beside them; after the close the server computes the adler32 of what
        it stored, which must equal it (and ``adler32``, when given): no extra pass over
        the local file, and never a copy that differs from what was sent.
        """
        from XRootD.client.flags import AccessMode, OpenFlags

        url = self.resolve(path, base)
        handle = _client().File()
        # DELETE: create or truncate (the upload overwrites); MAKEPATH: create missing directories.
        # rw-r--r--, as xrdcp creates files: without a mode the server makes them owner-only,
        # and collaborators or jobs of another account could no longer restore.
        status, _ = handle.open(url.url, OpenFlags.DELETE | OpenFlags.MAKEPATH,
                                mode=AccessMode.UR | AccessMode.UW | AccessMode.GR | AccessMode.OR,
                                timeout=self.timeout)
        if not status.ok:
            raise self._fail(status, "open for writing", url)
        sent, closed = 1, False
        try:
            with open(local, "rb") as source:
                start, size = span if span is not None else (0, os.fstat(source.fileno()).st_size)

                def send(offset: int) -> bytes:
                    length = min(_CHUNK, size - offset)
                    data = os.pread(source.fileno(), length, start + offset)
                    if len(data) != length:
                        raise OSError(f"{local} ended early while uploading it to {url}")
                    try:
                        status, _ = handle.write(data, offset, len(data), timeout=self.timeout)
                    except ValueError as error:  # the client closed the file after losing the server
                        raise StorageUnavailable(f"write to {url} failed: {error}", str(url)) from error
                    if not status.ok:
                        raise self._fail(status, "write", url)
                    return data

                with transfer_progress(size, f"xrootd {url.path.rsplit('/', 1)[-1]}") as advance:
                    for data in pipelined(send, size, "xrootd-write"):
                        sent = adler32_of(data, sent)
                        advance(len(data))
            closed = True
            status, _ = handle.close(timeout=self.timeout)
            if not status.ok:
                raise self._fail(status, "close after writing", url)
        finally:
            if not closed:
                handle.close(timeout=self.timeout)
        if on_sent is not None:
            on_sent()
        return self._check_stored(url, size, sent, adler32)

    def _check_stored(self, url: XRootDURL, size: int, sent: int, adler32: int | None) -> int:
        """The server's adler32 of what it stored, checked against the bytes sent."""
        # The server acknowledges a write that its disk cut short (a full disk returns a
        # short count, not an error, and the server passes that on as success in 5.5.3,
        # measured with its data on a full tmpfs): no retry makes room, so it is permanent.
        # Both questions at once: one round trip instead of two over a slow link.
        # (Ungated: this runs inside the gated upload; see _stat_ungated.)
        info, stored = together(lambda: self._stat_ungated(url), lambda: self._checksum_ungated(url))
        stored_size = info.size if info is not None else 0
        if stored_size != size:
            raise StorageFull(
                f"the server stored only {stored_size} of {size} bytes of {url} and reported no error: "
                f"no space left on its disk, or over quota", str(url))
        expected = sent if adler32 is None else adler32
        if stored != expected or sent != expected:
            raise VerificationError(
                f"checksum mismatch after uploading {url}: the server's adler32 is {stored:08x}, "
                f"the bytes sent {sent:08x}, expected {expected:08x}", str(url))
        return stored

    @_gated
    def download(self, path: str, local: str | os.PathLike, base: str | None = None,
                 adler32: int | None = None, at: int | None = None) -> None:
        """Copy ``path`` from the server to a local file, overwriting (with ``at``, into the
        existing file from that offset on).

        With ``adler32`` the received bytes are checked against it (VerificationError
        on a mismatch); the check runs while the next chunks are still on the wire
        (benchmarks/README.md has what it still costs against an unchecked xrdcp).
        """
        url = self.resolve(path, base)
        if adler32 is None and at is None:
            self._copy(url.url, str(Path(local).absolute()))
            return
        value = 1
        fd = os.open(local, os.O_WRONLY) if at is not None else \
            os.open(local, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            with self._reading(url) as (handle, size), \
                    transfer_progress(size, f"xrootd {url.path.rsplit('/', 1)[-1]}") as advance:
                for data in self._chunks(handle, size, url, write_to=(fd, at or 0)):
                    value = adler32_of(data, value)
                    advance(len(data))
        finally:
            os.close(fd)
        if adler32 is not None and value != adler32:
            raise VerificationError(f"downloaded {url}: adler32 {value:08x}, expected {adler32:08x}", str(url))

    @_gated
    def read_bytes(self, path: str, base: str | None = None) -> bytes:
        """The whole content of a small file (manifests, pointers)."""
        url = self.resolve(path, base)
        with self._reading(url) as (handle, size):
            status, data = handle.read(0, size, timeout=self.timeout)
            if not status.ok:
                raise self._fail(status, "read", url)
            return data

    @_gated
    def checksum(self, path: str, base: str | None = None) -> int:
        """The server's adler32 of ``path``."""
        return self._checksum_ungated(self.resolve(path, base))

    def _checksum_ungated(self, url: XRootDURL) -> int:
        from XRootD.client.flags import QueryCode

        status, answer = self._fs(url).query(QueryCode.CHECKSUM, url.path, timeout=self.timeout)
        if not status.ok:
            raise self._fail(status, "checksum query", url)
        text = answer.decode(errors="replace").strip("\0 \n")
        algorithm, _, value = text.partition(" ")
        if algorithm != "adler32" or not value:
            raise StorageError(f"server answered an unexpected checksum for {url}: {text!r}", str(url))
        return int(value, 16)

    @_gated
    def compute_checksum(self, path: str, base: str | None = None) -> int:
        """adler32 of the bytes the server returns for ``path``, computed here.

        Unlike ``checksum``, never an answer the server cached: XRootD keeps a file's
        checksum in an extended attribute and reuses it while the mtime is unchanged,
        so it does not see bytes that rotted on its disk.
        """
        url = self.resolve(path, base)
        value = 1
        with self._reading(url) as (handle, size):
            for data in self._chunks(handle, size, url):
                value = adler32_of(data, value)
        return value

    @contextlib.contextmanager
    def _reading(self, url: XRootDURL) -> Iterator[tuple[object, int]]:
        """An open ``XRootD.client.File`` of ``url`` and its size; closed on exit."""
        from XRootD.client.flags import OpenFlags

        handle = _client().File()
        status, _ = handle.open(url.url, OpenFlags.READ, timeout=self.timeout)
        if not status.ok:
            raise self._fail(status, "open", url)  # StorageNotFound when absent
        try:
            # Reads always name their size: read() without one stats the file inside the
            # C extension, which crashed the process when the server went away meanwhile.
            status, info = handle.stat(timeout=self.timeout)
            if not status.ok or info is None:
                raise self._fail(status, "stat", url)
            yield handle, info.size
        finally:
            handle.close(timeout=self.timeout)

    def _chunks(self, handle, size: int, url: XRootDURL,
                write_to: tuple[int, int] | None = None) -> Iterator[bytes]:
        """The file's bytes in order, with up to ``xrootd_client.IN_FLIGHT`` reads on the wire.

        With ``write_to`` (a file descriptor and where the file starts in it) each chunk
        is also written there at its offset by the thread that read it, so writing,
        reading and the caller's checksum all overlap.
        """
        def read(offset: int) -> bytes:
            try:
                status, data = handle.read(offset, min(_CHUNK, size - offset), timeout=self.timeout)
            except ValueError as error:  # the client closed the file after losing the server
                raise StorageUnavailable(f"read of {url} failed: {error}", str(url)) from error
            if not status.ok:
                raise self._fail(status, "read", url)
            if write_to is not None and os.pwrite(write_to[0], data, write_to[1] + offset) != len(data):
                raise OSError(f"short write while downloading {url}")
            return data

        return pipelined(read, size, "xrootd-read")

    @_gated
    def rename(self, src: str, dst: str, base: str | None = None) -> None:
        """Rename on the server; atomic within one server, replaces ``dst``."""
        src_url, dst_url = self.resolve(src, base), self.resolve(dst, base)
        if src_url.server != dst_url.server:
            raise StorageError(f"cannot rename across servers: {src_url} -> {dst_url}", str(dst_url))
        status, _ = self._fs(src_url).mv(src_url.path, dst_url.path, timeout=self.timeout)
        if not status.ok:
            raise self._fail(status, f"rename to {dst_url}", src_url)

    @_gated
    def _copy(self, src: str, dst: str) -> None:
        """An unchecked copy by the client's own copy engine (law's ``filecopy``, plain downloads)."""
        process = _client().CopyProcess()
        # inittimeout bounds connecting and opening (the default is 600 s).
        options = dict(force=True, inittimeout=self.timeout)
        process.add_job(src, dst, **options)
        status, results = process.prepare(), None
        if status.ok:
            # A byte bar for long copies, only on a terminal.
            status, results = process.run(XRootDProgress(f"xrootd {src.rsplit('/', 1)[-1]}"))
            if status.ok and results and not results[0]["status"].ok:
                status = results[0]["status"]
        if not status.ok:
            remote = dst if dst.startswith("root") else src
            raise StorageUnavailable(f"XRootD copy {src} -> {dst} failed: {status.message.strip()}", remote)

