"""Stopping a training at a consistent point: the checkpoint exit code and the StopGuard.

HTCondor's ``checkpoint_exit_code`` convention: a job that exits with this code has
saved a checkpoint and asks to be started again from it.
"""
from __future__ import annotations

#: the exit code that says "checkpoint saved, start me again" (HTCondor's checkpoint_exit_code)
CHECKPOINT_EXIT_CODE = 85
