"""A law task that trains the Lightning digits classifier as a ``CheckpointedTask``.

The base class gives the checkpoint location (``<store>/LightningDigitsTask/<fingerprint>/main``),
the parameters ``--store``, ``--checkpoint-every``, ``--checkpoint-interval``,
``--keep-last``, ``--storage-timeout``, the fingerprint check, and the checkpoints
as an optional output. Lightning owns the training loop, so ``run`` is the
Lightning one: the callback commits into ``self.checkpoint_store()`` and, on
SIGTERM, leaves with exit code 85 through ``os._exit`` (luigi would turn a
``SystemExit`` into a task failure).

Not registered in law.cfg; run it with::

    law run examples.lightning_example.law_task.LightningDigitsTask --store /tmp/ckpt --epochs 3
    python examples/lightning_example/law_task.py --store /tmp/ckpt --epochs 3      # luigi.build

(from the repository root, with PYTHONPATH including it).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import law
import luigi

from ckpt_tasks.tasks import CheckpointedTask

HERE = Path(__file__).resolve().parent


class LightningDigitsTask(CheckpointedTask):
    """Train the digits classifier with PyTorch Lightning; resumes from its newest checkpoint."""

    epochs = luigi.IntParameter(default=3, description="training epochs; default: 3")
    batch_size = luigi.IntParameter(default=64, description="batch size; default: 64")
    seed = luigi.IntParameter(default=1, description="random seed; default: 1")
    output_dir = luigi.Parameter(default="", significant=False,
                                 description="where model.pt goes; default: $CKPT_TASKS_DATA/LightningDigitsTask")
    step_delay = luigi.FloatParameter(default=0.0, significant=False,
                                      description="pause per step, to make the demo interruptible")

    fingerprint_exclude = ("epochs",)  # more epochs continue the same training

    def output(self):
        directory = self.output_dir or os.path.join(os.path.expandvars("$CKPT_TASKS_DATA"), self.task_family)
        return {"model": law.LocalFileTarget(os.path.join(directory, f"model-seed{self.seed}-e{self.epochs}.pt")),
                "checkpoints": self.checkpoint_target()}

    def run(self):
        import lightning.pytorch as pl
        import torch

        sys.path.insert(0, str(HERE))
        from train import DigitsClassifier, digits  # the example's model and data

        from ckpt_tasks.integrations.lightning import LightningCheckpointerCallback, SeededBatches

        torch.use_deterministic_algorithms(True)
        pl.seed_everything(self.seed, workers=True)
        x_train, y_train, x_val, y_val = digits()
        model = DigitsClassifier(step_delay=self.step_delay)
        callback = LightningCheckpointerCallback(
            store=self.checkpoint_store(), params=self.checkpoint_params(),
            checkpoint_every=self.checkpoint_every, checkpoint_interval=self.checkpoint_interval or 0,
            hard_exit=True)  # os._exit(85): luigi catches SystemExit
        trainer = pl.Trainer(max_epochs=self.epochs, callbacks=[callback], accelerator="cpu", devices=1,
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, deterministic=True, num_sanity_val_steps=0)
        ckpt_path = callback.restore()
        self.publish_message(f"resuming from step {callback.transfer.restored.step}" if ckpt_path
                             else "no checkpoint; starting from scratch")
        trainer.fit(model, SeededBatches(x_train, y_train, batch_size=self.batch_size, seed=self.seed),
                    SeededBatches(x_val, y_val, batch_size=256, shuffle=False),
                    ckpt_path=ckpt_path, weights_only=True)

        output = self.output()["model"]
        output.parent.touch()
        partial = output.path + ".partial"
        torch.save({"model": model.state_dict(), "steps": trainer.global_step}, partial)
        os.replace(partial, output.path)
        self.publish_message(f"training complete after {trainer.global_step} steps -> {output.path}")


if __name__ == "__main__":
    # python law_task.py --store ... [--epochs N] [...]: the task's parameters on the command line
    from luigi.cmdline_parser import CmdlineParser

    with CmdlineParser.global_instance(["LightningDigitsTask", *sys.argv[1:]]) as parser:
        task = parser.get_task_obj()
    sys.exit(0 if luigi.build([task], local_scheduler=True) else 1)
