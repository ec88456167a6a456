"""The Lightning callback with strategy="ddp" on 2 CPU processes (gloo), for real.

Lightning's own launcher makes rank 0 the parent of rank 1 (it runs the script again).
A SIGTERM to the parent alone, as HTCondor sends it, stops both ranks after the same
step, rank 0 commits that step once, the job exits 85, and the resumed run ends with
weights byte-identical to an uninterrupted 2-rank run (each rank's dropout generator
included).
"""
from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lightning")

from background_run import BackgroundRun  # noqa: E402
from ckpt_tasks.storage.store import CheckpointStore  # noqa: E402

SCRIPT = Path(__file__).parent / "helpers" / "lightning_ddp_script.py"
STEPS = 57  # 600 samples, 300 per rank, batches of 16: 19 steps per epoch, 3 epochs
STOPPED = re.compile(r"rank (\d) stopped after step (\d+); exit (\d+)")


class Run(BackgroundRun):
    timeout = 240

    def __init__(self, tmp: Path, store: Path, output: Path, *args: str, launcher: tuple[str, ...] = ()):
        # The callback's local work directories go under the test's own scratch directory.
        self.scratch = tmp / "scratch"
        self.scratch.mkdir(exist_ok=True)
        super().__init__([sys.executable, *launcher, str(SCRIPT), str(store), str(output), *args], cwd=tmp,
                         env={"TMPDIR": str(self.scratch)})

    def pids(self) -> dict[int, int]:
        return {int(m.group(1)): int(m.group(2)) for line in self.lines
                if (m := re.match(r"rank (\d) pid (\d+) ", line))}

    def parents(self) -> dict[int, int]:
        return {int(m.group(1)): int(m.group(2)) for line in self.lines
                if (m := re.match(r"rank \d pid (\d+) parent (\d+)$", line))}

    def trained(self, rank: int) -> list[int]:
        return [int(m.group(1)) for line in self.lines if (m := re.match(rf"rank {rank} epoch \d+ batch \d+ step (\d+)$", line))]


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("lightning-ddp-reference")
    run = Run(tmp, tmp / "store", tmp / "model.pt")
    assert run.finish() == 0, run.output[-4000:]
    assert f"done after {STEPS} steps" in run.output
    assert run.trained(0) == run.trained(1) == list(range(1, STEPS + 1)), run.output[-3000:]
    return weights(tmp / "model.pt")


def test_sigterm_to_the_parent_stops_both_ranks_at_one_step_commits_once_and_resumes_identically(
        tmp_path, reference):
    store = tmp_path / "store"
    first = Run(tmp_path, store, tmp_path / "model.pt", "--step-delay", "0.1")
    first.wait_for(r"rank 0 epoch 0 batch 12 step ")
    pids = first.pids()
    assert set(pids) == {0, 1}, first.output[-3000:]
    os.kill(pids[0], signal.SIGTERM)  # rank 0 is the job's top process; rank 1 gets nothing
    assert first.finish() == 85, first.output[-4000:]
    stops = {int(m.group(1)): (int(m.group(2)), int(m.group(3))) for m in STOPPED.finditer(first.output)}
    assert set(stops) == {0, 1} and stops[0] == stops[1], first.output[-3000:]
    step, code = stops[0]
    assert code == 85 and 13 <= step < STEPS, stops
    # one commit, by rank 0, of the agreed step (checkpoint_every is far away)
    assert first.output.count("committed checkpoint of step") == 1, first.output[-3000:]
    assert [c.step for c in CheckpointStore(store).list()] == [step]
    # every rank trained up to the agreed step, none beyond it (the model prints a step after the
    # callback's hook, so the stopping step itself is not printed)
    assert max(first.trained(0)) == max(first.trained(1)) == step - 1, first.output[-3000:]
    deadline = time.monotonic() + 30
    while alive(pids[1]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pids[1]), "rank 1 outlived the job"
    # a stop leaves without Lightning's teardown: the ranks removed their local copies themselves
    assert list(first.scratch.glob("ckpt-lightning-*")) == [], list(first.scratch.rglob("*"))

    second = Run(tmp_path, store, tmp_path / "model.pt")
    assert second.finish() == 0, second.output[-4000:]
    assert second.output.count(f"resuming from step {step} ") == 2, second.output[-3000:]  # both ranks
    assert second.trained(0)[0] == second.trained(1)[0] == step + 1  # no step twice, none skipped
    trained = weights(tmp_path / "model.pt")
    assert trained.keys() == reference.keys()
    for key in trained:
        assert trained[key].numpy().tobytes() == reference[key].numpy().tobytes(), key


def test_under_the_projects_launcher_a_sigterm_to_it_stops_both_ranks_and_it_exits_85(tmp_path):
    # The ranks are the launcher's children (Lightning sees torchrun's variables and starts none).
    store = tmp_path / "store"
    run = Run(tmp_path, store, tmp_path / "model.pt", "--step-delay", "0.1",
              launcher=("-m", "ckpt_tasks.distributed.launch", "--nproc", "2", "--"))
    run.wait_for(r"rank 1 epoch 0 batch 5 step ")
    parents = run.parents()
    assert len(parents) == 2 and set(parents.values()) == {run.proc.pid}, run.output[-3000:]
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 85, run.output[-4000:]
    stops = {int(m.group(1)): int(m.group(2)) for m in STOPPED.finditer(run.output)}
    assert set(stops) == {0, 1} and stops[0] == stops[1], run.output[-3000:]
    assert [c.step for c in CheckpointStore(store).list()] == [stops[0]]
    assert "all 2 ranks exited 85" in run.output


def test_saves_by_count_and_by_time_happen_at_the_same_step_on_both_ranks(tmp_path):
    # Lightning's save_checkpoint is collective: a rank saving alone would hang the other.
    store = tmp_path / "store"
    run = Run(tmp_path, store, tmp_path / "model.pt", "--epochs", "2", "--checkpoint-every", "20",
              "--checkpoint-interval", "1", "--step-delay", "0.1")
    assert run.finish() == 0, run.output[-4000:]
    commits = [int(n) for n in re.findall(r"committed checkpoint of step (\d+)", run.output)]
    # 38 steps of >= 100 ms: at least 3 s of training, so time-based saves besides step 20's
    assert 20 in commits and len([c for c in commits if c % 20]) >= 2, run.output[-3000:]
    assert CheckpointStore(store).latest().step == max(commits)


def test_seeded_batches_refuse_a_position_of_another_number_of_ranks():
    from ckpt_tasks.integrations.lightning import SeededBatches

    batches = SeededBatches(torch.arange(10.0), batch_size=4, seed=3)
    assert len(batches) == 3  # one process: the whole epoch
    with pytest.raises(ValueError, match="split over 2 ranks, this training has 1"):
        batches.load_state_dict({"epoch": 1, "position": 2, "seed": 3, "world_size": 2})
    batches.load_state_dict({"epoch": 1, "position": 2, "seed": 3})  # one rank's, as before
    batches.set_epoch(1)
    assert [b[0].tolist() for b in batches] == [batches.order(1)[8:].tolist()]
