"""``ckpt-tasks status LOCATION``: one view of every branch of a workflow.

``LOCATION`` is the workflow's checkpoint directory, the one that holds a
``branch-N`` location per branch (``<store>/<task family>/<fingerprint>``, as
``CheckpointedTask`` lays them out). For each branch it shows:

- the newest committed step (of ``--total`` steps when given) and the age of
  that checkpoint;
- from the schedd (``condor_q``, else ``condor_history``), when ``--jobs`` names
  law's submission file (``htcondor_jobs_*.json``) or the workflow's HTCondor
  output directory that holds it: the job, its state, the hold reason (and
  whether it is temporary, :mod:`ckpt_tasks.htcondor.holds`) and the job's counters
  ``NumJobStarts``, ``NumHolds``, ``NumJobCompletions``, ``NumVacates`` (where the
  schedd has it; else the starts that ended neither by an exit nor by a hold),
  ``CommittedTime`` and ``RemoteWallClockTime``. These come from the schedd because
  the sandbox's job ad, and so the lineage recorded from it, is stale: it is written
  once per sandbox, and an eviction before the first commit leaves no trace in the store;
- from the manifests' lineage (:mod:`ckpt_tasks.history`): evictions (raised to the
  schedd's count of the current job where that is higher), work lost and goodput
  (start-up counted as overhead).

``--json`` prints the same as JSON; ``--plot FILE.png`` draws every branch's
step over wall time (held branches dashed, with their state in the legend).
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ckpt_tasks.history import _duration, _percent, _unix, build_timeline
from ckpt_tasks.storage.registry import open_location
from ckpt_tasks.storage.store import CheckpointStore, RetryPolicy

logger = logging.getLogger(__name__)

JOB_STATES = {1: "idle", 2: "running", 3: "removed", 4: "completed", 5: "held", 6: "transferring output",
              7: "suspended"}
SCHEDD_ATTRIBUTES = ("ClusterId", "ProcId", "JobStatus", "HoldReason", "HoldReasonCode", "HoldReasonSubCode",
                     "NumJobStarts", "NumShadowStarts", "NumHolds", "NumVacates", "NumJobCompletions", "ExitCode",
                     "CommittedTime", "RemoteWallClockTime")
BRANCH_RE = re.compile(r"^branch-(\d+)$")


@dataclass
class BranchStatus:
    """What ``status`` knows about one branch."""

    branch: int
    location: str
    step: int | None = None
    total: int | None = None
    checkpoint_age: float | None = None  # seconds since the newest commit
    job_id: str | None = None
    job_state: str | None = None
    hold_reason: str | None = None
    hold_temporary: bool | None = None
    job_starts: int | None = None  # from the schedd
    holds: int | None = None
    job_evictions: int | None = None  # the schedd's, of the current job
    committed_seconds: float | None = None  # CommittedTime: run time not lost to evictions
    wall_seconds: float | None = None  # RemoteWallClockTime: all run time of the job
    evictions: int = 0
    lost_seconds: float = 0.0
    startup_seconds: float = 0.0
    goodput: float | None = None
    progress: list = field(default_factory=list)  # [unix time, step] of every checkpoint known


def branch_locations(location: str, deadline: float = 30.0) -> dict[int, str]:
    """The ``branch-N`` locations under a workflow's checkpoint directory, by branch."""
    opened = open_location(location, deadline=deadline)
    root = opened.root.rstrip("/")
    found = {}
    for name in opened.backend.listdir(root):
        if match := BRANCH_RE.match(name.rstrip("/").rsplit("/", 1)[-1]):
            found[int(match.group(1))] = f"{root}/branch-{match.group(1)}"
    return dict(sorted(found.items()))


def jobs_of_branches(jobs: str | Path) -> dict[int, str]:
    """The newest job id of every branch, from law's submission file (or the directory holding it)."""
    path = Path(jobs)
    files = sorted(path.glob("htcondor_jobs_*.json")) if path.is_dir() else [path]
    by_branch = {}
    for file in files:
        for job in json.loads(file.read_text()).get("jobs", {}).values():
            job_id = job.get("job_id")
            if job_id and re.match(r"^\d+\.\d+$", str(job_id)):
                for branch in job.get("branches", []):
                    by_branch[int(branch)] = str(job_id)
    return by_branch


def _condor_json(command: list[str]) -> list[dict]:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as error:
        logger.warning("%s failed: %s", command[0], error)
        return []
    return json.loads(out) if out.strip() else []


def query_schedd(job_ids: list[str]) -> dict[str, dict]:
    """The schedd's ads (``SCHEDD_ATTRIBUTES``) of ``job_ids``: the queue first, then the history."""
    if not job_ids:
        return {}
    attributes = ["-attributes", ",".join(SCHEDD_ATTRIBUTES)]
    ads = {f"{ad['ClusterId']}.{ad['ProcId']}": ad
           for ad in _condor_json(["condor_q", *job_ids, "-json", *attributes])}
    missing = [job_id for job_id in job_ids if job_id not in ads]
    if missing:
        for ad in _condor_json(["condor_history", *missing, "-json", *attributes, "-limit", str(len(missing))]):
            ads.setdefault(f"{ad['ClusterId']}.{ad['ProcId']}", ad)
    return ads


def _apply_ad(status: BranchStatus, ad: dict) -> None:
    from ckpt_tasks.htcondor.holds import classify_hold

    status.job_state = JOB_STATES.get(ad.get("JobStatus"), str(ad.get("JobStatus")))
    status.job_starts, status.holds = ad.get("NumJobStarts"), ad.get("NumHolds")
    status.job_evictions = schedd_evictions(ad)
    status.committed_seconds, status.wall_seconds = ad.get("CommittedTime"), ad.get("RemoteWallClockTime")
    if status.job_evictions is not None:
        status.evictions = max(status.evictions, status.job_evictions)
    if ad.get("JobStatus") == 5:
        hold = classify_hold(ad.get("HoldReasonCode"), ad.get("HoldReasonSubCode"), ad.get("HoldReason") or "")
        status.hold_reason, status.hold_temporary = hold.describe(), hold.temporary


def schedd_evictions(ad: dict) -> int | None:
    """The evictions of a job by the schedd's counters: ``NumVacates`` where the schedd has it,
    else the runs that ended neither by an exit of the job (``NumJobCompletions``) nor by a hold
    (HTCondor 23.9 counts no vacates; a lost machine then counts as an eviction too).

    The fallback is a lower bound: an exit that ``on_exit_hold`` held raises both counters,
    and a hold of an idle job ended no run, so such holds hide as many evictions; the
    store's own count (from the reasons of its checkpoints) is taken where it is larger."""
    if ad.get("NumVacates") is not None:
        return int(ad["NumVacates"])
    if ad.get("NumJobStarts") is None:
        return None
    running = 1 if ad.get("JobStatus") in (2, 6) else 0  # the run going on has not ended
    ended = int(ad["NumJobStarts"]) - running
    return max(0, ended - int(ad.get("NumJobCompletions") or 0) - int(ad.get("NumHolds") or 0))


def collect(location: str, jobs: str | Path | None = None, total: int | None = None,
            deadline: float = 30.0, now: float | None = None, query=query_schedd) -> list[BranchStatus]:
    """The :class:`BranchStatus` of every branch (with a checkpoint location or a job)."""
    now = time.time() if now is None else now
    locations = branch_locations(location, deadline)
    job_ids = jobs_of_branches(jobs) if jobs else {}
    ads = query(sorted(set(job_ids.values()))) if job_ids else {}
    retry = RetryPolicy(deadline=deadline, initial_delay=min(1.0, deadline / 4))
    rows = []
    for branch in sorted(set(locations) | set(job_ids)):
        where = locations.get(branch, f"{location.rstrip('/')}/branch-{branch}")
        status = BranchStatus(branch=branch, location=where, total=total, job_id=job_ids.get(branch))
        if branch in locations:
            checkpoints = CheckpointStore(where, retry=retry).list()
            if checkpoints:
                newest = checkpoints[-1]
                created = _unix(newest.created)
                status.step = newest.step
                status.checkpoint_age = None if created is None else max(0.0, now - created)
            timeline = build_timeline(checkpoints, where)
            status.evictions, status.lost_seconds = len(timeline.evictions), timeline.lost_seconds
            status.startup_seconds, status.goodput = timeline.startup_seconds, timeline.goodput
            status.progress = [[p.done, p.step] for run in timeline.runs for p in run.points]
        if status.job_id in ads:
            _apply_ad(status, ads[status.job_id])
        rows.append(status)
    return rows


def format_status(rows: list[BranchStatus]) -> str:
    """The table that ``ckpt-tasks status`` prints."""
    if not rows:
        return "no branches found\n"
    header = (f"{'branch':>6}  {'step':>14}  {'newest':>9}  {'job':>8}  {'state':11}  {'starts':>6}  "
              f"{'evict':>5}  {'lost':>8}  {'goodput':>7}")
    lines = [header]
    for row in rows:
        step = "-" if row.step is None else str(row.step)
        if row.total and row.step is not None:
            step += f"/{row.total} ({100 * (row.step or 0) / row.total:.0f}%)"
        age = "-" if row.checkpoint_age is None else _duration(row.checkpoint_age) + " ago"
        lines.append(f"{row.branch:>6}  {step:>14}  {age:>9}  {row.job_id or '-':>8}  {row.job_state or '-':11}  "
                     f"{'-' if row.job_starts is None else row.job_starts:>6}  {row.evictions:>5}  "
                     f"{_duration(row.lost_seconds):>8}  {_percent(row.goodput):>7}")
        if row.hold_reason:
            lines.append(f"{'':>8}{row.hold_reason}")
    return "\n".join(lines) + "\n"


def plot_status(rows: list[BranchStatus], path: str) -> None:
    """Every branch's step over wall time, as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(10, 5), constrained_layout=True)
    origin = min((t for row in rows for t, _ in row.progress), default=0.0)
    for row in rows:
        label = f"branch {row.branch}" + (f" ({row.job_state})" if row.job_state else "")
        times = [(t - origin) / 60 for t, _ in row.progress]
        axes.plot(times, [step for _, step in row.progress], marker="o", markersize=3, label=label,
                  linestyle="--" if row.job_state == "held" else "-")
    total = max((row.total or 0 for row in rows), default=0)
    if total:
        axes.axhline(total, color="grey", linestyle=":", linewidth=1, label=f"total ({total})")
    axes.set_xlabel("wall time since the first checkpoint [min]")
    axes.set_ylabel("step")
    axes.set_title(f"{len(rows)} branches", fontsize="medium")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", loc="upper left")
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run_status(args: argparse.Namespace) -> int:
    """The handler of ``ckpt-tasks status``."""
    rows = collect(args.location, args.jobs, args.total, args.deadline)
    if args.json:
        print(json.dumps([asdict(row) for row in rows], indent=2))
    else:
        sys.stdout.write(format_status(rows))
    if args.plot:
        plot_status(rows, args.plot)
        if not args.json:
            print(f"plot written to {args.plot}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``status`` on the ``ckpt-tasks`` subcommands."""
    parser = subparsers.add_parser(
        "status", help="every branch of a workflow: progress, job state, holds, evictions, goodput",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("location", help="the workflow's checkpoint directory (holding branch-N)")
    parser.add_argument("--jobs", metavar="PATH", help="law's htcondor_jobs_*.json, or the directory holding it")
    parser.add_argument("--total", type=int, metavar="STEPS", help="the steps of a whole training")
    parser.add_argument("--json", action="store_true", help="print a JSON list, one object per branch")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw every branch's progress into this PNG")
    parser.add_argument("--deadline", type=float, default=30.0, metavar="SECONDS",
                        help="how long to retry a storage that does not answer (default: %(default)s)")
    parser.set_defaults(func=run_status)
    return parser
