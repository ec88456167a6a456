"""law targets on XRootD (without gfal2) and the checkpoint-location target of a task.

The one module of ``ckpt_tasks.storage`` that imports law: the adapter from the
backend contract to law's target API. ``XRootDRemoteFileInterface`` is law's
``RemoteFileInterface`` over ``XRootDFileInterface``; ``XRootDFileSystem`` is law's
``RemoteFileSystem`` on it;
``XRootDFileTarget`` and ``XRootDDirectoryTarget`` are law's remote targets on it,
so any law task can declare ``root://`` outputs.

``checkpoints_target(location)`` gives the target a ``CheckpointedTask`` lists
as its ``"checkpoints"`` output: a directory target whose ``--print-status``
line tells how far the training got.
"""
from __future__ import annotations

import stat as stat_module

import law
from law.target.remote.base import RemoteDirectoryTarget, RemoteFileSystem, RemoteFileTarget
from law.target.remote.interface import RemoteFileInterface

from ckpt_tasks.errors import StorageError
from ckpt_tasks.storage.location import parse_xrootd_url
from ckpt_tasks.storage.registry import open_location, scheme_of
from ckpt_tasks.storage.xrootd import CALL_TIMEOUT, XRootDFileInterface
from ckpt_tasks.storage.xrootd_client import classify_status, gated


class XRootDRemoteFileInterface(XRootDFileInterface, RemoteFileInterface):
    """law's ``RemoteFileInterface`` over XRootD: the backend plus what only law asks for."""

    def __init__(self, base: str, timeout: int = CALL_TIMEOUT, **kwargs):
        RemoteFileInterface.__init__(self, base=base, **kwargs)
        XRootDFileInterface.__init__(self, base, timeout)

    def isdir(self, path, stat=None, base=None, **kwargs):
        stat = stat or self.exists(path, stat=True, base=base)
        return bool(stat) and stat_module.S_ISDIR(stat.st_mode)

    def isfile(self, path, stat=None, base=None, **kwargs):
        stat = stat or self.exists(path, stat=True, base=base)
        return bool(stat) and stat_module.S_ISREG(stat.st_mode)

    def mkdir(self, path, perm=0o755, base=None, silent=True, **kwargs):
        return self._mkdir(path, base, recursive=False, silent=silent)

    @gated
    def chmod(self, path, perm, base=None, silent=False, **kwargs):
        if perm is None:
            return True  # law passes None for "leave the permissions as they are"
        url = self.resolve(path, base)
        from XRootD.client.flags import AccessMode

        mode = 0
        for bit, flag in ((0o400, "UR"), (0o200, "UW"), (0o100, "UX"), (0o040, "GR"), (0o020, "GW"),
                          (0o010, "GX"), (0o004, "OR"), (0o002, "OW"), (0o001, "OX")):
            if perm & bit:
                mode |= getattr(AccessMode, flag)
        status, _ = self._fs(url).chmod(url.path, mode, timeout=self.timeout)
        if not status.ok and not silent:
            raise classify_status(status, "chmod", url)
        return status.ok

    def filecopy(self, src, dst, base=None, **kwargs):
        """Copy between a local path and the server, or within the server (law API)."""
        src_uri, dst_uri = self._copy_uri(src, base), self._copy_uri(dst, base)
        self._copy(src_uri, dst_uri)
        return src_uri, dst_uri

    def _copy_uri(self, path, base) -> str:
        # law's convention: "file://..." is local, anything else is on this interface's server.
        text = str(path)
        return text[len("file://"):] if text.startswith("file://") else self.resolve(text, base).url


class XRootDFileSystem(RemoteFileSystem):
    """law file system on one XRootD server (``base = "root://host:port"``)."""

    file_interface_cls = XRootDRemoteFileInterface

    def __init__(self, base: str, **kwargs):
        super().__init__(XRootDRemoteFileInterface(base), **kwargs)


def _path_and_fs(path: str, fs: XRootDFileSystem | None) -> tuple[str, XRootDFileSystem]:
    # A full URL alone, or law's (path, fs) pair when law makes children and parents.
    if fs is not None:
        return path, fs
    parsed = parse_xrootd_url(path)
    return parsed.path, XRootDFileSystem(parsed.server)


class XRootDFileTarget(RemoteFileTarget):
    """A file on XRootD: ``XRootDFileTarget("root://host:port//path")``."""

    def __init__(self, path: str, fs: XRootDFileSystem | None = None, **kwargs):
        super().__init__(*_path_and_fs(path, fs), **kwargs)


class XRootDDirectoryTarget(RemoteDirectoryTarget):
    """A directory on XRootD: ``XRootDDirectoryTarget("root://host:port//path")``."""

    def __init__(self, path: str, fs: XRootDFileSystem | None = None, **kwargs):
        super().__init__(*_path_and_fs(path, fs), **kwargs)


XRootDFileTarget.file_class = XRootDFileTarget
XRootDFileTarget.directory_class = XRootDDirectoryTarget
XRootDDirectoryTarget.file_class = XRootDFileTarget
XRootDDirectoryTarget.directory_class = XRootDDirectoryTarget


class _CheckpointsStatus:
    """Shows the newest committed checkpoint in law's ``--print-status``."""

    location: str
    total_steps: int | None = None

    def status_text(self, max_depth=0, flags=None, color=False, exists=None):
        from ckpt_tasks.storage.store import CheckpointStore

        try:
            latest = CheckpointStore(self.location).latest()
        except StorageError as error:
            text = f"storage error: {error}"
            return law.util.colored(text, "red") if color else text
        if latest is None:
            text = "no checkpoint yet"
            return law.util.colored(text, "grey") if color else text
        of = f" of {self.total_steps}" if self.total_steps else ""
        text = f"checkpoint at step {latest.step}{of} ({latest.created})"
        return law.util.colored(text, "cyan") if color else text


class LocalCheckpointsTarget(_CheckpointsStatus, law.LocalDirectoryTarget):
    def __init__(self, location: str, total_steps: int | None = None, **kwargs):
        self.location, self.total_steps = location, total_steps
        super().__init__(open_location(location).root, **kwargs)


class XRootDCheckpointsTarget(_CheckpointsStatus, XRootDDirectoryTarget):
    def __init__(self, location: str, total_steps: int | None = None, **kwargs):
        self.location, self.total_steps = location, total_steps
        super().__init__(location, **kwargs)

    def _parent_args(self):
        # law builds parents and children from these: plain XRootD directories.
        return (self.path, self.fs), {}


def checkpoints_target(location: str, total_steps: int | None = None, optional: bool = True):
    """The directory target of a checkpoint location (optional: it never makes a task complete).

    The location is checked by the registry; law has directory targets for local paths and
    XRootD only, so another registered backend raises ValueError here."""
    root = open_location(location, parameter="store").root
    scheme = scheme_of(root)
    if scheme not in _TARGETS:
        raise ValueError(f"store={location!r}: law targets exist for {', '.join(sorted(_TARGETS))} "
                         f"locations only")
    return _TARGETS[scheme](location, total_steps=total_steps, optional=optional)


_TARGETS = {"file": LocalCheckpointsTarget, "root": XRootDCheckpointsTarget, "roots": XRootDCheckpointsTarget}
