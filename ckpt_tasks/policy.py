"""When to save: small policy objects, and the reasons a checkpoint is made.

A save policy answers one question at the end of a step: is a checkpoint due? The
flat parameters of the Checkpointer, the task and the callbacks (``checkpoint_every``,
``checkpoint_interval``) are shorthands for these objects::

    policy = SaveEvery(100) | SaveInterval(seconds=600)
    if policy.due(step_count, time.monotonic()):
        save(); policy.saved(step_count, time.monotonic())

A stop (SIGTERM, a site's time limit) always saves; that is the StopGuard's business,
not a policy's.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class SaveReason(str, enum.Enum):
    """Why a checkpoint was made; the value is what manifests record as ``reason``."""

    INTERVAL = "interval"  #: due by the save policy
    SIGNAL = "signal"      #: a stop: SIGTERM or SIGINT
    EXIT = "exit"          #: a voluntary checkpoint exit (``--checkpoint-exit-interval``)
    SITE_LIMIT = "site limit"  #: a stop before the site's run-time limit (``--walltime-margin``)
    FINAL = "final"        #: the program ended (the watcher's last save)
    NEW_VERSION = "new version"  #: the watched program wrote a new complete file

    def __str__(self) -> str:
        return self.value


class SavePolicy:
    """Base of the save policies: ``due`` asks, ``saved`` tells that a save happened."""

    def due(self, count: int, now: float) -> bool:
        """Whether a checkpoint is due after ``count`` steps counted from 0 (the call's
        index) at monotonic time ``now``."""
        raise NotImplementedError

    def saved(self, count: int, now: float) -> None:
        """A checkpoint was made at step index ``count`` and time ``now``."""

    def __or__(self, other: "SavePolicy") -> "SaveAny":
        return SaveAny((self, other))


@dataclass
class SaveEvery(SavePolicy):
    """Due on step indices 0, N, 2N, ... (the seed's ``checkpoint_every``: calls 1, N+1, ...)."""

    steps: int

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"checkpoint_every must be an integer >= 1, got {self.steps!r}")

    def due(self, count: int, now: float) -> bool:
        return count % self.steps == 0


@dataclass
class SaveInterval(SavePolicy):
    """Due when ``seconds`` passed since the last save (or since the policy was made)."""

    seconds: float
    last: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if isinstance(self.seconds, bool) or not isinstance(self.seconds, (int, float)) \
                or not self.seconds > 0:
            raise ValueError(f"checkpoint_interval must be None or seconds > 0, got {self.seconds!r}")

    def due(self, count: int, now: float) -> bool:
        return now - self.last >= self.seconds

    def saved(self, count: int, now: float) -> None:
        self.last = now


@dataclass
class SaveAny(SavePolicy):
    """Due when any of its policies is due."""

    policies: tuple[SavePolicy, ...]

    def due(self, count: int, now: float) -> bool:
        return any(policy.due(count, now) for policy in self.policies)

    def saved(self, count: int, now: float) -> None:
        for policy in self.policies:
            policy.saved(count, now)

    def __or__(self, other: SavePolicy) -> "SaveAny":
        return SaveAny((*self.policies, other))


class SaveNever(SavePolicy):
    """Never due: only a stop saves."""

    def due(self, count: int, now: float) -> bool:
        return False


def save_policy(checkpoint_every: int | None = 1, checkpoint_interval: float | None = None) -> SavePolicy:
    """The policy the flat parameters describe (``None`` leaves a part out)."""
    parts: list[SavePolicy] = []
    if checkpoint_every is not None:
        parts.append(SaveEvery(checkpoint_every))
    if checkpoint_interval is not None:
        parts.append(SaveInterval(checkpoint_interval))
    if not parts:
        return SaveNever()
    return parts[0] if len(parts) == 1 else SaveAny(tuple(parts))
