"""Asynchronous checkpointing: snapshots are copies, one commit at a time, bounded stops."""
from __future__ import annotations

import logging
import os
import threading
import time

import pytest
import torch

from ckpt_tasks.async_checkpoint import BackgroundCommitter, Snapshotter
from ckpt_tasks.state import TrainingState
from ckpt_tasks.storage.store import CheckpointStore, RetryPolicy
from ckpt_tasks.tasks import TaskCheckpointer
from ckpt_tasks.transfer import StoreTransfer


def make_state(width: int = 64) -> TrainingState:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    return TrainingState(model=model, optimizer=optimizer)


def train_step(state: TrainingState) -> None:
    model, optimizer = state.objects["model"], state.objects["optimizer"]
    width = model[0].in_features
    loss = model(torch.randn(8, width)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    state.step += 1


def flat(state_dict) -> torch.Tensor:
    return torch.cat([t.flatten().float() for _, t in sorted(state_dict.items())])


def test_snapshot_is_a_copy_that_later_steps_cannot_change():
    state = make_state()
    train_step(state)
    snapshotter = Snapshotter()
    snapshot = snapshotter.snapshot(state.state_dict())
    before = flat(state.objects["model"].state_dict()).clone()
    for _ in range(3):
        train_step(state)
    assert not torch.equal(flat(state.objects["model"].state_dict()), before)  # training moved on
    assert torch.equal(flat(snapshot["objects"]["model"]), before)  # the snapshot did not
    assert snapshot["objects"]["optimizer"]["state"][0]["exp_avg"].data_ptr() != \
        state.objects["optimizer"].state_dict()["state"][0]["exp_avg"].data_ptr()


def test_snapshot_buffers_are_reused_between_checkpoints():
    state = make_state()
    snapshotter = Snapshotter()
    first = snapshotter.snapshot(state.state_dict())["objects"]["model"]["0.weight"]
    train_step(state)
    second = snapshotter.snapshot(state.state_dict())["objects"]["model"]["0.weight"]
    assert first.data_ptr() == second.data_ptr()  # no new allocation per checkpoint
    assert torch.equal(second, state.objects["model"][0].weight.detach())


def test_background_committer_runs_one_commit_at_a_time_and_reports_errors():
    committer = BackgroundCommitter()
    running, peak, lock = [0], [0], threading.Lock()

    def slow_commit():
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1

    for label in range(4):
        committer.submit(label, slow_commit)
    assert committer.wait()
    assert peak[0] == 1

    committer.submit("bad", lambda: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError, match="disk gone"):
        committer.wait()


def checkpointer_for(tmp_path, state, store: CheckpointStore, **kwargs) -> TaskCheckpointer:
    transfer = StoreTransfer(store, step_of=lambda: state.step, params={"p": 1})
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    return TaskCheckpointer(workdir, state, transfer, checkpoint_every=1, **kwargs)


def test_optimizer_steps_during_a_background_commit_never_leak_into_it(tmp_path, monkeypatch):
    # Test double (named as such): the background torch.save waits until the training
    # thread has taken three more optimizer steps, the race a real run only sometimes shows.
    steps_taken = threading.Event()
    real_save = torch.save

    def delayed_save(obj, path, *args, **kwargs):
        assert steps_taken.wait(30), "the training thread never stepped during the commit"
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", delayed_save)
    state = make_state()
    store = CheckpointStore(tmp_path / "store", keep_last=5)
    checkpointer = checkpointer_for(tmp_path, state, store)
    try:
        train_step(state)
        expected = flat(state.objects["model"].state_dict()).clone()
        checkpointer.step(state)  # snapshot of step 1, commit in the background
        assert checkpointer.committer.busy, "the commit was not in the background"
        for _ in range(3):
            train_step(state)  # the loop goes on and changes the live weights
        steps_taken.set()
        checkpointer.committer.wait()
    finally:
        checkpointer.close()
    monkeypatch.setattr(torch, "save", real_save)
    committed = store.latest()
    assert committed.step == 1
    restored = make_state()
    store.fetch(committed, tmp_path / "back.pt")
    restored.load(tmp_path / "back.pt")
    assert restored.step == 1
    assert torch.equal(flat(restored.objects["model"].state_dict()), expected)


def test_final_commit_past_the_deadline_keeps_the_newest_committed_and_says_what_is_lost(
        tmp_path, make_xrootd_server, caplog):
    server = make_xrootd_server()
    state = make_state()
    # A short retry deadline, so the abandoned commit ends soon after the stop gave up on it.
    store = CheckpointStore(f"{server.url}//run", keep_last=3, retry=RetryPolicy(deadline=5))
    checkpointer = checkpointer_for(tmp_path, state, store, stop_deadline=3)
    try:
        train_step(state)
        checkpointer.step(state)
        checkpointer.committer.wait()
        assert store.latest().step == 1
        for _ in range(4):
            train_step(state)
        server.stop()  # the storage goes away during the last commit
        started = time.monotonic()
        with caplog.at_level(logging.ERROR):
            checkpointer.committer.save_final(state)
        elapsed = time.monotonic() - started
    finally:
        # The abandoned commit must not outlive this test (and its server).
        try:
            checkpointer.committer.wait(timeout=60)
        except Exception:
            pass  # it failed, as it should with the server down
        checkpointer.close()
    assert elapsed < 6, f"the stop took {elapsed:.1f} s with a 3 s deadline"
    assert "final checkpoint of step 5 was not committed" in caplog.text
    assert "newest committed checkpoint is step 1" in caplog.text
    server.start()
    time.sleep(3)  # the client avoids a failed server for a few seconds
    assert CheckpointStore(f"{server.url}//run").latest().step == 1
    assert CheckpointStore(f"{server.url}//run").verify().step == 1


def test_the_final_commit_leaves_retention_to_the_next_run(tmp_path):
    state = make_state()
    store = CheckpointStore(tmp_path / "store", keep_last=1)
    checkpointer = checkpointer_for(tmp_path, state, store)
    try:
        train_step(state)
        checkpointer.step(state)  # an interval commit of step 1
        checkpointer.flush()
        train_step(state)
        checkpointer.committer.save_final(state)  # what a SIGTERM commits
    finally:
        checkpointer.close()
    assert [c.step for c in store.list()] == [1, 2], "the stop spent its time deleting step 1"
    assert [c.metadata["reason"] for c in store.list()] == ["interval", "signal"]


def test_interval_commits_yield_the_cpu_and_a_final_commit_does_not():
    def nice_of_commit(**kwargs) -> int:
        seen = []
        committer = BackgroundCommitter()
        committer.submit("c", lambda: seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())),
                         **kwargs)
        committer.wait()
        return seen[0]

    mine = os.getpriority(os.PRIO_PROCESS, 0)
    if mine >= 10:
        pytest.skip(f"this process already runs at nice {mine}")
    assert nice_of_commit() == 10  # the training keeps the CPU
    assert nice_of_commit(yield_cpu=False) == mine  # the training is waiting for this one
