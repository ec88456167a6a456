"""The cost of the agreed stop per training step, with 2 ranks (gloo, CPU).

    python benchmarks/bench_distributed.py [--hidden 1536] [--steps 20] [--pairs 6] [--every 1]

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


def main() -> int:
    options = parse()
    if "WORLD_SIZE" in os.environ:
        rank_main(options)
        return 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.call([sys.executable, "-m", "ckpt_tasks.distributed.launch", "--nproc", str(options.nproc),
                            "--", __file__, *sys.argv[1:]], env=env)


if __name__ == "__main__":
    sys.exit(main())
