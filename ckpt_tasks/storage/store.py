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

import contextlib
import json
import logging
import math
import os
import random
import re
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Callable, NamedTuple, TypeVar

from ckpt_tasks.errors import StorageError, StorageUnavailable, VerificationError
from ckpt_tasks.lineage import lineage
from ckpt_tasks.storage.checksum import adler32_concat
from ckpt_tasks.storage.commit import PARTIAL_MARKER, PublishedFile, publish_file, temporary_name
from ckpt_tasks.storage.local import LocalFileInterface
from ckpt_tasks.storage.staging import StagingFile
from ckpt_tasks.storage.location import is_xrootd_url, local_path_from, parse_xrootd_url
from ckpt_tasks.storage.xrootd import XRootDFileInterface

logger = logging.getLogger(__name__)

T = TypeVar("T")

LATEST = "LATEST"
#: manifests of single-file checkpoints keep version 1, so older readers still see them;
#: a checkpoint in parts has a version-2 manifest, which needs this code to read
MANIFEST_VERSION = 1
MANIFEST_VERSION_PARTS = 2
_NAME_RE = re.compile(r"^step-(?P<step>\d{12})-(?P<tag>[0-9a-f]{8})\.json$")
_DATA_RE = re.compile(r"^(?P<stem>step-\d{12}-[0-9a-f]{8})\.ckpt(\.\d{4})?$")
#: checkpoints larger than this are stored in parts of this size (CheckpointStore's default)
PART_SIZE = 128 << 20
# Parts published at once: one uploading while the storage checks the previous one.
_PARTS_IN_FLIGHT = 2
#: temporary files older than this belong to dead writers and are removed by retention
STALE_PARTIAL_SECONDS = 3600


def _check_step(step: Any) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")


@dataclass(frozen=True)
class Part:
    """One file of a checkpoint stored in parts."""

    name: str  # e.g. "step-000000000240-5e6f7a8b.ckpt.0001"
    size: int
    adler32: str  # 8 hex digits


class DataFile(NamedTuple):
    """Where a stored file's bytes go in the checkpoint: path, offset, size and adler32."""

    path: str
    offset: int
    size: int
    adler32: str


@dataclass(frozen=True)
class Checkpoint:
    """One committed checkpoint, as its manifest describes it."""

    step: int
    name: str  # file name of the data, e.g. "step-000000000120-1a2b3c4d.ckpt"
    size: int
    adler32: str  # 8 hex digits, as XRootD prints it, of the whole checkpoint
    created: str  # ISO 8601, UTC
    path: str  # full path or URL of the data file (of the first part's name without its suffix)
    metadata: dict = field(default_factory=dict)
    parts: tuple[Part, ...] = ()  # empty: the data is the single file ``name``

    @property
    def manifest_name(self) -> str:
        return self.name.rsplit(".", 1)[0] + ".json"

    @property
    def data_files(self) -> list[DataFile]:
        """The stored files that hold this checkpoint, in order."""
        if not self.parts:
            return [DataFile(self.path, 0, self.size, self.adler32)]
        directory = self.path.rsplit("/", 1)[0]
        files, offset = [], 0
        for part in self.parts:
            files.append(DataFile(f"{directory}/{part.name}", offset, part.size, part.adler32))
            offset += part.size
        return files

    def to_json(self) -> dict:
        fields = asdict(self)
        if not self.parts:
            del fields["parts"]  # a single file: the same manifest as before parts existed
        return fields


@dataclass(frozen=True)
class RetryPolicy:
    """Retry transient storage errors with exponential backoff until ``deadline`` seconds passed."""

    deadline: float = 120.0
    initial_delay: float = 1.0
    max_delay: float = 15.0

    def run(self, operation: Callable[[], T], what: str) -> T:
        start, delay = time.monotonic(), self.initial_delay
        while True:
            try:
                return operation()
            except (StorageUnavailable, VerificationError) as error:
                remaining = self.deadline - (time.monotonic() - start)
                if remaining <= 0:
                    raise
                wait = min(delay * random.uniform(0.8, 1.2), self.max_delay, remaining)
                logger.warning("%s failed (%s); retrying in %.1f s", what, error, wait)
                time.sleep(wait)
                delay = min(delay * 2, self.max_delay)


def _check_parts_make_up(checkpoint: Checkpoint) -> None:
    """Raise VerificationError when a manifest's parts are not its checkpoint's bytes."""
    if not checkpoint.parts:
        return
    combined = adler32_concat((int(p.adler32, 16), p.size) for p in checkpoint.parts)
    if sum(p.size for p in checkpoint.parts) != checkpoint.size or f"{combined:08x}" != checkpoint.adler32:
        raise VerificationError(f"checkpoint of step {checkpoint.step}: its parts do not make up the "
                                f"{checkpoint.size} bytes, adler32 {checkpoint.adler32}, its manifest "
                                f"says", checkpoint.path)


class _SendingTurn:
    """One part sends at a time: the storage checks the part just sent while the next
    goes up. (Two sending at once share the bandwidth, then wait for their checks together.)"""

    def __init__(self, lock: threading.Lock):
        lock.acquire()
        self._lock, self._held = lock, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._lock.release()


class CheckpointStore:
    """Versioned checkpoints at ``location``, with verification and retention.

    Args:
        location: a local path, ``file:///path`` or ``root://host[:port]//path``.
        keep_last: how many of the newest checkpoints retention keeps.
        keep_every: also keep every checkpoint whose step is a multiple of this.
        retry: how long transient storage errors are retried.
        part_size: checkpoints larger than this many bytes are stored in parts of this
            size (None: always one file).
    """

    def __init__(self, location: str | os.PathLike, keep_last: int = 3, keep_every: int | None = None,
                 retry: RetryPolicy | None = None, part_size: int | None = PART_SIZE):
        if not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last must be an integer >= 1, got {keep_last!r}")
        if keep_every is not None and (not isinstance(keep_every, int) or keep_every < 1):
            raise ValueError(f"keep_every must be None or an integer >= 1, got {keep_every!r}")
        if part_size is not None and (not isinstance(part_size, int) or part_size < 1):
            raise ValueError(f"part_size must be None or an integer >= 1, got {part_size!r}")
        self.part_size = part_size
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.retry = retry or RetryPolicy()
        location = os.fspath(location)
        if is_xrootd_url(location):
            url = parse_xrootd_url(location)
            # A single call must not outlast the retry deadline (the client's default is 30 s).
            self.files = XRootDFileInterface(url.server, timeout=max(1, min(30, math.ceil(self.retry.deadline))))
            self.root = url.url
        else:
            self.files = LocalFileInterface()
            self.root = str(local_path_from(location).absolute())
        self.location = self.root

    def __repr__(self) -> str:
        return f"CheckpointStore({self.root!r}, keep_last={self.keep_last}, keep_every={self.keep_every})"

    def _path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    # -- writing ---------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, step: int, metadata: dict[str, Any] | None = None,
             retention: bool = True) -> Checkpoint:
        """Commit the local file ``path`` as the checkpoint of ``step``; return what was committed.

        ``retention=False`` leaves deleting older checkpoints to the next save (a process
        about to be evicted should spend its last seconds on the commit only).
        """
        _check_step(step)
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
        _check_step(step)
        if self.part_size is None:
            # One file: staged whole, so on disk rather than in memory the size of the checkpoint.
            staging = StagingFile.in_directory(staging_dir)
        else:
            # The parts being published and the one being written.
            capacity = (_PARTS_IN_FLIGHT + 1) * self.part_size
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
        # Lineage: where and when this checkpoint was made (callers may bring their own).
        metadata = dict(metadata or {})
        metadata.setdefault("lineage", lineage(step=step, loss=metadata.get("loss")))
        stem = f"step-{step:012d}-{uuid.uuid4().hex[:8]}"
        self.retry.run(lambda: self.files.mkdir_rec(self.root), f"creating {self.root}")
        # The manifest records the sizes and the adler32s that the storage verified while publishing.
        # More than one part's bytes (or the writer's end) decide between one file and parts.
        one_part = source.wait_for(None if self.part_size is None else self.part_size + 1)
        if source.finished and (self.part_size is None or one_part <= self.part_size):
            published = self.retry.run(lambda: publish_file(self.files, source.path, self._path(f"{stem}.ckpt")),
                                       f"uploading {self._path(f'{stem}.ckpt')}")
            adler32, parts = published.adler32, ()
        else:
            published_parts = self._publish_parts(source, stem)
            adler32 = adler32_concat((p.adler32, p.size) for p in published_parts)
            parts = tuple(Part(p.path.rsplit("/", 1)[-1], p.size, f"{p.adler32:08x}") for p in published_parts)
        size = source.size
        checkpoint = Checkpoint(
            step=step, name=f"{stem}.ckpt", size=size, adler32=f"{adler32:08x}",
            created=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            path=self._path(f"{stem}.ckpt"), metadata=metadata, parts=parts)
        version = MANIFEST_VERSION_PARTS if checkpoint.parts else MANIFEST_VERSION
        manifest = {"version": version, **checkpoint.to_json()}
        self._publish_text(checkpoint.manifest_name, json.dumps(manifest, indent=2, sort_keys=True))
        self._advance_latest(checkpoint)
        logger.info("committed checkpoint of step %d to %s (%d bytes)", step, checkpoint.path, size)
        if retention:
            self.apply_retention()
        return checkpoint

    def _publish_parts(self, source: StagingFile, stem: str) -> list[PublishedFile]:
        """Publish ``source`` as parts of ``part_size`` bytes, each as soon as its bytes are
        written, ``_PARTS_IN_FLIGHT`` at a time, one of them sending while the others are checked.

        All or none: when a part fails for good, the parts already published are removed.
        """
        sending = threading.Lock()

        def publish(index: int, span: tuple[int, int]) -> PublishedFile:
            dest = self._path(f"{stem}.ckpt.{index:04d}")

            def attempt() -> PublishedFile:
                turn = _SendingTurn(sending)
                try:
                    return publish_file(self.files, source.path, dest, span=span, on_sent=turn.release)
                finally:
                    turn.release()

            try:
                published = self.retry.run(attempt, f"uploading {dest}")
            except BaseException:
                source.abandon()  # the commit has failed: a writer still writing stops
                raise
            source.release(*span)  # stored for good: the writer may reuse its memory
            return published

        with ThreadPoolExecutor(_PARTS_IN_FLIGHT, thread_name_prefix="ckpt-part") as pool:
            futures = []
            try:
                offset = 0
                while (written := source.wait_for(offset + self.part_size)) > offset:
                    length = min(self.part_size, written - offset)
                    futures.append(pool.submit(publish, len(futures), (offset, length)))
                    offset += length
                return [future.result() for future in futures]
            except BaseException as error:
                source.abandon()
                for future in futures:
                    future.cancel()
                started = [future for future in futures if not future.cancelled()]
                for future in started:
                    if future.exception() is None:
                        with contextlib.suppress(StorageError):  # else an orphan, removed by retention later
                            self.files.remove(future.result().path, silent=True)
                # A part that failed for good stopped the writer: its error is the one to tell.
                cause = next((f.exception() for f in started if f.exception() is not None), None)
                if cause is not None and cause is not error:
                    raise cause from None
                raise

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
        checkpoints = []
        for name in names:
            if not _NAME_RE.match(name):
                continue
            checkpoint = self._read_manifest(name)
            if checkpoint is not None:
                checkpoints.append(checkpoint)
        return sorted(checkpoints, key=lambda c: (c.step, c.created))

    def _read_manifest(self, name: str) -> Checkpoint | None:
        try:
            data = self.retry.run(lambda: self.files.read_bytes(self._path(name)), f"reading {name}")
        except FileNotFoundError:
            return None  # removed by retention between listing and reading
        try:
            fields = json.loads(data)
            if not isinstance(fields, dict):
                raise ValueError("not a JSON object")
            version = fields.pop("version", MANIFEST_VERSION)
        except ValueError as error:
            logger.warning("manifest %s is unreadable (%s); ignoring it", self._path(name), error)
            return None
        if isinstance(version, int) and version > MANIFEST_VERSION_PARTS:
            # Loud: skipping it could resume an older checkpoint, or start from scratch.
            raise StorageError(f"manifest {self._path(name)} has version {version}, written by a newer "
                               f"ckpt_tasks than this one (reads up to {MANIFEST_VERSION_PARTS}); upgrade",
                               self._path(name))
        try:
            fields["path"] = self._path(fields["name"])  # the location may have been moved
            fields["parts"] = tuple(Part(**part) for part in fields.get("parts", ()))
            return Checkpoint(**fields)
        except (ValueError, TypeError, KeyError) as error:
            logger.warning("manifest %s is unreadable (%s); ignoring it", self._path(name), error)
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
        _check_parts_make_up(checkpoint)
        for data in checkpoint.data_files:
            self._verify_data_file(checkpoint, data)
        return checkpoint

    def _verify_data_file(self, checkpoint: Checkpoint, data: DataFile) -> None:
        try:
            size = self.retry.run(lambda: self.files.stat(data.path).st_size, f"stat {data.path}")
        except StorageError as error:
            if isinstance(error, StorageUnavailable):
                raise
            raise VerificationError(f"checkpoint of step {checkpoint.step} is missing: {error}",
                                    data.path) from error
        if size != data.size:
            raise VerificationError(f"checkpoint of step {checkpoint.step} has {size} bytes in {data.path}, "
                                    f"its manifest says {data.size}", data.path)
        # Read the data back: a checksum the server cached would not see bytes rotted on its disk.
        stored = self.retry.run(lambda: self.files.compute_checksum(data.path), f"checksum {data.path}")
        if f"{stored:08x}" != data.adler32:
            raise VerificationError(f"checkpoint of step {checkpoint.step} has adler32 {stored:08x} in "
                                    f"{data.path}, its manifest says {data.adler32}", data.path)

    def fetch(self, checkpoint: Checkpoint, dest: str | os.PathLike) -> Path:
        """Download ``checkpoint`` to ``dest`` and check it against its manifest.

        ``dest`` appears complete or not at all; a mismatch raises VerificationError.
        """
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(temporary_name(dest))

        def download(data: DataFile) -> VerificationError | None:
            # adler32 is checked while the bytes arrive (no second pass over the file). A
            # mismatch is what the storage holds: returned, not raised, so it is not retried.
            try:
                self.files.download(data.path, partial, adler32=int(data.adler32, 16),
                                    at=data.offset if checkpoint.parts else None)
            except VerificationError as error:
                return error
            return None

        _check_parts_make_up(checkpoint)  # else the gaps would stay zeros
        try:
            if checkpoint.parts:
                with open(partial, "wb") as stream:
                    stream.truncate(checkpoint.size)  # the parts are written at their offsets
            mismatch = None
            for data in checkpoint.data_files:
                mismatch = mismatch or self.retry.run(lambda: download(data), f"downloading {data.path}")
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
        """Delete checkpoints beyond ``keep_last`` (sparing ``keep_every`` multiples and the one
        LATEST names) and temporary or uncommitted files of dead writers; return what was deleted."""
        checkpoints = self.list()
        latest = self._read_latest()
        if checkpoints and (latest is None or latest[0] < checkpoints[-1].step):
            # Two writers raced on LATEST (read, then replace) and the lower step won, or
            # a writer died between its manifest and LATEST: point it at the newest again.
            self._advance_latest(checkpoints[-1])
            latest = self._read_latest()
        keep = {c.name for c in checkpoints[-self.keep_last:]}
        if latest is not None:
            keep.add(latest[1].rsplit(".", 1)[0] + ".ckpt")
        if self.keep_every:
            keep.update(c.name for c in checkpoints if c.step % self.keep_every == 0)
        deleted = []
        for checkpoint in checkpoints:
            if checkpoint.name in keep:
                continue
            # Manifest first: from then on the checkpoint no longer exists for readers.
            self.files.remove(self._path(checkpoint.manifest_name), silent=True)
            for data in checkpoint.data_files:
                self.files.remove(data.path, silent=True)
            deleted.append(checkpoint)
            logger.info("retention removed checkpoint of step %d", checkpoint.step)
        self._remove_stale_partials()
        return deleted

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
            data = _DATA_RE.match(committed_name)
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

