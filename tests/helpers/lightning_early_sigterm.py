"""A Lightning fit that gets SIGTERM during its sanity check, before the training loop starts."""
import os
import signal
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from ckpt_tasks.integrations.lightning import LightningCheckpointerCallback


class Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.sent = False

    def training_step(self, batch, index):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, index):
        if not self.sent:  # while Lightning's own handler is in place
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


data = torch.utils.data.TensorDataset(torch.randn(64, 2))
directory = Path(sys.argv[1])
callback = LightningCheckpointerCallback(local_checkpoint_file=directory / "ckpt.ckpt")
trainer = pl.Trainer(max_epochs=3, callbacks=[callback], logger=False, enable_progress_bar=False,
                     enable_checkpointing=False, accelerator="cpu", num_sanity_val_steps=1)
loader = torch.utils.data.DataLoader(data, batch_size=8)
trainer.fit(Model(), loader, loader, ckpt_path=callback.restore())
print("fit returned normally", flush=True)
