"""benchmarks/bench_distributed.py still runs and prints its rows (tiny sizes; no timing asserted)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_distributed_prints_every_row():
    result = subprocess.run([sys.executable, "benchmarks/bench_distributed.py", "--hidden", "64", "--steps", "3",
                             "--pairs", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for row in ("| time in `agree` per step, mean |", "| time in `agree` per step, median |",
                "| step time, median of windows |"):
        assert row in result.stdout, result.stdout
