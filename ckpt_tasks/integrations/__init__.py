"""Callbacks for trainings whose loop belongs to a framework: PyTorch Lightning and Keras 3.

- :mod:`ckpt_tasks.integrations.lightning`: ``LightningCheckpointerCallback``
- :mod:`ckpt_tasks.integrations.keras`: ``KerasCheckpointerCallback``

Both keep the seed project's names and signatures (a local checkpoint file and the
Checkpointer's transfer modes), and both have a new mode, chosen with ``store=``:
the framework's own checkpoint contents are committed into a
:class:`~ckpt_tasks.storage.store.CheckpointStore` (a directory or ``root://``),
verified by size and adler32, versioned, with retention.

This module holds what the two share: a :class:`~ckpt_tasks.checkpointer.Checkpointer`
that the callbacks drive from the framework's hooks. Importing it does not import
Lightning or Keras.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable

from ckpt_tasks.checkpointer import Checkpointer
from ckpt_tasks.storage.store import CheckpointStore, RetryPolicy
from ckpt_tasks.transfer import StoreTransfer

logger = logging.getLogger(__name__)

__all__ = ["FrameworkCheckpointer", "open_store"]


def open_store(store: str | os.PathLike | CheckpointStore, keep_last: int = 3,
               storage_timeout: float = 120.0) -> CheckpointStore:
    """A CheckpointStore for ``store`` (a path, ``file://`` or ``root://`` URL, or a store)."""
    if isinstance(store, CheckpointStore):
        return store
    return CheckpointStore(store, keep_last=keep_last, retry=RetryPolicy(deadline=storage_timeout))


class _SkipCommitted:
    """The committer of ``store=`` mode: a stop does not write again the step just committed."""

    def __init__(self, store_transfer: StoreTransfer, current_step: Callable[[], int]):
        self.store_transfer = store_transfer
        self.current_step = current_step
        self.checkpointer: Checkpointer | None = None  # set once the Checkpointer exists

    def save(self, value: Any) -> None:
        self.checkpointer.checkpoint(value)
        self.checkpointer.transfer_checkpoint_files()

    def save_final(self, value: Any) -> None:
        if self.store_transfer.last_committed_step == self.current_step():
            logger.info("step %d is committed already", self.current_step())
            return
        self.save(value)


class FrameworkCheckpointer(Checkpointer):
    """The Checkpointer behind a framework callback, built from the Checkpointer's public options.

    It differs from the plain Checkpointer in three ways:

    - Signal handlers are installed by the callback when the training loop starts
      (:meth:`install_signal_handlers`) and removed when it ends (:meth:`close`), not at
      construction: outside the loop nobody would honour a recorded signal.
    - A SIGTERM/SIGINT is only recorded; the callback honours it at the next batch
      end (:meth:`stop_if_requested`), where the framework's state is consistent.
    - With a :class:`StoreTransfer` (``store=`` mode) a stop does not write again the
      step that was just committed; ``hard_exit=True`` leaves with ``os._exit``
      (for luigi/law, which catch ``SystemExit``).
    """

    def __init__(self, local_checkpoint_file, checkpoint_function, restore_function, *,
                 store_transfer: StoreTransfer | None = None, current_step: Callable[[], int] | None = None,
                 **kwargs):
        committer = None
        if store_transfer is not None:
            if current_step is None:
                raise TypeError("store_transfer needs current_step")
            committer = _SkipCommitted(store_transfer, current_step)
            kwargs.update(transfer=store_transfer, committer=committer)
        # The callbacks install the handlers when training starts (after the framework's own).
        super().__init__(local_checkpoint_file, checkpoint_function, restore_function,
                         handle_signals=False, defer_signals=True, **kwargs)
        if committer is not None:
            committer.checkpointer = self

    def write_and_transfer(self, value: Any) -> None:
        """Checkpoint ``value`` now (write and transfer), whatever the cadence says."""
        with self.stop_guard.critical():
            self.checkpoint(value)
            self.transfer_checkpoint_files()
        self.stop_guard.honour()  # the callbacks call this at a batch or epoch end: consistent
