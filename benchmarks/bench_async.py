"""Asynchronous checkpointing against its baselines, each a ratio measured in one run.

    python benchmarks/bench_async.py [--state-mib 400] [--throughput-seconds 120] [--repeat 5]

1. Stall of the training loop per checkpoint: async (snapshot only) and sync
   (serialise + commit) against a bare copy of the state dict to CPU.
   Goal: async stall <= 1.5x the bare copy.
2. Training throughput with a checkpoint every 10 s against none. Goal: >= 95 %.
   One training, in pairs of 10 s windows, one with a checkpoint and one without
   (see ``bench_throughput``). Measured twice: training on every core (a CPU-only
   training, where serialising, uploading and the local XRootD server take CPU
   from it) and on all cores but one (the loop waits on a GPU, or a core is left
   for I/O).
3. Stop on SIGTERM: the final commit (wait for the one in flight, snapshot,
   serialise, commit to XRootD) against a snapshot plus a raw ``xrdcp`` of the
   same bytes. Goal: <= 1.2x.

It starts its own XRootD server on a free loopback port (Debian's xrootd-server).
On a pool the storage is another machine; here the server runs on the same cores,
so its CPU counts against the training. Its files go to memory (/dev/shm) by
default, since a remote storage's disk writes are not the worker's;
``--server-data disk`` puts them on this machine's disk, whose writeback then
counts too.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from ckpt_tasks.state import TrainingState  # noqa: E402
from ckpt_tasks.storage.store import CheckpointStore  # noqa: E402
from ckpt_tasks.tasks import TaskCheckpointer  # noqa: E402
from ckpt_tasks.transfer import StoreTransfer  # noqa: E402
from xrootd_server import XRootDServer  # noqa: E402


def make_state(state_mib: int) -> TrainingState:
    # Linear layers of width w hold w*w floats; with SGD momentum the state doubles.
    width = 2048
    layers = max(1, round(state_mib * 2**20 / 2 / (width * width * 4)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    state = TrainingState(model=model, optimizer=optimizer)
    train_step(state)  # creates the momentum buffers
    return state


def state_bytes(state: TrainingState) -> int:
    total = 0

    def walk(value):
        nonlocal total
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(state.state_dict()["objects"])
    return total


def train_step(state: TrainingState) -> None:
    model, optimizer = state.objects["model"], state.objects["optimizer"]
    loss = model(torch.randn(16, model[0].in_features)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    state.step += 1


def checkpointer(workdir: Path, state: TrainingState, location: str, asynchronous: bool) -> TaskCheckpointer:
    store = CheckpointStore(location, keep_last=2)
    transfer = StoreTransfer(store, step_of=lambda: state.step, params={"bench": 1})
    workdir.mkdir(parents=True, exist_ok=True)
    return TaskCheckpointer(workdir, state, transfer, asynchronous=asynchronous, checkpoint_every=10**9)


def bare_copy(state: TrainingState):
    def copy(value):
        if isinstance(value, torch.Tensor):
            return value.detach().to("cpu", copy=True)
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [copy(v) for v in value]
        return value

    return copy(state.state_dict())


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_stall(state, tmp: Path, server_url: str, repeat: int) -> dict:
    sync = checkpointer(tmp / "sync", state, f"{server_url}//stall-sync", asynchronous=False)
    async_ = checkpointer(tmp / "async", state, f"{server_url}//stall-async", asynchronous=True)
    results = {"bare": [], "async": [], "sync": []}
    try:
        for _ in range(repeat):
            train_step(state)
            results["bare"].append(timed(lambda: bare_copy(state)))
            async_.committer.wait()  # measure the snapshot, not a wait for the previous commit
            results["async"].append(timed(lambda: async_.committer.save(state)))
            async_.committer.wait()
            results["sync"].append(timed(lambda: sync.committer.save(state)))
    finally:
        sync.close()
        async_.close()
    return {k: statistics.median(v) for k, v in results.items()}


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_throughput(state, tmp: Path, server: XRootDServer, seconds: float, interval: float,
                     threads: int) -> dict:
    """Steps per second with a checkpoint every ``interval`` s against none, training on ``threads``.

    One training runs for about ``seconds`` in pairs of windows of ``interval`` seconds:
    a window that begins with a checkpoint (the snapshot in the loop, the commit in the
    background, which ends inside the window: a busy committer extends it) and a
    window without, in alternating order. A checkpoint window is one period of a
    training that checkpoints every ``interval`` s. Alternating at that grain cancels the drift of a
    shared machine's speed, which separate runs of minutes measure as a difference.
    Each window ends at a step boundary, and its rate is its steps over its exact time.
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    ckpt = checkpointer(tmp / f"tp-{threads}", state, f"{server.url}//tp-{threads}", asynchronous=True)
    steps = {True: 0, False: 0}
    elapsed = {True: 0.0, False: 0.0}
    pair_ratios, extended, server_cpu = [], 0, 0.0
    try:
        train_step(state)
        ckpt.committer.save(state)  # warm-up: from here on the snapshot reuses its buffers, as in a long training
        ckpt.committer.wait()
        settle()
        rates = {}
        for window in range(2 * max(1, round(seconds / (2 * interval)))):
            # Pairs alternate which window comes first, so a drift favours neither.
            with_checkpoint = (window % 2 == 0) == (window // 2 % 2 == 0)
            before = process_cpu_seconds(server.process.pid)
            count, start, waited = 0, time.perf_counter(), False
            while True:
                train_step(state)
                count += 1
                if with_checkpoint and count == 1:
                    ckpt.committer.save(state)  # due at the end of the window's first step
                if time.perf_counter() - start >= interval:
                    if not (with_checkpoint and ckpt.committer.busy):
                        break
                    waited = True
            took = time.perf_counter() - start
            extended += waited
            steps[with_checkpoint] += count
            elapsed[with_checkpoint] += took
            rates[with_checkpoint] = count / took
            if with_checkpoint:
                server_cpu += process_cpu_seconds(server.process.pid) - before
            if window % 2 == 1:
                pair_ratios.append(rates[True] / rates[False])
        ckpt.committer.wait()
    finally:
        ckpt.close()
        torch.set_num_threads(previous_threads)
    pairs = len(pair_ratios)
    return {"with": steps[True] / elapsed[True], "without": steps[False] / elapsed[False],
            "threads": threads, "pairs": pairs, "pair_ratios": pair_ratios, "extended": extended,
            "server_cpu": server_cpu / pairs}


def settle() -> None:
    """Write back what the previous measurement left dirty and let the machine go quiet."""
    os.sync()
    time.sleep(1.0)


def bench_stop(state, tmp: Path, server_url: str, repeat: int, in_flight: bool) -> dict:
    times: dict[str, list[float]] = {"ours": [], "raw": []}
    for attempt in range(repeat):
        name = f"stop-{attempt}-{in_flight}"
        local = tmp / f"raw-{attempt}.pt"

        def ours():
            ckpt = checkpointer(tmp / name, state, f"{server_url}//{name}", asynchronous=True)
            try:
                settle()
                train_step(state)
                if in_flight:
                    ckpt.committer.save(state)      # a commit in flight when the signal comes
                    train_step(state)
                times["ours"].append(timed(lambda: ckpt.committer.save_final(state)))
            finally:
                ckpt.close()

        def raw():
            # baseline: snapshot + the same bytes, serialised, through raw xrdcp
            def baseline():
                snapshot = bare_copy(state)
                torch.save(snapshot, local)
                subprocess.run(["xrdcp", "-s", "-f", str(local), f"{server_url}//raw-{attempt}.pt"], check=True)
            settle()
            times["raw"].append(timed(baseline))

        for measure in (ours, raw) if attempt % 2 == 0 else (raw, ours):
            measure()
    return {"ours": statistics.median(times["ours"]), "raw": statistics.median(times["raw"]), "times": times}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-mib", type=int, default=400, help="size of model + optimizer state")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions of the stall and stop measures")
    parser.add_argument("--throughput-seconds", type=float, default=120.0,
                        help="length of each throughput measure: alternating windows of --interval s")
    parser.add_argument("--interval", type=float, default=10.0, help="checkpoint interval for throughput")
    parser.add_argument("--server-data", choices=("memory", "disk"), default="memory",
                        help="where the XRootD server keeps its files: /dev/shm, or the temporary directory")
    args = parser.parse_args()

    in_memory = args.server_data == "memory" and Path("/dev/shm").is_dir()
    server = XRootDServer(directory="/dev/shm" if in_memory else None).start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            state = make_state(args.state_mib)
            size = state_bytes(state)
            stall = bench_stall(state, tmp, server.url, args.repeat)
            cores = os.cpu_count() or 1
            # All cores train (a CPU-only training: any background work competes with it), and
            # one core left free (the loop waits on a GPU, or one core is kept for I/O).
            throughputs = [bench_throughput(state, tmp, server, args.throughput_seconds, args.interval, threads)
                           for threads in sorted({cores, max(1, cores - 1)}, reverse=True)]
            stop = bench_stop(state, tmp, server.url, args.repeat, in_flight=False)
            stop_busy = bench_stop(state, tmp, server.url, args.repeat, in_flight=True)
    finally:
        server.cleanup()

    print(f"state: {size / 2**20:.0f} MiB of tensors, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU; the XRootD server's files in "
          f"{'memory' if in_memory else 'the temporary directory'} ({server.data_dir})\n")
    print("| measure | ours | baseline | ratio | goal |")
    print("|---|---|---|---|---|")
    print(f"| stall per checkpoint, async | {stall['async']:.3f} s | bare copy {stall['bare']:.3f} s "
          f"| {stall['async'] / stall['bare']:.2f}x | <= 1.5x |")
    print(f"| stall per checkpoint, sync | {stall['sync']:.3f} s | bare copy {stall['bare']:.3f} s "
          f"| {stall['sync'] / stall['bare']:.2f}x | (for comparison) |")
    for throughput in throughputs:
        print(f"| throughput, checkpoint every {args.interval:g} s, training on {throughput['threads']} of "
              f"{os.cpu_count()} cores | {throughput['with']:.2f} steps/s | none {throughput['without']:.2f} steps/s "
              f"| {100 * throughput['with'] / throughput['without']:.1f} % | >= 95 % |")
    print(f"| SIGTERM to committed final checkpoint | {stop['ours']:.3f} s | snapshot + xrdcp "
          f"{stop['raw']:.3f} s | {stop['ours'] / stop['raw']:.2f}x | <= 1.2x |")
    print(f"| same, a commit in flight when SIGTERM comes | {stop_busy['ours']:.3f} s | snapshot + xrdcp "
          f"{stop_busy['raw']:.3f} s | {stop_busy['ours'] / stop_busy['raw']:.2f}x | (worst case) |")
    for throughput in throughputs:
        print(f"\ntraining on {throughput['threads']} threads: {throughput['pairs']} pairs of {args.interval:g} s "
              f"windows; {throughput['extended']} checkpoint windows waited for their commit past "
              f"{args.interval:g} s; the XRootD server (on this machine) used {throughput['server_cpu']:.2f} s "
              f"of CPU per checkpoint window")
        print("  with/without per pair:", [round(r, 3) for r in throughput["pair_ratios"]])
    for label, result in (("stop", stop), ("stop, commit in flight", stop_busy)):
        print(f"{label} (s), ours, baseline:", [round(t, 2) for t in result["times"]["ours"]],
              [round(t, 2) for t in result["times"]["raw"]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
