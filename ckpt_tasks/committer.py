"""How a Checkpointer makes a checkpoint persistent: the Committer protocol and the seed's way.

A committer gets the value to checkpoint, at a due save and at the last save on a stop;
the law task's committer (``async_checkpoint.TrainingStateCommitter``) serialises and
commits in the background, the seed's (:class:`WriteAndTransfer`) writes and transfers
in the caller's thread.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ckpt_tasks.checkpointer import Checkpointer

logger = logging.getLogger(__name__)


class Committer(Protocol):
    """How a Checkpointer makes a checkpoint of a value persistent.

    The default writes the local checkpoint and transfers it in the caller's thread;
    a law task's committer serialises and commits in the background.
    """

    def save(self, value: Any) -> None:
        """A checkpoint due by the save policy (may finish in the background)."""

    def save_final(self, value: Any) -> None:
        """The last checkpoint on a stop: persistent when this returns, or it raises."""


class WriteAndTransfer:
    """The seed's way: ``checkpoint(value)``, then ``transfer_checkpoint_files()``."""

    def __init__(self, checkpointer: "Checkpointer"):
        self.checkpointer = checkpointer

    def save(self, value: Any) -> None:
        self.checkpointer.checkpoint(value)
        self.checkpointer.transfer_checkpoint_files()

    def save_final(self, value: Any) -> None:
        if self.checkpointer.step_saved:
            # The stop came during this step's own save, which has just been transferred.
            logger.info("the checkpoint of this step, saved just now, is the last one")
            return
        self.save(value)
