"""What retention keeps: small policy objects, pure functions of the committed steps.

A policy answers which of a location's checkpoints (their steps, oldest first) it
keeps, by position. ``KeepLast(3) | KeepEvery(1000)`` keeps what either keeps.
:func:`checkpoints_to_delete` adds the one rule no policy can break: the checkpoint
``LATEST`` names is never deleted. ``CheckpointStore.apply_retention`` deletes what
it returns, after repairing ``LATEST``, and then sweeps the partial files of dead writers.
"""
from __future__ import annotations

from typing import Protocol, Sequence

from ckpt_tasks.storage.records import Checkpoint


class RetentionPolicy(Protocol):
    """Which checkpoints to keep."""

    def keep(self, steps: Sequence[int]) -> set[int]:
        """The positions in ``steps`` (the committed steps, oldest first) to keep."""

    def __or__(self, other: "RetentionPolicy") -> "RetentionPolicy":
        """A policy that keeps what either keeps."""


class _Combinable:
    def __or__(self, other: RetentionPolicy) -> "KeepAny":
        return KeepAny(self, other)


def _check_count(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


class KeepLast(_Combinable):
    """The ``n`` newest checkpoints."""

    def __init__(self, n: int):
        self.n = _check_count(n, "keep_last")

    def keep(self, steps: Sequence[int]) -> set[int]:
        return set(range(max(0, len(steps) - self.n), len(steps)))

    def __repr__(self) -> str:
        return f"KeepLast({self.n})"


class KeepEvery(_Combinable):
    """Every checkpoint whose step is a multiple of ``k`` (milestones kept for good)."""

    def __init__(self, k: int):
        self.k = _check_count(k, "keep_every")

    def keep(self, steps: Sequence[int]) -> set[int]:
        return {i for i, step in enumerate(steps) if step % self.k == 0}

    def __repr__(self) -> str:
        return f"KeepEvery({self.k})"


class KeepAny(_Combinable):
    """What any of ``policies`` keeps."""

    def __init__(self, *policies: RetentionPolicy):
        if not policies:
            raise ValueError("KeepAny needs at least one policy")
        self.policies = policies

    def keep(self, steps: Sequence[int]) -> set[int]:
        kept: set[int] = set()
        for policy in self.policies:
            kept |= policy.keep(steps)
        return kept

    def __repr__(self) -> str:
        return " | ".join(map(repr, self.policies))


def policy_from(keep_last: int = 3, keep_every: int | None = None) -> RetentionPolicy:
    """The policy of ``CheckpointStore``'s shorthands ``keep_last`` and ``keep_every``."""
    last = KeepLast(keep_last)
    if keep_every is None:
        return last
    if isinstance(keep_every, bool) or not isinstance(keep_every, int) or keep_every < 1:
        raise ValueError(f"keep_every must be None or an integer >= 1, got {keep_every!r}")
    return last | KeepEvery(keep_every)


def checkpoints_to_delete(policy: RetentionPolicy, checkpoints: Sequence[Checkpoint],
                          latest_manifest: str | None) -> list[Checkpoint]:
    """The ``checkpoints`` (oldest first) that ``policy`` does not keep, sparing the one whose
    manifest ``LATEST`` names (``latest_manifest``), whatever the policy says."""
    kept = policy.keep([c.step for c in checkpoints])
    return [c for i, c in enumerate(checkpoints) if i not in kept and c.manifest_name != latest_manifest]
