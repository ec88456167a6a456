"""law targets on XRootD (without gfal2) and the checkpoint-location target of a task.

``XRootDFileSystem`` is law's ``RemoteFileSystem`` over ``XRootDFileInterface``;
``XRootDFileTarget`` and ``XRootDDirectoryTarget`` are law's remote targets on it,
so any law task can declare ``root://`` outputs.

``checkpoints_target(location)`` gives the target a ``CheckpointedTask`` lists
as its ``"checkpoints"`` output: a directory target whose ``--print-status``
line tells how far the training got.
"""
from __future__ import annotations

import law
from law.target.remote.base import RemoteDirectoryTarget, RemoteFileSystem, RemoteFileTarget

from ckpt_tasks.errors import StorageError
from ckpt_tasks.storage.location import is_xrootd_url, local_path_from, parse_xrootd_url
from ckpt_tasks.storage.xrootd import XRootDFileInterface


class XRootDFileSystem(RemoteFileSystem):
    """law file system on one XRootD server (``base = "root://host:port"``)."""

    file_interface_cls = XRootDFileInterface

    def __init__(self, base: str, **kwargs):
        super().__init__(XRootDFileInterface(base), **kwargs)


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
        super().__init__(str(local_path_from(location)), **kwargs)


class XRootDCheckpointsTarget(_CheckpointsStatus, XRootDDirectoryTarget):
    def __init__(self, location: str, total_steps: int | None = None, **kwargs):
        self.location, self.total_steps = location, total_steps
        super().__init__(location, **kwargs)

    def _parent_args(self):
        # law builds parents and children from these: plain XRootD directories.
        return (self.path, self.fs), {}


def checkpoints_target(location: str, total_steps: int | None = None, optional: bool = True):
    """The directory target of a checkpoint location (optional: it never makes a task complete)."""
    cls = XRootDCheckpointsTarget if is_xrootd_url(location) else LocalCheckpointsTarget
    return cls(location, total_steps=total_steps, optional=optional)
