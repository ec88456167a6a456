"""The site's time limits for this job: when it will be ended, and how long a stop may take.

Pools end jobs for reasons other than eviction. Each names its limit differently in
the job ad (seconds of run time unless said otherwise):

=============================  ==========================================================
``AllowedExecuteDuration``     HTCondor's own ``allowed_execute_duration`` (hold code 47)
``AllowedJobDuration``         HTCondor's ``allowed_job_duration`` (hold code 46)
``MaxRuntime``                 CERN (``+MaxRuntime``: removed past it)
``RequestRuntime``             DESY NAF (``+RequestRuntime``: killed past it; 3 h default)
``RequestWalltime``            KIT (``+RequestWalltime``)
=============================  ==========================================================

The names read are configurable (``[ckpt_tasks] walltime_attributes`` in ``law.cfg``);
the earliest limit wins. Its clock starts at the job's current start as the job ad
says (the later of ``JobCurrentStartExecutingDate`` and ``JobCurrentStartDate``: at a
start after a requeue the former is still the previous run's; else this process's
start). The ad is written once per sandbox, and a job that exits with the
checkpoint code is restarted in the same sandbox: after such restarts the ad's start
is the sandbox's first, and the limit is counted conservatively from it. A limit that
had already passed when this process started cannot be the live one (the job would
have been ended); it is then counted from this process's start, with a warning.
(In the test pool, HTCondor 23.9 holds a job with code 47 a few seconds after its
``allowed_execute_duration``, counted from the start of execution; see
tests/test_walltime_pool.py.)

The time between SIGTERM and the hard kill is the job's ``JobMaxVacateTime``
(``job_max_vacate_time``) or the machine's ``MachineMaxVacateTime``, whichever is
shorter; a stop deadline longer than it would be cut off.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

from ckpt_tasks.jobenv.htcondor import JobAd
from ckpt_tasks.jobenv.process import PROCESS_START

logger = logging.getLogger(__name__)

#: the job ad attributes read as a run-time limit in seconds, in the order they are reported
DEFAULT_WALLTIME_ATTRIBUTES = ("AllowedExecuteDuration", "AllowedJobDuration", "MaxRuntime",
                               "RequestRuntime", "RequestWalltime")
VACATE_ATTRIBUTES = ("JobMaxVacateTime", "MachineMaxVacateTime")
START_ATTRIBUTES = ("JobCurrentStartExecutingDate", "JobCurrentStartDate")
#: the default time kept free before a limit: the final commit must fit into it
DEFAULT_MARGIN = 300.0


def _seconds(ad: JobAd, name: str) -> float | None:
    value = ad.get(name)
    if value is None or isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        logger.warning("job ad attribute %s = %r is not a number of seconds; ignored", name, value)
        return None
    return seconds if seconds > 0 else None


@dataclass(frozen=True)
class SiteLimits:
    """When the site ends this job (Unix time), by which attribute, and its vacate time."""

    deadline: float | None = None
    source: str | None = None
    vacate_time: float | None = None

    def stop_at(self, margin: float = DEFAULT_MARGIN) -> float | None:
        """The Unix time at which to commit and exit so the job is not ended by the limit."""
        return None if self.deadline is None else self.deadline - margin

    def stop_deadline(self, requested: float) -> float:
        """``requested`` seconds for a stop, cut to 90 % of the vacate time when that is shorter."""
        if self.vacate_time is None:
            return requested
        return min(requested, 0.9 * self.vacate_time)

    def describe(self) -> str:
        """A line for the log."""
        parts = []
        if self.deadline is not None:
            parts.append(f"{self.source} ends the job at {time.strftime('%H:%M:%S', time.localtime(self.deadline))}"
                         f" (in {self.deadline - time.time():.0f} s)")
        if self.vacate_time is not None:
            parts.append(f"vacate time {self.vacate_time:.0f} s")
        return "; ".join(parts) or "no site time limit in the job ad"


def read_site_limits(ad: JobAd | None, attributes: Sequence[str] = DEFAULT_WALLTIME_ATTRIBUTES,
                     process_start: float | None = None) -> SiteLimits:
    """The limits the job ad ``ad`` sets (no ad: none)."""
    if ad is None:
        return SiteLimits()
    process_start = process_start if process_start is not None else PROCESS_START
    # The newest of the start dates: at a start after a requeue, HTCondor (23.9) writes the
    # new JobCurrentStartDate into the ad but the previous run's JobCurrentStartExecutingDate.
    starts = [s for s in (_seconds(ad, name) for name in START_ATTRIBUTES) if s is not None]
    job_start = max(starts) if starts else process_start
    limits = []
    for name in attributes:
        seconds = _seconds(ad, name)
        if seconds is None:
            continue
        deadline = job_start + seconds
        if deadline <= process_start:
            logger.warning("%s = %.0f s counted from the job ad's start had passed before this process "
                           "started (a stale ad after restarts in place); counting it from this process",
                           name, seconds)
            deadline = process_start + seconds
        limits.append((deadline, name))
    vacate = [v for v in (_seconds(ad, name) for name in VACATE_ATTRIBUTES) if v is not None]
    deadline, source = min(limits) if limits else (None, None)
    return SiteLimits(deadline, source, min(vacate) if vacate else None)


def parse_attribute_list(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"MaxRuntime, RequestRuntime"`` (law.cfg) as a tuple; empty or None: the defaults."""
    if text is None:
        return DEFAULT_WALLTIME_ATTRIBUTES
    items = text.split(",") if isinstance(text, str) else list(text)
    names = tuple(item.strip().lstrip("+") for item in items if item.strip())
    for name in names:
        if not name.replace("_", "").isalnum():
            raise ValueError(f"walltime_attributes: {name!r} is not a ClassAd attribute name")
    return names or DEFAULT_WALLTIME_ATTRIBUTES
