"""A checkpoint writer for subprocess tests of CheckpointStore (SIGKILL stress, two writers).

As a module it gives ``content_for(step)``, the bytes a writer commits for a step,
so a test can check what it restores. As a script::

    python store_writer.py LOCATION --start auto|N --stride K --count N --keep-last N [--part-size B]

saves checkpoints with steps start, start+stride, ... (``--count 0``: forever),
``--start auto`` resuming after the highest committed step like an evicted
training. It prints ``ready`` once the store is built and ``committed STEP`` after
each save, flushed, so the parent can time its kills.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path

MIN_SIZE = 200_000
MAX_SIZE = 3_000_000
#: so that about two thirds of the checkpoints go up in parts, the rest as one file
PART_SIZE = 1_000_000


def content_for(step: int, min_size: int = MIN_SIZE, max_size: int = MAX_SIZE) -> bytes:
    """Random bytes of a random size (a few hundred KB to a few MB), both fixed by ``step``."""
    rng = random.Random(step)
    return rng.randbytes(rng.randint(min_size, max_size))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("location")
    parser.add_argument("--start", default="auto")
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--count", type=int, default=0, help="0: until killed")
    parser.add_argument("--keep-last", type=int, default=3)
    parser.add_argument("--deadline", type=float, default=30.0)
    parser.add_argument("--min-size", type=int, default=MIN_SIZE)
    parser.add_argument("--max-size", type=int, default=MAX_SIZE)
    parser.add_argument("--part-size", type=int, default=PART_SIZE)
    parser.add_argument("--workdir", help="where the local state file is written (default: a new temp dir)")
    args = parser.parse_args(argv)

    from ckpt_tasks.storage import CheckpointStore, RetryPolicy

    store = CheckpointStore(args.location, keep_last=args.keep_last, part_size=args.part_size,
                            retry=RetryPolicy(deadline=args.deadline, initial_delay=0.2))
    if args.start == "auto":
        latest = store.latest()
        step = latest.step + 1 if latest else 0
    else:
        step = int(args.start)
    print("ready", flush=True)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="store-writer-"))
    work.mkdir(parents=True, exist_ok=True)
    saved = 0
    while args.count == 0 or saved < args.count:
        local = work / f"state-{os.getpid()}.bin"
        local.write_bytes(content_for(step, args.min_size, args.max_size))
        store.save(local, step, metadata={"writer": os.getpid()})
        print(f"committed {step}", flush=True)
        saved += 1
        step += args.stride
    return 0


if __name__ == "__main__":
    sys.exit(main())
