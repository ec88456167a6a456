"""The ``ckpt-tasks`` command: inspect, verify and restore the checkpoints of a location."""
from __future__ import annotations

import argparse
import json
import logging
import sys

import ckpt_tasks
from ckpt_tasks import history, status, watch
from ckpt_tasks.errors import CkptTasksError, VerificationError
from ckpt_tasks.storage.store import CheckpointStore, RetryPolicy


def _store(args: argparse.Namespace) -> CheckpointStore:
    return CheckpointStore(args.location, retry=RetryPolicy(deadline=args.deadline))


def _ls(args: argparse.Namespace) -> int:
    checkpoints = _store(args).list()
    if args.json:
        # "files": what to copy by hand (one file, or the parts in order)
        print(json.dumps([{**c.to_json(), "files": [data.path for data in c.data_files]} for c in checkpoints],
                         indent=2))
        return 0
    if not checkpoints:
        print(f"no checkpoints at {args.location}")
        return 0
    print(f"{'step':>10}  {'size':>12}  {'adler32':8}  {'created':29}  name")
    for c in checkpoints:
        print(f"{c.step:>10}  {c.size:>12}  {c.adler32:8}  {c.created:29}  {c.name}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    store = _store(args)
    checkpoints = store.list() if args.all else [c for c in [store.latest()] if c]
    if not checkpoints:
        print(f"no checkpoints at {args.location}", file=sys.stderr)
        return 1
    bad = 0
    for checkpoint in checkpoints:
        try:
            store.verify(checkpoint)
            print(f"ok       step {checkpoint.step}  {checkpoint.name}")
        except VerificationError as error:
            bad += 1
            print(f"CORRUPT  step {checkpoint.step}  {checkpoint.name}: {error}")
    return 1 if bad else 0


def _restore(args: argparse.Namespace) -> int:
    checkpoint = _store(args).restore(args.dest)
    if checkpoint is None:
        print(f"no checkpoints at {args.location}", file=sys.stderr)
        return 1
    print(f"restored step {checkpoint.step} ({checkpoint.name}) to {args.dest}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ckpt-tasks", description=ckpt_tasks.__doc__)
    parser.add_argument("--version", action="version", version=f"ckpt-tasks {ckpt_tasks.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--deadline", type=float, default=RetryPolicy.deadline, metavar="SECONDS",
                        help="how long to retry a storage that does not answer (default: %(default)s)")

    ls = commands.add_parser("ls", parents=[common], help="list the committed checkpoints of a location")
    ls.add_argument("location", help="a path, file:// or root://host:port//path")
    ls.add_argument("--json", action="store_true", help="print a JSON list")
    ls.set_defaults(func=_ls)

    verify = commands.add_parser("verify", parents=[common], help="check size and adler32 on the storage")
    verify.add_argument("location")
    verify.add_argument("--all", action="store_true", help="every checkpoint, not only the latest")
    verify.set_defaults(func=_verify)

    restore = commands.add_parser("restore", parents=[common], help="fetch the newest intact checkpoint")
    restore.add_argument("location")
    restore.add_argument("dest", help="local file to write")
    restore.set_defaults(func=_restore)

    watch.add_parser(commands)
    history.add_parser(commands)
    status.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return args.func(args)
    except (CkptTasksError, ValueError, OSError) as error:
        print(f"ckpt-tasks: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
