"""CheckpointStore: versioned, verified checkpoints in one storage location.

Layout of a location (a local directory or ``root://host:port//path``)::

    step-000000000120-1a2b3c4d.ckpt    the checkpoint, immutable once renamed into place
    step-000000000120-1a2b3c4d.json    its manifest: step, size, adler32, created, metadata
    step-000000000240-5e6f7a8b.ckpt.0000, .0001, ...
                                       a checkpoint larger than ``part_size``, in parts
    step-000000000240-5e6f7a8b.json    its manifest lists the parts (name, size, adler32)
                                       (a sharded checkpoint's parts are its ranks' files: sharded.py)
    LATEST                             pointer to the newest manifest, with the index: a copy of
                                       every kept manifest (ckpt_tasks/storage/index.py)

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

Few round trips (DESIGN.md): a reader lists the location and reads ``LATEST`` at
once, and takes the manifests from the index (``index.scan_location``), so a
restore costs the same whatever the number of checkpoints. A save reads the
location while its data goes up; a small checkpoint's manifest and the new
``LATEST`` are staged under temporary names beside the data, and then only the
three renames are sequential: data, manifest, ``LATEST``. Retention deletes all
manifests at once, then all data (benchmarks/bench_wan.py has the counts).
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Callable

from ckpt_tasks.errors import StorageError, VerificationError
from ckpt_tasks.storage.checksum import adler32_concat, adler32_of_file
from ckpt_tasks.storage.cleanup import STALE_PARTIAL_SECONDS, delete_checkpoints, remove_stale_partials
from ckpt_tasks.storage.commit import PARTS_IN_FLIGHT, StagedFile, discard_on_error, publish_parts, stage_file
from ckpt_tasks.storage.index import Pointer, Scan, highest_step, list_names, pointer_text, read_manifest, scan_location
from ckpt_tasks.storage.parallel import settled, together
from ckpt_tasks.storage.reading import fetch_checked, verify_stored
from ckpt_tasks.storage.records import (LATEST, Checkpoint, StoredFile, check_step, hex32, manifest_content,
                                        manifest_text)
from ckpt_tasks.storage.registry import open_location
from ckpt_tasks.storage.retention import RetentionPolicy, checkpoints_to_delete, policy_from
from ckpt_tasks.storage.retry import RetryPolicy
from ckpt_tasks.storage.sharded import SHARDED_KEY, fetch_sharded, is_sharded
from ckpt_tasks.storage.staging import StagingFile

logger = logging.getLogger(__name__)

__all__ = ["Checkpoint", "CheckpointStore", "LATEST", "PART_SIZE", "RetryPolicy", "STALE_PARTIAL_SECONDS",
           "StoredFile"]

#: checkpoints larger than this are stored in parts of this size (CheckpointStore's default)
PART_SIZE = 128 << 20
#: a one-file checkpoint up to this size has its adler32 computed before the upload, so its
#: manifest goes up beside the data (a local pass of milliseconds saves round trips)
MANIFEST_WITH_DATA_BYTES = 64 << 20


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
        self._last_kept: list[Checkpoint] | None = None  # what this store's last commit kept

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

    def commit_published(self, checkpoint: Checkpoint, retention: bool = True) -> Checkpoint:
        """Commit ``checkpoint``, whose parts are all published already (a sharded one, see
        ``ckpt_tasks.storage.sharded``): its manifest, then LATEST, as ``save`` does."""
        check_step(checkpoint.step)
        return self._commit(checkpoint, checkpoint.step, checkpoint.metadata, retention)

    def _commit(self, source: StagingFile | Checkpoint, step: int, metadata: dict[str, Any] | None,
                retention: bool) -> Checkpoint:
        if isinstance(source, StagingFile) and SHARDED_KEY in (metadata or {}):
            # restore would read such a checkpoint as the files of a sharded one
            raise ValueError(f"the metadata key {SHARDED_KEY!r} is the store's own (sharded checkpoints)")
        stem = f"step-{step:012d}-{uuid.uuid4().hex[:8]}"
        with ThreadPoolExecutor(1, thread_name_prefix="ckpt-scan") as pool:
            # What the location holds is read while the data goes up: the retention set, the
            # index and the check that LATEST moves forward come from it, in no extra round trip.
            scanning = pool.submit(self._scan)
            plans: list[_Plan] = []

            def stage_pointer(checkpoint: Checkpoint) -> StagedFile | None:
                guess = self._guess_pointer(checkpoint, retention)
                plans.append(plan := self._plan(checkpoint, scanning.result(), retention))
                text = pointer_text(plan.newest, plan.kept) if plan.forward else None
                if guess is not None and guess[0] == text:
                    return guess[1]  # the location is as this writer left it: the guess is right
                if guess is not None:
                    guess[1].discard()
                return self._stage_text(LATEST, text) if text is not None else None

            try:
                checkpoint, staged, pointer = ((source, [], _LATER) if isinstance(source, Checkpoint) else
                                               self._stage_checkpoint(source, step, stem, metadata, stage_pointer))
            except BaseException:
                scanning.cancel()
                raise
        deleted, pointed = self._publish(checkpoint, staged, pointer, stage_pointer, plans)
        self._last_kept = plans[-1].kept if plans[-1].forward else None
        logger.info("committed checkpoint of step %d to %s (%d bytes)", step, checkpoint.path, checkpoint.size)
        if retention:
            # A second listing, beside the deletes: another writer may have committed a higher
            # step since the scan, and this writer's LATEST replaced its pointer.
            _, names = together(lambda: delete_checkpoints(self.files, self._path, deleted),
                                lambda: list_names(self.files, self.retry, self.root))
            if (highest_step(names) or 0) > pointed:
                self._ensure_latest(self._scan())
            gone = {name for c in deleted for name in (c.manifest_name, *(d.name for d in c.data_files))}
            remove_stale_partials(self.files, self._path, [name for name in names if name not in gone])
        return checkpoint

    def _stage_checkpoint(self, source: StagingFile, step: int, stem: str, metadata: dict[str, Any] | None,
                          stage_pointer: Callable[[Checkpoint], StagedFile | None]):
        """The checkpoint's data on the storage (one file staged under a temporary name, or
        parts published); with a small one-file checkpoint its manifest and the new LATEST
        staged beside it. Returns the checkpoint, what was staged, and the staged LATEST
        (``_LATER`` when it was not staged yet)."""
        path = self._path(f"{stem}.ckpt")

        def record(adler32: int, parts: tuple[StoredFile, ...] = ()) -> Checkpoint:
            return Checkpoint(step=step, name=f"{stem}.ckpt", size=source.size, adler32=hex32(adler32),
                              created=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                              path=path, metadata=dict(metadata or {}), parts=parts)

        # More than one part's bytes (or the writer's end) decide between one file and parts.
        one_part = source.wait_for(None if self.part_size is None else self.part_size + 1)
        if not source.finished or (self.part_size is not None and one_part > self.part_size):
            parts = tuple(publish_parts(self.files, self.retry, source, self.part_size,
                                        lambda index: f"{path}.{index:04d}"))
            return record(adler32_concat((part.adler32, part.size) for part in parts), parts), [], _LATER
        if source.size > MANIFEST_WITH_DATA_BYTES:
            # The adler32 comes from the upload (no extra pass over a large file).
            data = self.retry.run(lambda: stage_file(self.files, source.path, path), f"uploading {path}")
            return record(data.stored.adler32), [data], _LATER
        # Small: one local pass for the adler32 lets the manifest and LATEST go up beside the data.
        checkpoint = record(adler32_of_file(source.path)[1])
        outcomes = settled(
            lambda: self.retry.run(lambda: stage_file(self.files, source.path, path,
                                                      adler32=int(checkpoint.adler32, 16)), f"uploading {path}"),
            lambda: self._stage_text(checkpoint.manifest_name, manifest_text(checkpoint)),
            lambda: stage_pointer(checkpoint))
        discard_on_error(outcomes)
        return checkpoint, [outcomes[0][0], outcomes[1][0]], outcomes[2][0]

    def _guess_pointer(self, checkpoint: Checkpoint, retention: bool) -> tuple[str, StagedFile] | None:
        """LATEST as it will be if the location is as this store's last commit left it, staged
        at once, while the scan is still on its way; None after no commit of this store."""
        if self._last_kept is None or not self._last_kept:
            return None
        last = self._last_kept[-1]
        guessed = Scan([], Pointer(last.step, last.manifest_name), self._last_kept, True)
        plan = self._plan(checkpoint, guessed, retention)
        text = pointer_text(plan.newest, plan.kept)
        return text, self._stage_text(LATEST, text)

    def _plan(self, checkpoint: Checkpoint, scan: Scan, retention: bool) -> "_Plan":
        checkpoints = sorted([*scan.checkpoints, checkpoint], key=lambda c: (c.step, c.created))
        newest, pointer = checkpoints[-1], scan.pointer
        # LATEST may name a step this writer did not see (another writer just committed it).
        forward = pointer is None or pointer.step <= newest.step
        latest_manifest = newest.manifest_name if forward else pointer.manifest
        deleted = checkpoints_to_delete(self.retention, checkpoints, latest_manifest) if retention else []
        return _Plan(deleted, newest, [c for c in checkpoints if c not in deleted], forward,
                     newest.step if forward else pointer.step)

    def _publish(self, checkpoint: Checkpoint, staged: list[StagedFile], pointer: Any,
                 stage_pointer: Callable[[Checkpoint], StagedFile | None],
                 plans: list["_Plan"]) -> tuple[list[Checkpoint], int]:
        """Rename data and manifest into place (while the new LATEST goes up, when it is not
        staged yet), then move LATEST (never backwards); return the checkpoints retention is
        to delete and the step LATEST names."""
        def data_then_manifest() -> None:
            if staged:
                staged[0].commit()
            if len(staged) > 1:
                staged[1].commit()
            else:
                self._publish_text(checkpoint.manifest_name, manifest_text(checkpoint))

        later = pointer is _LATER
        outcomes = settled(data_then_manifest, (lambda: stage_pointer(checkpoint)) if later else (lambda: pointer))
        if outcomes[0][1] is not None:
            for temporary in staged:
                temporary.discard()  # a commit that failed removed its own temporary already
        discard_on_error(outcomes)
        plan, pointer = plans[-1], outcomes[1][0]
        if pointer is None:
            logger.warning("LATEST already names step %d > %d; left as it is", plan.pointed, plan.newest.step)
        else:
            pointer.commit()
        return plan.deleted, plan.pointed

    def _stage_text(self, name: str, text: str) -> StagedFile:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
            handle.write(text)
        try:
            return self.retry.run(lambda: stage_file(self.files, handle.name, self._path(name)),
                                  f"writing {self._path(name)}")
        finally:
            os.unlink(handle.name)

    def _publish_text(self, name: str, text: str) -> None:
        self._stage_text(name, text).commit()

    def _scan(self) -> Scan:
        scan = scan_location(self.files, self.retry, self.root, self._path)
        # A first save after a restore guesses LATEST from what the restore saw (a commit
        # and apply_retention replace this with what they left); a wrong guess costs round trips only.
        self._last_kept = scan.checkpoints or None
        return scan

    # -- reading ---------------------------------------------------------------------------

    def list(self) -> list[Checkpoint]:
        """Every committed checkpoint, oldest step first. Empty when the location does not exist.

        Two requests at once (the listing and LATEST with its index); manifests the index
        lacks are read, all at once (``ckpt_tasks.storage.index``).
        """
        return self._scan().checkpoints

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
        # The manifest itself, too: the record may come from the index in LATEST.
        _, manifest = together(lambda: verify_stored(self.files, self.retry, checkpoint),
                               lambda: read_manifest(self.files, self.retry, self._path, checkpoint.manifest_name))
        if manifest is None or manifest_content(manifest) != manifest_content(checkpoint):
            raise VerificationError(f"checkpoint of step {checkpoint.step}: its manifest {checkpoint.manifest_name} "
                                    f"is {'missing or unreadable' if manifest is None else 'different'}",
                                    self._path(checkpoint.manifest_name))
        return checkpoint

    def fetch(self, checkpoint: Checkpoint, dest: str | os.PathLike) -> Path:
        """Download ``checkpoint`` to ``dest`` and check it against its manifest.

        ``dest`` appears complete or not at all; a mismatch raises VerificationError. A
        sharded checkpoint becomes the directory ``dest`` of its files.
        """
        if is_sharded(checkpoint):
            return fetch_sharded(self, checkpoint, dest)
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
        names) and temporary or uncommitted files of dead writers; return what was deleted.

        LATEST is rewritten first when it names an older checkpoint than the newest or its
        index is missing, stale or damaged (rebuilt from the manifests the scan read).
        """
        scan = self._scan()
        latest_manifest = self._ensure_latest(scan)
        deleted = checkpoints_to_delete(self.retention, scan.checkpoints, latest_manifest)
        kept = [c for c in scan.checkpoints if c not in deleted]
        # What the next save guesses LATEST from (see _guess_pointer).
        self._last_kept = kept if kept and kept[-1].manifest_name == latest_manifest else None
        delete_checkpoints(self.files, self._path, deleted)
        remove_stale_partials(self.files, self._path, scan.names)
        return deleted

    def _ensure_latest(self, scan: Scan) -> str | None:
        """Point LATEST at the newest checkpoint, with a whole index, where it does not (never
        backwards); return the manifest it names."""
        checkpoints, pointer = scan.checkpoints, scan.pointer
        if not checkpoints or (pointer is not None and (pointer.step > checkpoints[-1].step or (
                pointer.manifest == checkpoints[-1].manifest_name and scan.index_complete))):
            return pointer.manifest if pointer is not None else None
        # Two writers raced on LATEST (read, then replace) and the lower step won, a writer died
        # between its manifest and LATEST, or the index lacks manifests (an earlier version's
        # LATEST, a damaged one): rewritten from what the scan read.
        self._publish_text(LATEST, pointer_text(checkpoints[-1], checkpoints))
        return checkpoints[-1].manifest_name


_LATER = object()  # LATEST is staged once the data is on the storage


@dataclass(frozen=True)
class _Plan:
    """What a commit does after its data: delete ``deleted``, point LATEST (``forward``) at
    ``newest`` with the index of ``kept``; ``pointed``: the step LATEST names after it."""

    deleted: list[Checkpoint]
    newest: Checkpoint
    kept: list[Checkpoint]
    forward: bool
    pointed: int
