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
import shutil
import tarfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Protocol

from ckpt_tasks.errors import CkptTasksError
from ckpt_tasks.fingerprint import check_fingerprint, parameter_fingerprint
from ckpt_tasks.jobenv import sandbox_dir
from ckpt_tasks.jobenv.htcondor import JobAd
from ckpt_tasks.local_checkpoint import LocalCheckpointPath
from ckpt_tasks.storage.commit import publish_file
from ckpt_tasks.storage.location import XRootDURL
from ckpt_tasks.storage.registry import open_location

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
        return LocalCheckpointPath(local).exists()


class HTCondorSpool(LocalOnly):
    """Mode ``htcondor``: HTCondor transfers the file when the job exits with the checkpoint code,
    and copies it back into the new sandbox before a restart."""

    def __init__(self, job_ad: JobAd, local: Path):
        self.files = job_ad.transfer_checkpoint_files
        self.exit_code = job_ad.checkpoint_exit_code
        sandbox = sandbox_dir()
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
    """Modes ``shared`` and ``xrootd``: publish the file to a path on a storage, complete or absent.

    A checkpoint that is a directory is stored as one uncompressed tar file whose only
    top-level entry is :data:`DIRECTORY_ARCHIVE_ROOT`, and unpacked and swapped in as a
    whole on retrieval; nothing else is ever unpacked.
    """

    removes_local_copy = True

    def __init__(self, files, target: str):
        self.files = files
        self.target = target

    def store(self, local: Path) -> None:
        if not local.is_dir():
            publish_file(self.files, local, self.target)
            return
        partial = LocalCheckpointPath(local).partial()
        archive = partial.with_name(partial.name + ".tar")  # the unique tag stays in the name
        try:
            pack_directory(local, archive)
            publish_file(self.files, archive, self.target)
        finally:
            archive.unlink(missing_ok=True)

    def retrieve(self, local: Path) -> bool:
        if not self.files.exists(self.target):
            return False
        # Download beside the local file and swap in, so a crash never leaves half of it.
        checkpoint = LocalCheckpointPath(local)
        partial = checkpoint.partial()
        unpacked = partial.with_name(partial.name + ".d")
        try:
            self.files.download(self.target, partial)
            if unpack_directory(partial, unpacked):
                checkpoint.swap_in(unpacked)
            else:
                checkpoint.swap_in(partial)
        finally:
            partial.unlink(missing_ok=True)
            if unpacked.exists():
                shutil.rmtree(unpacked)
        return True


def remove_local(local: Path) -> None:
    """Remove the local checkpoint, a file or a directory."""
    if local.is_dir() and not local.is_symlink():
        shutil.rmtree(local)
    else:
        local.unlink(missing_ok=True)


#: the top-level entry of the tar file that holds a directory checkpoint on a storage
DIRECTORY_ARCHIVE_ROOT = "ckpt_tasks-directory-checkpoint"


def pack_directory(directory: Path, archive: Path) -> None:
    """Write ``directory`` into the tar file ``archive`` under :data:`DIRECTORY_ARCHIVE_ROOT`.

    Links are stored as the files they point to (hard links and symbolic links, inside
    the directory or out of it), so that what :func:`unpack_directory` takes (regular
    files and directories only) is all there is: a checkpoint that could not be
    unpacked fails here, at the save, not at the resume.
    """
    with tarfile.open(archive, "w", dereference=True) as tar:
        tar.add(directory, arcname=DIRECTORY_ARCHIVE_ROOT, recursive=True)
        for member in tar.getmembers():
            if not (member.isfile() or member.isdir()):
                raise CkptTasksError(f"{directory}: {member.name} is neither a file nor a directory; a "
                                     "directory checkpoint holds files and directories only")


def unpack_directory(archive: Path, destination: Path) -> bool:
    """Unpack a directory checkpoint written by :func:`pack_directory` into ``destination``.

    Returns False (and unpacks nothing) for any other file: a file checkpoint that
    happens to be a tar file stays a file. Only regular files and directories under
    the archive's root are taken ("data" filter: no links out, no devices).
    """
    if not tarfile.is_tarfile(archive):
        return False
    with tarfile.open(archive, "r") as tar:
        first = tar.next()
        if first is None or first.name != DIRECTORY_ARCHIVE_ROOT or not first.isdir():
            return False
        destination.mkdir()
        prefix = DIRECTORY_ARCHIVE_ROOT + "/"
        members = []
        for member in tar.getmembers()[1:]:
            if not member.name.startswith(prefix):
                raise CkptTasksError(f"{archive}: unexpected entry {member.name!r} in a directory checkpoint")
            member.name = member.name[len(prefix):]
            members.append(member)
        tar.extractall(destination, members=members, filter="data")
    return True


def shared_copy(target: Path) -> StorageCopy:
    opened = open_location(os.path.abspath(target), parameter="checkpoint_transfer_target")
    return StorageCopy(opened.backend, opened.root)


def xrootd_copy(url: XRootDURL) -> StorageCopy:
    opened = open_location(url.url, parameter="checkpoint_transfer_target")
    return StorageCopy(opened.backend, opened.root)


class ManualCallback:
    """Mode ``manual``: a user callback ``callback(src, dst, **kwargs)`` moves the file both ways.

    For restoring, the callback is called with source and destination swapped. It
    says "nothing stored yet" by raising ``FileNotFoundError`` (or by writing nothing);
    any other exception means the storage could not be asked, and is raised with a
    note naming the callback: a training must not start from scratch because a copy
    command failed.
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
        except Exception as error:
            # The callback's own exception goes up unchanged (callers may catch its type),
            # with a note on what it interrupted.
            name = getattr(self.callback, "__qualname__", repr(self.callback))
            error.add_note(f"raised by checkpoint_transfer_callback {name}({self.target!r}, {str(local)!r}) "
                           "while restoring; it must raise FileNotFoundError when nothing is stored yet")
            raise
        return LocalCheckpointPath(local).exists()


class StoreTransfer:
    """Transfer into a ``CheckpointStore``: versioned, verified, with retention.

    ``step_of()`` gives the training step of the file being stored. ``params``
    are the parameters of the training the checkpoints belong to: they go into
    every manifest, and a checkpoint made with other parameters is refused.
    """

    removes_local_copy = True

    def __init__(self, checkpoints, step_of: Callable[[], int], params: dict[str, Any],
                 metadata_of: Callable[[], dict] | None = None):
        self.checkpoints = checkpoints  # the CheckpointStore
        self.step_of = step_of
        self.params = params
        self.metadata_of = metadata_of or dict
        self.fingerprint = parameter_fingerprint(params)
        self.last_committed_step: int | None = None
        self.last_committed = None  # the newest Checkpoint committed or restored: its lineage goes on
        self.restored = None  # the Checkpoint restored, if any

    def store(self, local: Path) -> None:
        self.commit(local, self.step_of(), self.metadata_of())

    def commit(self, source: Path | Callable[[BinaryIO], None], step: int, metadata: dict,
               retention: bool = True) -> None:
        """Commit ``source`` as the checkpoint of ``step`` (callable from a background thread).

        ``source`` is a local file, or a function that writes the checkpoint into the
        stream it is given (``CheckpointStore.save_streaming``).
        ``retention=False`` leaves deleting older checkpoints to the next commit.
        """
        from ckpt_tasks.lineage import lineage, trail

        metadata = {**metadata, "params": self.params, "fingerprint": self.fingerprint,
                    "lineage_trail": trail(self.last_committed)}
        # The writer stamps lineage (where and when); the store records metadata as it is.
        if "lineage" not in metadata:
            metadata["lineage"] = lineage(step=step, loss=metadata.get("loss"))
        if callable(source):
            self.last_committed = self.checkpoints.save_streaming(source, step, metadata, retention=retention)
        else:
            self.last_committed = self.checkpoints.save(source, step, metadata, retention=retention)
        self.last_committed_step = step

    def retrieve(self, local: Path) -> bool:
        latest = self.checkpoints.latest()
        if latest is None:
            return False
        check_fingerprint(latest, self.params, self.fingerprint, self.checkpoints.location)
        self.restored = self.checkpoints.restore(local)
        if self.restored is not None and self.restored is not latest:
            check_fingerprint(self.restored, self.params, self.fingerprint, self.checkpoints.location)
        self.last_committed_step = self.restored.step if self.restored else None
        self.last_committed = self.restored
        return self.restored is not None
