"""A training on N ranks whose state is sharded with FSDP2 (``fully_shard``), saved and
loaded through ckpt_tasks.distributed.dcp; run by tests/test_distributed_dcp.py.

Every rank logs to ``--log-dir/rank-R.log``: ``loaded S``, ``step S loss L``,
``published S`` (its shard of step S is on the storage), ``finishing S`` and
``committed S`` (rank 0, around its commit), ``saved S in T s``. Rank 0 writes the
full (unsharded) model and optimizer state after loading (``--out-dir/loaded.pt``) and at
the end (``final.pt``), for the tests to compare.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from ckpt_tasks.distributed import init_ranks
from ckpt_tasks.distributed.dcp import StoreWriter, load_sharded, save_sharded
from ckpt_tasks.storage import CheckpointStore, RetryPolicy


class PausingWriter(StoreWriter):
    """The real writer, with pauses after this rank has published its shard, before the
    coordinator's commit and after it: a test double in timing only, so that a kill lands
    at each of those moments."""

    def __init__(self, *args, pause: float, log, **kwargs):
        super().__init__(*args, **kwargs)
        self.pause, self.log = pause, log

    def write_data(self, plan, planner):
        written = super().write_data(plan, planner)
        self.log(f"published {self.step}")
        time.sleep(self.pause)
        return written

    def finish(self, metadata, results):
        self.log(f"finishing {self.step}")  # every rank has published; no manifest yet
        time.sleep(self.pause)
        super().finish(metadata, results)
        self.log(f"committed {self.step}")  # manifest and LATEST written; the other ranks not told yet
        time.sleep(self.pause)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--steps", type=int, required=True, help="train up to this step")
    parser.add_argument("--save-every", type=int, default=0, help="also save every this many steps")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds after publishing a shard")
    parser.add_argument("--log-dir", required=True)
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args()

    info = init_ranks("gloo", timeout=30)
    log_path = Path(args.log_dir) / f"rank-{info.rank}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = log_path.open("a")

    def log(message: str) -> None:
        log_file.write(f"{message}\n")
        log_file.flush()

    log(f"pid {os.getpid()}")
    torch.manual_seed(0)  # the same initial weights on every rank, before sharding
    model = torch.nn.Sequential(torch.nn.Linear(8, args.width), torch.nn.Tanh(),
                                torch.nn.Linear(args.width, args.width), torch.nn.Tanh(),
                                torch.nn.Linear(args.width, 4))
    mesh = init_device_mesh("cpu", (info.world_size,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    store = CheckpointStore(args.store, retry=RetryPolicy(deadline=20, initial_delay=0.1, max_delay=1))
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "step": 0}
    restored = load_sharded(state, store)
    if restored is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        log(f"loaded {state['step']}")
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if restored is not None:
        loaded = dict(zip(("model", "optim"), get_state_dict(model, optimizer, options=full)))
        if info.rank == 0:
            torch.save(loaded, out / "loaded.pt")

    for step in range(state["step"] + 1, args.steps + 1):
        generator = torch.Generator().manual_seed(1000 * step + info.rank)  # a rank's own batch
        inputs = torch.randn(16, 8, generator=generator)
        loss = (model(inputs) - inputs[:, :4].sin()).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        log(f"step {step} loss {loss.item():.6f}")
        if step == args.steps or (args.save_every and step % args.save_every == 0):
            model_sd, optim_sd = get_state_dict(model, optimizer)
            payload = {"model": model_sd, "optim": optim_sd, "step": step}
            metadata = {"world_size": info.world_size}
            started = time.perf_counter()
            if args.pause:
                dcp.save(payload, storage_writer=PausingWriter(store, step, metadata=metadata, pause=args.pause,
                                                               log=log))
            else:
                save_sharded(payload, store, step, metadata=metadata)
            log(f"saved {step} in {time.perf_counter() - started:.3f} s")
    final = dict(zip(("model", "optim"), get_state_dict(model, optimizer, options=full)))
    if info.rank == 0:
        torch.save(final, out / "final.pt")
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
