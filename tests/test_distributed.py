"""Several ranks in one job: the agreed stop, the launcher, exact resume, a killed rank.

Real processes throughout: two ranks with torch.distributed's gloo backend on the CPU,
training tests/helpers/distributed_train.py (DDP, per-rank dropout and input noise).
"""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from ckpt_tasks.distributed import RankInfo, StopAgreement, batches_per_epoch, rank_order  # noqa: E402
from ckpt_tasks.distributed.launch import exit_code_of, rank_command, rank_environment  # noqa: E402
from ckpt_tasks.storage.store import CheckpointStore  # noqa: E402

TRAIN = str(Path(__file__).resolve().parents[1] / "examples" / "distributed_example" / "train.py")
STEPS = 40
STEP_LINE = re.compile(r"rank (\d+) step (\d+) ")
STOPPED_LINE = re.compile(r"rank (\d+) stopped after step (\d+); exit (\d+)")


# -- pure parts ----------------------------------------------------------------------------


def test_rank_orders_partition_the_epoch_and_depend_on_seed_epoch_rank_only():
    orders = [rank_order(10, seed=3, epoch=1, rank=rank, world_size=3) for rank in range(3)]
    assert [len(order) for order in orders] == [4, 4, 4]  # padded to equal lengths
    assert set(torch.cat(orders).tolist()) == set(range(10))
    assert torch.equal(orders[1], rank_order(10, seed=3, epoch=1, rank=1, world_size=3))
    assert not torch.equal(orders[1], rank_order(10, seed=3, epoch=2, rank=1, world_size=3))
    assert not torch.equal(orders[1], rank_order(10, seed=4, epoch=1, rank=1, world_size=3))
    torch.manual_seed(0)  # the global RNG plays no part
    assert torch.equal(orders[0], rank_order(10, seed=3, epoch=1, rank=0, world_size=3))
    assert batches_per_epoch(10, 3, 3) == 2
    with pytest.raises(ValueError):
        rank_order(10, seed=3, epoch=1, rank=3, world_size=3)


def test_rank_info_reads_the_launcher_variables():
    assert RankInfo.from_environment({}) == RankInfo(0, 1, 0, "127.0.0.1", 0)
    env = rank_environment(1, 2, 4567, base={})
    info = RankInfo.from_environment(env)
    assert (info.rank, info.world_size, info.local_rank, info.master_port) == (1, 2, 1, 4567)
    assert not info.is_coordinator
    with pytest.raises(RuntimeError, match="outside"):
        RankInfo.from_environment({**env, "RANK": "2"})


def test_launcher_commands_and_exit_codes():
    assert rank_command(["train.py", "-x"]) == [sys.executable, "train.py", "-x"]
    assert rank_command(["law", "run"]) == ["law", "run"]
    assert exit_code_of(-signal.SIGKILL) == 137 and exit_code_of(85) == 85
    with pytest.raises(ValueError):
        StopAgreement(every=0)


# -- helpers for the process tests ----------------------------------------------------------


def train_args(tmp: Path, name: str, **options) -> list[str]:
    args = [TRAIN, "--store", str(tmp / "store"), "--out", str(tmp / f"{name}.pt"),
            "--log-dir", str(tmp / f"logs-{name}"), "--steps", str(STEPS), "--timeout", "20"]
    for key, value in options.items():  # an empty value: a flag
        args += [f"--{key.replace('_', '-')}"] + ([str(value)] if value != "" else [])
    return args


def launch(args: list[str], nproc: int = 2) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ckpt_tasks.distributed.launch", "--nproc", str(nproc),
                             "--grace", "5", "--", *args], stderr=subprocess.PIPE, text=True)


def log_text(tmp: Path, name: str, rank: int) -> str:
    path = tmp / f"logs-{name}" / f"rank-{rank}.log"
    return path.read_text() if path.exists() else ""


def last_step(tmp: Path, name: str, rank: int = 0) -> int:
    steps = [int(m.group(2)) for m in STEP_LINE.finditer(log_text(tmp, name, rank))]
    return max(steps, default=0)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def interrupt(tmp: Path, name: str, after_step: int) -> tuple[int, dict[int, int]]:
    """Launch, SIGTERM the launcher once rank 0 passed ``after_step``; the exit code and each
    rank's stop step."""
    process = launch(train_args(tmp, name, step_delay=0.05, checkpoint_every=7))
    wait_for(lambda: last_step(tmp, name) >= after_step or process.poll() is not None, 60, "training steps")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    stops = {}
    for rank in (0, 1):
        for match in STOPPED_LINE.finditer(log_text(tmp, name, rank)):
            stops[int(match.group(1))] = int(match.group(2))
    assert process.returncode == 85, stderr
    return process.returncode, stops


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype
        assert a[key].numpy().tobytes() == b[key].numpy().tobytes(), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The weights of an uninterrupted 2-rank run."""
    tmp = tmp_path_factory.mktemp("reference")
    process = launch(train_args(tmp, "reference", checkpoint_every=7))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    return weights(tmp / "reference.pt")


# -- the agreed stop and exact resume -------------------------------------------------------


def test_sigterm_to_the_launcher_stops_every_rank_after_the_same_step(tmp_path):
    code, stops = interrupt(tmp_path, "stopped", after_step=3)
    assert code == 85
    assert set(stops) == {0, 1} and stops[0] == stops[1], stops
    latest = CheckpointStore(tmp_path / "store").latest()
    assert latest is not None and latest.step == stops[0]
    assert latest.metadata["world_size"] == 2 and latest.metadata["reason"] == "signal"


@pytest.mark.parametrize("agreement", [{}, {"agree_every": 3, "agree_sync": ""}], ids=["overlapped", "sync-every-3"])
def test_a_signal_to_one_rank_only_stops_both_after_the_same_step(tmp_path, agreement):
    process = launch(train_args(tmp_path, "one", step_delay=0.05, **agreement))
    wait_for(lambda: last_step(tmp_path, "one", 1) >= 3 or process.poll() is not None, 60, "training steps")
    pid = int(re.search(r"rank 1 pid (\d+)", log_text(tmp_path, "one", 1)).group(1))
    os.kill(pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 85, stderr
    stops = {int(m.group(1)): int(m.group(2)) for rank in (0, 1)
             for m in STOPPED_LINE.finditer(log_text(tmp_path, "one", rank))}
    assert set(stops) == {0, 1} and stops[0] == stops[1] < STEPS, stops
    assert stops[0] % agreement.get("agree_every", 1) == 0
    assert CheckpointStore(tmp_path / "store").latest().step == stops[0]


def test_two_interruptions_then_resume_end_bit_identical(tmp_path, reference):
    _, first = interrupt(tmp_path, "first", after_step=5)
    _, second = interrupt(tmp_path, "second", after_step=first[0] + 6)
    assert first[0] < second[0] < STEPS
    assert f"rank 1 resumed from step {first[0]}" in log_text(tmp_path, "second", 1)
    process = launch(train_args(tmp_path, "last", checkpoint_every=7))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert_identical(weights(tmp_path / "last.pt"), reference)


# -- a killed rank --------------------------------------------------------------------------


def start_ranks(tmp: Path, name: str, **options) -> list[subprocess.Popen]:
    """Two ranks started by hand (no launcher): only the ranks themselves can notice a death."""
    from ckpt_tasks.distributed import free_port

    port = free_port()
    args = train_args(tmp, name, step_delay=0.05, checkpoint_every=5, **options)
    return [subprocess.Popen([sys.executable, *args], env=rank_environment(rank, 2, port),
                             stderr=(tmp / f"{name}-{rank}.err").open("w")) for rank in (0, 1)]


def test_a_sigkilled_rank_fails_the_other_in_bounded_time_and_the_job_resumes(tmp_path, reference):
    ranks = start_ranks(tmp_path, "killed")
    wait_for(lambda: last_step(tmp_path, "killed") >= 8 or ranks[0].poll() is not None, 60, "training steps")
    ranks[1].kill()
    killed_at = time.monotonic()
    try:
        ranks[0].wait(timeout=15)  # a dead peer closes its connections: no waiting for the timeout
    finally:
        for process in ranks:
            process.kill()
    assert ranks[0].returncode not in (0, 85)
    logger_time = time.monotonic() - killed_at
    assert logger_time < 15
    committed = CheckpointStore(tmp_path / "store").latest()
    assert committed is not None and committed.step % 5 == 0 and committed.step <= last_step(tmp_path, "killed")
    process = launch(train_args(tmp_path, "after", checkpoint_every=5))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert f"rank 0 resumed from step {committed.step}" in log_text(tmp_path, "after", 0)
    assert_identical(weights(tmp_path / "after.pt"), reference)


def test_the_launcher_fails_fast_when_a_rank_is_killed(tmp_path):
    process = launch(train_args(tmp_path, "launched", step_delay=0.05))
    wait_for(lambda: last_step(tmp_path, "launched", 1) >= 3 or process.poll() is not None, 60, "training steps")
    pid = int(re.search(r"rank 1 pid (\d+)", log_text(tmp_path, "launched", 1)).group(1))
    os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 128 + signal.SIGKILL, stderr
    assert time.monotonic() - started < 15
    assert "rank 1 failed with exit 137" in stderr


def test_a_hung_rank_fails_the_other_after_the_timeout(tmp_path):
    ranks = start_ranks(tmp_path, "hung", timeout=8)
    try:
        wait_for(lambda: last_step(tmp_path, "hung") >= 3 or ranks[0].poll() is not None, 60, "training steps")
        assert ranks[0].poll() is None, (tmp_path / "hung-0.err").read_text()
        ranks[1].send_signal(signal.SIGSTOP)  # alive, connections open, never answers
        stopped_at = time.monotonic()
        ranks[0].wait(timeout=40)
        waited = time.monotonic() - stopped_at
    finally:
        for process in ranks:
            process.kill()
    assert ranks[0].returncode not in (0, 85)
    logging.getLogger(__name__).info("the other rank failed %.1f s after SIGSTOP", waited)
    assert 7 < waited < 40, waited  # the collective's timeout (8 s), not for ever


@pytest.mark.parametrize("script, expected", [
    ("exit 85", 85),                                   # every rank stopped with a checkpoint
    ("exit 0", 0),
    ("exit $(( RANK == 0 ? 85 : 0 ))", 1),             # the ranks disagree: not a checkpoint exit
    ("[ $RANK = 1 ] && exit 3; sleep 30", 3),          # the first failure, the other killed after the grace
])
def test_the_launcher_exit_code_is_the_ranks_verdict(script, expected):
    from ckpt_tasks.distributed.launch import launch as launch_ranks

    started = time.monotonic()
    assert launch_ranks(["sh", "-c", script], 2, grace=1) == expected
    assert time.monotonic() - started < 10


def test_a_checkpoint_of_other_parameters_fails_every_rank_saying_why(tmp_path):
    process = launch(train_args(tmp_path, "first", steps=4, checkpoint_every=2))
    assert process.wait(timeout=120) == 0
    other = launch(train_args(tmp_path, "other", seed=8))  # another seed: another training
    _, stderr = other.communicate(timeout=60)
    assert other.returncode == 1, stderr
    # Rank 1 hears why from rank 0 instead of seeing only a lost connection.
    assert "rank 0 could not restore a checkpoint: FingerprintMismatch" in stderr, stderr
