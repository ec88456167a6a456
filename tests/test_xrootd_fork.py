"""fork() while XRootD transfers run: no hang, and forked children still reach the server.

Without ``ForkGate`` the first test hangs inside ``fork()`` within its first few
forks (XRootD client 6.2.1 and 5.9.9 alike); the child script runs in its own
process so that a hang fails the test after a timeout instead of stopping the suite.
"""
from __future__ import annotations

import textwrap
import threading
import time
from pathlib import Path

from ckpt_tasks.storage.xrootd_fork import ForkGate
from waiting import run_python

ROOT = Path(__file__).resolve().parents[1]


def run_script(body: str, *args: str, timeout: float = 90) -> str:
    return run_python("-c", textwrap.dedent(body), *args, timeout=timeout, cwd=ROOT)


def test_forks_while_another_thread_uploads_do_not_hang(tmp_path, xrootd_server):
    out = run_script("""
        import os, sys, threading, time
        from ckpt_tasks.storage.xrootd import XRootDFileInterface
        storage = XRootDFileInterface(sys.argv[1])
        local = os.path.join(sys.argv[2], "payload.bin")
        with open(local, "wb") as handle:
            handle.write(os.urandom(4 << 20))
        stop, uploads = threading.Event(), [0]
        def upload_loop():
            while not stop.is_set():
                storage.upload(local, "/fork/payload.bin")
                storage.exists("/fork/missing.bin")
                uploads[0] += 1
        thread = threading.Thread(target=upload_loop)
        thread.start()
        forks, end = 0, time.monotonic() + 8
        while time.monotonic() < end:
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
            forks += 1
        stop.set(); thread.join()
        print(forks, uploads[0])
        """, xrootd_server.url, str(tmp_path))
    forks, uploads = map(int, out.split())
    assert forks >= 5 and uploads >= 5, out


def test_a_forked_child_still_talks_to_the_server(tmp_path, xrootd_server):
    out = run_script("""
        import os, sys
        from ckpt_tasks.storage.xrootd import XRootDFileInterface
        storage = XRootDFileInterface(sys.argv[1])
        local = os.path.join(sys.argv[2], "small.txt")
        with open(local, "w") as handle:
            handle.write("parent")
        storage.upload(local, "/forked/parent.txt")  # the client is in use before the fork
        pid = os.fork()
        if pid == 0:
            # law's workers are forked processes that use the storage of their parent's tasks.
            content = storage.read_bytes("/forked/parent.txt")
            os._exit(0 if content == b"parent" else 3)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
        """, xrootd_server.url, str(tmp_path), timeout=60)
    assert out.split() == ["0"], out


def test_a_fork_waits_for_the_operation_in_flight_and_holds_new_ones_back():
    gate = ForkGate()
    events: list[str] = []
    in_flight = threading.Event()

    def operation(name: str, hold: float, started: threading.Event | None = None) -> None:
        with gate.operation():
            events.append(f"{name} start")
            if started:
                started.set()
            time.sleep(hold)
            events.append(f"{name} end")

    first = threading.Thread(target=operation, args=("first", 0.4, in_flight))
    first.start()
    in_flight.wait(5)
    forker_started = time.monotonic()
    late = threading.Thread(target=operation, args=("late", 0.0))

    def start_late_once_the_fork_waits() -> None:
        time.sleep(0.1)
        late.start()

    starter = threading.Thread(target=start_late_once_the_fork_waits)
    starter.start()
    gate.before_fork()
    events.append("fork")
    waited = time.monotonic() - forker_started
    gate.after_fork_in_parent()
    for thread in (first, starter, late):
        thread.join(5)
    assert waited >= 0.3, waited
    # The operation that came while the fork waited ran only after the fork.
    assert events == ["first start", "first end", "fork", "late start", "late end"], events


def test_nested_operations_and_a_fork_from_inside_one_do_not_wait_for_themselves():
    gate = ForkGate()
    with gate.operation():
        with gate.operation():
            started = time.monotonic()
            gate.before_fork()  # would wait forever if it counted this thread's own operation
            gate.after_fork_in_parent()
    assert time.monotonic() - started < 1.0
    # The gate is free again: a fork outside any operation goes through.
    gate.before_fork()
    gate.after_fork_in_parent()


def test_a_dataloader_forking_workers_beside_async_xrootd_commits(tmp_path, xrootd_server):
    # What a user's training does: a DataLoader forks its workers every epoch while
    # the background thread commits checkpoints to XRootD. An end-to-end check; the
    # hang itself is reproduced by the fork loop above (this run rarely hits the window).
    out = run_script("""
        import sys
        from pathlib import Path
        import torch
        from ckpt_tasks.state import TrainingState
        from ckpt_tasks.storage.store import CheckpointStore
        from ckpt_tasks.tasks import TaskCheckpointer
        from ckpt_tasks.transfer import StoreTransfer
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(8)])
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        state = TrainingState(model=model, optimizer=optimizer)
        store = CheckpointStore(sys.argv[1] + "//dataloader", keep_last=2)
        transfer = StoreTransfer(store, step_of=lambda: state.step, params={"test": 1})
        ckpt = TaskCheckpointer(Path(sys.argv[2]), state, transfer, asynchronous=True, checkpoint_every=2)
        data = torch.utils.data.TensorDataset(torch.randn(64, 512))
        for epoch in range(12):
            loader = torch.utils.data.DataLoader(data, batch_size=16, num_workers=2)
            for (batch,) in loader:
                loss = model(batch).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                state.step += 1
                ckpt.step(state)
        ckpt.flush()
        ckpt.close()
        print(state.step, store.latest().step)
        """, xrootd_server.url, str(tmp_path), timeout=150)
    steps, committed = map(int, out.split())
    # Every epoch ran, and the newest commit is no older than one checkpoint interval.
    assert steps == 48 and 0 <= steps - committed < 2, out
