"""Retrying what the backend contract calls transient, and nothing else."""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from ckpt_tasks.errors import StorageUnavailable, VerificationError

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Retry transient storage errors with exponential backoff until ``deadline`` seconds passed.

    Transient: ``StorageUnavailable`` (an outage) and ``VerificationError`` (bytes damaged on
    the way, sent again). Permanent errors (``PermanentStorageError``: permission,
    authentication, bad path, full or read-only storage), absent files and every other
    exception go up at once.
    """

    deadline: float = 120.0
    initial_delay: float = 1.0
    max_delay: float = 15.0

    def run(self, operation: Callable[[], T], what: str) -> T:
        """``operation()``, retried while it raises a transient error and time is left."""
        start, delay = time.monotonic(), self.initial_delay
        while True:
            try:
                return operation()
            except (StorageUnavailable, VerificationError) as error:
                remaining = self.deadline - (time.monotonic() - start)
                if remaining <= 0:
                    raise
                wait = min(delay * random.uniform(0.8, 1.2), self.max_delay, remaining)
                logger.warning("%s failed (%s); retrying in %.1f s", what, error, wait)
                time.sleep(wait)
                delay = min(delay * 2, self.max_delay)
