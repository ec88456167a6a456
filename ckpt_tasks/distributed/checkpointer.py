"""Checkpoints of a training on several ranks with replicated state (DDP).

Every rank builds the same :class:`~ckpt_tasks.state.TrainingState` (the DDP model,
its optimizer, ...) and calls :meth:`DistributedCheckpointer.step` after every
optimizer step. There the ranks agree whether to stop and whether a time-based save is
due (:class:`~ckpt_tasks.distributed.agreement.StopAgreement`). A checkpoint gathers
each rank's own part (its RNG states and any per-rank objects) to rank 0, which
writes the replicated state once, with every rank's part, through the store's usual
commit. On an agreed stop rank 0 commits that step while the others wait for its
word, and every rank leaves with the checkpoint exit code (85).

A peer that dies or stops answering makes the next collective fail on every other
rank (at once for a dead peer, after the group's timeout for a hung one): the
training raises :class:`PeerFailure` instead of waiting for ever.
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from ckpt_tasks.async_checkpoint import BackgroundCommitter, Snapshotter, checkpoint_metadata, wait_for_cuda
from ckpt_tasks.distributed.agreement import StopAgreement
from ckpt_tasks.distributed.ranks import DEFAULT_TIMEOUT, RankInfo, control_group
from ckpt_tasks.errors import CkptTasksError
from ckpt_tasks.policy import SaveInterval, SaveReason
from ckpt_tasks.state import Stateful, TrainingState, capture_rng_state, restore_rng_state
from ckpt_tasks.stop import CHECKPOINT_EXIT_CODE, EXIT_CHECKPOINT_FAILED, exit_process
from ckpt_tasks.transfer import StoreTransfer

logger = logging.getLogger(__name__)

#: seconds on top of the stop deadline that the other ranks wait for rank 0's final commit
_COMMIT_WAIT_MARGIN = 30.0


class PeerFailure(CkptTasksError):
    """A collective failed: another rank died, or did not answer within the timeout."""


class DistributedCheckpointer:
    """Restores, checkpoints and stops a replicated training consistently on all ranks.

    Args:
        store: this rank's CheckpointStore of the training (only rank 0 writes to it).
        state: the TrainingState, the same structure on every rank.
        params: the parameters of the training (recorded in manifests, checked on resume).
        checkpoint_every: save every this many steps (None: never by count).
        checkpoint_interval: also save after this many seconds, agreed among the ranks.
        agree_every: combine stop flags every this many steps (the same on all ranks).
        overlap: agree in the background while the next step trains (see StopAgreement).
        rank_objects: per-rank objects (state_dict protocol) saved for every rank.
        stop_deadline: seconds rank 0's final commit may take.
        control_timeout: seconds a control collective waits for a hung peer.
        asynchronous: commit periodic checkpoints in a background thread on rank 0.
        hard_exit: leave with ``os._exit`` (code run by luigi; see ``exit_process``).
    """

    def __init__(self, store: Any, state: TrainingState, *, params: dict[str, Any] | None = None,
                 checkpoint_every: int | None = None, checkpoint_interval: float | None = None,
                 agree_every: int = 1, rank_objects: dict[str, Stateful] | None = None,
                 stop_deadline: float = 300.0, control_timeout: float = DEFAULT_TIMEOUT,
                 asynchronous: bool = True, hard_exit: bool = False, overlap: bool = True):
        if checkpoint_every is not None and (isinstance(checkpoint_every, bool)
                                             or not isinstance(checkpoint_every, int) or checkpoint_every < 1):
            raise ValueError(f"checkpoint_every must be None or an integer >= 1, got {checkpoint_every!r}")
        self.info = RankInfo.from_environment()
        self.store = store
        self.state = state
        self.checkpoint_every = checkpoint_every
        self.rank_objects = dict(rank_objects or {})
        self.stop_deadline = stop_deadline
        self.asynchronous = asynchronous
        self.hard_exit = hard_exit
        self.transfer = StoreTransfer(store, step_of=lambda: state.step, params=dict(params or {}))
        self._interval = SaveInterval(checkpoint_interval) if checkpoint_interval else None
        # Every rank creates the groups in the same order: new_group is itself collective.
        self._control = control_group(control_timeout)
        self._commit_wait = control_group(stop_deadline + _COMMIT_WAIT_MARGIN)
        # A group of its own: its collective may be in flight while a save gathers states.
        self.agreement = StopAgreement(control_group(control_timeout), agree_every, overlap)
        self.background = BackgroundCommitter()
        self._snapshotter = Snapshotter()
        self._workdir = Path(tempfile.mkdtemp(prefix=f"ckpt-rank{self.info.rank}-"))
        self.agreement.install()

    # -- collectives ---------------------------------------------------------------------------

    def _collective(self, what: str, operation: Callable[[], Any]) -> Any:
        try:
            return operation()
        except RuntimeError as error:  # gloo and NCCL report a lost peer as RuntimeError subclasses
            raise PeerFailure(f"rank {self.info.rank}: {what} failed, another rank died or hangs: "
                              f"{error}") from error

    def _gather_rank_parts(self) -> list[dict] | None:
        import torch.distributed as dist

        part = {"rng": capture_rng_state(),
                "objects": {name: obj.state_dict() for name, obj in self.rank_objects.items()}}
        parts = [None] * self.info.world_size if self.info.is_coordinator else None
        self._collective("gathering the ranks' states",
                         lambda: dist.gather_object(part, parts, dst=0, group=self._control))
        return parts

    # -- resume --------------------------------------------------------------------------------

    def restore(self) -> bool:
        """Load the newest committed checkpoint into ``state`` on every rank; False: none yet.

        Rank 0 chooses (and verifies) the checkpoint; the others fetch that same one.
        """
        import torch
        import torch.distributed as dist

        local = self._workdir / "restored.pt"
        choice: list[Any] = [None]
        failure: BaseException | None = None
        if self.info.is_coordinator:
            try:
                choice[0] = self.transfer.restored if self.transfer.retrieve(local) else None
            except Exception as error:  # the others must hear of it instead of waiting
                choice[0], failure = f"{type(error).__name__}: {error}", error
        self._collective("telling the ranks what to restore",
                         lambda: dist.broadcast_object_list(choice, src=0, group=self._control))
        checkpoint = choice[0]
        if failure is not None:
            raise failure
        if isinstance(checkpoint, str):
            raise CkptTasksError(f"rank 0 could not restore a checkpoint: {checkpoint}")
        if not checkpoint:
            return False
        if not self.info.is_coordinator:
            self.store.fetch(checkpoint, local)
            self.transfer.restored = self.transfer.last_committed = checkpoint
            self.transfer.last_committed_step = checkpoint.step
        self._load(torch.load(local, map_location="cpu", weights_only=True))
        local.unlink(missing_ok=True)
        logger.info("rank %d resumed from step %d", self.info.rank, self.state.step)
        return True

    def _load(self, payload: dict) -> None:
        self.state.load_state_dict(payload)
        parts, saved_world = payload.get("ranks") or [], payload.get("world_size")
        if saved_world != self.info.world_size:
            logger.warning("the checkpoint was made by %s ranks, this training has %d: the replicated state "
                           "is restored, per-rank RNG states only for ranks below %d, so the run is not "
                           "bit-identical to one on %s ranks", saved_world, self.info.world_size,
                           len(parts), saved_world)
        if self.info.rank < len(parts):
            part = parts[self.info.rank]
            restore_rng_state(part["rng"])
            for name, obj in self.rank_objects.items():
                obj.load_state_dict(part["objects"][name])

    # -- training ------------------------------------------------------------------------------

    def step(self) -> None:
        """After each optimizer step (``state.step`` counted already), on every rank.

        Saves when due; on an agreed stop commits this step and leaves with code 85.
        """
        step = self.state.step
        time_due = self._interval is not None and self._interval.due(step, time.monotonic())
        decision = self._collective(f"agreeing after step {step}",
                                    lambda: self.agreement.agree(step, time_due))
        if decision.stop:
            self.stop()
        if decision.save or (self.checkpoint_every and step % self.checkpoint_every == 0):
            self.save()

    def save(self) -> None:
        """Checkpoint the current step (a collective: every rank calls it at the same step)."""
        parts = self._gather_rank_parts()
        if self._interval is not None:
            self._interval.saved(self.state.step, time.monotonic())
        if not self.info.is_coordinator:
            return
        self.background.wait()  # one commit at a time; its snapshot buffers are reused
        payload = self._payload(parts)
        if self.asynchronous:
            payload = self._snapshotter.snapshot(payload)
        self._submit(payload, SaveReason.INTERVAL)
        if not self.asynchronous:
            self.background.wait()

    def _payload(self, parts: list[dict]) -> dict:
        payload = self.state.state_dict()
        payload["ranks"] = parts
        payload["world_size"] = self.info.world_size
        return payload

    def _submit(self, payload: dict, reason: SaveReason) -> None:
        import torch

        step = self.state.step
        metadata = {**checkpoint_metadata(self.state, reason), "world_size": self.info.world_size}
        if reason is not SaveReason.INTERVAL:
            wait_for_cuda()
        self.background.submit(step, lambda: self.transfer.commit(
            lambda stream: torch.save(payload, stream), step, metadata,
            retention=reason is SaveReason.INTERVAL), yield_cpu=reason is SaveReason.INTERVAL)

    def stop(self) -> None:
        """Commit the current step on rank 0, wait for its word on the others, leave with 85.

        Leaves with ``EXIT_CHECKPOINT_FAILED`` on every rank when the commit failed.
        """
        import torch
        import torch.distributed as dist

        parts = self._gather_rank_parts()
        status = torch.zeros(1, dtype=torch.int32)
        if self.info.is_coordinator:
            status[0] = 0 if self._commit_final(parts) else 1
        self._collective("waiting for the final commit",
                         lambda: dist.broadcast(status, src=0, group=self._commit_wait))
        code = CHECKPOINT_EXIT_CODE if int(status[0]) == 0 else EXIT_CHECKPOINT_FAILED
        logger.info("rank %d stopped after step %d; exit %d", self.info.rank, self.state.step, code)
        self.agreement.uninstall()
        exit_process(code, hard=self.hard_exit)

    def _commit_final(self, parts: list[dict]) -> bool:
        deadline = time.monotonic() + self.stop_deadline
        try:
            if not self.background.wait(timeout=self.stop_deadline):
                logger.error("the checkpoint in flight did not finish within %.0f s", self.stop_deadline)
                return False
        except Exception as error:  # the commit in flight failed; the final one may still work
            logger.error("the checkpoint in flight failed: %s", error)
        if self.transfer.last_committed_step == self.state.step:
            return True
        try:
            self._submit(self._payload(parts), SaveReason.SIGNAL)
            if self.background.wait(timeout=max(0.0, deadline - time.monotonic())):
                return True
            logger.error("the final checkpoint of step %d was not committed within %.0f s",
                         self.state.step, self.stop_deadline)
        except Exception as error:
            logger.error("the final checkpoint of step %d failed: %s", self.state.step, error)
        return False

    def close(self) -> None:
        """At the end of training: wait for the commit in flight (raising its error) and let
        the stop signals go."""
        try:
            self._collective("finishing the agreement", self.agreement.finish)
            self.background.wait()
        finally:
            self.agreement.uninstall()
