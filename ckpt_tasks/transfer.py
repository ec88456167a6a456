"""Where the Checkpointer's local checkpoint file is kept safe: the transfer modes.

Each mode is a small object with two methods:

- ``store(local)``: make the local checkpoint file persistent;
- ``retrieve(local)``: bring the persistent checkpoint back to ``local`` and
  answer True, or answer False when the storage says there is none. A storage
  that does not answer raises; it is never taken for "no checkpoint".
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Protocol

from ckpt_tasks.htcondor.jobad import JobAd
from ckpt_tasks.storage.commit import publish_file, temporary_name
from ckpt_tasks.storage.local import LocalFileInterface
from ckpt_tasks.storage.location import XRootDURL
from ckpt_tasks.storage.xrootd import XRootDFileInterface

logger = logging.getLogger(__name__)


class TransferMode(Protocol):
    #: whether the local file is deleted after the last checkpoint on a signal
    removes_local_copy: bool

    def store(self, local: Path) -> None: ...
    def retrieve(self, local: Path) -> bool: ...


class LocalOnly:
    """Mode None: the local checkpoint file is the persistent one."""

    removes_local_copy = False

    def store(self, local: Path) -> None:
        pass

    def retrieve(self, local: Path) -> bool:
        return local.exists()


class HTCondorSpool(LocalOnly):
    """Mode ``htcondor``: HTCondor transfers the file when the job exits with the checkpoint code,
    and copies it back into the new sandbox before a restart."""

    def __init__(self, job_ad: JobAd, local: Path):
        self.files = job_ad.transfer_checkpoint_files
        self.exit_code = job_ad.checkpoint_exit_code
        sandbox = Path(os.environ.get("_CONDOR_SCRATCH_DIR") or os.getcwd()).absolute()
        try:
            relative = local.absolute().relative_to(sandbox)
        except ValueError:
            raise ValueError(
                f"local_checkpoint_file {local} lies outside the job's sandbox {sandbox}: HTCondor "
                "transfers checkpoint files from the sandbox only") from None
        listed = {Path(item) for item in self.files}
        if not any(relative == entry or entry in relative.parents for entry in listed):
            raise ValueError(
                f"local_checkpoint_file {relative} is not in the job's transfer_checkpoint_files "
                f"({', '.join(self.files)}): HTCondor would never save it")


class StorageCopy:
    """Modes ``shared`` and ``xrootd``: publish the file to a path on a storage, complete or absent."""

    removes_local_copy = True

    def __init__(self, files, target: str):
        self.files = files
        self.target = target

    def store(self, local: Path) -> None:
        publish_file(self.files, local, self.target)

    def retrieve(self, local: Path) -> bool:
        if not self.files.exists(self.target):
            return False
        # Download beside the local file and rename, so a crash never leaves half of it.
        partial = Path(temporary_name(local))
        try:
            self.files.download(self.target, partial)
            os.replace(partial, local)
        finally:
            partial.unlink(missing_ok=True)
        return True


def shared_copy(target: Path) -> StorageCopy:
    return StorageCopy(LocalFileInterface(), str(target))


def xrootd_copy(url: XRootDURL) -> StorageCopy:
    return StorageCopy(XRootDFileInterface(url.server), url.url)


class ManualCallback:
    """Mode ``manual``: a user callback ``callback(src, dst, **kwargs)`` moves the file both ways.

    For restoring, the callback is called with source and destination swapped; a
    ``FileNotFoundError`` from it means "no checkpoint yet", any other error is raised.
    """

    removes_local_copy = True

    def __init__(self, callback: Callable[..., Any], target, kwargs: dict):
        self.callback = callback
        self.target = target
        self.kwargs = kwargs

    def store(self, local: Path) -> None:
        self.callback(local, self.target, **self.kwargs)

    def retrieve(self, local: Path) -> bool:
        try:
            self.callback(self.target, local, **self.kwargs)
        except FileNotFoundError as error:
            logger.info("no checkpoint at %s (%s)", self.target, error)
            return False
        return local.exists()
