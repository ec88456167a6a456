"""Progress bars for long transfers and trainings, shown only in a terminal.

All bars go to stderr and are disabled when stderr is not a TTY (batch jobs,
HTCondor's redirected output, pipes, tests) or when ``CKPT_TASKS_PROGRESS=0``.
Transfer bars appear only after ``delay`` seconds, so short copies print nothing.

    with transfer_progress(size, "upload state.pt") as advance:
        for chunk in chunks:
            ...; advance(len(chunk))

    process.run(XRootDProgress("upload state.pt"))     # XRootD CopyProcess handler
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterator

ENV = "CKPT_TASKS_PROGRESS"


def enabled(stream=None) -> bool:
    """True when a bar should be drawn: ``stream`` (stderr) is a terminal and not switched off."""
    if os.environ.get(ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def _tqdm(**kwargs):
    from tqdm import tqdm

    return tqdm(file=sys.stderr, disable=not enabled(), leave=False, dynamic_ncols=True, **kwargs)


@contextlib.contextmanager
def transfer_progress(total: int | None, desc: str, delay: float = 2.0) -> Iterator[Callable[[int], None]]:
    """A byte bar for a transfer of ``total`` bytes; yields ``advance(nbytes)``."""
    bar = _tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, delay=delay)
    try:
        yield bar.update
    finally:
        bar.close()


def step_bar(total: int | None, initial: int = 0, desc: str | None = None):
    """A bar of training steps (``bar.update(1)`` per step, ``bar.set_postfix(loss=...)``)."""
    return _tqdm(total=total, initial=initial, desc=desc, unit="step")


class XRootDProgress:
    """A progress handler for ``XRootD.client.CopyProcess.run(handler)``: one bar per copy job."""

    def __init__(self, desc: str, delay: float = 2.0):
        self.desc = desc
        self.delay = delay
        self._bar = None
        self._done = 0

    def begin(self, jobId, total, source, target):  # noqa: N803 (XRootD's names)
        self._bar, self._done = None, 0

    def update(self, jobId, processed, total):  # noqa: N803
        if self._bar is None:
            self._bar = _tqdm(total=total or None, desc=self.desc, unit="B", unit_scale=True,
                              unit_divisor=1024, delay=self.delay)
        if processed > self._done:
            self._bar.update(processed - self._done)
            self._done = processed

    def end(self, jobId, results):  # noqa: N803
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def should_cancel(self, jobId):  # noqa: N803
        return False
