"""The parameter fingerprint: which training a checkpoint belongs to.

Every manifest records the fingerprint of the parameters that define its training
(``metadata["fingerprint"]``, with the parameters themselves in ``metadata["params"]``);
a checkpoint of other parameters is refused on restore instead of being resumed. The
same fingerprint names a task's checkpoint location (``CheckpointedTask.checkpoint_location``)
and its outputs (``workflows/train.py``), so it must stay stable across versions.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from ckpt_tasks.errors import FingerprintMismatch


def parameter_fingerprint(params: dict[str, Any]) -> str:
    """A short, stable hash of a training's parameters (16 hex digits of a SHA-256)."""
    text = json.dumps(params, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_fingerprint(checkpoint: Any, params: dict[str, Any], fingerprint: str, location: str) -> None:
    """Refuse ``checkpoint`` (a ``Checkpoint``) of another training, naming the parameters that differ.

    Raises :class:`~ckpt_tasks.errors.FingerprintMismatch` unless the manifest's fingerprint
    is ``fingerprint``.
    """
    recorded = checkpoint.metadata.get("fingerprint")
    if recorded == fingerprint:
        return
    theirs = checkpoint.metadata.get("params") or {}
    differences = [f"{name}: checkpoint {theirs.get(name, '<unset>')!r}, task {params.get(name, '<unset>')!r}"
                   for name in sorted(set(theirs) | set(params)) if theirs.get(name) != params.get(name)]
    detail = "; ".join(differences) or f"fingerprint {recorded!r} != {fingerprint!r}"
    raise FingerprintMismatch(
        f"the checkpoint of step {checkpoint.step} at {location} belongs to a training with other "
        f"parameters ({detail}); remove that location or run with --store elsewhere")
