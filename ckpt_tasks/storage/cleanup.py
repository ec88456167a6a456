"""What retention removes: checkpoints it does not keep, and the leftovers of dead writers.

Requests that do not depend on each other go out together (``parallel.each``): over a
slow link deleting ten checkpoints costs two round trips, not twenty.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from ckpt_tasks.errors import StorageError
from ckpt_tasks.storage.backend import StorageBackend
from ckpt_tasks.storage.commit import PARTIAL_MARKER
from ckpt_tasks.storage.parallel import each
from ckpt_tasks.storage.records import DATA_RE, Checkpoint

logger = logging.getLogger(__name__)

#: temporary files older than this belong to dead writers and are removed by retention
STALE_PARTIAL_SECONDS = 3600


def delete_checkpoints(files: StorageBackend, path_of: Callable[[str], str], deleted: list[Checkpoint]) -> None:
    """Remove ``deleted``: every manifest first (from then on they no longer exist for
    readers), then their data."""
    each(lambda c: files.remove(path_of(c.manifest_name), silent=True), deleted)
    each(lambda data: files.remove(data.path, silent=True), [d for c in deleted for d in c.data_files])
    for checkpoint in deleted:
        logger.info("retention removed checkpoint of step %d", checkpoint.step)


def _leftovers(names: list[str]) -> dict[str, list[str]]:
    """Temporaries, and data without a manifest, among ``names``, by checkpoint stem."""
    present = set(names)
    candidates: dict[str, list[str]] = {}
    for name in names:
        committed_name = name[1:name.index(PARTIAL_MARKER)] if PARTIAL_MARKER in name else name
        data = DATA_RE.match(committed_name)
        stem = data["stem"] if data else name
        if PARTIAL_MARKER not in name and (data is None or f"{stem}.json" in present):
            continue
        candidates.setdefault(stem, []).append(name)
    return candidates


def remove_stale_partials(files: StorageBackend, path_of: Callable[[str], str], names: list[str]) -> None:
    """Remove temporaries and uncommitted data of writers that are gone (``names``: the
    location's listing).

    A data file without its manifest was never committed: its writer died between the
    two, or retention died between removing the manifest and the data. But a writer
    uploading a large checkpoint in parts finished its first parts long before its
    manifest: a checkpoint's files go only when none of them changed for an hour.
    """
    now = time.time()
    candidates = _leftovers(names)

    def mtime(name: str) -> float | None:
        try:
            return files.stat(path_of(name)).st_mtime
        except StorageError:
            return None  # finished or removed by its writer in the meantime

    flat = [name for group in candidates.values() for name in group]
    mtimes = dict(zip(flat, each(mtime, flat)))
    stale = []
    for group in candidates.values():
        found = [name for name in group if mtimes[name] is not None]
        if found and now - max(mtimes[name] for name in found) > STALE_PARTIAL_SECONDS:
            stale.extend(found)
    each(lambda name: files.remove(path_of(name), silent=True), stale)
