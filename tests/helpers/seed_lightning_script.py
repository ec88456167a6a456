"""A training written for the seed project's Lightning callback, as its example is
(``pytorch_lightning`` imports, the callback built with ``local_checkpoint_file=Path(...)`` and
``checkpoint_every=1``, ``trainer.fit(..., ckpt_path=checkpointer.restore())``), with only the
import line changed to this project's, on small in-memory data and the CPU.

Usage: seed_lightning_script.py EPOCHS BATCH_DELAY
Prints "epoch E batch B step S" for every trained batch and "restored <type> <path>".
"""
import sys
import time
from pathlib import Path

import pytorch_lightning as ptl
import torch
from pytorch_lightning import Trainer
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ckpt_tasks.integrations.lightning import LightningCheckpointerCallback  # the only changed line

epochs, delay = int(sys.argv[1]), float(sys.argv[2])

digits = load_digits()
x = torch.tensor(digits.data[:512] / 16.0, dtype=torch.float32)
y = torch.tensor(digits.target[:512])
train_dataloader = DataLoader(TensorDataset(x[:384], y[:384]), batch_size=64)
test_dataloader = DataLoader(TensorDataset(x[384:], y[384:]), batch_size=64)


class LightningModuleExample(ptl.LightningModule):
    def __init__(self):
        super().__init__()
        self.stack = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, x):
        return self.stack(x)

    def training_step(self, batch, batch_idx):
        print(f"epoch {self.current_epoch} batch {batch_idx} step {self.global_step}", flush=True)
        time.sleep(delay)
        X, y = batch
        loss = self.loss_fn(self.forward(X), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        X, y = batch
        self.log("val_loss", self.loss_fn(self.forward(X), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


model = LightningModuleExample()
checkpoint_path = "trainer_checkpoint.ckpt"
checkpointer = LightningCheckpointerCallback(local_checkpoint_file=Path(checkpoint_path), checkpoint_every=1)
trainer = Trainer(max_epochs=epochs, accelerator="cpu", callbacks=[checkpointer], logger=False,
                  enable_progress_bar=False, enable_model_summary=False)
restored = checkpointer.restore()
print(f"restored {type(restored).__name__} {restored}", flush=True)
trainer.fit(model, train_dataloader, test_dataloader, ckpt_path=restored)
print(f"done after {trainer.global_step} steps", flush=True)
