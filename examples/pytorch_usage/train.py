"""Train a tiny PyTorch model that resumes exactly where it was stopped.

A linear regression on synthetic data (fixed seed). After every batch the whole
training state goes to :class:`ckpt_tasks.Checkpointer`: the model's and the
optimizer's state dicts and the position (epoch, next batch). The data order of
an epoch depends only on the seed and the epoch number, so a run that is
stopped any number of times ends with the same weights, bit for bit, as one
that never stopped.

The checkpoint is written with ``torch.save`` and read back with
``torch.load(..., weights_only=True)``, which never executes pickled code: a
checkpoint that comes from shared storage cannot run anything on load.

    python train.py --epochs 3 --sleep 0.2
    ^C                                 # exits with code 85 after checkpointing
    python train.py --epochs 3 --sleep 0.2
    restored epoch 1 batch 5
    ...
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from ckpt_tasks import Checkpointer

N_FEATURES = 3


def save(path: Path, state: dict) -> None:
    torch.save(state, path)


def load(path: Path) -> dict:
    # weights_only=True: tensors, dicts, lists and numbers only, no code.
    return torch.load(path, weights_only=True)


def make_data(seed: int, n_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy samples of y = x . w + b for fixed w, b; the same for a given seed."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples, N_FEATURES, generator=gen)
    true_w = torch.tensor([[2.0], [-3.0], [0.5]])
    y = x @ true_w + 1.0 + 0.01 * torch.randn(n_samples, 1, generator=gen)
    return x, y


def snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer, epoch: int, batch: int) -> dict:
    """Training state *after* a batch, as an independent copy.

    The checkpointer keeps the value until it is written (on SIGTERM perhaps
    only after further batches ran), and ``state_dict()`` returns live views of
    the parameters: without the copy the checkpoint could mix two steps.
    """
    return {
        "epoch": epoch,
        "batch": batch,  # the next batch to train
        "model": copy.deepcopy(model.state_dict()),
        "optimizer": copy.deepcopy(optimizer.state_dict()),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batches", type=int, default=8, help="batches per epoch")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sleep", type=float, default=0.0, help="extra seconds per batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=1, help="in batches")
    parser.add_argument("--file", type=Path, default=Path("checkpoint.pt"), help="local checkpoint file")
    parser.add_argument(
        "--mode",
        choices=["None", "shared"],
        default="None",
        help="None: the local file is persistent; shared: copy it to --target",
    )
    parser.add_argument("--target", type=Path, help="checkpoint path on shared storage (--mode shared)")
    parser.add_argument("--output", type=Path, help="where to write the trained weights at the end")
    args = parser.parse_args(argv)
    if args.mode == "shared" and args.target is None:
        parser.error("--mode shared needs --target")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.target is not None:
        args.target.parent.mkdir(parents=True, exist_ok=True)

    x, y = make_data(args.seed, args.batches * args.batch_size)
    torch.manual_seed(args.seed)  # the model's initial weights
    model = torch.nn.Linear(N_FEATURES, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    ckpt = Checkpointer(
        local_checkpoint_file=args.file,
        checkpoint_function=save,
        restore_function=load,
        checkpoint_transfer_mode=args.mode,
        checkpoint_transfer_target=args.target,
        checkpoint_every=args.checkpoint_every,
    )
    state = ckpt.restore(None)
    if state is None:
        start_epoch, start_batch = 0, 0
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, start_batch = state["epoch"], state["batch"]
    print(f"restored epoch {start_epoch} batch {start_batch}", flush=True)

    for epoch in range(start_epoch, args.epochs):
        # The shuffle depends on (seed, epoch) only, so a resumed epoch sees
        # its batches in the same order as an uninterrupted one.
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed + epoch))
        first = start_batch if epoch == start_epoch else 0
        for batch in range(first, args.batches):
            idx = order[batch * args.batch_size : (batch + 1) * args.batch_size]
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()

            # Store the position of the next batch; the end of an epoch is
            # stored as the start of the next one.
            if batch + 1 == args.batches:
                ckpt.step(snapshot(model, optimizer, epoch + 1, 0))
            else:
                ckpt.step(snapshot(model, optimizer, epoch, batch + 1))
            print(f"epoch {epoch} batch {batch} loss {loss.item():.6f}", flush=True)
            time.sleep(args.sleep)

    if args.output is not None:
        torch.save(model.state_dict(), args.output)
    print(f"done weight {model.weight.detach().flatten().tolist()} bias {model.bias.item():.4f}", flush=True)


if __name__ == "__main__":
    main()
