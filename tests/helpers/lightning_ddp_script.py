"""A Lightning fit with strategy="ddp" on 2 CPU processes (gloo), checkpointed into a store.

    python lightning_ddp_script.py STORE OUTPUT [--step-delay S] [--checkpoint-every N] [--checkpoint-interval S]

Lightning's launcher runs this script again for rank 1. Every rank prints one line per
optimizer step; rank 0 writes the final weights to OUTPUT.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import lightning.pytorch as pl
import torch

from ckpt_tasks.integrations.lightning import LightningCheckpointerCallback, SeededBatches

SAMPLES, FEATURES, CLASSES = 600, 16, 4


def say(line: str) -> None:
    # One write per line: the two ranks share the pipe, and print() writes the newline apart.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Model(pl.LightningModule):
    def __init__(self, step_delay: float):
        super().__init__()
        # Dropout draws from each rank's own generator: a resume must give every rank its own back.
        self.net = torch.nn.Sequential(torch.nn.Linear(FEATURES, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                       torch.nn.Linear(32, CLASSES))
        self.step_delay = step_delay

    def training_step(self, batch, index):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def setup(self, stage):
        # Each rank draws its own dropout masks (a fresh run; a resumed one gets the saved states back).
        torch.manual_seed(100 + self.global_rank)

    def on_fit_start(self):
        say(f"rank {self.global_rank} pid {os.getpid()} parent {os.getppid()}")

    def on_train_batch_end(self, outputs, batch, index):
        say(f"rank {self.global_rank} epoch {self.current_epoch} batch {index} step {self.global_step}")
        if self.step_delay:
            time.sleep(self.step_delay)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=0.01)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.8)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("output")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--checkpoint-every", type=int, default=1000)
    parser.add_argument("--checkpoint-interval", type=float, default=0, help="seconds; 0: never by time")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stdout)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    pl.seed_everything(7)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, FEATURES, generator=generator)
    y = (x[:, :CLASSES] + 0.5 * torch.randn(SAMPLES, CLASSES, generator=generator)).argmax(dim=1)
    callback = LightningCheckpointerCallback(store=args.store, checkpoint_every=args.checkpoint_every,
                                             checkpoint_interval=args.checkpoint_interval, params={"seed": 7})
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=2, strategy="ddp", callbacks=[callback],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, deterministic=True, num_sanity_val_steps=0)
    model = Model(args.step_delay)
    trainer.fit(model, SeededBatches(x, y, batch_size=16, seed=7), ckpt_path=callback.restore(), weights_only=True)
    if trainer.is_global_zero:
        torch.save({"model": model.state_dict(), "steps": trainer.global_step}, args.output)
        print(f"done after {trainer.global_step} steps", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
