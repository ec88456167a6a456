"""Stopping a training at a consistent point: the checkpoint exit code and the StopGuard.

HTCondor's ``checkpoint_exit_code`` convention: a job that exits with this code has
saved a checkpoint and asks to be started again from it. A batch system asks a job to
stop with SIGTERM (a user with SIGINT); the job must not stop in the middle of a step
or of a checkpoint, so :class:`StopGuard` records the signal and hands it on at the
next consistent point.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

logger = logging.getLogger(__name__)

#: the exit code that says "checkpoint saved, start me again" (HTCondor's checkpoint_exit_code)
CHECKPOINT_EXIT_CODE = 85
#: the exit code when the last checkpoint could not be made persistent on a stop
EXIT_CHECKPOINT_FAILED = 1
# The exit codes below say "no restart can fix this": the HTCondor workflow holds a job
# that exits with one of them, with a reason that says what to do (htcondor/holds.py).
#: the job started again and again without committing a checkpoint (a crash loop)
EXIT_CRASH_LOOP = 86
#: the job's software is unusable (a bundle missing or corrupt, a Python that cannot import torch)
EXIT_SOFTWARE_UNUSABLE = 87
#: the storage refused the job's credential (expired, revoked, lacking a permission)
EXIT_CREDENTIAL_REFUSED = 88
#: the signals that ask a training to stop
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_process(code: int, hard: bool = False) -> None:
    """Leave with ``code``: ``SystemExit``, or with ``hard=True`` at once after flushing.

    ``hard`` is for code run by luigi (law tasks): luigi catches ``SystemExit`` and would
    report a failed task instead of passing the checkpoint exit code on.
    """
    if not hard:
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def check_exit_code(code: Any, parameter: str = "checkpoint_exit_code") -> int:
    """``code`` if it is an exit status a batch system can see (1..255), else ``ValueError``."""
    if isinstance(code, bool) or not isinstance(code, int) or not 0 < code < 256:
        raise ValueError(f"{parameter} must be an integer in 1..255, got {code!r}")
    return code


class StopGuard:
    """Records SIGTERM/SIGINT and hands them on at a consistent point.

    ``on_stop(signum)`` is called once per process life: from the signal handler at
    once (when no critical work runs and ``defer`` is False), when the last
    :meth:`critical` block ends (``defer`` False only), or at :meth:`honour` (a point
    the caller knows to be consistent, such as the end of a training step; with
    ``defer`` True the only one). ``on_stop`` normally
    commits and leaves the process; a second signal while it runs is logged and
    ignored, so it is never interrupted half-way.

    Example::

        guard = StopGuard(lambda signum: (commit(state), exit_process(CHECKPOINT_EXIT_CODE)),
                          defer=True)
        guard.install()
        for batch in batches:
            train(batch)
            guard.honour()
    """

    def __init__(self, on_stop: Callable[[int], Any], *, defer: bool = False,
                 signals: tuple[int, ...] = STOP_SIGNALS):
        self.on_stop = on_stop
        #: True: a signal waits for :meth:`honour` even outside critical work
        self.defer = defer
        self.signals = signals
        self._requested: int | None = None
        self._stopping = False
        self._busy = 0
        self._previous: dict[int, Any] = {}

    # -- handlers -------------------------------------------------------------------------------

    def install(self) -> bool:
        """Take over the stop signals until :meth:`uninstall`; False where Python cannot
        (signals reach only the main thread of the main process)."""
        if self._previous:
            return True
        if multiprocessing.current_process().name != "MainProcess" \
                or threading.current_thread() is not threading.main_thread():
            logger.warning("not in the main thread of the main process: SIGTERM/SIGINT are not handled")
            return False
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return True

    def uninstall(self) -> None:
        """Give the stop signals back to the handlers installed before."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @property
    def installed(self) -> bool:
        """Whether this guard's handlers are in place."""
        return bool(self._previous)

    # -- state ------------------------------------------------------------------------------------

    @property
    def requested(self) -> int | None:
        """The signal recorded and not handed on yet (None: no stop requested)."""
        return None if self._stopping else self._requested

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Record a stop as if ``signum`` had arrived (for a site limit or a peer's stop)."""
        self._handle(signum, None)

    @contextmanager
    def critical(self) -> Iterator[None]:
        """Defer a stop until the work inside has finished (nestable)."""
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1
        # Reached only without an exception: the end of critical work is a consistent point,
        # unless the caller defers to points of its own (the end of a training step).
        if not self.defer:
            self.honour()

    def honour(self) -> None:
        """At a consistent point: hand a recorded stop on to ``on_stop`` (outside critical work)."""
        if self._requested is None or self._stopping or self._busy:
            return
        self._fire(self._requested)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._stopping or self._requested is not None:
            logger.warning("%s received while stopping already; the stop goes on", name)
            return
        self._requested = signum
        if self._busy or self.defer:
            logger.info("%s received; stopping at the next consistent point", name)
            return
        self._fire(signum)

    def _fire(self, signum: int) -> None:
        self._stopping = True
        self._busy += 1  # a second signal must not start another stop
        try:
            self.on_stop(signum)
        finally:
            self._busy -= 1
