"""CheckpointStore over a slow link: round trips and seconds against xrdcp, in one run.

A real XRootD server (tests/xrootd_server.py) on loopback sits behind a delaying
TCP proxy (benchmarks/wan_proxy.py) that adds ``--rtt`` milliseconds per round trip
and counts the sequential round trips that pass it. For each number of kept
checkpoints (``--kept``) a location is filled with that many checkpoints of
``--size-mib`` MiB (directly, not through the proxy), then, through the proxy:

- ``save``: ``CheckpointStore.save(LOCAL, step)`` by a store whose connection is open and
  that has read the location (a training that restored or saved before), with retention;
- ``restore (same process)``: a new ``CheckpointStore`` in this process (the client's
  connection is open) restores the newest checkpoint;
- ``restore (new process)``: ``ckpt-tasks restore`` in a new Python process;
- ``apply_retention``: after a save with ``retention=False``, deleting one checkpoint;
- ``ckpt-tasks ls`` and ``ckpt-tasks verify`` (new processes);

against ``xrdcp --cksum adler32:source -f LOCAL`` (upload) and ``xrdcp -f`` (download)
of the same bytes, each a new process that connects first. Each is repeated
``--repeat`` times, xrdcp and ours alternating; the table has medians, the round trips
of every repetition follow it.

    .venv/bin/python benchmarks/bench_wan.py [--rtt 20 100] [--kept 3 20 100] [--size-mib 1] [--repeat 3]

Needs the ``xrootd`` and ``xrdcp`` binaries (Debian: xrootd-server, xrootd-client).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from wan_proxy import WanProxy  # noqa: E402
from xrootd_server import XRootDServer  # noqa: E402

from ckpt_tasks.storage import CheckpointStore, RetryPolicy  # noqa: E402

CLI = [sys.executable, "-m", "ckpt_tasks.cli"]
RETRY = RetryPolicy(deadline=60, initial_delay=0.5)
#: the goals of issue 17: ours / xrdcp
GOALS = {"save": 2.0, "restore (same process)": 1.5}


def run(command: list[str]) -> None:
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)


def write_random(path: Path, size: int) -> None:
    with open(path, "wb") as stream:
        for offset in range(0, size, 64 << 20):
            stream.write(os.urandom(min(64 << 20, size - offset)))


class Measurements:
    """Round trips and seconds of named operations, through one proxy."""

    def __init__(self, proxy: WanProxy):
        self.proxy = proxy
        self.rows: dict[str, list[tuple[int, float]]] = {}

    def measure(self, name: str, operation) -> None:
        self.proxy.settle()
        self.proxy.reset()
        start = time.perf_counter()
        operation()
        seconds = time.perf_counter() - start
        self.proxy.settle()  # replies still on their way (a close) count for this operation
        self.rows.setdefault(name, []).append((self.proxy.round_trips, seconds))

    def median(self, name: str) -> tuple[float, float]:
        values = self.rows[name]
        return statistics.median(v[0] for v in values), statistics.median(v[1] for v in values)


def fill(direct_url: str, local: Path, kept: int) -> int:
    """Commit ``kept`` checkpoints at ``direct_url`` (no proxy); return the next step."""
    store = CheckpointStore(direct_url, keep_last=kept, retry=RETRY)
    for step in range(kept):
        store.save(local, step)
    return kept


def measure_location(proxy: WanProxy, server_url: str, local: Path, work: Path, kept: int,
                     repeat: int) -> Measurements:
    path = f"//bench/wan-{proxy.rtt * 1000:.0f}-{kept}"
    proxied = f"root://127.0.0.1:{proxy.port}{path}"
    step = fill(f"{server_url}{path}/store", local, kept)
    m = Measurements(proxy)
    store = CheckpointStore(f"{proxied}/store", keep_last=kept, retry=RETRY)
    store.latest()  # opens the connection, untimed
    raw = f"{proxied}/raw/state.bin"
    run(["xrdcp", "--nopbar", "-f", str(local), raw])
    for repetition in range(repeat):
        pairs = [
            ("xrdcp --cksum adler32:source", lambda: run(["xrdcp", "--nopbar", "--cksum", "adler32:source",
                                                          "-f", str(local), raw]),
             "save", lambda: store.save(local, step)),
            ("xrdcp (download)", lambda: run(["xrdcp", "--nopbar", "-f", raw, str(work / "raw.out")]),
             "restore (same process)",
             lambda: CheckpointStore(f"{proxied}/store", retry=RETRY).restore(work / "ours.out")),
        ]
        for raw_name, raw_op, ours_name, ours_op in pairs:
            order = [(raw_name, raw_op), (ours_name, ours_op)]
            for name, operation in (order if repetition % 2 == 0 else reversed(order)):
                m.measure(name, operation)
        step += 1
        assert (work / "ours.out").read_bytes() == local.read_bytes()
        m.measure("restore (new process)", lambda: run([*CLI, "restore", f"{proxied}/store",
                                                        str(work / "new.out")]))
        store.save(local, step, retention=False)
        step += 1
        m.measure("apply_retention", store.apply_retention)
        m.measure("ckpt-tasks ls", lambda: run([*CLI, "ls", f"{proxied}/store"]))
        m.measure("ckpt-tasks verify", lambda: run([*CLI, "verify", f"{proxied}/store"]))
    assert len(store.list()) == kept, [c.step for c in store.list()]
    return m


ORDER = ("xrdcp --cksum adler32:source", "save", "xrdcp (download)", "restore (same process)",
         "restore (new process)", "apply_retention", "ckpt-tasks ls", "ckpt-tasks verify")


def report(results: dict[tuple[int, int], Measurements], size_mib: int) -> bool:
    """Print the table; True when every goal holds."""
    print(f"\n{size_mib} MiB checkpoints; round trips / seconds (medians); ratio: seconds over xrdcp's\n")
    print("| RTT | kept | operation | round trips | seconds | ours / xrdcp |")
    print("|---:|---:|---|---:|---:|---:|")
    met = True
    for (rtt, kept), m in sorted(results.items()):
        up, down = m.median("xrdcp --cksum adler32:source")[1], m.median("xrdcp (download)")[1]
        for name in ORDER:
            trips, seconds = m.median(name)
            base = down if "restore" in name else up if name == "save" else None
            ratio = "" if base is None else f"{seconds / base:.2f}"
            goal = GOALS.get(name)
            if goal is not None and seconds / base > goal:
                met, ratio = False, f"{ratio} (goal {goal})"
            print(f"| {rtt} ms | {kept} | {name} | {trips:g} | {seconds:.3f} | {ratio} |")
    print("\nround trips of every repetition, in order:")
    for (rtt, kept), m in sorted(results.items()):
        print(f"  {rtt} ms, {kept} kept: " + "; ".join(
            f"{name} {' '.join(str(trips) for trips, _ in m.rows[name])}" for name in ORDER))
    print("\nall goals met" if met else "\nGOALS MISSED (see the ratio column)")
    return met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rtt", type=float, nargs="+", default=[20, 100], help="round-trip times, ms")
    parser.add_argument("--kept", type=int, nargs="+", default=[3, 20, 100], help="checkpoints kept")
    parser.add_argument("--size-mib", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--bandwidth-mbps", type=float, help="limit each direction to this many MB/s")
    args = parser.parse_args(argv)
    logging.getLogger("ckpt_tasks").setLevel(logging.ERROR)
    if shutil.which("xrdcp") is None:
        print("xrdcp is not installed (apt-get install xrootd-client)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-wan-"))
    server = XRootDServer().start()
    results: dict[tuple[int, int], Measurements] = {}
    try:
        local = work / "state.bin"
        write_random(local, args.size_mib << 20)
        bandwidth = args.bandwidth_mbps * 1e6 if args.bandwidth_mbps else None
        for rtt in args.rtt:
            proxy = WanProxy(("127.0.0.1", server.port), rtt / 1000, bandwidth).start()
            try:
                for kept in args.kept:
                    results[(int(rtt), kept)] = measure_location(proxy, server.url, local, work, kept, args.repeat)
            finally:
                proxy.stop()
    finally:
        server.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    report(results, args.size_mib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
