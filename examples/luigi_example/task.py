"""A luigi task whose work survives failures: a rerun resumes it.

``CountTask.run()`` counts to ``steps`` with a :class:`ckpt_tasks.Checkpointer`
in ``shared`` mode, so every checkpoint is copied to ``checkpoint_target`` (a
path on a shared file system). When the task fails half way, luigi marks it
failed and writes no output; running the same command again starts the task
again, and it continues from the last checkpoint instead of from 0.

    python task.py --steps 50 --checkpoint-target /shared/me/count.txt \\
        --output /shared/me/count.result --fail-probability 0.05
    # fails somewhere ("RuntimeError: simulated failure"), exit code 1
    python task.py ...same arguments...
    # restored 17 ...
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import luigi

from ckpt_tasks import Checkpointer


class CountTask(luigi.Task):
    """Count from 0 to ``steps - 1``; the output holds the final count."""

    steps = luigi.IntParameter(default=20)
    sleep = luigi.FloatParameter(default=0.1)
    checkpoint_target = luigi.Parameter(description="checkpoint path on shared storage")
    local_file = luigi.Parameter(default="count_checkpoint.txt", description="local checkpoint file")
    output_path = luigi.Parameter()
    # Simulated failures: randomly after each step, or exactly once at one step.
    # Neither changes what the task computes, so they are not significant
    # (they do not change the task's identity either).
    fail_probability = luigi.FloatParameter(default=0.0, significant=False)
    fail_at_step = luigi.IntParameter(default=-1, significant=False)

    def output(self):
        return luigi.LocalTarget(self.output_path)

    def run(self):
        target = Path(self.checkpoint_target)
        target.parent.mkdir(parents=True, exist_ok=True)
        ckpt = Checkpointer(
            local_checkpoint_file=Path(self.local_file),
            checkpoint_function=lambda path, value: path.write_text(str(value)),
            restore_function=lambda path: int(path.read_text()),
            checkpoint_transfer_mode="shared",
            checkpoint_transfer_target=target,
        )
        start = ckpt.restore(0)
        print(f"restored {start}", flush=True)
        for i in range(start, self.steps):
            ckpt.step(i)
            print(f"step {i}", flush=True)
            if i == self.fail_at_step or random.random() < self.fail_probability:
                raise RuntimeError(f"simulated failure at step {i}")
            time.sleep(self.sleep)

        # The output is written last and atomically (luigi writes to a
        # temporary file and renames it): the task is complete only when all
        # the counting is done.
        with self.output().open("w") as f:
            f.write(f"{self.steps}\n")
        print("done", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sleep", type=float, default=0.1)
    parser.add_argument("--checkpoint-target", required=True)
    parser.add_argument("--local-file", default="count_checkpoint.txt")
    parser.add_argument("--output", required=True)
    parser.add_argument("--fail-probability", type=float, default=0.0)
    parser.add_argument("--fail-at-step", type=int, default=-1)
    args = parser.parse_args(argv)

    task = CountTask(
        steps=args.steps,
        sleep=args.sleep,
        checkpoint_target=args.checkpoint_target,
        local_file=args.local_file,
        output_path=args.output,
        fail_probability=args.fail_probability,
        fail_at_step=args.fail_at_step,
    )
    ok = luigi.build([task], local_scheduler=True, workers=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
