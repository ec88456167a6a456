"""Sharded checkpoints: one checkpoint whose files several writers (ranks) publish.

A sharded checkpoint is a checkpoint in parts (``step-...-tag.ckpt.0000``, ``.0001``,
...) whose parts are written by different processes: every rank publishes its own
shard files, and one coordinator commits them. Its manifest lists every part (name,
size, adler32) as any checkpoint in parts does, and says in its metadata which file of
the sharded layout each part is (``metadata["sharded"]["files"]``: part name -> file
name, e.g. ``__1_0.distcp``; :mod:`ckpt_tasks.distributed.dcp` writes
torch.distributed.checkpoint's layout). So listing, ``verify``, the index in
``LATEST``, retention and the sweep of dead writers' files see it as they see every
checkpoint, and ``CheckpointStore.fetch``/``restore`` bring it back as a directory
of its files.

The commit (DESIGN.md, "Complete or absent"), :class:`ShardedCommit`:

1. the coordinator begins the commit of step N: a name (``step-N-tag``) no other
   writer uses, which it hands to every rank;
2. every rank publishes its files under that name: each uploaded under a temporary
   name, its size and adler32 checked against what the storage reports, renamed into
   place (``publish_file``, as a one-file checkpoint is published);
3. only after every rank has published (the coordinator has heard from all of them)
   does the coordinator write the manifest, listing every part with its size and
   adler32, and then move ``LATEST`` (``CheckpointStore.commit_published``).

A checkpoint exists for readers once its manifest does. A rank killed during step 2
leaves parts without a manifest: no checkpoint (retention removes them once they have
not changed for an hour); a coordinator killed between its manifest and ``LATEST``
leaves a complete checkpoint that readers find by listing. So a SIGKILL of any rank at
any moment leaves the newest checkpoint complete or absent.
"""
from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from ckpt_tasks.errors import VerificationError
from ckpt_tasks.storage.checksum import adler32_concat
from ckpt_tasks.storage.commit import publish_file, temporary_name
from ckpt_tasks.storage.reading import fetch_checked
from ckpt_tasks.storage.records import Checkpoint, StoredFile, check_step, hex32

if TYPE_CHECKING:
    from ckpt_tasks.storage.store import CheckpointStore

__all__ = ["SHARDED_KEY", "PublishedShard", "ShardedCommit", "fetch_shards", "fetch_sharded", "is_sharded",
           "shard_files"]

#: the manifest metadata key of a sharded checkpoint
SHARDED_KEY = "sharded"
#: part names have 4 digits (``records.DATA_RE``): part 0 and one part per further file
MAX_PARTS = 10_000


@dataclass(frozen=True)
class PublishedShard:
    """A file of a sharded checkpoint, published and verified: its name in the sharded
    layout (``file``), and the part that holds it on the storage."""

    file: str
    part: StoredFile


class ShardedCommit:
    """The commit of one sharded checkpoint of ``step`` at ``store``'s location.

    The coordinator creates it without ``stem`` (a fresh name is chosen) and hands
    ``stem`` to the other ranks, which create theirs with it. Any rank then calls
    :meth:`publish` for its files; the coordinator calls :meth:`commit` with all of them.
    """

    def __init__(self, store: "CheckpointStore", step: int, stem: str | None = None):
        check_step(step)
        if stem is not None and not stem.startswith(f"step-{step:012d}-"):
            raise ValueError(f"{stem!r} is not the name of a checkpoint of step {step}")
        self.store, self.step = store, step
        # Each commit's own random tag: a duplicate job never overwrites another's parts.
        self.stem = stem or f"step-{step:012d}-{uuid.uuid4().hex[:8]}"

    def part_path(self, index: int) -> str:
        """The path of part ``index`` of this checkpoint."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < MAX_PARTS:
            raise ValueError(f"a part index is an integer in [0, {MAX_PARTS}), got {index!r}")
        return self.store._path(f"{self.stem}.ckpt.{index:04d}")

    def publish(self, index: int, local: str | os.PathLike, file: str) -> PublishedShard:
        """Publish the local file ``local`` as part ``index`` (the sharded layout's ``file``):
        complete and checked on the storage (size and adler32), or not at all. Part indices
        are unique within the commit; the caller assigns them."""
        dest = self.part_path(index)
        part = self.store.retry.run(lambda: publish_file(self.store.files, local, dest), f"uploading {dest}")
        return PublishedShard(file, part)

    def commit(self, shards: Iterable[PublishedShard], metadata: dict[str, Any] | None = None,
               retention: bool = True, layout: str = "files") -> Checkpoint:
        """Write the manifest listing every shard (in part order) and move ``LATEST``; only
        the coordinator calls it, after every rank has published. ``layout`` names the
        format of the files (recorded in the manifest)."""
        shards = sorted(shards, key=lambda shard: shard.part.path)
        names = [shard.file for shard in shards]
        paths = [shard.part.path for shard in shards]
        if not shards or len(set(names)) != len(names) or len(set(paths)) != len(paths):
            raise ValueError(f"a sharded checkpoint needs distinct files in distinct parts, got {names} in {paths}")
        prefix = self.store._path(f"{self.stem}.ckpt.")
        if any(not shard.part.path.startswith(prefix) for shard in shards):
            raise ValueError(f"every shard must be a part of {self.stem}")
        parts, offset = [], 0
        for shard in shards:
            parts.append(StoredFile(shard.part.path, shard.part.size, shard.part.adler32, offset))
            offset += shard.part.size
        info = {"layout": layout, "files": {part.name: shard.file for part, shard in zip(parts, shards)}}
        checkpoint = Checkpoint(
            step=self.step, name=f"{self.stem}.ckpt", size=offset,
            adler32=hex32(adler32_concat((part.adler32, part.size) for part in parts)),
            created=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            path=self.store._path(f"{self.stem}.ckpt"), metadata={**(metadata or {}), SHARDED_KEY: info},
            parts=tuple(parts))
        return self.store.commit_published(checkpoint, retention=retention)


def is_sharded(checkpoint: Checkpoint) -> bool:
    """Whether ``checkpoint`` is a sharded one (its parts are files of a sharded layout)."""
    return bool(checkpoint.parts) and isinstance(checkpoint.metadata.get(SHARDED_KEY), dict)


def shard_files(checkpoint: Checkpoint) -> dict[str, StoredFile]:
    """The files of a sharded checkpoint: name in its layout -> the part that holds it."""
    if not is_sharded(checkpoint):
        raise ValueError(f"checkpoint of step {checkpoint.step} is not sharded")
    names = checkpoint.metadata[SHARDED_KEY].get("files", {})
    files = {}
    for part in checkpoint.parts:
        name = names.get(part.name)
        # A file name is joined to a local directory: nothing that leaves it.
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
            raise VerificationError(f"checkpoint of step {checkpoint.step}: part {part.name} has no valid "
                                    f"file name in its manifest ({name!r})", part.path)
        files[name] = part
    return files


def fetch_shards(store: "CheckpointStore", checkpoint: Checkpoint, directory: str | os.PathLike,
                 names: Iterable[str] | None = None) -> list[Path]:
    """Download the files ``names`` (default: all) of a sharded checkpoint into
    ``directory``, each checked (size and adler32) against the manifest and appearing
    complete or not at all; files already there are taken as they are."""
    files = shard_files(checkpoint)
    wanted = list(files) if names is None else list(dict.fromkeys(names))
    unknown = [name for name in wanted if name not in files]
    if unknown:
        raise VerificationError(f"checkpoint of step {checkpoint.step} has no files {unknown}", checkpoint.path)
    directory = Path(directory)
    paths = []
    for name in wanted:
        local, part = directory / name, files[name]
        if not local.exists():
            # One part as a one-file checkpoint: fetch_checked's verified, complete-or-absent download.
            fetch_checked(store.files, store.retry, Checkpoint(
                step=checkpoint.step, name=part.name, size=part.size, adler32=hex32(part.adler32),
                created=checkpoint.created, path=part.path), local)
        paths.append(local)
    return paths


def fetch_sharded(store: "CheckpointStore", checkpoint: Checkpoint, dest: str | os.PathLike) -> Path:
    """Download every file of a sharded checkpoint into the directory ``dest``, which
    appears complete or not at all (a directory already there is replaced)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(temporary_name(dest))
    try:
        partial.mkdir()
        fetch_shards(store, checkpoint, partial)
        if dest.exists() or dest.is_symlink():
            # Renamed aside first: dest is the old checkpoint (a directory, or the file of a
            # one-file restore) or the new one (or, for a moment, absent), never a mixture.
            old = Path(temporary_name(dest))
            dest.rename(old)
            try:
                partial.rename(dest)
            except OSError:
                old.rename(dest)  # the old one back, not a missing dest
                raise
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        else:
            partial.rename(dest)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return dest
