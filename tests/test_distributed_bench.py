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


def test_bench_distributed_checkpoints_prints_every_kind_on_one_and_two_ranks(tmp_path):
    result = subprocess.run([sys.executable, "benchmarks/bench_distributed.py", "--checkpoints", "--hidden", "32",
                             "--saves", "1", "--store", str(tmp_path / "store")], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|")[1:3] for line in result.stdout.splitlines() if line.startswith("| 1 ") or
            line.startswith("| 2 ")]
    kinds = ("replicated, background commit", "replicated, in the loop", "sharded (FSDP2, DCP)")
    assert [(r.strip(), k.strip()) for r, k in rows] == [(n, k) for n in ("1", "2") for k in kinds], result.stdout
    # every run committed into a store of its own under --store
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["run-1", "run-2"]
