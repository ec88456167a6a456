"""The Lightning callback on several ranks (``strategy="ddp"``): one agreed stop, one commit.

:class:`~ckpt_tasks.integrations.lightning.LightningCheckpointerCallback` hands its work
to a :class:`LightningRanks` when the trainer runs on more than one process. Every rank
then:

- records SIGTERM/SIGINT in a :class:`~ckpt_tasks.distributed.agreement.StopAgreement`
  (not in the single-process Checkpointer) and, after every optimizer step, combines its
  flags with the others': all ranks stop, and save on time, after the same step;
- saves at the same steps as the others: ``trainer.save_checkpoint`` is collective in
  Lightning (all ranks build the checkpoint, rank 0 writes it, a barrier follows), so
  every rank calls it and rank 0 alone commits the file into the store;
- hands its RNG states to rank 0 for the checkpoint and takes its own back on resume.

After an agreed stop rank 0 commits the step, tells the others the exit code on a group
whose timeout is the stop deadline plus a margin, and every rank leaves with
``os._exit`` (Lightning's teardown after a ``SystemExit`` would run collectives that
stopped peers never join). Lightning's own launcher (``strategy="ddp"`` without
torchrun) makes rank 0 the parent of the others and SIGKILLs the whole job when it sees
a child end with a non-zero code, 85 included: a rank whose parent is rank 0 therefore
waits for rank 0 to be gone before it leaves, so that rank 0's 85 is the job's exit code.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

from ckpt_tasks.distributed.agreement import Decision, StopAgreement
from ckpt_tasks.distributed.checkpointer import PeerFailure
from ckpt_tasks.distributed.ranks import DEFAULT_TIMEOUT, control_group
from ckpt_tasks.errors import CkptTasksError
from ckpt_tasks.policy import SaveInterval
from ckpt_tasks.state import capture_rng_state
from ckpt_tasks.stop import CHECKPOINT_EXIT_CODE, EXIT_CHECKPOINT_FAILED, exit_process

logger = logging.getLogger(__name__)

#: seconds the other ranks wait for rank 0's final commit. Generous: a commit of several GB
#: over a WAN link may take long, the batch system's vacate time ends a hung job sooner, and
#: a rank 0 that died is seen at once (its connections close).
DEFAULT_COMMIT_TIMEOUT = 3600.0
#: seconds a rank started by rank 0 waits for rank 0 to be gone before it leaves anyway
_PARENT_EXIT_WAIT = 60.0


def is_distributed(trainer: Any) -> bool:
    """Whether ``trainer`` runs on several processes of one process group."""
    return int(getattr(trainer, "world_size", 1)) > 1 and dist.is_available() and dist.is_initialized()


class LightningRanks:
    """The several-rank half of the Lightning callback (see the module docstring).

    Created in ``on_fit_start`` on every rank (it creates process groups: collective).

    Args:
        commit: on rank 0, writes the trainer's checkpoint and commits it (raises on failure).
        save_checkpoint: on the other ranks, their part of ``trainer.save_checkpoint``.
        exit_code_for: the exit code for a failed final commit.
        checkpoint_every: save every this many optimizer steps (None: never by count).
        checkpoint_interval: also save after this many seconds, agreed among the ranks.
        restored_step: the step this rank restored (None: none), checked against the others'.
        control_timeout: seconds a control collective waits for a hung peer.
        clean_up: removes this rank's local files; called before a stop leaves the process
            (which skips Lightning's teardown).
        commit_timeout: seconds the other ranks wait for rank 0's final commit.
    """

    def __init__(self, trainer: Any, *, commit: Callable[[], None], save_checkpoint: Callable[[], None],
                 exit_code_for: Callable[[Exception], int], checkpoint_every: int | None,
                 checkpoint_interval: float | None, restored_step: int | None,
                 clean_up: Callable[[], None] = lambda: None,
                 control_timeout: float = DEFAULT_TIMEOUT, commit_timeout: float = DEFAULT_COMMIT_TIMEOUT):
        self.rank = int(trainer.global_rank)
        self.world_size = int(trainer.world_size)
        self.commit = commit
        self.save_checkpoint = save_checkpoint
        self.exit_code_for = exit_code_for
        self.checkpoint_every = checkpoint_every
        self.clean_up = clean_up
        self._interval = SaveInterval(checkpoint_interval) if checkpoint_interval else None
        # Every rank creates the groups in the same order: new_group is itself collective.
        self._control = control_group(control_timeout)
        self._commit_wait = control_group(commit_timeout)
        self.agreement = StopAgreement(control_group(control_timeout))
        self.saved_step: int | None = None  # the step of the last save, the same on every rank
        #: every rank's RNG states at the last save (rank 0 only), for the callback's state
        self.rank_rngs: list[dict] | None = None
        facts: list[Any] = [None] * self.world_size
        self._collective("comparing the restored steps",
                         lambda: dist.all_gather_object(facts, (os.getpid(), restored_step), group=self._control))
        self.coordinator_pid = facts[0][0]
        steps = {step for _, step in facts}
        if len(steps) > 1:
            raise CkptTasksError(f"the ranks restored different checkpoints (steps {[s for _, s in facts]}): "
                                 "a checkpoint was committed while they started")

    # -- collectives --------------------------------------------------------------------------------

    def _collective(self, what: str, operation: Callable[[], Any]) -> Any:
        try:
            return operation()
        except RuntimeError as error:  # gloo and NCCL report a lost peer as RuntimeError subclasses
            raise PeerFailure(f"rank {self.rank}: {what} failed, another rank died or hangs: {error}") from error

    # -- signals ------------------------------------------------------------------------------------

    def install(self) -> None:
        """Record SIGTERM/SIGINT from now on (in the training loop)."""
        self.agreement.install()

    def uninstall(self) -> None:
        self.agreement.uninstall()

    def request(self, signum: int) -> None:
        """A stop asked for before the training loop (Lightning's handler got the signal)."""
        self.agreement.request(signum)

    # -- the training loop --------------------------------------------------------------------------

    def after_step(self, step: int) -> None:
        """After every optimizer step, on every rank: agree; stop or save when due."""
        time_due = self._interval is not None and self._interval.due(step, time.monotonic())
        decision = self._collective(f"agreeing after step {step}", lambda: self.agreement.agree(step, time_due))
        self._act(step, decision)

    def after_training(self, step: int) -> None:
        """At the end of training, on every rank: a stop asked for during the last steps."""
        decision = self._collective("agreeing at the end of training", lambda: self.agreement.settle(step))
        if decision.stop:
            self.stop(step)

    def _act(self, step: int, decision: Decision) -> None:
        if decision.stop:
            self.stop(step)
        if decision.save or (self.checkpoint_every and step % self.checkpoint_every == 0):
            self.save(step)

    def save(self, step: int) -> None:
        """Checkpoint ``step``: a collective (every rank calls it at the same step)."""
        parts: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        own = capture_rng_state()
        self._collective("gathering the ranks' random states",
                         lambda: dist.gather_object(own, parts, dst=0, group=self._control))
        self.rank_rngs = parts
        if self._interval is not None:
            self._interval.saved(step, time.monotonic())
        self.saved_step = step
        if self.rank == 0:
            self.commit()
        else:
            self.save_checkpoint()

    def stop(self, step: int) -> None:
        """Commit ``step`` (unless saved already) on rank 0, share its outcome, leave on every rank."""
        code = CHECKPOINT_EXIT_CODE
        failure: Exception | None = None
        if self.saved_step != step:  # the same answer on every rank: they save at the same steps
            try:
                self.save(step)
            except PeerFailure:
                raise
            except Exception as error:  # rank 0's commit failed: the others must hear of it
                failure = error
        if self.rank == 0 and failure is not None:
            logger.error("the final checkpoint of step %d failed: %s", step, failure)
            code = self.exit_code_for(failure)
        status = torch.tensor([code if self.rank == 0 else 0], dtype=torch.int32)
        self._collective("waiting for the final commit",
                         lambda: dist.broadcast(status, src=0, group=self._commit_wait))
        code = int(status[0])
        try:
            # Every rank has the code now; the barrier only keeps rank 0 from closing its
            # connections while a peer still reads the broadcast.
            dist.barrier(group=self._commit_wait)
        except RuntimeError:
            pass
        logger.info("rank %d stopped after step %d; exit %d", self.rank, step, code)
        self.uninstall()
        try:
            self.clean_up()
        except OSError as error:  # a leftover local file must not change the exit code
            logger.warning("rank %d: local files not removed: %s", self.rank, error)
        self._leave(code)

    def _leave(self, code: int) -> None:
        if self.rank != 0 and os.getppid() == self.coordinator_pid:
            # Lightning's launcher in rank 0 would SIGKILL the job on seeing this rank's exit
            # code: rank 0 leaves first, and its code is the job's.
            deadline = time.monotonic() + _PARENT_EXIT_WAIT
            while os.getppid() == self.coordinator_pid and time.monotonic() < deadline:
                time.sleep(0.01)
        exit_process(code or EXIT_CHECKPOINT_FAILED, hard=True)

    def close(self) -> None:
        """Let the stop signals go (the collective in flight is settled by ``after_training``)."""
        self.uninstall()
