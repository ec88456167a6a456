"""Asynchronous checkpointing: the training loop pauses only for an in-memory snapshot.

``Snapshotter`` copies a state dict into CPU buffers it keeps between
checkpoints (pinned memory for CUDA tensors, so device-to-host copies run at full
speed). The snapshot is a copy: an optimizer step after it can never leak into
the checkpoint.

``BackgroundCommitter`` serialises and commits one snapshot at a time in a
thread; the next checkpoint waits for the previous one, so at most one is in
flight and the snapshot buffers are never overwritten while being written.

``TrainingStateCommitter`` puts both together as the committer of a Checkpointer
whose value is a ``TrainingState``.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable

from ckpt_tasks.policy import SaveReason

logger = logging.getLogger(__name__)


class Snapshotter:
    """Copies nested state dicts into reused CPU buffers."""

    def __init__(self):
        self._buffers: dict[tuple, Any] = {}

    def snapshot(self, state: Any) -> Any:
        """A deep copy of ``state`` whose tensors live in this object's CPU buffers."""
        import torch

        copied_cuda = False

        def copy(value: Any, path: tuple) -> Any:
            nonlocal copied_cuda
            if isinstance(value, torch.Tensor):
                buffer = self._buffer(path, value)
                if value.is_cuda:
                    buffer.copy_(value.detach(), non_blocking=True)
                    copied_cuda = True
                else:
                    buffer.copy_(value.detach())
                return buffer
            if isinstance(value, dict):
                return type(value)((key, copy(item, path + (key,))) for key, item in value.items())
            if isinstance(value, (list, tuple)):
                items = [copy(item, path + (index,)) for index, item in enumerate(value)]
                return items if isinstance(value, list) else tuple(items)
            return value  # ints, floats, strings, None: immutable

        result = copy(state, ())
        if copied_cuda:
            torch.cuda.synchronize()  # non-blocking copies must land before anyone reads them
        return result

    def _buffer(self, path: tuple, like):
        import torch

        buffer = self._buffers.get(path)
        if buffer is None or buffer.shape != like.shape or buffer.dtype != like.dtype:
            buffer = torch.empty(like.shape, dtype=like.dtype, device="cpu",
                                 pin_memory=bool(like.is_cuda and torch.cuda.is_available()))
            self._buffers[path] = buffer
        return buffer


def _lower_thread_priority() -> None:
    # On Linux a thread is a task with its own nice value: the training threads keep
    # the CPU, the commit uses what they leave (best effort; not every system allows it).
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


class BackgroundCommitter:
    """Runs one commit at a time in a background thread and reports its outcome."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.in_flight: Any = None  # a label of the commit running (e.g. its step)

    def submit(self, label: Any, commit: Callable[[], None], yield_cpu: bool = True) -> None:
        """Start ``commit`` in the background after the previous one has finished.

        With ``yield_cpu`` it runs at a lower priority than the training; without, at the
        same (a final commit, which the training thread is waiting for).
        """
        self.wait()

        def run():
            try:
                if yield_cpu:
                    _lower_thread_priority()
                commit()
            except BaseException as error:  # reported to the training thread by wait()
                self._error = error

        self.in_flight = label
        self._thread = threading.Thread(target=run, name=f"ckpt-commit-{label}", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the commit in flight; False when ``timeout`` passed first.

        A commit that failed raises its error here, in the training thread.
        """
        if self._thread is not None:
            started = time.monotonic()
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
            if time.monotonic() - started > 0.5:
                logger.info("waited %.1f s for the checkpoint of %s", time.monotonic() - started, self.in_flight)
            self._thread, self.in_flight = None, None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return True

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


def wait_for_cuda() -> None:
    """Wait for every CUDA kernel, so a thread that copies from the device sees final values."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def checkpoint_metadata(state: Any, reason: SaveReason | str) -> dict:
    """What a manifest says about a TrainingState at a checkpoint (read by ``ckpt-tasks history``)."""
    metadata = {"epoch": state.epoch, "batch": state.batch, "reason": str(reason)}
    losses = state.metrics.get("loss")
    if losses:
        metadata["loss"] = losses[-1]
    return metadata


class TrainingStateCommitter:
    """A Checkpointer's committer for a TrainingState: commits into a CheckpointStore.

    - ``save`` (due by the save policy): with ``asynchronous=True`` the loop pays only
      for an in-memory snapshot; serialisation and commit run in the background, one at
      a time, each part going up while the next is serialised. Otherwise it commits at once.
    - ``save_final`` (a stop): waits for the commit in flight, then commits the current
      step (unless that step is committed already), all within ``stop_deadline``
      seconds; past it, the newest committed checkpoint stays valid and the log says
      which steps are lost.
    """

    def __init__(self, state: Any, store_transfer: Any, asynchronous: bool = True,
                 stop_deadline: float = 300.0):
        self.state = state
        self.store_transfer = store_transfer  # a StoreTransfer
        self.asynchronous = asynchronous
        self.stop_deadline = stop_deadline
        self.background = BackgroundCommitter()
        self._snapshotter = Snapshotter()
        #: what the final checkpoint's manifest records as its reason (a signal, unless the
        #: task stops on its own: a checkpoint exit or the site's limit)
        self.stop_reason = SaveReason.SIGNAL

    @property
    def busy(self) -> bool:
        """Whether a commit runs in the background."""
        return self.background.busy

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the commit in flight (False: ``timeout`` passed); raise its error, if it failed."""
        return self.background.wait(timeout)

    def save(self, value: Any = None) -> None:
        """Commit the state's current step, in the background when asynchronous."""
        self.background.wait()  # at most one in flight; its buffers are reused below
        self._submit(SaveReason.INTERVAL)
        if not self.asynchronous:
            self.background.wait()

    def save_final(self, value: Any = None) -> None:
        """Commit the current step before the process stops (see the class docstring)."""
        deadline = time.monotonic() + self.stop_deadline
        try:
            finished = self.background.wait(timeout=self.stop_deadline)
        except Exception as error:  # the commit in flight failed; the final one may still work
            logger.error("the checkpoint in flight failed: %s", error)
            finished = True
        if finished and self.store_transfer.last_committed_step != self.state.step:
            self._submit(self.stop_reason)
            finished = self.background.wait(timeout=max(0.0, deadline - time.monotonic()))
        if not finished:
            logger.error("the final checkpoint of step %d was not committed within %.0f s; the newest "
                         "committed checkpoint is step %s, so the steps after it are lost",
                         self.state.step, self.stop_deadline, self.store_transfer.last_committed_step)

    def _submit(self, reason: SaveReason) -> None:
        state = self.state
        step, metadata = state.step, checkpoint_metadata(state, reason)
        if reason is SaveReason.INTERVAL and self.asynchronous:
            payload = self._snapshotter.snapshot(state.state_dict())
        else:
            # A stop (or a synchronous save): the loop does not run during this commit, so the
            # live state is serialised as it is, without the time of a copy.
            payload = state.state_dict()
            wait_for_cuda()  # the commit thread copies from the device: every kernel must be done

        def commit():
            import torch

            # Streamed through memory: each part goes up while the next is serialised, and no
            # disk writeback competes with the training. On a stop, the last seconds go to the
            # commit; older checkpoints are deleted by the next run's first.
            self.store_transfer.commit(lambda stream: torch.save(payload, stream), step, metadata,
                                       retention=reason is SaveReason.INTERVAL)

        # A stop waits for this commit: it must not yield the CPU to anyone.
        self.background.submit(step, commit, yield_cpu=reason is SaveReason.INTERVAL)
