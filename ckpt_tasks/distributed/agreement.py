"""One agreed stop: every rank stops after the same step.

Each rank records its own signals with a :class:`~ckpt_tasks.stop.StopGuard` (a
SIGTERM may reach one rank, or all of them at slightly different steps). At a step
boundary the ranks combine their flags with one ``all_reduce(MAX)`` of a two-element
integer tensor (stop requested, a time-based save due): every rank then knows the same
answer after the same step. With ``every=k`` they combine only every k steps, which
all ranks must agree on (it is a parameter of the training, like the world size).

With ``overlap`` (the default) the collective runs in the background while the next
step trains: the flags sent after step s are read after the step that follows,
when the gradients' all_reduce has long brought the ranks together, so no rank waits
for a slower one here. A stop then comes one agreement later, after the same step on
every rank all the same.
"""
from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from typing import Any

from ckpt_tasks.stop import StopGuard

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """What all ranks agreed on at a step boundary."""

    stop: bool = False
    save: bool = False


NOTHING = Decision()


class StopAgreement:
    """A rank's local stop flag and the collective that makes it everyone's.

    Args:
        group: the process group to agree in (a gloo group of its own; None: the default group).
        every: combine flags every this many steps (the same on all ranks).
        overlap: run the collective while the next step trains (the same on all ranks).
    """

    def __init__(self, group: Any = None, every: int = 1, overlap: bool = True):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        import torch

        self.group = group
        self.every = every
        # The guard only records: the stop itself happens when the ranks agree.
        self.guard = StopGuard(lambda signum: None, defer=True)
        self.overlap = overlap
        # Two buffers: one in flight while the other is read.
        self._buffers = [torch.zeros(2, dtype=torch.int32) for _ in range(2)]
        self._pending: tuple[Any, Any] | None = None  # (work, its buffer)

    def install(self) -> bool:
        """Record SIGTERM/SIGINT from now on (False where Python cannot handle signals).

        Unblocks them too: the launcher starts ranks with them blocked, so a signal that
        came during start-up is delivered (and recorded) now.
        """
        installed = self.guard.install()
        if installed:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.guard.signals)
        return installed

    def uninstall(self) -> None:
        self.guard.uninstall()

    @property
    def requested(self) -> bool:
        """Whether this rank received a stop signal (or :meth:`request`) not agreed on yet."""
        return self.guard.requested is not None

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask for a stop as if ``signum`` had arrived (a site limit, a test)."""
        self.guard.request(signum)

    def agree(self, step: int, save_due: bool = False) -> Decision:
        """After ``step``: combine every rank's flags (on multiples of ``every``).

        A collective: every rank calls it after every step. It raises when a peer has
        died or does not answer within the group's timeout.
        """
        if step % self.every:
            return NOTHING
        import torch.distributed as dist

        decision = self._settle_pending(step)
        if decision.stop:
            return decision
        flags = self._buffers[0]
        self._buffers.reverse()
        flags[0], flags[1] = int(self.requested), int(save_due)
        if not self.overlap:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
            return self._decision(flags, step)
        self._pending = (dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flags)
        return decision

    def _settle_pending(self, step: int) -> Decision:
        """The decision of the overlapped collective still in flight (NOTHING: none)."""
        if self._pending is None:
            return NOTHING
        work, flags = self._pending
        self._pending = None
        work.wait()
        return self._decision(flags, step)

    @staticmethod
    def _decision(flags: Any, step: int) -> Decision:
        stop, save = bool(flags[0]), bool(flags[1])
        if stop:
            logger.info("the ranks agreed to stop after step %d", step)
        return Decision(stop, save) if (stop or save) else NOTHING

    def settle(self, step: int) -> Decision:
        """After the last step: the collective in flight, then one more synchronous round.

        A collective like :meth:`agree`, called by every rank once its loop is over (every
        rank has run the same steps). It tells every rank whether any of them asked for a
        stop or a save after the agreements so far, so that a signal during the last step
        is honoured alike on all of them.
        """
        import torch.distributed as dist

        decision = self._settle_pending(step)
        flags = self._buffers[0]
        flags[0], flags[1] = int(self.requested), 0
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        last = self._decision(flags, step)
        return Decision(decision.stop or last.stop, decision.save or last.save)

    def finish(self) -> None:
        """Wait for the collective in flight (before the process group goes away)."""
        if self._pending is not None:
            work, _ = self._pending
            self._pending = None
            work.wait()
