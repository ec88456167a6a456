"""When this process started: the clock of per-execution limits and of the lineage's start-up time."""
from __future__ import annotations

import os
import time

_IMPORT_TIME = time.time()


def _process_start_unix() -> float:
    """When this process started (from /proc on Linux), else when this module was imported."""
    try:
        with open("/proc/self/stat") as stream:
            fields = stream.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat(5), counting after "pid (comm)"
        with open("/proc/stat") as stream:
            boot = next(int(line.split()[1]) for line in stream if line.startswith("btime "))
        started = boot + start_ticks / os.sysconf("SC_CLK_TCK")
        # btime has whole seconds (and containers may skew it): trust it only when this
        # module was imported clearly later than the process started, and plausibly so.
        if 5 < _IMPORT_TIME - started < 30 * 86400:
            return started
    except (OSError, ValueError, IndexError, StopIteration):
        pass
    return _IMPORT_TIME


#: Unix time at which this process started
PROCESS_START = _process_start_unix()
