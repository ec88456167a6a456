"""``ckpt-tasks history LOCATION``: the timeline of a training from its checkpoint manifests.

Every manifest carries ``metadata["lineage"]`` (ckpt_tasks/lineage.py): host,
process, HTCondor job and ``NumJobStarts``, wall time, step, loss. Manifests
removed by retention survive as compact records in ``metadata["lineage_trail"]``
when the writer carries them forward (the watcher does).

From these records:

- a **run** is one process (one ``run_id``): its start, checkpoints, steps;
- between two runs there is an **interruption**, classified as
  ``eviction`` (``NumJobStarts`` grew: HTCondor started the job again),
  ``checkpoint restart`` (same job start: exit 85 and restarted in place),
  ``checkpoint exit`` or ``site limit`` (the run stopped on its own: its last
  checkpoint's reason),
  ``resubmission`` (another HTCondor job), or ``restart`` (no job information);
- **work lost** at an interruption is the time from the run's last committed
  checkpoint to when it stopped: 0 when that checkpoint was written on a
  signal or when the run stopped on its own (``metadata["reason"]``), else up to the job's
  ``LastVacateTime`` when HTCondor recorded one, else up to the next run's
  start (an upper bound, labelled as such); converted to steps with the run's
  step rate;
- **checkpoint overhead** is the time each commit took (from the lineage time,
  taken when the save started, to the manifest's ``created``);
- **start-up** is the time from a run's process start to its first training
  step (imports, fetch, restore): the first step's time is the run's first
  checkpoint minus the steps it made since the step it resumed from, at the
  run's step rate (or the training's, when the run has one checkpoint); with
  no rate at all, the whole time to the first checkpoint counts (an upper
  bound, labelled as such);
- **goodput** is the time held by runs minus work lost, start-up and
  checkpoint overhead, as a share of the time held (and of the wall time,
  which also counts the waits between runs).

``--json`` prints the same as JSON; ``--plot FILE.png`` draws step over wall
time with the interruptions marked, and the loss over steps.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from ckpt_tasks.policy import SaveReason
from ckpt_tasks.storage.store import CheckpointStore, RetryPolicy

logger = logging.getLogger(__name__)

#: the interruptions after a run that stopped on its own (exit 85, requeued), by the reason of its last checkpoint
_OWN_STOPS = {SaveReason.EXIT: "checkpoint exit", SaveReason.SITE_LIMIT: "site limit"}


@dataclass
class Point:
    """One checkpoint as its lineage describes it."""

    step: int
    time: float  # unix time the save started (lineage)
    committed: float | None  # unix time the manifest says it was committed
    run_id: str
    host: str | None = None
    pid: int | None = None
    process_start: float | None = None
    loss: float | None = None
    job_id: str | None = None
    num_job_starts: int | None = None
    last_vacate_time: float | None = None
    reason: str | None = None
    retained: bool = True  # still a committed checkpoint (not only a trail record)

    @property
    def done(self) -> float:
        """When the checkpoint was committed (the save's start if the manifest says otherwise)."""
        return max(self.time, self.committed) if self.committed is not None else self.time

    @property
    def overhead(self) -> float | None:
        if self.committed is None:
            return None
        return max(0.0, self.committed - self.time)


@dataclass
class Run:
    index: int
    run_id: str
    host: str | None
    pid: int | None
    job_id: str | None
    num_job_starts: int | None
    start: float
    points: list[Point] = field(default_factory=list)
    end: float | None = None  # when it stopped (estimated for all but the last run)
    startup: float = 0.0  # process start to the first training step
    startup_basis: str = ""  # how ``startup`` was found

    @property
    def first_step(self) -> int:
        return self.points[0].step

    @property
    def last_step(self) -> int:
        return self.points[-1].step

    @property
    def last_commit(self) -> float:
        return self.points[-1].done

    @property
    def step_rate(self) -> float | None:
        """Steps per second while it ran (from its checkpoints)."""
        if len(self.points) >= 2 and self.points[-1].time > self.points[0].time:
            return (self.points[-1].step - self.points[0].step) / (self.points[-1].time - self.points[0].time)
        return None


@dataclass
class Interruption:
    kind: str  # eviction, checkpoint restart, resubmission, restart
    after_run: int
    stopped: float  # estimated time the run stopped
    basis: str  # how "stopped" was found
    lost_seconds: float
    lost_steps: float | None
    down_seconds: float  # from stopping to the next run's start
    resumed_step: int  # the last step committed before it


@dataclass
class Timeline:
    location: str
    runs: list[Run]
    interruptions: list[Interruption]
    checkpoints: int
    without_lineage: int
    wall_seconds: float
    held_seconds: float
    lost_seconds: float
    overhead_seconds: float
    startup_seconds: float
    goodput: float | None  # of the held time
    goodput_wall: float | None  # of the wall time

    @property
    def evictions(self) -> list[Interruption]:
        return [i for i in self.interruptions if i.kind == "eviction"]

    @property
    def job_starts(self) -> list[Run]:
        """The runs that began an HTCondor job start (the first run of each ``NumJobStarts``)."""
        starts, seen = [], set()
        for run in self.runs:
            key = (run.job_id, run.num_job_starts)
            if run.job_id and key not in seen:
                seen.add(key)
                starts.append(run)
        return starts

    def to_json(self) -> dict:
        return {
            "location": self.location,
            "checkpoints": self.checkpoints,
            "without_lineage": self.without_lineage,
            "runs": [{**{k: v for k, v in asdict(run).items() if k != "points"},
                      "checkpoints": len(run.points), "first_step": run.first_step, "last_step": run.last_step,
                      "last_commit": run.last_commit, "points": [asdict(p) for p in run.points]}
                     for run in self.runs],
            "interruptions": [asdict(i) for i in self.interruptions],
            "evictions": len(self.evictions),
            "job_starts": len(self.job_starts),
            "wall_seconds": self.wall_seconds,
            "held_seconds": self.held_seconds,
            "lost_seconds": self.lost_seconds,
            "overhead_seconds": self.overhead_seconds,
            "startup_seconds": self.startup_seconds,
            "goodput": self.goodput,
            "goodput_wall": self.goodput_wall,
        }


def _unix(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _num(value, kind=float):
    try:
        return None if value is None else kind(value)
    except (TypeError, ValueError):
        return None


def _point(record: dict, committed: float | None, reason: str | None, retained: bool,
           step: int | None = None) -> Point | None:
    time_ = _num(record.get("unix_time")) or _unix(record.get("time"))
    step = step if step is not None else _num(record.get("step"), int)
    if time_ is None or step is None:
        return None
    job = record.get("htcondor") or {}
    return Point(step=step, time=time_, committed=committed, run_id=str(record.get("run_id") or
                 f"{record.get('host')}:{record.get('pid')}:{record.get('process_start_unix')}"),
                 host=record.get("host"), pid=_num(record.get("pid"), int),
                 process_start=_num(record.get("process_start_unix")) or _unix(record.get("process_start")),
                 loss=_num(record.get("loss")), job_id=job.get("job_id"),
                 num_job_starts=_num(job.get("num_job_starts"), int),
                 last_vacate_time=_num(job.get("last_vacate_time")), reason=reason, retained=retained)


def points_of(checkpoints) -> tuple[list[Point], int]:
    """The lineage points of committed checkpoints and their trails; and how many had no lineage."""
    points: dict[tuple, Point] = {}
    without = 0
    for checkpoint in checkpoints:
        metadata = checkpoint.metadata or {}
        for record in metadata.get("lineage_trail") or []:
            if isinstance(record, dict):
                point = _point(record, _unix(record.get("created")), record.get("reason"), False)
                if point is not None:
                    points.setdefault((point.run_id, point.step, round(point.time, 3)), point)
        record = metadata.get("lineage")
        point = _point(record, _unix(checkpoint.created), metadata.get("reason"), True, checkpoint.step) \
            if isinstance(record, dict) else None
        if point is None:
            without += 1
            continue
        points[(point.run_id, point.step, round(point.time, 3))] = point  # the manifest wins over a trail
    return sorted(points.values(), key=lambda p: (p.time, p.step)), without


def _estimate_startups(runs: list[Run]) -> None:
    """Set each run's start-up: process start to its first training step (module docstring)."""
    rates = sorted(rate for run in runs if (rate := run.step_rate))
    fallback = rates[len(rates) // 2] if rates else None  # the training's median rate
    resumed_from = 0
    for run in runs:
        first = run.points[0]
        to_first_checkpoint = max(0.0, first.time - run.start)
        rate = run.step_rate or fallback
        if rate:
            first_step_at = first.time - max(0, first.step - resumed_from) / rate
            run.startup = min(to_first_checkpoint, max(0.0, first_step_at - run.start))
            run.startup_basis = "step rate" if run.step_rate else "the training's step rate"
        else:
            run.startup, run.startup_basis = to_first_checkpoint, "to the first checkpoint (upper bound)"
        resumed_from = run.last_step


def build_timeline(checkpoints, location: str = "") -> Timeline:
    """The runs, interruptions and accounting of a location's checkpoints (module docstring)."""
    points, without = points_of(checkpoints)
    by_run: dict[str, Run] = {}
    for point in points:
        run = by_run.get(point.run_id)
        if run is None:
            run = by_run[point.run_id] = Run(0, point.run_id, point.host, point.pid, point.job_id,
                                             point.num_job_starts, point.process_start or point.time)
        run.points.append(point)
    runs = sorted(by_run.values(), key=lambda r: (r.start, r.points[0].time))
    for index, run in enumerate(runs, 1):
        run.index = index
    interruptions = []
    for previous, run in zip(runs, runs[1:]):
        if previous.job_id and run.job_id:
            if previous.job_id != run.job_id:
                kind = "resubmission"
            elif (run.num_job_starts or 0) > (previous.num_job_starts or 0):
                kind = "eviction"
            else:
                kind = "checkpoint restart"
        else:
            kind = "restart"
        last = previous.points[-1]
        if last.reason in _OWN_STOPS and kind in ("eviction", "checkpoint restart"):
            kind = _OWN_STOPS[last.reason]  # the job stopped on its own and was requeued: no eviction
        vacate = run.points[0].last_vacate_time
        if last.reason in (SaveReason.SIGNAL, SaveReason.FINAL, *_OWN_STOPS):
            stopped, basis = last.done, f"checkpoint at exit ({last.reason})"
        elif kind == "eviction" and vacate is not None and last.done <= vacate <= run.start:
            stopped, basis = vacate, "LastVacateTime"
        else:
            stopped, basis = max(last.done, run.start), "next start (upper bound)"
        lost = max(0.0, stopped - last.done)
        rate = previous.step_rate
        previous.end = stopped
        interruptions.append(Interruption(
            kind=kind, after_run=previous.index, stopped=stopped, basis=basis, lost_seconds=lost,
            lost_steps=None if rate is None else lost * rate, down_seconds=max(0.0, run.start - stopped),
            resumed_step=last.step))
    if runs:
        runs[-1].end = runs[-1].last_commit
    _estimate_startups(runs)
    wall = (runs[-1].end - runs[0].start) if runs else 0.0
    held = sum(max(0.0, run.end - run.start) for run in runs)
    lost = sum(i.lost_seconds for i in interruptions)
    overhead = sum(p.overhead or 0.0 for p in points)
    startup = sum(run.startup for run in runs)
    useful = max(0.0, held - lost - overhead - startup)
    return Timeline(
        location=location, runs=runs, interruptions=interruptions, checkpoints=len(points),
        without_lineage=without, wall_seconds=wall, held_seconds=held, lost_seconds=lost,
        overhead_seconds=overhead, startup_seconds=startup, goodput=useful / held if held > 0 else None,
        goodput_wall=useful / wall if wall > 0 else None)


# -- text --------------------------------------------------------------------------------

def _clock(unix: float) -> str:
    return datetime.fromtimestamp(unix, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def format_timeline(timeline: Timeline) -> str:
    if not timeline.runs:
        extra = f" ({timeline.without_lineage} without lineage)" if timeline.without_lineage else ""
        return f"no checkpoints with lineage at {timeline.location}{extra}\n"
    lines = [f"history of {timeline.location} (times in UTC)",
             f"{timeline.checkpoints} checkpoints, steps {timeline.runs[0].first_step}.."
             f"{timeline.runs[-1].last_step}, {len(timeline.runs)} runs, {len(timeline.job_starts)} HTCondor "
             f"job starts, {len(timeline.evictions)} evictions, {len(timeline.interruptions)} interruptions", ""]
    interruptions = {i.after_run: i for i in timeline.interruptions}
    for run in timeline.runs:
        where = f"host {run.host}, pid {run.pid}"
        if run.job_id:
            where += f", job {run.job_id}, job start {run.num_job_starts}"
        lines.append(f"{_clock(run.start)}  run {run.index} started ({where}); start-up "
                     f"{_duration(run.startup)} ({run.startup_basis})")
        for point in run.points:
            loss = "" if point.loss is None else f"  loss {point.loss:.4g}"
            overhead = "" if point.overhead is None else f"  commit {point.overhead:.2f} s"
            note = "" if point.retained else "  (removed by retention)"
            reason = {SaveReason.SIGNAL: "  (on signal)", SaveReason.FINAL: "  (at exit)", SaveReason.EXIT:
                      "  (checkpoint exit)", SaveReason.SITE_LIMIT: "  (before the site's limit)"}.get(point.reason or "", "")
            lines.append(f"{_clock(point.done)}    checkpoint step {point.step}{loss}{overhead}{reason}{note}")
        interruption = interruptions.get(run.index)
        if interruption is not None:
            steps = "" if interruption.lost_steps is None else f", about {interruption.lost_steps:.0f} steps"
            lines.append(f"{_clock(interruption.stopped)}  {interruption.kind.upper()}: work lost "
                         f"{_duration(interruption.lost_seconds)}{steps} ({interruption.basis}); "
                         f"down {_duration(interruption.down_seconds)}; resumes from step "
                         f"{interruption.resumed_step}")
    lines += ["", f"wall time            {_duration(timeline.wall_seconds)}",
              f"time held by runs    {_duration(timeline.held_seconds)}",
              f"work lost            {_duration(timeline.lost_seconds)}",
              f"checkpoint overhead  {_duration(timeline.overhead_seconds)}",
              f"start-up             {_duration(timeline.startup_seconds)}",
              f"goodput              {_percent(timeline.goodput)} of held time, "
              f"{_percent(timeline.goodput_wall)} of wall time"]
    if timeline.without_lineage:
        lines.append(f"({timeline.without_lineage} checkpoints without lineage are not shown)")
    return "\n".join(lines) + "\n"


# -- plot --------------------------------------------------------------------------------

def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("location", help="a path, file:// or root://host:port//path")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw the timeline into this PNG")
    parser.add_argument("--json", action="store_true", help="print the timeline as JSON")
    parser.add_argument("--deadline", type=float, default=RetryPolicy.deadline, metavar="SECONDS",
                        help="how long to retry a storage that does not answer (default: %(default)s)")


def run_history(args: argparse.Namespace) -> int:
    """The handler of ``ckpt-tasks history``."""
    store = CheckpointStore(args.location, retry=RetryPolicy(deadline=args.deadline,
                                                              initial_delay=min(1.0, args.deadline / 4)))
    timeline = build_timeline(store.list(), store.location)
    if args.json:
        print(json.dumps(timeline.to_json(), indent=2))
    else:
        sys.stdout.write(format_timeline(timeline))
    if args.plot:
        if not timeline.runs:
            print(f"ckpt-tasks history: nothing to plot at {args.location}", file=sys.stderr)
            return 1
        from ckpt_tasks.timeline_plot import plot_timeline  # matplotlib only for the plot

        plot_timeline(timeline, args.plot)
        if not args.json:
            print(f"plot written to {args.plot}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``history`` on the ``ckpt-tasks`` subcommands."""
    parser = subparsers.add_parser(
        "history", help="the timeline of a training: runs, evictions, work lost, goodput",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    parser.set_defaults(func=run_history)
    return parser
