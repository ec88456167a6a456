"""Count to ``--steps``, keeping the checkpoint on an XRootD server.

The same counter as ``examples/basic_usage``, but each checkpoint is copied to
``--server`` under the absolute path ``--target``, and ``restore`` fetches it
from there. A run restarted on another machine, with an empty working
directory, therefore continues where the last one stopped::

    python counter.py --server root://eos.example.org:1094 --target /eos/user/me/counter.txt
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ckpt_tasks import Checkpointer


def save(path: Path, value: int) -> None:
    path.write_text(str(value))


def load(path: Path) -> int:
    return int(path.read_text())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, help="root://host:port")
    parser.add_argument("--target", required=True, help="absolute path of the checkpoint on the server")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--sleep", type=float, default=1.0)
    parser.add_argument("--checkpoint-every", type=int, default=1)
    parser.add_argument(
        "--file", type=Path, default=Path("checkpoint.txt"), help="local copy of the checkpoint"
    )
    args = parser.parse_args(argv)
    if not args.target.startswith("/"):
        parser.error("--target must be an absolute path on the server")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ckpt = Checkpointer(
        # the XRootD client copies from and to absolute local paths
        local_checkpoint_file=args.file.resolve(),
        checkpoint_function=save,
        restore_function=load,
        checkpoint_transfer_mode="xrootd",
        checkpoint_transfer_target=args.target,
        xrootd_server_name=args.server,
        checkpoint_every=args.checkpoint_every,
    )
    start = ckpt.restore(0)
    print(f"restored {start}", flush=True)
    for i in range(start, args.steps):
        ckpt.step(i)
        print(f"step {i}", flush=True)
        time.sleep(args.sleep)
    print("done", flush=True)


if __name__ == "__main__":
    main()
