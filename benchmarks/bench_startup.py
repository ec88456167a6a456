"""A job's start-up in the software routes: to its first training step, first and cached.

The job script (``ckpt_tasks/htcondor/job.sh``) is rendered by the workflow, as law does
at submission, for ``TrainTask`` branch 0 (spool mode: its checkpoints stay in the
sandbox, so nothing but this machine is needed), and then run as HTCondor would run it:
in a fresh sandbox directory holding what HTCondor's file transfer would have put there
(the bundles, hard-linked: the transfer itself is not timed), with a clean environment.
The time is taken from the job's start to the line that its branch prints right before
training (``... starting from scratch``): fetching and checking the bundles, unpacking,
the import check, law's start, the restore. Then the job is stopped.

- ``shared``: the checkout and its ``.venv`` (the baseline: what any route costs);
- ``bundle (first on the worker)``: the environment is unpacked into an empty worker cache;
- ``bundle (cached)``: a later job on the same worker uses the cached tree;
- ``bundle (no worker cache)``: a cache that cannot be used: unpacked in the sandbox.

Building the bundles (the first time, with ``--rebuild``, and cached) and their sizes
are measured too.

    .venv/bin/python benchmarks/bench_startup.py [--repeat 3] [--rebuild]
"""
from __future__ import annotations

import argparse
import base64
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
READY = re.compile(r"starting from scratch|resuming from step")
SOFTWARE = re.compile(r"software \(\w+\) checked and unpacked in ([\d.]+) s")


def render(data: Path, cache: Path, software: str) -> tuple[str, list[str]]:
    """The job script and job.sh's arguments for branch 0, made by the workflow."""
    os.environ.update(CKPT_TASKS_DATA=str(data), CKPT_TASKS_BUNDLE_CACHE=str(cache))
    from law.job.dashboard import NoJobDashboard
    from luigi.cmdline_parser import CmdlineParser

    import workflows.train  # noqa: F401  (registers TrainTask)

    args = ["TrainTask", "--workflow", "htcondor", "--checkpoint-mode", "spool", "--software", software,
            "--epochs", "1"]
    with CmdlineParser.global_instance(args) as parser:
        proxy = parser.get_task_obj().workflow_proxy
        proxy.job_file_factory = proxy.create_job_file_factory()
        proxy.dashboard = NoJobDashboard()
        submit = Path(proxy.create_job_file(0, [0])["job"])
    (script,) = submit.parent.glob("job_*.sh")
    arguments = re.search(r"^arguments = (.*)$", submit.read_text(), re.M).group(1)
    return script.read_text(), shlex.split(arguments)


def start_job(script: str, arguments: list[str], sandbox: Path, worker_cache: Path) -> tuple[float, float]:
    """Seconds from the job's start to its first training step, and of its software phase (the
    job's own figure: fetch, check, unpack; 0 in the shared route)."""
    env = {"PATH": "/usr/bin:/bin", "_CONDOR_SCRATCH_DIR": str(sandbox), "CKPT_TASKS_WORKER_CACHE": str(worker_cache),
           "OMP_NUM_THREADS": "1", "HOME": str(sandbox)}
    started = time.monotonic()
    job = subprocess.Popen(["bash", "-c", script, "job.sh", *arguments], cwd=sandbox, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    seen, phase = [], 0.0
    try:
        for line in job.stdout:
            seen.append(line)
            if match := SOFTWARE.search(line):
                phase = float(match.group(1))
            if READY.search(line):
                return time.monotonic() - started, phase
        raise RuntimeError("the job ended before its first step:\n" + "".join(seen[-30:]))
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        job.wait()


def timed(function, *args):
    started = time.monotonic()
    result = function(*args)
    return result, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each case; medians are shown")
    parser.add_argument("--rebuild", action="store_true",
                        help="build the environment bundle into an empty cache (about a minute) instead of "
                             "reusing the user's bundle cache")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from ckpt_tasks.htcondor.bundle import build_code_bundle, default_cache_dir
    from ckpt_tasks.htcondor.envbundle import build_env_bundle

    work = Path(tempfile.mkdtemp(prefix="bench_startup-"))
    try:
        cache = work / "bundles" if args.rebuild else default_cache_dir()
        env, env_first = timed(build_env_bundle, cache)
        _, env_cached = timed(build_env_bundle, cache)
        code, code_s = timed(build_code_bundle, ROOT, cache)
        print(f"environment bundle: {env.size / 1e6:.0f} MB, built in {env_first:.1f} s"
              f"{'' if args.rebuild else ' (found in the cache: --rebuild to time a build)'}, "
              f"{env_cached:.2f} s when cached")
        print(f"code bundle: {code.size / 1e6:.2f} MB, {code_s:.2f} s")
        rows: dict[str, list[float]] = {}
        phases: dict[str, list[float]] = {}
        for run in range(args.repeat):
            for software in ("shared", "bundle"):
                script, arguments = render(work / "data", cache, software)
                cases = ["shared"] if software == "shared" else \
                    ["bundle (first on the worker)", "bundle (cached)", "bundle (no worker cache)"]
                worker_cache = work / f"worker-cache-{run}"
                for case in cases:
                    sandbox = work / f"sandbox-{run}-{software}-{cases.index(case)}"
                    sandbox.mkdir(parents=True)
                    # the bundles this job script names (the code bundle is the checkout at rendering)
                    for name in set(re.findall(r'"((?:code|env)-[0-9a-f]+\.tar\.gz)"', script)):
                        os.link(cache / name, sandbox / name)
                    cache_here = worker_cache
                    if case == "bundle (no worker cache)":
                        cache_here = work / "open-cache"
                        cache_here.mkdir(exist_ok=True)
                        cache_here.chmod(0o777)  # writable by others: never used
                    total, phase = start_job(script, arguments, sandbox, cache_here)
                    rows.setdefault(case, []).append(total)
                    phases.setdefault(case, []).append(phase)
                    shutil.rmtree(sandbox, ignore_errors=True)
                shutil.rmtree(worker_cache, ignore_errors=True)
        shared = statistics.median(rows["shared"])
        print(f"\njob start to the first training step, median of {args.repeat} (min-max); of it the "
              "software phase (fetch, check, unpack):")
        for case, values in rows.items():
            median = statistics.median(values)
            extra = "" if case == "shared" else f"   software {statistics.median(phases[case]):5.1f} s, " \
                                                f"vs shared {median - shared:+.1f} s"
            print(f"  {case:30s} {median:6.1f} s ({min(values):.1f}-{max(values):.1f}){extra}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
