"""Count to ``--steps`` as a self-checkpointing HTCondor job.

Transfer mode ``htcondor``: HTCondor itself moves the checkpoint file. The
Checkpointer reads the job's ClassAd (``$_CONDOR_JOB_AD``), so this script only
runs inside an HTCondor job; see README.md and submit.sub.

HTCondor stores a checkpoint only when the job *exits* with the checkpoint
exit code (``checkpoint_exit_code = 85`` in submit.sub): it then uploads the
files of ``transfer_checkpoint_files`` to the submit side and starts the job
again at once. Files written after an eviction's SIGTERM are not uploaded
(with ``when_to_transfer_output = ON_EXIT``), so an evicted job resumes from
the last exit-85 checkpoint. That is why this script also exits with 85 on its
own every ``--exit-every`` steps: it bounds what an eviction can cost.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ckpt_tasks import Checkpointer

# Must equal checkpoint_exit_code in submit.sub.
CHECKPOINT_EXIT_CODE = 85
# Must equal transfer_checkpoint_files in submit.sub.
CHECKPOINT_FILE = Path("checkpoint.txt")


def save(path: Path, value: int) -> None:
    path.write_text(str(value))


def load(path: Path) -> int:
    return int(path.read_text())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--sleep", type=float, default=1.0)
    parser.add_argument(
        "--exit-every",
        type=int,
        default=60,
        help="exit with the checkpoint exit code every N steps so that HTCondor "
        "stores the checkpoint (0: only when signalled)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ckpt = Checkpointer(
        local_checkpoint_file=CHECKPOINT_FILE,
        checkpoint_function=save,
        restore_function=load,
        checkpoint_transfer_mode="htcondor",
        checkpoint_exit_code=CHECKPOINT_EXIT_CODE,
    )
    start = ckpt.restore(0)
    print(f"restored {start}", flush=True)
    for i in range(start, args.steps):
        ckpt.step(i)
        print(f"step {i}", flush=True)
        time.sleep(args.sleep)
        done = i + 1 - start
        if args.exit_every and done % args.exit_every == 0 and i + 1 < args.steps:
            # Step i is finished: the next run starts at i + 1.
            ckpt.checkpoint(i + 1)
            print(f"checkpointed {i + 1}, exiting with {CHECKPOINT_EXIT_CODE}", flush=True)
            sys.exit(CHECKPOINT_EXIT_CODE)
    print("done", flush=True)


if __name__ == "__main__":
    main()
