"""Lineage: where and when a checkpoint was made.

``lineage(step, loss)`` returns a small JSON-able dict that goes into every
checkpoint manifest as ``metadata["lineage"]``::

    {"host": "wn042.example.org", "pid": 4711,
     "run_id": "3f2a...",                       # unique per process: one "run" of the training
     "process_start": "2025-...Z", "process_start_unix": 1735000000.0,
     "time": "2025-...Z", "unix_time": 1735000123.4,
     "step": 1200, "loss": 0.12,
     "htcondor": {"job_id": "123.0", "cluster_id": 123, "proc_id": 0,
                  "num_job_starts": 2, "global_job_id": "...",
                  "job_current_start_date": ..., "last_vacate_time": ...}}   # or None outside a job

``ckpt-tasks history`` (ckpt_tasks/history.py) turns these records into a
timeline: a new ``run_id`` is a new process (a restart), a higher
``num_job_starts`` an eviction (HTCondor counts real starts only, not exit-85
restarts), and the gap between a run's last checkpoint and the next run's
``process_start`` (or the job's ``LastVacateTime``) is the work lost.

Outside an HTCondor job, or with an unreadable job ad, ``htcondor`` is None:
this module never raises.

Retention deletes old manifests; ``trail(previous)`` carries a compact record
of earlier checkpoints forward (``metadata["lineage_trail"]``) so the history
of a location survives its retention.
"""
from __future__ import annotations

import os
import socket
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from ckpt_tasks import jobenv
from ckpt_tasks.jobenv.process import PROCESS_START

#: unique for this process; a new process (restart, eviction) gets a new one
RUN_ID = uuid.uuid4().hex[:12]
#: how many compact records ``trail`` keeps at most
TRAIL_LIMIT = 256




def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def htcondor_info() -> dict | None:
    """The job's identity (:meth:`ckpt_tasks.jobenv.JobEnvironment.identity`); None outside a job."""
    return jobenv.current().identity()


def lineage(step: int | None = None, loss: float | None = None) -> dict:
    """Where and when this checkpoint is made; see the module docstring. Never raises."""
    now = time.time()
    try:
        host = socket.gethostname()
    except OSError:
        host = None
    try:
        loss = None if loss is None else float(loss)
    except (TypeError, ValueError):
        loss = None
    return {
        "host": host,
        "pid": os.getpid(),
        "run_id": RUN_ID,
        "process_start": _iso(PROCESS_START),
        "process_start_unix": round(PROCESS_START, 3),
        "time": _iso(now),
        "unix_time": round(now, 3),
        "step": step,
        "loss": loss,
        "htcondor": htcondor_info(),
    }


def compact(record: dict, created: str | None = None, reason: str | None = None) -> dict:
    """The few fields of a lineage record that the history needs (for ``trail``)."""
    job = record.get("htcondor") or {}
    out = {"run_id": record.get("run_id"), "host": record.get("host"), "pid": record.get("pid"),
           "process_start_unix": record.get("process_start_unix"), "unix_time": record.get("unix_time"),
           "step": record.get("step"), "loss": record.get("loss")}
    if job:
        out["htcondor"] = {k: job.get(k) for k in ("job_id", "num_job_starts", "last_vacate_time")}
    if created:
        out["created"] = created
    if reason:
        out["reason"] = reason
    return out


def trail(previous: Any | None, limit: int = TRAIL_LIMIT) -> list[dict]:
    """Compact lineage records of the checkpoints up to and including ``previous``.

    ``previous`` is the newest committed ``Checkpoint`` (or None); its own
    ``lineage_trail`` is extended by its own lineage. When longer than ``limit``
    the oldest records are thinned out, keeping the first and last record of
    every run (what the history needs for restarts and work lost).
    """
    if previous is None:
        return []
    metadata = getattr(previous, "metadata", None) or {}
    records = [r for r in (metadata.get("lineage_trail") or []) if isinstance(r, dict)]
    own = metadata.get("lineage")
    if isinstance(own, dict):
        records.append(compact(own, getattr(previous, "created", None), metadata.get("reason")))
    if len(records) <= limit:
        return records
    boundaries = set()
    for index, record in enumerate(records):
        if index == 0 or index == len(records) - 1 or records[index - 1].get("run_id") != record.get("run_id") \
                or records[index + 1].get("run_id") != record.get("run_id"):
            boundaries.add(index)
    drop = len(records) - limit
    kept = []
    for index, record in enumerate(records):
        if drop > 0 and index not in boundaries:
            drop -= 1
            continue
        kept.append(record)
    return kept[-limit:] if len(kept) > limit else kept
