"""The picture of a training's history: step over wall time with evictions, and the loss.

``ckpt-tasks history --plot FILE.png`` draws it (matplotlib, imported only for the plot).
"""
from __future__ import annotations

from ckpt_tasks.history import Timeline, _percent


def plot_timeline(timeline: Timeline, path: str) -> None:
    """Step over wall time (runs coloured, interruptions marked) and loss over step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), constrained_layout=True)
    origin = timeline.runs[0].start if timeline.runs else 0.0
    span = timeline.wall_seconds
    unit, scale = ("s", 1.0) if span < 300 else ("min", 60.0) if span < 3 * 3600 else ("h", 3600.0)

    def hours(t: float) -> float:  # in the chosen unit
        return (t - origin) / scale
    for run in timeline.runs:
        label = f"run {run.index}" + (f" (job {run.job_id} #{run.num_job_starts})" if run.job_id else "")
        top.plot([hours(p.done) for p in run.points], [p.step for p in run.points], marker="o", markersize=3,
                 label=label)
        top.axvline(hours(run.start), color="grey", linestyle=":", linewidth=0.8)
    for interruption in timeline.interruptions:
        color = "red" if interruption.kind == "eviction" else "orange"
        run = timeline.runs[interruption.after_run - 1]
        top.axvline(hours(interruption.stopped), color=color, linewidth=1.5,
                    label=interruption.kind)
        top.axvspan(hours(run.last_commit), hours(interruption.stopped), color=color, alpha=0.25)
    handles, labels = top.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    if unique:
        top.legend(unique.values(), unique.keys(), fontsize="small", loc="upper left")
    top.set_xlabel(f"wall time since the first start [{unit}]")
    top.set_ylabel("step")
    top.set_title(f"{timeline.location}: {len(timeline.runs)} runs, {len(timeline.evictions)} evictions, "
                  f"goodput {_percent(timeline.goodput)}", fontsize="medium")
    top.grid(alpha=0.3)
    losses = [(p.step, p.loss) for run in timeline.runs for p in run.points if p.loss is not None]
    if losses:
        losses.sort()
        bottom.plot([s for s, _ in losses], [v for _, v in losses], marker=".", color="tab:blue")
        if all(v > 0 for _, v in losses) and max(v for _, v in losses) / min(v for _, v in losses) > 20:
            bottom.set_yscale("log")
    else:
        bottom.text(0.5, 0.5, "no loss recorded", ha="center", va="center", transform=bottom.transAxes)
    bottom.set_xlabel("step")
    bottom.set_ylabel("loss")
    bottom.grid(alpha=0.3)
    figure.savefig(path, dpi=100)
    plt.close(figure)


# -- command line ------------------------------------------------------------------------
