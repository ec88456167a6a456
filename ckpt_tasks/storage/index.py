"""The ``LATEST`` pointer and the index it carries: a location read in a fixed number of round trips.

``LATEST`` names the newest checkpoint's manifest, as it always did (``step``,
``manifest``: what earlier versions read). Since pointer version 2 it also carries
``index``, a copy of the manifest of every checkpoint kept when it was written, and
``index_adler32``, the adler32 of that copy, so a damaged copy is found::

    {"version": 2, "step": 240, "manifest": "step-000000000240-5e6f7a8b.json",
     "index": [{...manifest of step 120...}, {...manifest of step 240...}], "index_adler32": "1a2b3c4d"}

A reader (:func:`scan_location`) lists the location and reads ``LATEST`` together
(two requests, one round trip's wait). The listing decides which checkpoints exist:
a checkpoint is committed when its manifest is there, whatever the index says. The
index only saves opening manifests: an entry is used when its manifest is listed
(manifests are never rewritten: each name has a writer's random tag), entries whose
manifest is gone are dropped, and listed manifests the index lacks (written by an
earlier version, by a writer that lost the race for ``LATEST``, or whose writer died
before moving it) are read, all at once. A damaged index (its adler32 differs, an
entry is not a manifest of its name) is ignored and every manifest read: never trusted
blindly. The next save writes an index rebuilt from what was read.
"""
from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass
from typing import Callable

from ckpt_tasks.storage.backend import StorageBackend
from ckpt_tasks.storage.parallel import each, together
from ckpt_tasks.storage.records import (LATEST, MANIFEST_RE, MANIFEST_VERSION, MANIFEST_VERSION_PARTS, Checkpoint,
                                        checkpoint_of_fields, hex32, parse_manifest)
from ckpt_tasks.storage.retry import RetryPolicy

logger = logging.getLogger(__name__)

POINTER_VERSION = 2


@dataclass(frozen=True)
class Pointer:
    """What ``LATEST`` says: the newest step, its manifest, and the index (None: none, or damaged)."""

    step: int
    manifest: str
    index: dict[str, dict] | None = None  # manifest name -> the manifest's JSON object


@dataclass(frozen=True)
class Scan:
    """A location as one reader saw it.

    ``names``: its listing (empty when the location does not exist); ``pointer``: ``LATEST``
    (None when absent or unreadable); ``checkpoints``: the committed ones, oldest first;
    ``index_complete``: whether the index held every listed manifest (else some were read,
    and the next ``LATEST`` written carries the rebuilt index).
    """

    names: list[str]
    pointer: Pointer | None
    checkpoints: list[Checkpoint]
    index_complete: bool


def _index_adler32(entries: list[dict]) -> str:
    return hex32(zlib.adler32(json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()))


def _manifests(kept: list[Checkpoint]) -> list[dict]:
    # What json.loads(manifest_text(c)) gives for each, in one pass of the C encoder:
    # parsing each indented manifest text took 0.1 ms per entry, 10 ms for a LATEST of 100,
    # twice per save, holding the GIL while the save's other requests waited to go out
    # (benchmarks/bench_wan.py counted it as round trips).
    return json.loads(json.dumps([{"version": MANIFEST_VERSION_PARTS if c.parts else MANIFEST_VERSION,
                                   **c.to_json()} for c in kept], sort_keys=True))


def manifest_fields(checkpoint: Checkpoint) -> dict:
    """A checkpoint's manifest as the index copies it (the manifest's own JSON object, what
    ``json.loads(manifest_text(checkpoint))`` gives)."""
    return _manifests([checkpoint])[0]


def pointer_text(newest: Checkpoint, kept: list[Checkpoint]) -> str:
    """The JSON of ``LATEST`` naming ``newest``, with the manifests of ``kept`` as its index."""
    entries = _manifests(kept)
    return json.dumps({"version": POINTER_VERSION, "step": newest.step, "manifest": newest.manifest_name,
                       "index": entries, "index_adler32": _index_adler32(entries)})


def _index_of(fields: dict, where: str) -> dict[str, dict] | None:
    entries = fields.get("index")
    if entries is None:
        return None  # written by an earlier version: no index
    try:
        if fields["index_adler32"] != _index_adler32(entries):
            raise ValueError("its adler32 differs")
        index = {}
        for entry in entries:
            name = str(entry["name"]).rsplit(".", 1)[0] + ".json"
            match = MANIFEST_RE.match(name)
            if match is None or int(match["step"]) != entry["step"]:
                raise ValueError(f"an entry is not the manifest {name}")
            index[name] = entry
        return index
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        logger.warning("the index in %s is damaged (%s); reading every manifest instead", where, error)
        return None


def parse_pointer(data: bytes, where: str) -> Pointer | None:
    """``LATEST``'s content; None (with a warning) when it is unreadable."""
    try:
        fields = json.loads(data)
        step, manifest = int(fields["step"]), str(fields["manifest"])
    except (ValueError, KeyError, TypeError):
        logger.warning("%s is unreadable; ignoring it", where)
        return None
    return Pointer(step, manifest, _index_of(fields, where))


def read_pointer(files: StorageBackend, retry: RetryPolicy, path: str) -> Pointer | None:
    """``LATEST`` at ``path``; None when it is absent or unreadable."""
    try:
        data = retry.run(lambda: files.read_bytes(path), "reading LATEST")
    except FileNotFoundError:
        return None
    return parse_pointer(data, path)


def list_names(files: StorageBackend, retry: RetryPolicy, root: str) -> list[str]:
    """The names at ``root``; empty when it does not exist (an outage raises)."""
    try:
        return retry.run(lambda: files.listdir(root), f"listing {root}")
    except FileNotFoundError:
        return []  # the location does not exist yet: no checkpoints (an outage raises)


def read_manifest(files: StorageBackend, retry: RetryPolicy, path_of: Callable[[str], str],
                  name: str) -> Checkpoint | None:
    """The checkpoint of the manifest ``name``; None when it is gone or unreadable."""
    where = path_of(name)
    try:
        data = retry.run(lambda: files.read_bytes(where), f"reading {name}")
    except FileNotFoundError:
        return None  # removed by retention between listing and reading
    try:
        return parse_manifest(data, path_of, where)
    except ValueError as error:
        logger.warning("manifest %s is unreadable (%s); ignoring it", where, error)
        return None


def highest_step(names: list[str]) -> int | None:
    """The highest step of the manifests among ``names`` (None: there is none)."""
    steps = [int(match["step"]) for match in map(MANIFEST_RE.match, names) if match]
    return max(steps, default=None)


def scan_location(files: StorageBackend, retry: RetryPolicy, root: str,
                  path_of: Callable[[str], str]) -> Scan:
    """The committed checkpoints at ``root``, from its listing and the index in ``LATEST``."""
    names, pointer = together(lambda: list_names(files, retry, root),
                              lambda: read_pointer(files, retry, path_of(LATEST)))
    index = pointer.index if pointer is not None and pointer.index is not None else {}
    manifests = [name for name in names if MANIFEST_RE.match(name)]
    checkpoints: list[Checkpoint] = []
    missing = []
    for name in manifests:
        entry = index.get(name)
        if entry is None:
            missing.append(name)
            continue
        try:
            checkpoints.append(checkpoint_of_fields(entry, path_of, f"{path_of(LATEST)} (index)"))
        except ValueError:
            missing.append(name)  # an entry this version cannot take: its manifest decides
    if missing:
        logger.debug("reading %d manifests the index of %s lacks", len(missing), root)
        read = each(lambda name: read_manifest(files, retry, path_of, name), missing)
        checkpoints.extend(c for c in read if c is not None)
    checkpoints.sort(key=lambda c: (c.step, c.created))
    return Scan(names, pointer, checkpoints, index_complete=not missing)
