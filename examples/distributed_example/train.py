"""A small DDP training on every rank of a job, checkpointed by DistributedCheckpointer.

    python -m ckpt_tasks.distributed.launch --nproc 2 -- examples/distributed_example/train.py \
        --store /tmp/ckpt --out /tmp/model.pt --log-dir /tmp/logs --step-delay 0.1

(or under torchrun, or with the rank variables set by hand). Each rank logs ``rank R
pid P`` at start, ``rank R step S`` after each step and the checkpointer's ``rank R
stopped after step S`` into ``<log-dir>/rank-R.log``; rank 0 writes the final weights
to ``--out``. Dropout (the global RNG) and input noise (a per-rank generator) differ
between ranks, so a resume is exact only when each rank gets its own RNG states back.
tests/test_distributed.py stops, kills and resumes it.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ckpt_tasks.distributed import DistributedCheckpointer, batches_per_epoch, init_ranks, rank_batches
from ckpt_tasks.state import GeneratorState, TrainingState
from ckpt_tasks.storage.store import CheckpointStore

SAMPLES, FEATURES, CLASSES = 256, 16, 4


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--log-dir", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--checkpoint-every", type=int, default=None)
    parser.add_argument("--agree-every", type=int, default=1)
    parser.add_argument("--agree-sync", action="store_true", help="agree without overlap")
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=7)
    return parser.parse_args()


def main() -> None:
    args = parse()
    info = init_ranks("gloo", timeout=args.timeout)
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, filename=os.path.join(args.log_dir, f"rank-{info.rank}.log"),
                        format="%(asctime)s %(name)s %(message)s")
    log = logging.getLogger("train")
    log.info("rank %d pid %d", info.rank, os.getpid())
    torch.use_deterministic_algorithms(True)
    data = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, FEATURES, generator=data)
    y = torch.randint(0, CLASSES, (SAMPLES,), generator=data)
    torch.manual_seed(args.seed)
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                torch.nn.Linear(32, CLASSES))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(args.seed + 1000 * (info.rank + 1))  # each rank its own dropout masks
    noise = torch.Generator().manual_seed(5000 + info.rank)
    state = TrainingState(model=model, optimizer=optimizer)
    checkpointer = DistributedCheckpointer(
        CheckpointStore(args.store, keep_last=3), state, params={"seed": args.seed, "steps": args.steps},
        checkpoint_every=args.checkpoint_every, agree_every=args.agree_every, overlap=not args.agree_sync,
        rank_objects={"noise": GeneratorState(noise)}, control_timeout=args.timeout, stop_deadline=60.0)
    checkpointer.restore()
    per_epoch = batches_per_epoch(SAMPLES, args.batch_size, info.world_size)
    while state.step < args.steps:
        for index in rank_batches(SAMPLES, args.batch_size, args.seed, state.epoch, info.rank,
                                  info.world_size, state.batch):
            inputs = x[index] + 0.01 * torch.randn(len(index), FEATURES, generator=noise)
            loss = torch.nn.functional.cross_entropy(ddp(inputs), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            state.step, state.batch = state.step + 1, state.batch + 1
            if state.batch == per_epoch:
                state.epoch, state.batch = state.epoch + 1, 0
            log.info("rank %d step %d loss %.6f", info.rank, state.step, loss.item())
            checkpointer.step()
            if state.step >= args.steps:
                break
            time.sleep(args.step_delay)
    checkpointer.close()
    if info.is_coordinator:
        torch.save(model.state_dict(), args.out)
    log.info("rank %d finished at step %d", info.rank, state.step)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
