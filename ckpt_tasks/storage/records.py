"""What a checkpoint location holds: stored files, checkpoints and their manifests.

One record type, :class:`StoredFile`, describes a file that is complete on the
storage (what ``publish_file`` returns, a part of a checkpoint, a file a fetch reads);
its adler32 is an int, written as 8 hex digits only in the JSON of a manifest.
:class:`Checkpoint` is a committed checkpoint as its manifest describes it.
The manifest format is fixed: see ``ckpt_tasks/storage/store.py`` for the layout.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from ckpt_tasks.errors import StorageError, VerificationError
from ckpt_tasks.storage.checksum import adler32_concat

LATEST = "LATEST"
#: manifests of single-file checkpoints keep version 1, so older readers still see them;
#: a checkpoint in parts has a version-2 manifest, which needs this code to read
MANIFEST_VERSION = 1
MANIFEST_VERSION_PARTS = 2
MANIFEST_RE = re.compile(r"^step-(?P<step>\d{12})-(?P<tag>[0-9a-f]{8})\.json$")
DATA_RE = re.compile(r"^(?P<stem>step-\d{12}-[0-9a-f]{8})\.ckpt(\.\d{4})?$")


def check_step(step: Any) -> None:
    """Raise ValueError unless ``step`` is an integer >= 0."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")


def hex32(value: int) -> str:
    """An adler32 as XRootD prints it: 8 hex digits."""
    return f"{value:08x}"


@dataclass(frozen=True)
class StoredFile:
    """A file complete on the storage: its full path or URL, size, adler32, and where its
    bytes go in the checkpoint it belongs to (``offset``)."""

    path: str
    size: int
    adler32: int
    offset: int = 0

    @property
    def name(self) -> str:
        """The file's name in its directory."""
        return self.path.rsplit("/", 1)[-1]

    def to_json(self) -> dict:
        """A part's entry in a manifest (its name, not its path: locations may move)."""
        return {"name": self.name, "size": self.size, "adler32": hex32(self.adler32)}


@dataclass(frozen=True)
class Checkpoint:
    """One committed checkpoint, as its manifest describes it."""

    step: int
    name: str  # file name of the data, e.g. "step-000000000120-1a2b3c4d.ckpt"
    size: int
    adler32: str  # 8 hex digits of the whole checkpoint, as the manifest and XRootD print it
    created: str  # ISO 8601, UTC
    path: str  # full path or URL of the data file (of the first part's name without its suffix)
    metadata: dict = field(default_factory=dict)
    parts: tuple[StoredFile, ...] = ()  # empty: the data is the single file ``name``

    @property
    def manifest_name(self) -> str:
        return self.name.rsplit(".", 1)[0] + ".json"

    @property
    def data_files(self) -> list[StoredFile]:
        """The stored files that hold this checkpoint, in order, with their offsets."""
        if not self.parts:
            return [StoredFile(self.path, self.size, int(self.adler32, 16))]
        return list(self.parts)

    def to_json(self) -> dict:
        """The manifest's fields (without its version)."""
        fields = {"step": self.step, "name": self.name, "size": self.size, "adler32": self.adler32,
                  "created": self.created, "path": self.path, "metadata": self.metadata}
        if self.parts:  # a single file: the same manifest as before parts existed
            fields["parts"] = [part.to_json() for part in self.parts]
        return fields


def manifest_text(checkpoint: Checkpoint) -> str:
    """The JSON of ``checkpoint``'s manifest."""
    version = MANIFEST_VERSION_PARTS if checkpoint.parts else MANIFEST_VERSION
    return json.dumps({"version": version, **checkpoint.to_json()}, indent=2, sort_keys=True)


def _data_stem(name: Any) -> str:
    """The ``step-...-tag`` stem of a checkpoint's data file name; ValueError for anything
    else (a manifest must never name a path outside its location, such as ``../x``)."""
    match = DATA_RE.match(name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(f"{name!r} is no checkpoint data file name")
    return match["stem"]


def parts_at(directory: str, entries: list[dict], stem: str | None = None) -> tuple[StoredFile, ...]:
    """The parts of a manifest, as stored files in ``directory`` with their offsets; each
    part's name must be a data file name of ``stem`` (the checkpoint's own), once."""
    parts, offset, names = [], 0, set()
    for entry in entries:
        if set(entry) != {"name", "size", "adler32"}:
            raise ValueError(f"a part has the fields {sorted(entry)}")
        if stem is not None and (_data_stem(entry["name"]) != stem or entry["name"] in names):
            raise ValueError(f"part {entry['name']!r} is not a part of {stem} named once")
        names.add(entry["name"])
        part = StoredFile(f"{directory}/{entry['name']}", int(entry["size"]), int(entry["adler32"], 16), offset)
        parts.append(part)
        offset += part.size
    return tuple(parts)


def parse_manifest(data: bytes, path_of: Callable[[str], str], where: str) -> Checkpoint:
    """The checkpoint of a manifest's bytes (read from ``where``); ``path_of(name)`` is the
    path of a name in the location.

    An unreadable manifest raises ValueError, for the caller to skip; one of a newer format
    raises StorageError, loudly: skipping it could resume an older checkpoint, or start
    from scratch.
    """
    fields = json.loads(data)
    if not isinstance(fields, dict):
        raise ValueError("not a JSON object")
    return checkpoint_of_fields(fields, path_of, where)


def checkpoint_of_fields(fields: dict, path_of: Callable[[str], str], where: str) -> Checkpoint:
    """The checkpoint of a manifest's parsed JSON object (a manifest's, or its copy in the
    index that ``LATEST`` carries); the errors of :func:`parse_manifest`."""
    fields = dict(fields)  # the caller's copy stays as it is
    version = fields.pop("version", MANIFEST_VERSION)
    if isinstance(version, int) and version > MANIFEST_VERSION_PARTS:
        raise StorageError(f"manifest {where} has version {version}, written by a newer ckpt_tasks "
                           f"than this one (reads up to {MANIFEST_VERSION_PARTS}); upgrade", where)
    try:
        stem = _data_stem(fields["name"])
        fields["path"] = path_of(fields["name"])  # the location may have been moved
        directory = fields["path"].rsplit("/", 1)[0]
        fields["parts"] = parts_at(directory, fields.get("parts", ()), stem)
        return Checkpoint(**fields)
    except (TypeError, KeyError, AttributeError) as error:
        raise ValueError(str(error)) from error


def check_parts_make_up(checkpoint: Checkpoint) -> None:
    """Raise VerificationError when a manifest's parts are not its checkpoint's bytes."""
    if not checkpoint.parts:
        return
    combined = adler32_concat((p.adler32, p.size) for p in checkpoint.parts)
    if sum(p.size for p in checkpoint.parts) != checkpoint.size or hex32(combined) != checkpoint.adler32:
        raise VerificationError(f"checkpoint of step {checkpoint.step}: its parts do not make up the "
                                f"{checkpoint.size} bytes, adler32 {checkpoint.adler32}, its manifest "
                                f"says", checkpoint.path)


def manifest_content(checkpoint: Checkpoint) -> dict:
    """What a manifest says of a checkpoint, wherever the location is now."""
    return json.loads(json.dumps({k: v for k, v in checkpoint.to_json().items() if k != "path"}))
