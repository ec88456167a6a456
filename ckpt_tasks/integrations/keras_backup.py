"""The Keras callback's backup directory in seed mode, laid out as the seed project lays it out.

``local_checkpoint_file`` names a backup directory; the file the Checkpointer writes and
transfers is ``<backup dir>/checkpoint.zip`` (the seed's name; a tar file, as the seed's
is, though this one is not compressed: weights hardly compress). Keeping it inside the
directory lets the seed's HTCondor submit files, which list the directory in
``transfer_checkpoint_files``, work unchanged.

``checkpoint.zip`` holds one of:

- this project's state, ``<dir>/keras_state.npz`` (see :mod:`ckpt_tasks.integrations.keras`);
- a *completed* marker, ``<dir>/training-completed.json``, written when a fit ended
  normally: the seed deletes its backup then, so the next run trains from the start;
- the seed's own backup: Keras' ``BackupAndRestore`` files (``latest.weights.h5``,
  ``training_metadata.json``) under the directory's name. They are unpacked into the
  backup directory and loaded by Keras' own ``BackupAndRestore``, as the seed would.

Anything else is refused with an error naming the file: a backup is never ignored.
"""
from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from ckpt_tasks.errors import CkptTasksError

logger = logging.getLogger(__name__)

__all__ = ["ARCHIVE_NAME", "STATE_FILE", "COMPLETED_FILE", "KERAS_FILES", "Backup", "UnreadableBackup", "read_backup",
           "write_state_archive", "write_completed_archive", "has_keras_backup", "load_keras_backup"]

#: the seed's name of the archive inside the backup directory
ARCHIVE_NAME = "checkpoint.zip"
STATE_FILE = "keras_state.npz"
COMPLETED_FILE = "training-completed.json"
#: what Keras' BackupAndRestore writes into its backup directory (``.bkp``: double_checkpoint)
KERAS_FILES = ("latest.weights.h5", "training_metadata.json",
               "latest.weights.h5.bkp", "training_metadata.json.bkp")


class UnreadableBackup(CkptTasksError):
    """A backup that is neither this project's, nor the seed's, nor a completed marker."""


@dataclass
class Backup:
    """What ``checkpoint.zip`` held: ``kind`` is ``"state"`` (``state`` is the npz's bytes),
    ``"completed"`` or ``"keras"`` (Keras' files, unpacked into the backup directory)."""

    kind: str
    state: bytes | None = None


def _members(archive: tarfile.TarFile, path: Path) -> dict[str, tarfile.TarInfo]:
    """The archive's regular files by base name, refusing names that would leave the directory."""
    found: dict[str, tarfile.TarInfo] = {}
    for member in archive.getmembers():
        name = PurePosixPath(member.name)
        if name.is_absolute() or ".." in name.parts:
            raise UnreadableBackup(f"{path}: refusing the member {member.name!r} (outside the backup)")
        if member.isfile() and len(name.parts) <= 2:  # "<dir>/<file>" (or a bare file name)
            found[name.name] = member
    return found


def read_backup(path: Path, backup_dir: Path) -> Backup:
    """Read ``checkpoint.zip`` at ``path``; Keras' files in it are unpacked into ``backup_dir``."""
    try:
        with tarfile.open(path, "r:*") as archive:
            members = _members(archive, path)
            if STATE_FILE in members:
                return Backup("state", archive.extractfile(members[STATE_FILE]).read())
            if COMPLETED_FILE in members:
                return Backup("completed")
            if "latest.weights.h5" in members:
                for name in KERAS_FILES:
                    if name in members:
                        # replaced as a whole: a crash never leaves half a weights file
                        partial = backup_dir / f".{name}.partial"
                        partial.write_bytes(archive.extractfile(members[name]).read())
                        os.replace(partial, backup_dir / name)
                return Backup("keras")
            held = ", ".join(sorted(members)) or "no files"
    except (tarfile.TarError, EOFError, OSError) as error:
        raise UnreadableBackup(f"cannot read the Keras backup {path}: {error}") from error
    raise UnreadableBackup(
        f"the Keras backup {path} holds {held}: neither {STATE_FILE} (this project's) nor Keras' "
        "BackupAndRestore files (latest.weights.h5, the seed's); move it away to train from the start")


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_state_archive(path: Path, directory_name: str, write_state: Callable[[Any], None]) -> None:
    """Write ``checkpoint.zip`` at ``path``: ``write_state(file)`` writes the npz into it."""
    state = path.with_name(path.name + ".npz")
    try:
        with open(state, "wb") as handle:
            write_state(handle)
        with tarfile.open(path, "w") as archive:
            archive.add(state, arcname=f"{directory_name}/{STATE_FILE}", recursive=False)
    finally:
        state.unlink(missing_ok=True)


def write_completed_archive(path: Path, directory_name: str) -> None:
    """Write a ``checkpoint.zip`` that says: the training completed, nothing to resume."""
    with tarfile.open(path, "w") as archive:
        _add_bytes(archive, f"{directory_name}/{COMPLETED_FILE}",
                   json.dumps({"completed": True}).encode())


def has_keras_backup(backup_dir: Path) -> bool:
    """Whether Keras' BackupAndRestore left a backup in ``backup_dir``."""
    return (backup_dir / "latest.weights.h5").exists()


def load_keras_backup(model, backup_dir: Path) -> int:
    """Load a Keras BackupAndRestore backup into ``model`` with Keras' own callback (weights,
    optimizer, the epoch to start at); the epoch it starts at."""
    import keras

    loader = keras.callbacks.BackupAndRestore(str(backup_dir), delete_checkpoint=False)
    loader.set_model(model)
    loader.on_train_begin()
    epoch = int(getattr(model, "_initial_epoch", None) or 0)
    logger.info("resuming the Keras BackupAndRestore backup in %s at epoch %d", backup_dir, epoch)
    return epoch
