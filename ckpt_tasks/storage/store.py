"""CheckpointStore: versioned, verified checkpoints in one storage location.

Layout of a location (a local directory or ``root://host:port//path``)::

    step-000000000120-1a2b3c4d.ckpt    the checkpoint, immutable once renamed into place
    step-000000000120-1a2b3c4d.json    its manifest: step, size, adler32, created, metadata
    step-000000000240-5e6f7a8b.ckpt.0000, .0001, ...
                                       a checkpoint larger than ``part_size``, in parts
    step-000000000240-5e6f7a8b.json    its manifest lists the parts (name, size, adler32)
    LATEST                             pointer to the newest manifest

Commit protocol of ``save`` (DESIGN.md, "Complete or absent"): publish the data
(temporary name, size and adler32 checked, rename), then publish the manifest
the same way, and only then move ``LATEST``. A checkpoint without a manifest
does not exist for readers. A large checkpoint goes up in parts, each published
(and verified by the storage) on its own, two at a time: the server's adler32
pass over one part overlaps the upload of the next, where one whole file would
make the save wait for a full second pass over every byte. ``save_streaming``
sends each part as soon as the serialiser has written it. Each writer adds a
random tag to the names, so two writers (a duplicate job) never overwrite each
other's files; readers take the highest committed step, whatever ``LATEST``
says, so a race between two writers cannot move resumption backwards.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Callable

from ckpt_tasks.errors import StorageError, VerificationError
from ckpt_tasks.storage.checksum import adler32_concat
from ckpt_tasks.storage.commit import PARTIAL_MARKER, PARTS_IN_FLIGHT, publish_file, publish_parts
from ckpt_tasks.storage.reading import fetch_checked, verify_stored
from ckpt_tasks.storage.records import (DATA_RE, LATEST, MANIFEST_RE, Checkpoint, StoredFile, check_step,
                                        hex32, manifest_text, parse_manifest)
from ckpt_tasks.storage.registry import open_location
from ckpt_tasks.storage.retention import RetentionPolicy, checkpoints_to_delete, policy_from
from ckpt_tasks.storage.retry import RetryPolicy
from ckpt_tasks.storage.staging import StagingFile

logger = logging.getLogger(__name__)

__all__ = ["Checkpoint", "CheckpointStore", "LATEST", "PART_SIZE", "RetryPolicy", "STALE_PARTIAL_SECONDS",
           "StoredFile"]

#: checkpoints larger than this are stored in parts of this size (CheckpointStore's default)
PART_SIZE = 128 << 20
#: temporary files older than this belong to dead writers and are removed by retention
STALE_PARTIAL_SECONDS = 3600


class CheckpointStore:
    """Versioned checkpoints at ``location``, with verification and retention.

    Args:
        location: a local path, ``file:///path``, ``root://host[:port]//path``, or a location
            of another backend in ``ckpt_tasks.storage.registry``; an invalid one raises
            ValueError.
        keep_last: how many of the newest checkpoints retention keeps.
        keep_every: also keep every checkpoint whose step is a multiple of this.
        retry: how long transient storage errors are retried.
        part_size: checkpoints larger than this many bytes are stored in parts of this
            size (None: always one file).
        retention: what retention keeps (``KeepLast(3) | KeepEvery(1000)``); replaces
            ``keep_last`` and ``keep_every``, which are its shorthands. The checkpoint
            ``LATEST`` names is kept whatever it says.
    """

    def __init__(self, location: str | os.PathLike, keep_last: int = 3, keep_every: int | None = None,
                 retry: RetryPolicy | None = None, part_size: int | None = PART_SIZE,
                 retention: RetentionPolicy | None = None):
        self.retention = retention if retention is not None else policy_from(keep_last, keep_every)
        if part_size is not None and (isinstance(part_size, bool) or not isinstance(part_size, int)
                                      or part_size < 1):
            raise ValueError(f"part_size must be None or an integer >= 1, got {part_size!r}")
        self.part_size = part_size
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.retry = retry or RetryPolicy()
        opened = open_location(location, deadline=self.retry.deadline)
        self.files, self.root = opened.backend, opened.root
        self.location = self.root

    def __repr__(self) -> str:
        return f"CheckpointStore({self.root!r}, retention={self.retention!r})"

    def _path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    # -- writing ---------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, step: int, metadata: dict[str, Any] | None = None,
             retention: bool = True) -> Checkpoint:
        """Commit the local file ``path`` as the checkpoint of ``step``; return what was committed.

        ``metadata`` goes into the manifest as it is (writers add their lineage there).

        ``retention=False`` leaves deleting older checkpoints to the next save (a process
        about to be evicted should spend its last seconds on the commit only).
        """
        check_step(step)
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint file to save at {path}")
        return self._commit(StagingFile.of_complete(path), step, metadata, retention)

    def save_streaming(self, write: Callable[[BinaryIO], None], step: int,
                       metadata: dict[str, Any] | None = None, retention: bool = True,
                       staging_dir: str | os.PathLike | None = None) -> Checkpoint:
        """Commit what ``write(stream)`` writes as the checkpoint of ``step``, for instance
        ``lambda stream: torch.save(state, stream)``; return what was committed.

        ``write`` runs in a thread of its own. A checkpoint larger than ``part_size`` sends
        each part as soon as it is written, while ``write`` goes on with the next. The bytes
        are staged in memory, at most three parts' worth at a time (the writer waits for
        room), or with ``staging_dir`` in a temporary file there. The commit is
        the same as ``save``'s.
        """
        check_step(step)
        if self.part_size is None:
            # One file: staged whole, so on disk rather than in memory the size of the checkpoint.
            staging = StagingFile.in_directory(staging_dir)
        else:
            # The parts being published and the one being written.
            capacity = (PARTS_IN_FLIGHT + 1) * self.part_size
            staging = (StagingFile.in_directory(staging_dir, capacity) if staging_dir is not None
                       else StagingFile.in_memory(capacity))

        def serialise() -> None:
            try:
                write(staging)
            except BaseException as error:  # raised to the committing thread by wait_for
                staging.fail(error)
            else:
                staging.finish()

        writer = threading.Thread(target=serialise, name=f"ckpt-serialise-{step}", daemon=True)
        try:
            writer.start()
            return self._commit(staging, step, metadata, retention)
        finally:
            staging.abandon()  # a failed commit stops the writer at its next write
            if writer.is_alive():
                writer.join()
            staging.close()

    def _commit(self, source: StagingFile, step: int, metadata: dict[str, Any] | None,
                retention: bool) -> Checkpoint:
        stem = f"step-{step:012d}-{uuid.uuid4().hex[:8]}"
        path = self._path(f"{stem}.ckpt")
        self.retry.run(lambda: self.files.mkdir_rec(self.root), f"creating {self.root}")
        # The manifest records the sizes and the adler32s that the storage verified while publishing.
        # More than one part's bytes (or the writer's end) decide between one file and parts.
        one_part = source.wait_for(None if self.part_size is None else self.part_size + 1)
        if source.finished and (self.part_size is None or one_part <= self.part_size):
            published = self.retry.run(lambda: publish_file(self.files, source.path, path), f"uploading {path}")
            adler32, parts = published.adler32, ()
        else:
            parts = tuple(publish_parts(self.files, self.retry, source, self.part_size,
                                        lambda index: f"{path}.{index:04d}"))
            adler32 = adler32_concat((part.adler32, part.size) for part in parts)
        checkpoint = Checkpoint(
            step=step, name=f"{stem}.ckpt", size=source.size, adler32=hex32(adler32),
            created=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            path=path, metadata=dict(metadata or {}), parts=parts)
        self._publish_text(checkpoint.manifest_name, manifest_text(checkpoint))
        self._advance_latest(checkpoint)
        logger.info("committed checkpoint of step %d to %s (%d bytes)", step, checkpoint.path, checkpoint.size)
        if retention:
            self.apply_retention()
        return checkpoint

    def _publish_text(self, name: str, text: str) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
            handle.write(text)
        try:
            self.retry.run(lambda: publish_file(self.files, handle.name, self._path(name)),
                           f"writing {self._path(name)}")
        finally:
            os.unlink(handle.name)

    def _advance_latest(self, checkpoint: Checkpoint) -> None:
        # Never move LATEST backwards: another writer may have committed a higher step.
        current = self._read_latest()
        if current is not None and current[0] > checkpoint.step:
            logger.warning("LATEST already names step %d > %d; left as it is", current[0], checkpoint.step)
            return
        pointer = {"step": checkpoint.step, "manifest": checkpoint.manifest_name}
        self._publish_text(LATEST, json.dumps(pointer))

    def _read_latest(self) -> tuple[int, str] | None:
        try:
            data = self.retry.run(lambda: self.files.read_bytes(self._path(LATEST)), "reading LATEST")
        except FileNotFoundError:
            return None
        try:
            pointer = json.loads(data)
            return int(pointer["step"]), str(pointer["manifest"])
        except (ValueError, KeyError, TypeError):
            logger.warning("LATEST at %s is unreadable; ignoring it", self.root)
            return None

    # -- reading ---------------------------------------------------------------------------

    def list(self) -> list[Checkpoint]:
        """Every committed checkpoint, oldest step first. Empty when the location does not exist."""
        if not self.retry.run(lambda: self.files.exists(self.root), f"checking {self.root}"):
            return []
        names = self.retry.run(lambda: self.files.listdir(self.root), f"listing {self.root}")
        checkpoints = [c for c in map(self._read_manifest, filter(MANIFEST_RE.match, names)) if c is not None]
        return sorted(checkpoints, key=lambda c: (c.step, c.created))

    def _read_manifest(self, name: str) -> Checkpoint | None:
        where = self._path(name)
        try:
            data = self.retry.run(lambda: self.files.read_bytes(where), f"reading {name}")
        except FileNotFoundError:
            return None  # removed by retention between listing and reading
        try:
            return parse_manifest(data, self._path, where)
        except ValueError as error:
            logger.warning("manifest %s is unreadable (%s); ignoring it", where, error)
            return None

    def latest(self) -> Checkpoint | None:
        """The committed checkpoint with the highest step, or None when there is none."""
        checkpoints = self.list()
        return checkpoints[-1] if checkpoints else None

    def verify(self, checkpoint: Checkpoint | None = None) -> Checkpoint:
        """Check size and adler32 of a checkpoint (default: the latest) by reading it from the storage.

        Raises VerificationError naming the checkpoint when they differ from its manifest.
        """
        checkpoint = checkpoint or self.latest()
        if checkpoint is None:
            raise StorageError(f"no checkpoint to verify at {self.root}", self.root)
        verify_stored(self.files, self.retry, checkpoint)
        return checkpoint

    def fetch(self, checkpoint: Checkpoint, dest: str | os.PathLike) -> Path:
        """Download ``checkpoint`` to ``dest`` and check it against its manifest.

        ``dest`` appears complete or not at all; a mismatch raises VerificationError.
        """
        return fetch_checked(self.files, self.retry, checkpoint, dest)

    def restore(self, dest: str | os.PathLike) -> Checkpoint | None:
        """Fetch the newest checkpoint that verifies to ``dest``; None when the location is empty.

        A corrupt newest checkpoint is skipped with a warning and the previous one used.
        Storage outages raise: they are never taken for an empty location.
        """
        candidates = self.list()
        for checkpoint in reversed(candidates):
            try:
                self.fetch(checkpoint, dest)
                return checkpoint
            except VerificationError as error:
                logger.warning("skipping checkpoint of step %d: %s", checkpoint.step, error)
        if candidates:
            raise VerificationError(f"none of the {len(candidates)} checkpoints at {self.root} verifies",
                                    self.root)
        return None

    # -- retention -------------------------------------------------------------------------

    def apply_retention(self) -> list[Checkpoint]:
        """Delete the checkpoints the retention policy does not keep (never the one LATEST
        names) and temporary or uncommitted files of dead writers; return what was deleted."""
        checkpoints = self.list()
        latest = self._repair_latest(checkpoints)
        deleted = checkpoints_to_delete(self.retention, checkpoints, latest[1] if latest else None)
        for checkpoint in deleted:
            # Manifest first: from then on the checkpoint no longer exists for readers.
            self.files.remove(self._path(checkpoint.manifest_name), silent=True)
            for data in checkpoint.data_files:
                self.files.remove(data.path, silent=True)
            logger.info("retention removed checkpoint of step %d", checkpoint.step)
        self._remove_stale_partials()
        return deleted

    def _repair_latest(self, checkpoints: list[Checkpoint]) -> tuple[int, str] | None:
        latest = self._read_latest()
        if checkpoints and (latest is None or latest[0] < checkpoints[-1].step):
            # Two writers raced on LATEST (read, then replace) and the lower step won, or
            # a writer died between its manifest and LATEST: point it at the newest again.
            self._advance_latest(checkpoints[-1])
            latest = self._read_latest()
        return latest

    def _remove_stale_partials(self) -> None:
        """Remove temporaries and uncommitted data of writers that are gone.

        A data file without its manifest was never committed: its writer died between the
        two, or retention died between removing the manifest and the data. But a writer
        uploading a large checkpoint in parts finished its first parts long before its
        manifest: a checkpoint's files go only when none of them changed for an hour.
        """
        now = time.time()
        names = self.files.listdir(self.root)
        present = set(names)
        candidates: dict[str, list[tuple[str, float]]] = {}  # checkpoint stem -> (name, mtime)
        for name in names:
            committed_name = name[1:name.index(PARTIAL_MARKER)] if PARTIAL_MARKER in name else name
            data = DATA_RE.match(committed_name)
            stem = data["stem"] if data else name
            if PARTIAL_MARKER not in name and (data is None or f"{stem}.json" in present):
                continue
            try:
                mtime = self.files.stat(self._path(name)).st_mtime
            except StorageError:
                continue  # finished or removed by its writer in the meantime
            candidates.setdefault(stem, []).append((name, mtime))
        for files in candidates.values():
            if now - max(mtime for _, mtime in files) > STALE_PARTIAL_SECONDS:
                for name, _ in files:
                    self.files.remove(self._path(name), silent=True)

