"""Reading checkpoints back: verifying them on the storage and fetching them, checked."""
from __future__ import annotations

import os
from pathlib import Path

from ckpt_tasks.errors import VerificationError
from ckpt_tasks.storage.backend import StorageBackend
from ckpt_tasks.storage.commit import temporary_name
from ckpt_tasks.storage.records import Checkpoint, StoredFile, check_parts_make_up, hex32
from ckpt_tasks.storage.retry import RetryPolicy


def verify_stored(files: StorageBackend, retry: RetryPolicy, checkpoint: Checkpoint) -> None:
    """Check size and adler32 of every file of ``checkpoint`` by reading it from the storage;
    VerificationError naming the checkpoint when one is missing or differs from its manifest."""
    check_parts_make_up(checkpoint)
    for data in checkpoint.data_files:
        _verify_data_file(files, retry, checkpoint, data)


def _verify_data_file(files: StorageBackend, retry: RetryPolicy, checkpoint: Checkpoint,
                      data: StoredFile) -> None:
    try:
        size = retry.run(lambda: files.stat(data.path).st_size, f"stat {data.path}")
    except FileNotFoundError as error:
        # Absent is damage to this checkpoint; an outage or a refusal is not, and goes up.
        raise VerificationError(f"checkpoint of step {checkpoint.step} is missing: {error}",
                                data.path) from error
    if size != data.size:
        raise VerificationError(f"checkpoint of step {checkpoint.step} has {size} bytes in {data.path}, "
                                f"its manifest says {data.size}", data.path)
    # Read the data back: a checksum the server cached would not see bytes rotted on its disk.
    stored = retry.run(lambda: files.compute_checksum(data.path), f"checksum {data.path}")
    if stored != data.adler32:
        raise VerificationError(f"checkpoint of step {checkpoint.step} has adler32 {hex32(stored)} in "
                                f"{data.path}, its manifest says {hex32(data.adler32)}", data.path)


def fetch_checked(files: StorageBackend, retry: RetryPolicy, checkpoint: Checkpoint,
                  dest: str | os.PathLike) -> Path:
    """Download ``checkpoint`` to ``dest`` and check it against its manifest.

    ``dest`` appears complete or not at all; a mismatch raises VerificationError.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(temporary_name(dest))

    def download(data: StoredFile) -> VerificationError | None:
        # adler32 is checked while the bytes arrive (no second pass over the file). A
        # mismatch is what the storage holds: returned, not raised, so it is not retried.
        try:
            files.download(data.path, partial, adler32=data.adler32, at=data.offset if checkpoint.parts else None)
        except VerificationError as error:
            return error
        return None

    check_parts_make_up(checkpoint)  # else the gaps would stay zeros
    try:
        if checkpoint.parts:
            with open(partial, "wb") as stream:
                stream.truncate(checkpoint.size)  # the parts are written at their offsets
        mismatch = None
        for data in checkpoint.data_files:
            mismatch = mismatch or retry.run(lambda: download(data), f"downloading {data.path}")
        if mismatch is None and partial.stat().st_size != checkpoint.size:
            mismatch = f"{partial.stat().st_size} bytes arrived"
        if mismatch is not None:
            raise VerificationError(
                f"checkpoint of step {checkpoint.step} is corrupt: {mismatch}; "
                f"its manifest says {checkpoint.size} bytes, adler32 {checkpoint.adler32}", checkpoint.path)
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    return dest
