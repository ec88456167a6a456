"""Many trainings, one XRootD server: aggregate throughput of concurrent commits against xrdcp.

``--processes`` (8) processes each commit ``--checkpoints`` checkpoints of ``--size-mib`` MiB
with ``CheckpointStore.save`` to a location of their own on one XRootD server
(tests/xrootd_server.py, loopback, free port), all at once; against the same number of
``xrdcp --cksum adler32:source -f`` processes, each copying the same bytes as many times
to a path of its own, all at once. Throughput is the bytes of all processes over the
time from the start until the last one is done. Each side runs ``--repeat`` times, the
order alternating; the table has medians.

A committing process is a training that is already running: it has imported
``ckpt_tasks`` and opened its store's connection before the clock starts (a ``ready``
line), and waits for the start on its standard input. Each ``xrdcp`` starts, connects
and copies within the time measured, as it would in a job's script.

After every round of commits each location is read back by a new store: every
checkpoint that was committed must be listed, verify on the storage (size and adler32
read back from the server, against its manifest), and have the adler32 of the bytes its
process saved; no temporary file may be left. A loss fails the run (exit 1).

    .venv/bin/python benchmarks/bench_concurrent.py [--processes 8] [--size-mib 64] [--checkpoints 3] [--repeat 3]

``--rtt MS`` puts benchmarks/wan_proxy.py between the processes and the server; its one
process then bounds the throughput of both sides. ``--json PATH`` writes the figures.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

#: the goal of issue 17: our aggregate throughput over that of as many xrdcp at once
GOAL = 0.9


def worker(location: str, source: str, first_step: int, count: int) -> int:
    """One training: open the store, say ``ready``, wait for the start, commit ``count`` steps."""
    from ckpt_tasks.storage import CheckpointStore, RetryPolicy

    logging.getLogger("ckpt_tasks").setLevel(logging.ERROR)
    store = CheckpointStore(location, keep_last=count, retry=RetryPolicy(deadline=120, initial_delay=0.5))
    store.latest()  # the connection is open, as in a training that resumed
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 2
    start = time.perf_counter()
    committed = [store.save(source, first_step + index).step for index in range(count)]
    print(json.dumps({"seconds": time.perf_counter() - start, "steps": committed}), flush=True)
    return 0


def write_random(path: Path, size: int) -> None:
    with open(path, "wb") as stream:
        for offset in range(0, size, 64 << 20):
            stream.write(os.urandom(min(64 << 20, size - offset)))


def adler32_hex(path: Path) -> str:
    value = 1
    with open(path, "rb") as stream:
        while chunk := stream.read(8 << 20):
            value = zlib.adler32(chunk, value)
    return f"{value:08x}"


def run_xrdcp(sources: list[Path], base: str, count: int, round_index: int) -> float:
    """``len(sources)`` processes at once, each ``count`` checked copies of its source; the seconds."""
    commands = []
    for index, source in enumerate(sources):
        copies = [f"xrdcp --nopbar --cksum adler32:source -f {source} {base}//conc/raw-{index}/r{round_index}-{k}"
                  for k in range(count)]
        commands.append(["sh", "-ec", " && ".join(copies)])
    start = time.perf_counter()
    processes = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for command in commands]
    failures = [p.stderr.read().decode(errors="replace") for p in processes if p.wait() != 0]
    seconds = time.perf_counter() - start
    for process in processes:
        process.stderr.close()
    if failures:
        raise RuntimeError(f"{len(failures)} xrdcp processes failed: {failures[0]}")
    return seconds


def run_commits(sources: list[Path], base: str, count: int, round_index: int) -> tuple[float, list[str]]:
    """``len(sources)`` trainings at once, each committing ``count`` checkpoints; the seconds from
    the start to the last commit, and the locations."""
    locations = [f"{base}//conc/train-{index}" for index in range(len(sources))]
    first_step = round_index * count
    processes = [subprocess.Popen([sys.executable, __file__, "--worker", location, str(source), str(first_step),
                                   str(count)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=ROOT)
                 for location, source in zip(locations, sources)]
    try:
        for process in processes:
            line = process.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"a committing process did not start: {line} {process.stderr.read()}")
        start = time.perf_counter()
        for process in processes:
            process.stdin.write("go\n")
            process.stdin.flush()
        reports = [process.stdout.readline() for process in processes]
        seconds = time.perf_counter() - start
        for process, report in zip(processes, reports):
            if process.wait(60) != 0 or not report:
                raise RuntimeError(f"a committing process failed: {process.stderr.read()}")
            steps = json.loads(report)["steps"]
            if steps != list(range(first_step, first_step + count)):
                raise RuntimeError(f"a committing process committed {steps}")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return seconds, locations


def check_nothing_lost(locations: list[str], sources: list[Path], steps: list[int]) -> dict:
    """Read every location back with a new store; what was found, verified, missing or damaged."""
    from ckpt_tasks.errors import VerificationError
    from ckpt_tasks.storage import CheckpointStore
    from ckpt_tasks.storage.records import LATEST

    found = verified = 0
    problems: list[str] = []
    for location, source in zip(locations, sources):
        store = CheckpointStore(location)
        checkpoints = store.list()
        found += len(checkpoints)
        if [c.step for c in checkpoints] != steps:
            problems.append(f"{location}: steps {[c.step for c in checkpoints]}, committed {steps}")
        expected = adler32_hex(source)
        for checkpoint in checkpoints:
            try:
                store.verify(checkpoint)
            except VerificationError as error:
                problems.append(f"{location}: {error}")
                continue
            if checkpoint.adler32 != expected:
                problems.append(f"{location}: step {checkpoint.step} has adler32 {checkpoint.adler32}, "
                                f"the bytes saved {expected}")
                continue
            verified += 1
        wanted = {LATEST, *(name for c in checkpoints for name in (c.manifest_name, *(d.name for d in c.data_files)))}
        leftovers = sorted(set(store.files.listdir(location)) - wanted)
        if leftovers:
            problems.append(f"{location}: files left over: {leftovers}")
    return {"expected": len(locations) * len(steps), "found": found, "verified": verified, "problems": problems}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=8, help="trainings (and xrdcp processes) at once")
    parser.add_argument("--size-mib", type=int, default=64, help="size of each checkpoint")
    parser.add_argument("--checkpoints", type=int, default=3, help="checkpoints each process commits per round")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of each side, alternating")
    parser.add_argument("--server-data", choices=("disk", "memory"), default="disk",
                        help="where the server keeps its files: the temporary directory, or /dev/shm")
    parser.add_argument("--rtt", type=float, default=0.0, help="round-trip time added by a proxy, ms (0: none)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--worker", nargs=4, metavar=("LOCATION", "SOURCE", "FIRST_STEP", "COUNT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        location, source, first_step, count = args.worker
        return worker(location, source, int(first_step), int(count))
    if shutil.which("xrdcp") is None:
        print("xrdcp is not installed (apt-get install xrootd-client)", file=sys.stderr)
        return 2
    from wan_proxy import WanProxy
    from xrootd_server import XRootDServer

    in_memory = args.server_data == "memory" and Path("/dev/shm").is_dir()
    work = Path(tempfile.mkdtemp(prefix="bench-concurrent-"))
    server = XRootDServer(directory="/dev/shm" if in_memory else None).start()
    proxy = None
    try:
        base = server.url
        if args.rtt:
            proxy = WanProxy(("127.0.0.1", server.port), args.rtt / 1000).start()
            base = f"root://127.0.0.1:{proxy.port}"
        sources = [work / f"state-{index}.bin" for index in range(args.processes)]
        for source in sources:
            write_random(source, args.size_mib << 20)
        total = args.processes * args.checkpoints * (args.size_mib << 20)
        raw, ours, checks = [], [], []
        for round_index in range(args.repeat):
            sides = ["xrdcp", "ours"] if round_index % 2 == 0 else ["ours", "xrdcp"]
            for side in sides:
                os.sync()  # no side pays for the other's writeback
                time.sleep(1)
                if side == "xrdcp":
                    raw.append(run_xrdcp(sources, base, args.checkpoints, round_index))
                else:
                    seconds, locations = run_commits(sources, base, args.checkpoints, round_index)
                    ours.append(seconds)
                    first = round_index * args.checkpoints
                    checks.append(check_nothing_lost(locations, sources,
                                                     list(range(first, first + args.checkpoints))))
            # Free the server's disk for the next round (untimed).
            shutil.rmtree(server.data_dir / "conc", ignore_errors=True)
    finally:
        if proxy is not None:
            proxy.stop()
        server.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    return report(args, total, raw, ours, checks)


def report(args, total: int, raw: list[float], ours: list[float], checks: list[dict]) -> int:
    raw_s, ours_s = statistics.median(raw), statistics.median(ours)
    raw_rate, ours_rate = total / raw_s / 1e6, total / ours_s / 1e6
    ratio = ours_rate / raw_rate
    expected = sum(c["expected"] for c in checks)
    verified = sum(c["verified"] for c in checks)
    problems = [p for c in checks for p in c["problems"]]
    where = f", through a proxy adding {args.rtt:g} ms" if args.rtt else ""
    print(f"\n{args.processes} processes at once, each {args.checkpoints} x {args.size_mib} MiB per round, "
          f"one XRootD server (files on {args.server_data}{where}); medians of {args.repeat} rounds\n")
    print("| side | seconds | aggregate MB/s | ours / xrdcp |")
    print("|---|---:|---:|---:|")
    print(f"| {args.processes} x `xrdcp --cksum adler32:source` | {raw_s:.2f} | {raw_rate:.0f} | |")
    verdict = "" if ratio >= GOAL else f" (goal {GOAL})"
    print(f"| {args.processes} x `CheckpointStore.save` | {ours_s:.2f} | {ours_rate:.0f} | {ratio:.2f}{verdict} |")
    print(f"\nall rounds (s): xrdcp {' '.join(f'{s:.2f}' for s in raw)}; ours {' '.join(f'{s:.2f}' for s in ours)}")
    print(f"checkpoints committed {expected}, verified {verified}, lost or damaged {expected - verified}")
    for problem in problems:
        print(f"  {problem}")
    print("nothing lost" if not problems and verified == expected else "CHECKPOINTS LOST OR DAMAGED")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "processes": args.processes, "checkpoints_per_process": args.checkpoints, "size_mib": args.size_mib,
            "rounds": args.repeat, "bytes_per_round": total, "xrdcp_seconds": raw, "ours_seconds": ours,
            "xrdcp_mb_s": raw_rate, "ours_mb_s": ours_rate, "ratio": ratio, "goal": GOAL,
            "committed": expected, "verified": verified, "problems": problems}, indent=2))
    return 0 if not problems and verified == expected else 1


if __name__ == "__main__":
    sys.exit(main())
