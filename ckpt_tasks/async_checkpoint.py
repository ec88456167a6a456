"""Asynchronous checkpointing: the training loop pauses only for an in-memory snapshot.

``Snapshotter`` copies a state dict into CPU buffers it keeps between
checkpoints (pinned memory for CUDA tensors, so device-to-host copies run at full
speed). The snapshot is a copy: an optimizer step after it can never leak into
the checkpoint.

``BackgroundCommitter`` serialises and commits one snapshot at a time in a
thread; the next checkpoint waits for the previous one, so at most one is in
flight and the snapshot buffers are never overwritten while being written.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable

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
