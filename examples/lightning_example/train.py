"""A PyTorch Lightning training on the digits data that survives being killed.

    python train.py --store /tmp/ckpt-lightning --epochs 4 --step-delay 0.05
    ^C or kill -TERM <pid>       # commits a checkpoint at the end of the batch, exits 85
    python train.py --store /tmp/ckpt-lightning --epochs 4
    resuming from step 37 ...     # continues at the next batch, same result as an uninterrupted run

``--store`` may be a root://host:port//path URL. The final weights go to ``--output``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from ckpt_tasks.integrations.lightning import LightningCheckpointerCallback, SeededBatches


def digits(seed: int = 0):
    """The digits data as tensors: (x_train, y_train, x_val, y_val), split with a fixed seed."""
    import numpy as np
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    n_val = len(y) // 5
    return x[order[n_val:]], y[order[n_val:]], x[order[:n_val]], y[order[:n_val]]


class DigitsClassifier(pl.LightningModule):
    def __init__(self, hidden: int = 64, learning_rate: float = 0.01, step_delay: float = 0.0):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Dropout(0.2),
            torch.nn.Linear(hidden, 10))
        self.learning_rate = learning_rate
        self.step_delay = step_delay

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # One line per step, for people and for the tests that interrupt this script.
        print(f"epoch {self.current_epoch} batch {batch_idx} step {self.global_step} "
              f"loss {outputs['loss'].item():.6f}", flush=True)
        if self.step_delay:
            time.sleep(self.step_delay)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        accuracy = (self.net(x).argmax(dim=1) == y).float().mean()
        self.log("val_accuracy", accuracy, prog_bar=False)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.learning_rate)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="checkpoint location: a path or root://host:port//path")
    parser.add_argument("--output", default="model.pt", help="where the final weights go")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--checkpoint-every", type=int, default=10, help="optimizer steps between commits")
    parser.add_argument("--step-delay", type=float, default=0.0, help="pause per step, to have time to interrupt")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)

    torch.use_deterministic_algorithms(True)
    pl.seed_everything(args.seed, workers=True)
    x_train, y_train, x_val, y_val = digits()
    train_batches = SeededBatches(x_train, y_train, batch_size=args.batch_size, seed=args.seed)
    val_batches = SeededBatches(x_val, y_val, batch_size=256, shuffle=False)
    model = DigitsClassifier(step_delay=args.step_delay)

    callback = LightningCheckpointerCallback(
        store=args.store, checkpoint_every=args.checkpoint_every,
        params={"seed": args.seed, "batch_size": args.batch_size})
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=[callback], accelerator="cpu", devices=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, deterministic=True, num_sanity_val_steps=0)
    ckpt_path = callback.restore()   # the newest verified checkpoint, or None
    print("resuming" if ckpt_path else "starting from scratch", flush=True)
    trainer.fit(model, train_batches, val_batches, ckpt_path=ckpt_path, weights_only=True)

    partial = Path(args.output).with_suffix(".partial")
    torch.save({"model": model.state_dict(), "steps": trainer.global_step,
                "val_accuracy": float(trainer.callback_metrics["val_accuracy"])}, partial)
    os.replace(partial, args.output)
    print(f"done after {trainer.global_step} steps, val_accuracy "
          f"{float(trainer.callback_metrics['val_accuracy']):.4f} -> {args.output}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
