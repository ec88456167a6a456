"""Keep ``fork()`` away from XRootD client operations in flight.

The XRootD client registers a ``pthread_atfork`` handler that locks every open
file object and stops the client's worker threads before the fork. When a fork
comes while a transfer runs, or while a worker thread is still tearing down a
file that a transfer just closed, that handler and the worker wait for each
other forever: the process hangs inside ``fork()``. Measured with the pip
``xrootd`` 5.9.9 and 6.2.1 clients: a loop that forks while another thread
uploads hangs within the first forks (``tests/test_xrootd_fork.py``).

Trainings fork all the time: a ``DataLoader`` with workers forks them at every
epoch, luigi forks a process per task with ``--workers N``. Turning the client's
handler off (``XRD_RUNFORKHANDLER=0``) would avoid the hang but leave every forked
child with a client that cannot talk to any server, so law's worker processes
could not reach their storage. Instead ``FORK_GATE`` makes ``os.fork()`` wait
until no XRootD operation of this package runs, and holds new ones back until
the fork is done. A fork that waits says so in the log after a few seconds.

Forks that do not run Python's fork hooks (``subprocess`` with ``user=`` or
``group=`` and no ``preexec_fn``) are not covered; ``subprocess`` without those
uses ``vfork``, which runs no fork handlers at all.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

# After this long a waiting fork is logged, so that a stalled DataLoader start is explained.
_REPORT_AFTER_S = 5.0
# The client's teardown of a closed file runs on its own threads just after the
# operation returns; a fork this soon after the last operation waits this long.
_SETTLE_S = 0.25


class ForkGate:
    """A readers/writer gate: XRootD operations share it, ``fork()`` takes it alone."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._active = 0
        self._forks_waiting = 0
        self._last_end = 0.0
        self._local = threading.local()
        self._held_for_fork = False

    @contextmanager
    def operation(self) -> Iterator[None]:
        """Wrap one call into the XRootD client; nested calls in one thread count once."""
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            with self._lock:
                # A waiting fork goes first, or a busy committer thread would starve it.
                while self._forks_waiting:
                    self._idle.wait()
                self._active += 1
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0:
                with self._lock:
                    self._active -= 1
                    self._last_end = time.monotonic()
                    self._idle.notify_all()

    def before_fork(self) -> None:
        if getattr(self._local, "depth", 0):
            return  # forking from inside an operation: waiting would wait for ourselves
        started = time.monotonic()
        reported = False
        self._lock.acquire()
        self._forks_waiting += 1
        while True:
            while self._active:
                if not reported and time.monotonic() - started > _REPORT_AFTER_S:
                    logger.warning("fork() waits for an XRootD transfer in flight to finish")
                    reported = True
                self._idle.wait(timeout=1.0)
            settle = self._last_end + _SETTLE_S - time.monotonic()
            if settle <= 0:
                break
            self._lock.release()
            time.sleep(settle)
            self._lock.acquire()
        self._forks_waiting -= 1
        # The lock stays held through the fork, so no operation starts during it.
        self._held_for_fork = True

    def after_fork_in_parent(self) -> None:
        if self._held_for_fork:
            self._held_for_fork = False
            self._idle.notify_all()  # operations held back by the fork go on
            self._lock.release()

    def after_fork_in_child(self) -> None:
        # The child has one thread and no operation in flight; start from a fresh gate.
        self._reset()


FORK_GATE = ForkGate()
os.register_at_fork(before=FORK_GATE.before_fork, after_in_parent=FORK_GATE.after_fork_in_parent,
                    after_in_child=FORK_GATE.after_fork_in_child)
