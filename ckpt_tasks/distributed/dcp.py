"""Sharded state through torch.distributed.checkpoint (DCP), committed to a CheckpointStore.

Every rank saves its own shards (FSDP2 ``fully_shard`` parameters, a sharded
optimizer, any DTensor state dict); DCP plans who writes what, and this module's
:class:`StoreWriter` and :class:`StoreReader` put DCP's files into the store's
sharded commit (:mod:`ckpt_tasks.storage.sharded`):

- the coordinator (rank 0) begins the commit while it makes DCP's global plan: the
  plan of every rank carries the checkpoint's name and the part that rank writes;
- every rank writes its DCP file (``__<rank>_0.distcp``) to a local staging directory
  and publishes it as its part, checked (size and adler32) against the storage;
- DCP gathers what every rank wrote to the coordinator, which publishes DCP's
  ``.metadata`` as part 0, then the manifest of all parts, then ``LATEST``.

A rank that dies before it has published fails DCP's gather on the coordinator (at
once for a dead peer, after the group's timeout for a hung one): no manifest is
written and the checkpoint does not exist; the parts already published are left to
retention's sweep. Loading reads DCP's plan for this rank and downloads (checked) only
the files it needs, so the world size may differ between save and load: DCP reshards.

Nothing from the storage is unpickled freely: ``.metadata`` (a pickle in DCP's format)
is read by an unpickler that knows only DCP's metadata classes, tensors are loaded with
``weights_only=True`` (DCP's own reader), and a non-tensor value is handed to DCP's
planner only after ``torch.load(weights_only=True)`` has read it.

Usage, on every rank after ``init_ranks()`` (``get_state_dict``/``set_state_dict``
from ``torch.distributed.checkpoint.state_dict`` give and take the sharded state)::

    state = {"model": model_sd, "optim": optim_sd, "step": step}
    save_sharded(state, store, step)              # a collective: every rank calls it
    restored = load_sharded(state, store)         # the newest sharded checkpoint, or None
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import pickle
import shutil
import tempfile
import warnings
import weakref
from pathlib import Path
from typing import Any, Iterator

from ckpt_tasks.errors import CkptTasksError, VerificationError
from ckpt_tasks.storage.records import Checkpoint
from ckpt_tasks.storage.sharded import SHARDED_KEY, PublishedShard, ShardedCommit, fetch_shards, is_sharded

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import (CURRENT_DCP_VERSION, FileSystemReader, FileSystemWriter,
                                                     _StorageInfo, _StoragePrefix)
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

logger = logging.getLogger(__name__)

__all__ = ["DCP_LAYOUT", "ShardedCheckpointError", "StoreReader", "StoreWriter", "load_sharded", "save_sharded"]

#: the layout a sharded manifest names for DCP's files
DCP_LAYOUT = "torch.distributed.checkpoint"
_METADATA_FILE = ".metadata"  # DCP's name; part 0 of the checkpoint


@dataclasses.dataclass(frozen=True)
class _RankAssignment:
    """What the coordinator's global plan tells a rank: DCP's file prefix, the checkpoint's
    name and the part the rank's file becomes."""

    prefix: str
    stem: str
    part: int


@dataclasses.dataclass(frozen=True)
class _Published:
    """A WriteResult's storage data on its way to the coordinator: DCP's record of the item,
    and the part that holds its file."""

    info: _StorageInfo
    shard: PublishedShard


class StoreWriter(StorageWriter):
    """A DCP ``StorageWriter`` that commits one checkpoint of ``step`` to ``store``.

    One writer per save, on every rank (each rank's own store object for the same
    location). ``metadata`` goes into the manifest; ``retention=False`` leaves deleting
    older checkpoints to the next save. ``committed`` is the checkpoint on the
    coordinator once DCP's save has returned (None on the other ranks).
    """

    def __init__(self, store: Any, step: int, metadata: dict[str, Any] | None = None, retention: bool = True,
                 staging_dir: str | None = None):
        super().__init__()
        self.store, self.step, self.metadata, self.retention = store, step, dict(metadata or {}), retention
        self.staging_dir = staging_dir
        self.committed: Checkpoint | None = None
        self._commit: ShardedCommit | None = None
        self._local: Path | None = None
        self._files: FileSystemWriter | None = None
        self._is_coordinator = False

    def reset(self, checkpoint_id: Any = None) -> None:
        """A fresh save (``checkpoint_id`` is not used: the store and the step name it)."""
        self.close()
        self.committed = self._commit = None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.close()
        self._local = Path(tempfile.mkdtemp(prefix=f"ckpt-dcp-{self.step}-", dir=self.staging_dir))
        _remove_when_gone(self, self._local)
        # DCP's own writer makes the file into the staging directory; fsync is not needed there,
        # the storage checks what it holds before anything is committed.
        self._files = FileSystemWriter(self._local, single_file_per_rank=True, sync_files=False, thread_count=1)
        self._files.set_up_storage_writer(is_coordinator, *args, **kwargs)
        self._is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """On the coordinator: begin the commit, and give every rank its part (0 is ``.metadata``)."""
        self._commit = ShardedCommit(self.store, self.step)
        return [dataclasses.replace(plan, storage_data=_RankAssignment(f"__{i}_", self._commit.stem, i + 1))
                for i, plan in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Write this rank's file locally and publish it as this rank's part (checked)."""
        assignment: _RankAssignment = plan.storage_data
        try:
            results = self._files.write_data(
                dataclasses.replace(plan, storage_data=_StoragePrefix(assignment.prefix)), planner).wait()
            written = sorted({result.storage_data.relative_path for result in results})
            if len(written) > 1:  # thread_count=1 and one file per rank: DCP writes one file
                raise RuntimeError(f"a rank wrote {len(written)} DCP files, one was expected: {written}")
            commit = ShardedCommit(self.store, self.step, stem=assignment.stem)
            shards = {name: commit.publish(assignment.part, self._local / name, name) for name in written}
        except BaseException:
            self.close()  # the save failed here: finish() never comes
            raise
        if self._is_coordinator:
            for name in written:
                (self._local / name).unlink(missing_ok=True)
        else:
            self.close()  # this rank's part of the save is done
        published: Future[list[WriteResult]] = Future()
        published.set_result([dataclasses.replace(result, storage_data=_Published(
            result.storage_data, shards[result.storage_data.relative_path])) for result in results])
        return published

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """On the coordinator, after every rank has published: ``.metadata``, the manifest, LATEST."""
        shards: dict[str, PublishedShard] = {}
        storage: dict = {}
        for rank_results in results:
            for result in rank_results:
                storage[result.index] = result.storage_data.info
                shards[result.storage_data.shard.file] = result.storage_data.shard
        metadata.version = CURRENT_DCP_VERSION
        metadata.storage_data = storage
        metadata.storage_meta = self.storage_meta()
        local = self._local / _METADATA_FILE
        try:
            with open(local, "wb") as stream:
                pickle.dump(metadata, stream)
            first = self._commit.publish(0, local, _METADATA_FILE)
        finally:
            self.close()
        self.committed = self._commit.commit([first, *shards.values()], self.metadata, self.retention,
                                             layout=DCP_LAYOUT)
        logger.info("committed the sharded checkpoint of step %d (%d files from %d ranks)",
                    self.step, len(shards) + 1, len(results))

    def storage_meta(self) -> StorageMeta | None:
        # A string, not a path object: the metadata's unpickler on load knows no pathlib.
        return StorageMeta(checkpoint_id=f"{self.store.root}#step={self.step}")

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False  # never chosen by DCP for a checkpoint_id: the caller passes the writer

    def close(self) -> None:
        """Remove the local staging directory (done by the save itself once it succeeded)."""
        if self._local is not None:
            shutil.rmtree(self._local, ignore_errors=True)
            self._local = None


class _MetadataUnpickler(pickle.Unpickler):
    """Reads DCP's ``.metadata`` knowing only the classes it is made of: a pickle from shared
    storage never gets to call anything else."""

    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"),
               ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("collections", "OrderedDict"),
               *(("torch.distributed.checkpoint.metadata", name) for name in (
                   "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                   "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"))}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                              torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's metadata; refused")


class _CheckedBytes:
    """The load planner, whose ``load_bytes`` gets a value only once ``weights_only`` has read it
    (DCP's default planner unpickles non-tensor values without that restriction)."""

    def __init__(self, planner: LoadPlanner, where: str):
        self._planner, self._where = planner, where

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            torch.load(io.BytesIO(value.getvalue()), weights_only=True)
        except pickle.UnpicklingError as error:
            raise VerificationError(f"{read_item.dest_index.fqn} in {self._where} is not plain data "
                                    f"(refused by weights_only): {error}", self._where) from error
        value.seek(0)
        self._planner.load_bytes(read_item, value)


class StoreReader(StorageReader):
    """A DCP ``StorageReader`` of one committed sharded ``checkpoint`` of ``store``.

    Each rank downloads (checked against the manifest) only the files its load plan
    reads, into a local staging directory that is removed after the load.
    """

    def __init__(self, store: Any, checkpoint: Checkpoint, staging_dir: str | None = None):
        super().__init__()
        if not is_sharded(checkpoint) or checkpoint.metadata[SHARDED_KEY].get("layout") != DCP_LAYOUT:
            raise ValueError(f"checkpoint of step {checkpoint.step} is not a sharded DCP checkpoint")
        self.store, self.checkpoint, self.staging_dir = store, checkpoint, staging_dir
        self._local: Path | None = None
        self._files: FileSystemReader | None = None

    def _directory(self) -> Path:
        if self._local is None:
            self._local = Path(tempfile.mkdtemp(prefix=f"ckpt-dcp-load-{self.checkpoint.step}-",
                                                dir=self.staging_dir))
            _remove_when_gone(self, self._local)
        return self._local

    def reset(self, checkpoint_id: Any = None) -> None:
        self.close()

    def read_metadata(self, *args: Any) -> Metadata:
        # No **kwargs: DCP would then fall back to per-rank metadata files, which a store never has.
        try:
            return self._fetch_metadata()
        except BaseException:
            self.close()  # DCP called directly never closes a reader whose load failed
            raise

    def _fetch_metadata(self) -> Metadata:
        (path,) = fetch_shards(self.store, self.checkpoint, self._directory(), [_METADATA_FILE])
        try:
            with open(path, "rb") as stream:
                metadata = _MetadataUnpickler(stream).load()
        except pickle.UnpicklingError:
            raise  # a forbidden class: refused, loudly
        except Exception as error:  # its checksum matched, yet it is no DCP metadata: a bad writer
            raise VerificationError(f"{_METADATA_FILE} of step {self.checkpoint.step} cannot be read: {error}",
                                    self.checkpoint.path) from error
        if not isinstance(metadata, Metadata):
            raise VerificationError(f"{_METADATA_FILE} of step {self.checkpoint.step} holds no DCP metadata",
                                    self.checkpoint.path)
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self._files = FileSystemReader(self._directory())
        self._files.set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Download the files this rank's plan reads (checked), then let DCP's reader read them."""
        needed = sorted({self._files.storage_data[item.storage_index].relative_path for item in plan.items})
        try:
            fetch_shards(self.store, self.checkpoint, self._directory(), needed)
            return self._files.read_data(plan, _CheckedBytes(planner, self.checkpoint.path))
        finally:
            self.close()

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False

    def close(self) -> None:
        """Remove the local staging directory."""
        if self._local is not None:
            shutil.rmtree(self._local, ignore_errors=True)
            self._local = None


# -- the helpers ---------------------------------------------------------------------------


def _remove_when_gone(owner: Any, directory: Path) -> None:
    """Remove ``directory`` when ``owner`` is collected or the process ends: a writer or reader
    that DCP called directly and that failed is never closed."""
    weakref.finalize(owner, shutil.rmtree, str(directory), True)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class ShardedCheckpointError(CkptTasksError):
    """A sharded save or load failed on one or more ranks."""


@contextlib.contextmanager
def _dcp_call(what: str) -> Iterator[None]:
    """DCP's call, quiet about one process (meant here), and its CheckpointException (a
    BaseException, which ``except Exception`` would miss) as a ShardedCheckpointError that
    names each rank's error."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            yield
    except CheckpointException as error:
        causes = "; ".join(f"rank {rank}: {type(cause).__name__}: {cause}"
                           for rank, (cause, _) in sorted(error.failures.items()))
        raise ShardedCheckpointError(f"{what} failed ({causes})") from error


def _from_coordinator(value: Any, group: Any) -> Any:
    """``value`` of the group's first rank, on every rank (itself without a process group)."""
    if not _distributed():
        return value
    box = [value]
    source = dist.get_global_rank(group, 0) if group is not None else 0
    dist.broadcast_object_list(box, src=source, group=group)
    return box[0]


def save_sharded(state_dict: dict[str, Any], store: Any, step: int, *, metadata: dict[str, Any] | None = None,
                 retention: bool = True, process_group: Any = None, planner: SavePlanner | None = None,
                 staging_dir: str | None = None) -> Checkpoint:
    """Save ``state_dict`` (sharded: every rank its own shards) as the checkpoint of ``step``
    of ``store``; return the committed checkpoint, on every rank.

    A collective: every rank of ``process_group`` (default: the world) calls it with its
    own store object of the same location. Complete or absent (see the module docstring);
    an error on any rank raises ShardedCheckpointError on every rank (a rank that died
    fails the others' collective: a RuntimeError, or ShardedCheckpointError).
    """
    writer = StoreWriter(store, step, metadata=metadata, retention=retention, staging_dir=staging_dir)
    try:
        with _dcp_call(f"saving the sharded checkpoint of step {step}"):
            dcp.save(state_dict, storage_writer=writer, planner=planner, process_group=process_group,
                     no_dist=not _distributed())
    finally:
        writer.close()
    return _from_coordinator(writer.committed, process_group)


def _choose(store: Any, step: int | None) -> Checkpoint | None:
    """The newest sharded DCP checkpoint (of ``step``, when given) that verifies."""
    candidates = [c for c in store.list() if is_sharded(c) and c.metadata[SHARDED_KEY].get("layout") == DCP_LAYOUT
                  and (step is None or c.step == step)]
    for checkpoint in reversed(candidates):
        try:
            return store.verify(checkpoint)
        except VerificationError as error:
            logger.warning("skipping sharded checkpoint of step %d: %s", checkpoint.step, error)
    if candidates:
        raise VerificationError(f"none of the {len(candidates)} sharded checkpoints at {store.root} verifies",
                                store.root)
    if step is not None:
        raise CkptTasksError(f"no sharded checkpoint of step {step} at {store.root}")
    return None


def load_sharded(state_dict: dict[str, Any], store: Any, step: int | None = None, *, process_group: Any = None,
                 planner: LoadPlanner | None = None, staging_dir: str | None = None) -> Checkpoint | None:
    """Load the newest sharded checkpoint of ``store`` (or the one of ``step``) into
    ``state_dict`` in place, on every rank; return it, or None when there is none.

    A collective. Rank 0 chooses and verifies the checkpoint (a corrupt newest one is
    skipped, as ``CheckpointStore.restore`` does) and tells the others; the world size
    may differ from the one that saved it. When rank 0 cannot choose (none verifies, the
    storage fails), rank 0 raises that error and the others a ShardedCheckpointError that
    names it; an error inside DCP's load is a ShardedCheckpointError on every rank.
    """
    choice: Any = None
    failure: BaseException | None = None
    if not _distributed() or dist.get_rank(process_group) == 0:
        try:
            choice = _choose(store, step)
        except Exception as error:  # the others must hear of it instead of waiting
            choice, failure = f"{type(error).__name__}: {error}", error
    choice = _from_coordinator(choice, process_group)
    if failure is not None:
        raise failure
    if isinstance(choice, str):
        raise ShardedCheckpointError(f"rank 0 could not choose a sharded checkpoint: {choice}")
    if choice is None:
        return None
    reader = StoreReader(store, choice, staging_dir=staging_dir)
    try:
        with _dcp_call(f"loading the sharded checkpoint of step {choice.step}"):
            dcp.load(state_dict, storage_reader=reader, planner=planner, process_group=process_group,
                     no_dist=not _distributed())
    finally:
        reader.close()
    logger.info("loaded the sharded checkpoint of step %d", choice.step)
    return choice
