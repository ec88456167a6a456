"""CheckpointStore against raw xrdcp on a real XRootD server (loopback).

Measures, in one run and on one server:

(a) upload:   ``xrdcp --cksum adler32:source -f LOCAL root://.../raw``  vs  ``CheckpointStore.save(LOCAL, step)``
(b) download: ``xrdcp -f root://.../raw COPY``                          vs  ``CheckpointStore.fetch(checkpoint, COPY2)``

Each pair is repeated ``--repeat`` times, alternating which one goes first, and
the median is reported with MB/s and the ratio ours/raw (goal: at most 1.10).
Before each timed copy, ``os.sync()`` writes back what earlier copies left in the
page cache and a 1 s pause lets the server and the kernel settle, so one copy
does not pay for another's writeback.
``save`` does the whole commit (upload under a temporary name verified by the
server's adler32, rename, manifest, LATEST, retention); ``fetch`` downloads and
checks size and adler32 against the manifest. xrdcp's times include starting
the xrdcp process (tens of milliseconds).

    .venv/bin/python benchmarks/bench_store.py [--size-mib 1024] [--repeat 3] [--workdir DIR]

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
# --code-root DIR: measure the ckpt_tasks of another checkout (e.g. a commit before a change)
_code = sys.argv[sys.argv.index("--code-root") + 1] if "--code-root" in sys.argv else str(ROOT)
sys.path.insert(0, _code)

from xrootd_server import XRootDServer  # noqa: E402

from ckpt_tasks.storage import CheckpointStore, RetryPolicy  # noqa: E402


SETTLE_S = 1.0  # seconds of quiet before each timed copy


def timed(operation) -> float:
    start = time.perf_counter()
    operation()
    return time.perf_counter() - start


def xrdcp(*args: str) -> None:
    subprocess.run(["xrdcp", "--nopbar", *args], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def write_random(path: Path, size: int) -> None:
    chunk = 64 << 20
    with open(path, "wb") as stream:
        left = size
        while left:
            n = min(chunk, left)
            stream.write(os.urandom(n))
            left -= n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the checkpoint file (default 1024)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of each pair (default 3)")
    parser.add_argument("--only", choices=("save", "fetch"), help="time only uploads or only downloads")
    parser.add_argument("--workdir", help="where the local files go (default: a temporary directory)")
    parser.add_argument("--code-root", help="import ckpt_tasks from this checkout instead of this one")
    args = parser.parse_args(argv)
    logging.getLogger("ckpt_tasks").setLevel(logging.WARNING)
    if shutil.which("xrdcp") is None:
        print("xrdcp is not installed (apt-get install xrootd-client)", file=sys.stderr)
        return 2

    size = args.size_mib << 20
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-store-"))
    work.mkdir(parents=True, exist_ok=True)
    server = XRootDServer().start()
    try:
        local, copy_raw, copy_ours = work / "state.bin", work / "copy-raw.bin", work / "copy-ours.bin"
        write_random(local, size)
        store = CheckpointStore(f"{server.url}//bench/store", keep_last=2,
                                retry=RetryPolicy(deadline=60, initial_delay=0.5))
        raw_url = f"{server.url}//bench/raw/state.bin"
        xrdcp("-f", "--path", str(local), raw_url)  # warm up both paths once, untimed
        checkpoint = store.save(local, 0)

        times: dict[str, list[float]] = {k: [] for k in ("save_raw", "save_ours", "save_raw_e2e",
                                                          "fetch_raw", "fetch_ours")}
        for repetition in range(args.repeat):
            step = repetition + 1
            upload = {
                "save_raw": lambda: xrdcp("--cksum", "adler32:source", "-f", str(local), raw_url),
                "save_ours": lambda: store.save(local, step),
                # for reference: xrdcp verifying at the destination too (the server's adler32)
                "save_raw_e2e": lambda: xrdcp("--cksum", "adler32", "-f", str(local), raw_url),
            }
            download = {
                "fetch_raw": lambda: xrdcp("-f", raw_url, str(copy_raw)),
                "fetch_ours": lambda: store.fetch(checkpoint, copy_ours),
            }
            pairs = {"save": (upload,), "fetch": (download,)}.get(args.only, (upload, download))
            for pair in pairs:
                order = list(pair) if repetition % 2 == 0 else list(reversed(pair))
                for key in order:
                    os.sync()  # write back what the previous copy left dirty, outside the timing
                    time.sleep(SETTLE_S)
                    times[key].append(timed(pair[key]))
            if args.only != "fetch":
                checkpoint = store.latest()
                assert checkpoint.step == step and checkpoint.size == size
        if args.only != "save":
            assert copy_ours.stat().st_size == copy_raw.stat().st_size == size

        print(f"\n{args.size_mib} MiB, {args.repeat} repetitions (median), server {server.url} on loopback, "
              f"{os.cpu_count()} CPUs, ckpt_tasks from {_code}\n")
        print("| operation | raw xrdcp (s) | raw MB/s | CheckpointStore (s) | ours MB/s | ours/raw |")
        print("|---|---:|---:|---:|---:|---:|")
        for label, raw, ours in (("upload: `save` vs `xrdcp --cksum adler32:source`", "save_raw", "save_ours"),
                                 ("upload: `save` vs `xrdcp --cksum adler32` (verified at the server)",
                                  "save_raw_e2e", "save_ours"),
                                 ("download: `fetch` vs `xrdcp`", "fetch_raw", "fetch_ours")):
            if not times[ours]:
                continue  # not timed in this run (--only)
            t_raw, t_ours = statistics.median(times[raw]), statistics.median(times[ours])
            print(f"| {label} | {t_raw:.2f} | {size / 1e6 / t_raw:.0f} | {t_ours:.2f} | "
                  f"{size / 1e6 / t_ours:.0f} | {t_ours / t_raw:.2f} |")
        print("\nall times (s):", {k: [round(t, 2) for t in v] for k, v in times.items()})
    finally:
        server.cleanup()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
