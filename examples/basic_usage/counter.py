"""Count to ``--steps`` and survive being stopped on the way.

The smallest possible use of :class:`ckpt_tasks.Checkpointer`: the loop
counter is the whole state, stored as text in one local file (transfer mode
``None``: the local file is assumed to be persistent).

Run it, press Ctrl-C (or ``kill -TERM <pid>``) half way, and run it again:
the second run starts where the first one stopped::

    python counter.py --steps 20 --sleep 0.5
    ^C                                # exits with code 85 after checkpointing
    python counter.py --steps 20 --sleep 0.5
    restored 7
    step 7
    ...
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ckpt_tasks import Checkpointer


def save(path: Path, value: int) -> None:
    """Write the counter value as text."""
    path.write_text(str(value))


def load(path: Path) -> int:
    """Read back what :func:`save` wrote."""
    return int(path.read_text())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="count from 0 to STEPS-1")
    parser.add_argument("--sleep", type=float, default=1.0, help="seconds of 'work' per step")
    parser.add_argument(
        "--checkpoint-every", type=int, default=1, help="write the checkpoint every N steps"
    )
    parser.add_argument(
        "--file", type=Path, default=Path("checkpoint.txt"), help="local checkpoint file"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ckpt = Checkpointer(
        local_checkpoint_file=args.file,
        checkpoint_function=save,
        restore_function=load,
        checkpoint_every=args.checkpoint_every,
    )
    # The stored value is the last step that was started, so a resumed run
    # repeats that one step: nothing is skipped.
    start = ckpt.restore(0)
    print(f"restored {start}", flush=True)
    for i in range(start, args.steps):
        ckpt.step(i)
        print(f"step {i}", flush=True)
        time.sleep(args.sleep)
    print("done", flush=True)


if __name__ == "__main__":
    main()
