"""The ``ckpt-tasks`` command."""
from __future__ import annotations

import argparse
import sys

import ckpt_tasks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ckpt-tasks", description=ckpt_tasks.__doc__)
    parser.add_argument("--version", action="version", version=f"ckpt-tasks {ckpt_tasks.__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
