"""Progress bars for long transfers and trainings, shown only in a terminal.

All bars go to stderr and are disabled when stderr is not a TTY (batch jobs,
HTCondor's redirected output, pipes, tests) or when ``CKPT_TASKS_PROGRESS=0``.
Transfer bars appear only after ``delay`` seconds, so short copies print nothing.

    with transfer_progress(size, "upload state.pt") as advance:
        for chunk in chunks:
            ...; advance(len(chunk))

    process.run(XRootDProgress("upload state.pt"))     # XRootD CopyProcess handler

:class:`SchedulerProgress` sends a training's progress to the luigi scheduler instead
(``luigid``'s web page shows it): the percentage, and a status message with the step of
the total, the newest checkpoint's step and age, and the evictions so far.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Iterator

logger = logging.getLogger(__name__)

ENV = "CKPT_TASKS_PROGRESS"


def enabled(stream=None) -> bool:
    """True when a bar should be drawn: ``stream`` (stderr) is a terminal and not switched off."""
    if os.environ.get(ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def _tqdm(**kwargs):
    from tqdm import tqdm

    return tqdm(file=sys.stderr, disable=not enabled(), leave=False, dynamic_ncols=True, **kwargs)


@contextlib.contextmanager
def transfer_progress(total: int | None, desc: str, delay: float = 2.0) -> Iterator[Callable[[int], None]]:
    """A byte bar for a transfer of ``total`` bytes; yields ``advance(nbytes)``."""
    bar = _tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, delay=delay)
    try:
        yield bar.update
    finally:
        bar.close()


def step_bar(total: int | None, initial: int = 0, desc: str | None = None):
    """A bar of training steps (``bar.update(1)`` per step, ``bar.set_postfix(loss=...)``)."""
    return _tqdm(total=total, initial=initial, desc=desc, unit="step")


class XRootDProgress:
    """A progress handler for ``XRootD.client.CopyProcess.run(handler)``: one bar per copy job."""

    def __init__(self, desc: str, delay: float = 2.0):
        self.desc = desc
        self.delay = delay
        self._bar = None
        self._done = 0

    def begin(self, jobId, total, source, target):  # noqa: N803 (XRootD's names)
        self._bar, self._done = None, 0

    def update(self, jobId, processed, total):  # noqa: N803
        if self._bar is None:
            self._bar = _tqdm(total=total or None, desc=self.desc, unit="B", unit_scale=True,
                              unit_divisor=1024, delay=self.delay)
        if processed > self._done:
            self._bar.update(processed - self._done)
            self._done = processed

    def end(self, jobId, results):  # noqa: N803
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def should_cancel(self, jobId):  # noqa: N803
        return False


class SchedulerProgress:
    """A training's status-message line for the luigi scheduler (``luigid``), e.g.
    ``step 120 of 405 (29%); newest checkpoint: step 100, 4 s ago; evictions: 1``.

    (The percentage goes by law's ``publish_progress`` at every step.) The line comes first,
    before the messages the task published (law's message cache), and is sent
    at most every ``interval`` seconds, and at once when a new checkpoint was committed:
    with a central scheduler each message is an HTTP request (with the local scheduler, an
    in-process call). A task that no luigi worker runs has no ``set_status_message``: then
    it does nothing. ``newest()`` gives the newest committed checkpoint (a store
    ``Checkpoint``, or None); ``evictions()`` the evictions before this run, asked once, in
    a thread of its own, at the first update.
    """

    def __init__(self, task, total_steps: int | None, newest: Callable[[], Any] = lambda: None,
                 evictions: Callable[[], int] = lambda: 0, interval: float = 10.0, count_wait: float = 0.5):
        self.task = task
        self.total_steps = total_steps
        self.newest = newest
        self.evictions = evictions
        self.interval = interval
        self.count_wait = count_wait  # seconds the first message waits for the eviction count
        self._evictions: int | None = None
        self._counter: threading.Thread | None = None
        self._sent_at: float | None = None
        self._sent_checkpoint: int | None = None
        self.last_message: str | None = None

    def message(self, step: int, now: float | None = None) -> str:
        """The status line of ``step`` (wall clock ``now`` for the checkpoint's age)."""
        from ckpt_tasks.history import _duration, _unix

        now = time.time() if now is None else now
        parts = [f"step {step}" + (f" of {self.total_steps} ({100 * step / self.total_steps:.0f}%)"
                                   if self.total_steps else "")]
        newest = self.newest()
        if newest is None:
            parts.append("no checkpoint yet")
        else:
            created = _unix(getattr(newest, "created", None))
            age = "" if created is None else f", {_duration(max(0.0, now - created))} ago"
            parts.append(f"newest checkpoint: step {newest.step}{age}")
        parts.append(f"evictions: {self._past_evictions()}")
        return "; ".join(parts)

    def _past_evictions(self) -> int | str:
        """The count, from a listing of the store in a thread of its own: a slow or
        unreachable store must not hold up the training loop ("counting" until it answers)."""
        if self._counter is None:
            self._counter = threading.Thread(target=self._count_evictions, name="ckpt-tasks-evictions",
                                             daemon=True)
            self._counter.start()
            self._counter.join(timeout=self.count_wait)  # a store that answers at once: the count now
        return "counting" if self._evictions is None else self._evictions

    def _count_evictions(self) -> None:
        try:
            self._evictions = int(self.evictions())
        except Exception as error:  # informative only: never stop a training over it
            logger.debug("evictions unknown: %s", error)
            self._evictions = 0

    def update(self, step: int, force: bool = False) -> bool:
        """Send the progress of ``step`` when due; True when it was sent."""
        send = getattr(self.task, "set_status_message", None)
        if not callable(send):
            return False
        newest = self.newest()
        committed = None if newest is None else newest.step
        clock = time.monotonic()
        due = (force or self._sent_at is None or clock - self._sent_at >= self.interval
               or committed != self._sent_checkpoint)
        if not due:
            return False
        self._sent_at, self._sent_checkpoint = clock, committed
        self.last_message = self.message(step)
        # law joins its cached messages into the status message; the progress line goes first,
        # where luigid's message box shows it without scrolling.
        published = list(getattr(self.task, "_message_cache", None) or [])
        try:
            send("\n".join([self.last_message, *published]))
        except Exception as error:  # a scheduler that does not answer must not stop the training
            logger.warning("could not send the progress to the scheduler: %s", error)
        return True


def past_evictions(store) -> int:
    """The evictions in a store's checkpoint history (:func:`ckpt_tasks.history.build_timeline`)."""
    from ckpt_tasks.history import build_timeline

    return len(build_timeline(store.list(), store.location).evictions)
