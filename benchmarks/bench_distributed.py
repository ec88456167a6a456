"""The cost of the agreed stop per training step, and of a checkpoint, on 1 and 2 ranks (gloo, CPU).

    python benchmarks/bench_distributed.py [--hidden 1536] [--steps 20] [--pairs 6] [--every 1]
    python benchmarks/bench_distributed.py --checkpoints [--hidden 1536] [--saves 5] [--store DIR|URL]

Each rank trains the same DDP model (a step of tens of milliseconds on one CPU thread
per rank). Two measures, both from one run:

1. time inside ``StopAgreement.agree`` per step (the all_reduce of the flags on its own
   gloo group) against the mean step time: the direct cost;
2. mean step time of windows of ``--steps`` steps with the agreement against windows
   without, in alternating pairs (the order alternates too): the cost as the training
   sees it, noisier on a shared machine;
3. the median step time of steps with the agreement against steps without, taken in
   turn (one with, one without): load that drifts during the run hits both alike.

Goal: at most 1 % of a step. The launcher starts the ranks (``--nproc 2``); rank 0
prints a Markdown table.

With ``--checkpoints``: per checkpoint, the stall (the time the training loop is held
in the save call, the slowest rank's) and the commit time (from the save call until the
checkpoint is committed: manifest and ``LATEST`` written), on 1 and on 2 ranks, for

- replicated state (DDP) through ``DistributedCheckpointer``: rank 0 writes it once,
  in the background (``asynchronous=True``, the default: the loop pays for the gather of
  the ranks' RNG states and an in-memory snapshot) or in the loop (``asynchronous=False``);
- sharded state (FSDP2 ``fully_shard``) through ``ckpt_tasks.distributed.dcp.save_sharded``:
  every rank writes its shard, synchronously.

The model is an MLP with Adam (weights and two moments: 12 bytes per parameter).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse(args=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1536, help="hidden units of the model; default: 1536")
    parser.add_argument("--batch", type=int, default=64, help="batch per rank; default: 64")
    parser.add_argument("--steps", type=int, default=20, help="steps per window; default: 20")
    parser.add_argument("--pairs", type=int, default=6, help="pairs of windows; default: 6")
    parser.add_argument("--every", type=int, default=1, help="agree every N steps; default: 1")
    parser.add_argument("--no-overlap", action="store_true",
                        help="agree synchronously instead of while the next step trains")
    parser.add_argument("--nproc", type=int, default=2, help="ranks; default: 2")
    parser.add_argument("--checkpoints", action="store_true",
                        help="measure the stall and commit time of checkpoints on 1 and 2 ranks instead")
    parser.add_argument("--saves", type=int, default=5, help="checkpoints per kind (--checkpoints); default: 5")
    parser.add_argument("--store", default=None,
                        help="where the checkpoints go (--checkpoints; a directory or root:// URL); default: a "
                             "temporary directory")
    return parser.parse_args(args)


def rank_main(options: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from ckpt_tasks.distributed import StopAgreement, init_ranks
    from ckpt_tasks.distributed.ranks import control_group

    torch.set_num_threads(1)
    info = init_ranks("gloo", timeout=60)
    torch.manual_seed(0)
    width = options.hidden
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                                torch.nn.ReLU(), torch.nn.Linear(width, 10))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    agreement = StopAgreement(control_group(60), options.every, overlap=not options.no_overlap)
    x, y = torch.randn(options.batch, width), torch.randint(0, 10, (options.batch,))
    step = 0
    agree_seconds: list[float] = []

    def window(agree: bool) -> float:
        nonlocal step
        dist.barrier()
        started = time.perf_counter()
        for _ in range(options.steps):
            loss = torch.nn.functional.cross_entropy(ddp(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if agree:
                before = time.perf_counter()
                agreement.agree(step)
                agree_seconds.append(time.perf_counter() - before)
        return (time.perf_counter() - started) / options.steps

    def alternating() -> tuple[list[float], list[float]]:
        # Steps with and without the agreement in turn: load that drifts hits both alike.
        nonlocal step
        times: tuple[list[float], list[float]] = ([], [])
        dist.barrier()
        for index in range(2 * options.steps * options.pairs):
            started = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(ddp(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if index % 2:
                agreement.agree(step)
            times[index % 2].append(time.perf_counter() - started)
        return times

    window(False)  # warm-up
    pairs = []
    for index in range(options.pairs):
        order = (True, False) if index % 2 else (False, True)
        times = dict((agree, window(agree)) for agree in order)
        pairs.append((times[True], times[False]))
    without_steps, with_steps = alternating()
    agreement.finish()
    if info.is_coordinator:
        report(options, pairs, agree_seconds)
        print(f"| step time, median of alternating steps | {statistics.median(with_steps) * 1e3:.1f} ms "
              f"| {statistics.median(without_steps) * 1e3:.1f} ms "
              f"| {statistics.median(with_steps) / statistics.median(without_steps) - 1:+.2%} | <= 1 % |")
    dist.destroy_process_group()


def report(options: argparse.Namespace, pairs: list[tuple[float, float]], agree_seconds: list[float]) -> None:
    import torch

    with_agree = statistics.median(p[0] for p in pairs)
    without = statistics.median(p[1] for p in pairs)
    ratios = [p[0] / p[1] for p in pairs]
    inside = sum(agree_seconds) / len(agree_seconds)  # per step, counting the steps that skip it
    print(f"{options.nproc} ranks, gloo on the CPU, 1 thread each, torch {torch.__version__}; model "
          f"{options.hidden}x{options.hidden}x2 MLP, batch {options.batch} per rank; agreement every "
          f"{options.every} step(s), {'synchronous' if options.no_overlap else 'overlapped'}; "
          f"{options.pairs} pairs of {options.steps}-step windows\n")
    print("| measure | with agreement | without | ratio | goal |")
    print("|---|---|---|---|---|")
    median = statistics.median(agree_seconds)
    print(f"| time in `agree` per step, mean | {inside * 1e3:.3f} ms | step {without * 1e3:.1f} ms "
          f"| {inside / without:.2%} | <= 1 % |")
    print(f"| time in `agree` per step, median | {median * 1e3:.3f} ms | step {without * 1e3:.1f} ms "
          f"| {median / without:.2%} | <= 1 % |")
    print(f"| step time, median of windows | {with_agree * 1e3:.1f} ms | {without * 1e3:.1f} ms "
          f"| {with_agree / without - 1:+.2%} | <= 1 % |")
    print(f"| with/without per pair of windows | {', '.join(f'{r:.3f}' for r in ratios)} | | | |")


# -- checkpoints ---------------------------------------------------------------------------------------


def _mlp(width: int):
    import torch

    torch.manual_seed(0)  # the same initial weights on every rank
    return torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                               torch.nn.ReLU(), torch.nn.Linear(width, 10))


def _slowest(seconds: float) -> float:
    """The largest of the ranks' ``seconds`` (a collective)."""
    import torch
    import torch.distributed as dist

    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value[0])


def _train_step(model, optimizer, x, y) -> None:
    import torch

    loss = torch.nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _replicated(options, info, store, asynchronous: bool) -> tuple[list[float], list[float], int]:
    import torch

    from ckpt_tasks.distributed import DistributedCheckpointer
    from ckpt_tasks.state import TrainingState

    model = _mlp(options.hidden)
    forward = torch.nn.parallel.DistributedDataParallel(model) if info.world_size > 1 else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    state = TrainingState(model=model, optimizer=optimizer)
    checkpointer = DistributedCheckpointer(store, state, asynchronous=asynchronous, control_timeout=300)
    checkpointer.agreement.uninstall()  # no stop signals here
    x, y = torch.randn(options.batch, options.hidden), torch.randint(0, 10, (options.batch,))
    stalls, commits = [], []
    for _ in range(options.saves + 1):  # the first one warms up (buffers, connections)
        _train_step(forward, optimizer, x, y)
        state.step += 1
        started = time.perf_counter()
        checkpointer.save()
        held = time.perf_counter() - started
        checkpointer.background.wait()
        committed = time.perf_counter() - started
        stalls.append(_slowest(held))
        commits.append(_slowest(committed))
    checkpointer.close()
    size = store.latest().size if info.is_coordinator else 0
    return stalls[1:], commits[1:], size


def _sharded(options, info, store) -> tuple[list[float], list[float], int]:
    import torch
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ckpt_tasks.distributed.dcp import save_sharded

    model = _mlp(options.hidden)
    mesh = init_device_mesh("cpu", (info.world_size,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(options.batch, options.hidden), torch.randint(0, 10, (options.batch,))
    times = []
    for step in range(1, options.saves + 2):
        _train_step(model, optimizer, x, y)
        started = time.perf_counter()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        save_sharded({"model": model_sd, "optim": optim_sd, "step": step}, store, step)
        times.append(_slowest(time.perf_counter() - started))
    size = store.latest().size if info.is_coordinator else 0
    return times[1:], times[1:], size  # synchronous: the loop is held until the commit


def checkpoint_rank_main(options: argparse.Namespace) -> None:
    """One rank of the checkpoint benchmark: every kind in turn, into a store of its own."""
    import torch
    import torch.distributed as dist

    from ckpt_tasks.distributed import init_ranks
    from ckpt_tasks.storage.store import CheckpointStore

    torch.set_num_threads(1)
    info = init_ranks("gloo", timeout=300)
    base = options.store.rstrip("/")
    results = []
    for kind, run in (("replicated, background commit", lambda s: _replicated(options, info, s, True)),
                      ("replicated, in the loop", lambda s: _replicated(options, info, s, False)),
                      ("sharded (FSDP2, DCP)", lambda s: _sharded(options, info, s))):
        where = f"{base}/{info.world_size}-ranks-{len(results)}"
        results.append((kind, *run(CheckpointStore(where, keep_last=2))))
    if info.is_coordinator:
        for kind, stalls, commits, size in results:
            print(f"| {info.world_size} | {kind} | {size / 2**20:.1f} MiB | {statistics.median(stalls) * 1e3:.0f} ms "
                  f"| {statistics.median(commits) * 1e3:.0f} ms | {max(commits) * 1e3:.0f} ms |", flush=True)
    dist.destroy_process_group()


def _without_store(argv: list[str]) -> list[str]:
    """``argv`` less its ``--store X`` / ``--store=X`` (each run gets a store of its own)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--store":
            skip = True
        elif not arg.startswith("--store="):
            kept.append(arg)
    return kept


def checkpoints(options: argparse.Namespace, env: dict) -> int:
    """The checkpoint benchmark on 1 and 2 ranks, each started by the launcher."""
    import tempfile

    import torch

    print(f"gloo on the CPU, 1 thread per rank, torch {torch.__version__}; MLP {options.hidden}x{options.hidden}"
          f"x2 with Adam; median of {options.saves} checkpoints after one warm-up\n")
    print("| ranks | state | checkpoint | stall (median) | commit (median) | commit (max) |")
    print("|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as scratch:
        store = options.store or scratch
        argv = _without_store(sys.argv[1:])
        for nproc in (1, 2):
            code = subprocess.call([sys.executable, "-m", "ckpt_tasks.distributed.launch", "--nproc", str(nproc),
                                    "--", __file__, *argv, "--store", f"{store.rstrip('/')}/run-{nproc}"],
                                   env=env)
            if code:
                return code
    return 0


def main() -> int:
    options = parse()
    if "WORLD_SIZE" in os.environ:
        (checkpoint_rank_main if options.checkpoints else rank_main)(options)
        return 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if options.checkpoints:
        return checkpoints(options, env)
    return subprocess.call([sys.executable, "-m", "ckpt_tasks.distributed.launch", "--nproc", str(options.nproc),
                            "--", __file__, *sys.argv[1:]], env=env)


if __name__ == "__main__":
    sys.exit(main())
