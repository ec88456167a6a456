"""Lineage records and ``ckpt-tasks history``: timeline, evictions, work lost, goodput, plot.

The timelines are crafted: lineage dicts of several runs (other pids, run ids,
process starts and HTCondor ``NumJobStarts``) simulate job starts, an exit-85
restart and evictions. The numbers are checked exactly on ``build_timeline``;
the same checkpoints are then saved through ``CheckpointStore`` (local and a
real XRootD server) and read back by the command.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import uuid
import zlib
from datetime import datetime, timezone
from pathlib import Path

import pytest

from ckpt_tasks import history
from ckpt_tasks.lineage import PROCESS_START, RUN_ID, compact, lineage, trail
from ckpt_tasks.storage.store import Checkpoint, CheckpointStore, RetryPolicy

REPO = Path(__file__).resolve().parents[1]
T0 = 1_750_000_000.0  # crafted timelines start here


def iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, timezone.utc).isoformat(timespec="milliseconds")


def record(run: str, pid: int, start: float, t: float, step: int, loss: float | None = None,
           njs: int | None = None, job: str | None = "7.0", vacate: float | None = None) -> dict:
    """A lineage dict as ``lineage()`` makes it, with crafted values."""
    htcondor = None
    if njs is not None:
        cluster, proc = job.split(".")
        htcondor = {"job_id": job, "cluster_id": int(cluster), "proc_id": int(proc), "num_job_starts": njs,
                    "global_job_id": f"schedd#{job}#1", "job_current_start_date": int(start),
                    "last_vacate_time": vacate}
    return {"host": f"wn-{run}", "pid": pid, "run_id": run, "process_start": iso(start),
            "process_start_unix": start, "time": iso(t), "unix_time": t, "step": step, "loss": loss,
            "htcondor": htcondor}


def crafted() -> list[tuple[int, dict, float, str | None]]:
    """(step, lineage, commit seconds, reason): three runs of job 7.0 and one of job 8.0.

    run a  job start 1, starts T0,      checkpoints 100,200,300 at T0+100,+200,+300, killed
    run b  job start 2 (an eviction at T0+350 by LastVacateTime), starts T0+400,
           checkpoints 400,500 at +500,+600, the last one on SIGTERM (exit 85)
    run c  job start 2 again (an exit-85 restart in place), starts T0+610, checkpoint 600 at +700
    run d  job 8.0 (a resubmission), starts T0+1000, checkpoint 700 at +1100
    """
    def loss(step):
        return 2.0 / (1 + step / 100)

    rows = []
    for step, t in ((100, 100), (200, 200), (300, 300)):
        rows.append((step, record("a", 11, T0, T0 + t, step, loss(step), njs=1), 2.0, None))
    rows.append((400, record("b", 22, T0 + 400, T0 + 500, 400, loss(400), njs=2, vacate=T0 + 350), 2.0, None))
    rows.append((500, record("b", 22, T0 + 400, T0 + 600, 500, loss(500), njs=2, vacate=T0 + 350), 2.0, "signal"))
    rows.append((600, record("c", 33, T0 + 610, T0 + 700, 600, loss(600), njs=2, vacate=T0 + 350), 2.0, None))
    rows.append((700, record("d", 44, T0 + 1000, T0 + 1100, 700, loss(700), njs=1, job="8.0"), 2.0, None))
    return rows


def checkpoints_of(rows) -> list[Checkpoint]:
    out = []
    for step, lin, commit, reason in rows:
        metadata = {"lineage": lin, "loss": lin["loss"]}
        if reason:
            metadata["reason"] = reason
        out.append(Checkpoint(step=step, name=f"step-{step:012d}-00000000.ckpt", size=1, adler32="00000001",
                              created=iso(lin["unix_time"] + commit), path="/x", metadata=metadata))
    return out


# -- lineage ---------------------------------------------------------------------------------

def test_lineage_outside_a_job(monkeypatch):
    monkeypatch.delenv("_CONDOR_JOB_AD", raising=False)
    before = time.time()
    lin = lineage(step=5, loss=0.25)
    assert lin["step"] == 5 and lin["loss"] == 0.25
    assert lin["pid"] == os.getpid() and lin["run_id"] == RUN_ID and lin["host"]
    assert lin["htcondor"] is None
    assert before - 1 <= lin["unix_time"] <= time.time() + 1
    assert datetime.fromisoformat(lin["time"].replace("Z", "+00:00")).timestamp() == pytest.approx(
        lin["unix_time"], abs=0.01)
    assert lin["process_start_unix"] == round(PROCESS_START, 3) <= lin["unix_time"]
    json.dumps(lin)  # goes into a JSON manifest


def test_lineage_reads_the_job_ad(monkeypatch, tmp_path):
    ad = tmp_path / ".job.ad"
    ad.write_text('ClusterId = 4711\nProcId = 3\nNumJobStarts = 2\nGlobalJobId = "schedd.example#4711.3#17"\n'
                  "JobCurrentStartDate = 1750000400\nLastVacateTime = 1750000350\n"
                  'TransferCheckpoint = "state.dat"\n')
    monkeypatch.setenv("_CONDOR_JOB_AD", str(ad))
    job = lineage(step=1)["htcondor"]
    assert job == {"job_id": "4711.3", "cluster_id": 4711, "proc_id": 3, "num_job_starts": 2,
                   "global_job_id": "schedd.example#4711.3#17", "job_current_start_date": 1750000400,
                   "last_vacate_time": 1750000350}


@pytest.mark.parametrize("content", [None, "this is [ not a classad", ""])
def test_lineage_never_fails_on_a_bad_job_ad(monkeypatch, tmp_path, content):
    ad = tmp_path / f"bad-{uuid.uuid4().hex[:6]}.ad"
    if content is not None:
        ad.write_text(content)
    monkeypatch.setenv("_CONDOR_JOB_AD", str(ad))
    lin = lineage(step=3)
    assert lin["step"] == 3
    assert lin["htcondor"] is None or lin["htcondor"]["num_job_starts"] is None


def test_trail_keeps_run_boundaries_when_thinned():
    previous = None
    for run in range(5):
        for i in range(100):
            lin = record(f"r{run}", run, T0 + 1000 * run, T0 + 1000 * run + i, run * 100 + i)
            cp = Checkpoint(step=run * 100 + i, name="x", size=1, adler32="1", created=iso(T0 + 1000 * run + i),
                            path="x", metadata={"lineage": lin, "lineage_trail": trail(previous, limit=40)})
            previous = cp
    records = trail(previous, limit=40)
    assert len(records) <= 40
    steps = [r["step"] for r in records]
    assert steps == sorted(steps) and steps[-1] == 499
    for run in range(1, 5):  # the first step of each run survives
        assert run * 100 in steps
    assert records[-1] == compact(previous.metadata["lineage"], previous.created)


# -- the timeline ----------------------------------------------------------------------------

@pytest.mark.parametrize("reason, kind", [("site limit", "site limit"), ("exit", "checkpoint exit"),
                                          ("signal", "eviction")])
def test_a_run_that_stopped_itself_is_no_eviction(reason, kind):
    # job 7.0 started twice; the first run's last checkpoint says why it stopped
    rows = [(100, record("a", 11, T0, T0 + 100, 100, 1.0, njs=1), 2.0, reason),
            (200, record("b", 22, T0 + 150, T0 + 250, 200, 0.5, njs=2), 2.0, None)]
    timeline = history.build_timeline(checkpoints_of(rows), "loc")
    (interruption,) = timeline.interruptions
    assert interruption.kind == kind and interruption.lost_seconds == 0
    assert len(timeline.evictions) == (kind == "eviction")
    assert {"site limit": "(before the site's limit)", "exit": "(checkpoint exit)",
            "signal": "(on signal)"}[reason] in history.format_timeline(timeline)


def test_timeline_numbers():
    timeline = history.build_timeline(checkpoints_of(crafted()), "loc")
    assert [r.run_id for r in timeline.runs] == ["a", "b", "c", "d"]
    assert [[p.step for p in r.points] for r in timeline.runs] == [[100, 200, 300], [400, 500], [600], [700]]
    kinds = [i.kind for i in timeline.interruptions]
    assert kinds == ["eviction", "checkpoint restart", "resubmission"]
    assert len(timeline.evictions) == 1
    assert [(r.job_id, r.num_job_starts) for r in timeline.job_starts] == [("7.0", 1), ("7.0", 2), ("8.0", 1)]

    eviction, restart, resubmission = timeline.interruptions
    # run a committed step 300 at T0+302, was evicted at LastVacateTime T0+350: 48 s lost,
    # at its rate (1 step/s) about 48 steps; down from T0+350 to the next start T0+400.
    assert eviction.basis == "LastVacateTime"
    assert eviction.lost_seconds == pytest.approx(48.0)
    assert eviction.lost_steps == pytest.approx(48.0)
    assert eviction.down_seconds == pytest.approx(50.0)
    assert eviction.resumed_step == 300
    # run b's last checkpoint was written on SIGTERM: nothing lost.
    assert restart.lost_seconds == 0 and restart.basis.startswith("checkpoint at exit")
    assert restart.down_seconds == pytest.approx(610 - 602)
    # run c stopped somewhere between T0+702 and the next start T0+1000: an upper bound.
    assert resubmission.basis == "next start (upper bound)"
    assert resubmission.lost_seconds == pytest.approx(298.0)

    assert timeline.overhead_seconds == pytest.approx(7 * 2.0)
    assert timeline.lost_seconds == pytest.approx(48 + 0 + 298)
    held = (350 - 0) + (602 - 400) + (1000 - 610) + (1102 - 1000)
    assert timeline.held_seconds == pytest.approx(held)
    assert timeline.wall_seconds == pytest.approx(1102)
    assert timeline.goodput == pytest.approx((held - 346 - 14) / held)
    assert timeline.goodput_wall == pytest.approx((held - 346 - 14) / 1102)

    text = history.format_timeline(timeline)
    assert "EVICTION: work lost 48.0 s, about 48 steps (LastVacateTime)" in text
    assert "1 evictions" in text and "4 runs" in text and "3 HTCondor job starts" in text
    assert "goodput" in text and "checkpoint overhead  14.0 s" in text


def test_timeline_without_htcondor_and_without_lineage():
    rows = [(10, record("x", 1, T0, T0 + 10, 10, njs=None), 1.0, None),
            (20, record("y", 2, T0 + 100, T0 + 110, 20, njs=None), 1.0, "final")]
    checkpoints = checkpoints_of(rows) + [Checkpoint(step=30, name="n", size=1, adler32="1",
                                                     created=iso(T0 + 200), path="p", metadata={})]
    timeline = history.build_timeline(checkpoints, "loc")
    assert [i.kind for i in timeline.interruptions] == ["restart"]
    assert timeline.interruptions[0].lost_seconds == pytest.approx(100 - 11)
    assert timeline.without_lineage == 1 and not timeline.job_starts
    assert "without lineage" in history.format_timeline(timeline)
    assert "no checkpoints with lineage" in history.format_timeline(history.build_timeline([], "empty"))


# -- through the store and the command -------------------------------------------------------

class _CraftedClock(datetime):
    """``datetime`` for the store module whose ``now()`` is the crafted commit time."""

    at: float = T0

    @classmethod
    def now(cls, tz=None):
        return datetime.fromtimestamp(cls.at, tz)


def save_crafted(location: str, tmp_path: Path, monkeypatch, keep_last: int = 20,
                 with_trail: bool = False) -> None:
    """Save the crafted checkpoints through CheckpointStore.save, with the manifests' ``created``
    at the crafted commit times (the store stamps ``created`` with ``datetime.now``)."""
    from ckpt_tasks.storage import store as store_module

    monkeypatch.setattr(store_module, "datetime", _CraftedClock)
    store = CheckpointStore(location, keep_last=keep_last, retry=RetryPolicy(deadline=10, initial_delay=0.2))
    previous = None
    for step, lin, commit, reason in crafted():
        _CraftedClock.at = lin["unix_time"] + commit
        (tmp_path / "state.bin").write_bytes(os.urandom(64) + str(step).encode())
        metadata = {"lineage": lin, "loss": lin["loss"]}
        if reason:
            metadata["reason"] = reason
        if with_trail:
            metadata["lineage_trail"] = trail(previous)
        previous = store.save(tmp_path / "state.bin", step, metadata)
        assert previous.metadata["lineage"]["run_id"] == lin["run_id"], \
            "CheckpointStore.save must keep a caller's metadata['lineage'] (setdefault, not overwrite)"


def run_history(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "ckpt_tasks.cli", "history", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 600 and height >= 400
    import matplotlib.image

    pixels = matplotlib.image.imread(str(path))
    assert pixels.shape[:2] == (height, width)
    assert pixels.std() > 0.02, "the image is blank"
    # Lines were drawn in colour (runs, eviction marks), not only black text on white.
    rgb = pixels[..., :3]
    assert ((rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.3).mean() > 0.001
    # Every chunk's CRC holds: a complete file, not a truncated one.
    offset = 8
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        chunk = data[offset + 4:offset + 8 + length]
        assert struct.unpack(">I", data[offset + 8 + length:offset + 12 + length])[0] == zlib.crc32(chunk)
        offset += 12 + length
        if kind == b"IEND":
            break
    assert offset == len(data)


@pytest.fixture(params=["local", "xrootd"])
def location(request, tmp_path):
    name = f"hist-{uuid.uuid4().hex[:8]}"
    if request.param == "local":
        return str(tmp_path / name)
    server = request.getfixturevalue("xrootd_server")
    return f"{server.url}//history/{name}"


def test_history_command_and_plot(location, tmp_path, monkeypatch):
    save_crafted(location, tmp_path, monkeypatch)
    plot = tmp_path / "timeline.png"
    result = run_history(location, "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    assert "EVICTION: work lost 48.0 s" in result.stdout
    assert "CHECKPOINT RESTART" in result.stdout and "RESUBMISSION" in result.stdout
    assert "checkpoint step 700" in result.stdout and f"plot written to {plot}" in result.stdout
    assert_png(plot)

    result = run_history(location, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [r["run_id"] for r in data["runs"]] == ["a", "b", "c", "d"]
    assert data["evictions"] == 1 and data["job_starts"] == 3 and data["checkpoints"] == 7
    assert [i["kind"] for i in data["interruptions"]] == ["eviction", "checkpoint restart", "resubmission"]
    assert data["interruptions"][0]["basis"] == "LastVacateTime"
    assert data["lost_seconds"] == pytest.approx(346, abs=0.01)
    assert data["overhead_seconds"] == pytest.approx(14, abs=0.01)
    assert 0 < data["goodput"] < 1


def test_history_survives_retention_through_the_trail(tmp_path, monkeypatch):
    location = str(tmp_path / "kept2")
    save_crafted(location, tmp_path, monkeypatch, keep_last=2, with_trail=True)
    assert len(CheckpointStore(location).list()) == 2
    data = json.loads(run_history(location, "--json").stdout)
    assert [r["run_id"] for r in data["runs"]] == ["a", "b", "c", "d"]
    assert data["checkpoints"] == 7 and data["evictions"] == 1
    retained = [p["retained"] for r in data["runs"] for p in r["points"]]
    assert retained == [False] * 5 + [True] * 2


def test_history_of_an_empty_location(tmp_path):
    result = run_history(str(tmp_path / "nothing"))
    assert result.returncode == 0 and "no checkpoints with lineage" in result.stdout
    result = run_history(str(tmp_path / "nothing"), "--plot", str(tmp_path / "x.png"))
    assert result.returncode == 1 and not (tmp_path / "x.png").exists()


def test_parser_registration(tmp_path):
    import argparse

    parser = argparse.ArgumentParser(prog="ckpt-tasks")
    commands = parser.add_subparsers(dest="command", required=True)
    history.add_parser(commands)
    args = parser.parse_args(["history", str(tmp_path), "--plot", "x.png", "--deadline", "5"])
    assert args.func is history.run_history and args.plot == "x.png" and args.deadline == 5


def test_progress_is_quiet_when_not_a_terminal(capsys):
    from ckpt_tasks import progress

    assert not progress.enabled()  # pytest captures stderr
    with progress.transfer_progress(1 << 20, "upload", delay=0) as advance:
        advance(1 << 19)
        advance(1 << 19)
    handler = progress.XRootDProgress("download", delay=0)
    handler.begin(1, 1, None, None)
    handler.update(1, 10, 100)
    handler.update(1, 100, 100)
    handler.end(1, {})
    assert capsys.readouterr().err == ""


def test_progress_draws_in_a_terminal():
    """In a pseudo-terminal the bar appears on stderr; CKPT_TASKS_PROGRESS=0 switches it off."""
    import fcntl
    import pty
    import termios

    code = ("from ckpt_tasks import progress\n"
            "with progress.transfer_progress(4 << 20, 'upload state.pt', delay=0) as advance:\n"
            "    [advance(1 << 20) for _ in range(4)]\n")
    outputs = {}
    for setting in ("1", "0"):
        primary, secondary = pty.openpty()
        fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
        env = dict(os.environ, CKPT_TASKS_PROGRESS=setting,
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        proc = subprocess.Popen([sys.executable, "-c", code], stderr=secondary, stdout=subprocess.DEVNULL, env=env)
        os.close(secondary)
        chunks = []
        while True:
            try:
                chunk = os.read(primary, 4096)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        proc.wait(timeout=60)
        os.close(primary)
        outputs[setting] = b"".join(chunks).decode(errors="replace")
    assert "upload state.pt" in outputs["1"] and "4.00M" in outputs["1"]
    assert outputs["0"] == ""


def test_start_up_counts_as_overhead_not_as_useful_work():
    # A fresh process that imports, fetches and restores for 50 s, then trains 10 steps/s
    # from step 0 and commits steps 10 and 20 (0.1 s each): 2 s of its 52 were useful.
    rows = [(10, record("f", 5, T0, T0 + 51.0, 10, njs=None), 0.1, None),
            (20, record("f", 5, T0, T0 + 52.0, 20, njs=None), 0.1, None)]
    timeline = history.build_timeline(checkpoints_of(rows), "loc")
    (run,) = timeline.runs
    assert run.startup == pytest.approx(50.0) and run.startup_basis == "step rate"
    assert timeline.startup_seconds == pytest.approx(50.0)
    assert timeline.held_seconds == pytest.approx(52.1)
    assert timeline.goodput == pytest.approx((52.1 - 50.0 - 0.2) / 52.1)
    assert timeline.to_json()["startup_seconds"] == pytest.approx(50.0)
    assert "start-up             50.0 s" in history.format_timeline(timeline)


def test_start_up_of_a_run_with_one_checkpoint():
    # run g (10 steps/s) gives the rate for run h, which resumed from 20, started at +100
    # and committed step 30 at +130: its first step came at +129, 29 s of start-up.
    rows = [(10, record("g", 1, T0, T0 + 2.0, 10, njs=None), 0.0, None),
            (20, record("g", 1, T0, T0 + 3.0, 20, njs=None), 0.0, None),
            (30, record("h", 2, T0 + 100, T0 + 130.0, 30, njs=None), 0.0, None)]
    first, second = history.build_timeline(checkpoints_of(rows), "loc").runs
    assert first.startup == pytest.approx(1.0)
    assert second.startup == pytest.approx(29.0) and second.startup_basis == "the training's step rate"
    # alone, with no rate anywhere, everything up to the first checkpoint counts
    (alone,) = history.build_timeline(checkpoints_of(rows[2:]), "loc").runs
    assert alone.startup == pytest.approx(30.0) and "upper bound" in alone.startup_basis
