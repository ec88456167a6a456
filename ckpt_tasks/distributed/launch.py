"""Start N ranks of one job and stand for them towards the batch system.

HTCondor signals only a job's top process, and reads only its exit code. torchrun
stops its workers a fixed time after a SIGTERM and reports a worker's exit 85 as 1, so
this small launcher is the top process instead::

    python -m ckpt_tasks.distributed.launch --nproc 2 -- train.py --store /data/ckpt

It starts the ranks with torchrun's variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` on a free port), passes
SIGTERM and SIGINT on to every rank and never kills a rank that is stopping, and
exits with the ranks' agreed code: 85 when all exited 85, 0 when all exited 0. When a
rank fails, the others get ``--grace`` seconds to fail by themselves (their next
collective does), then SIGKILL, and the launcher exits with the first failure's code
(128 + N for a rank killed by signal N).

The ranks start with SIGTERM and SIGINT blocked, so that a stop during their start-up
waits for :class:`~ckpt_tasks.distributed.agreement.StopAgreement` to install its
handlers (which unblocks them); a rank command that never does stays deaf to them
until the batch system kills it.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Sequence

from ckpt_tasks.distributed.ranks import free_port
from ckpt_tasks.stop import CHECKPOINT_EXIT_CODE, EXIT_CHECKPOINT_FAILED, STOP_SIGNALS

logger = logging.getLogger("ckpt_tasks.distributed.launch")

_POLL_SECONDS = 0.05
_PR_SET_PDEATHSIG = 1


def _prepare_rank() -> None:
    # A stop signal that arrives while a rank still imports torch must wait for its
    # handler, not kill it: blocked here (the mask survives exec), a signal stays
    # pending until StopAgreement.install unblocks it, and is then recorded.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    # A launcher killed hard (SIGKILL) must not leave its ranks running (Linux only).
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def exit_code_of(returncode: int) -> int:
    """A child's status as a shell reports it: killed by signal N is 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def rank_command(argv: Sequence[str]) -> list[str]:
    """The command of a rank: a ``.py`` script runs with this interpreter, anything else as given."""
    argv = list(argv)
    if not argv:
        raise ValueError("no command to launch")
    return [sys.executable, *argv] if argv[0].endswith(".py") else argv


def rank_environment(rank: int, nproc: int, port: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of rank ``rank`` of ``nproc`` on this machine."""
    env = dict(os.environ if base is None else base)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
               GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # The ranks share the machine's cores instead of each starting one thread per core.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


class RankProcesses:
    """The ranks of one job: started together, signalled together, judged together."""

    def __init__(self, argv: Sequence[str], nproc: int, grace: float = 10.0, port: int | None = None):
        if nproc < 1:
            raise ValueError(f"nproc must be >= 1, got {nproc}")
        self.command = rank_command(argv)
        self.nproc = nproc
        self.grace = grace
        self.port = port or free_port()
        self.processes: list[subprocess.Popen] = []
        self.relayed: int | None = None

    def start(self) -> None:
        for rank in range(self.nproc):
            self.processes.append(subprocess.Popen(
                self.command, env=rank_environment(rank, self.nproc, self.port), preexec_fn=_prepare_rank))
        logger.info("started %d ranks of %s (rendezvous on port %d)", self.nproc, self.command, self.port)

    def relay(self, signum: int, frame=None) -> None:
        """Pass a stop signal on to every rank still running."""
        self.relayed = signum
        logger.info("%s: passing it on to %d ranks", signal.Signals(signum).name, self.nproc)
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signum)

    def wait(self) -> int:
        """Wait for every rank; the job's exit code (see the module docstring)."""
        failed_at: float | None = None
        first_failure: int | None = None
        while True:
            codes = [process.poll() for process in self.processes]
            for rank, code in enumerate(codes):
                if code is not None and first_failure is None and code not in (0, CHECKPOINT_EXIT_CODE):
                    first_failure, failed_at = exit_code_of(code), time.monotonic()
                    logger.error("rank %d failed with exit %d; the others get %.0f s to fail by themselves",
                                 rank, first_failure, self.grace)
            if all(code is not None for code in codes):
                return self._verdict(codes, first_failure)
            if failed_at is not None and time.monotonic() - failed_at > self.grace:
                self.kill()
            time.sleep(_POLL_SECONDS)

    def _verdict(self, codes: list[int], first_failure: int | None) -> int:
        if first_failure is not None:
            return first_failure
        if len(set(codes)) == 1:
            logger.info("all %d ranks exited %d", self.nproc, codes[0])
            return codes[0]
        logger.error("the ranks disagree on how they ended (exit codes %s)", codes)
        return EXIT_CHECKPOINT_FAILED

    def kill(self) -> None:
        """SIGKILL every rank still running."""
        for rank, process in enumerate(self.processes):
            if process.poll() is None:
                logger.error("killing rank %d (pid %d)", rank, process.pid)
                process.kill()


def launch(argv: Sequence[str], nproc: int, grace: float = 10.0) -> int:
    """Run ``argv`` as ``nproc`` ranks, relaying stop signals; return the job's exit code."""
    ranks = RankProcesses(argv, nproc, grace)
    previous = {signum: signal.signal(signum, ranks.relay) for signum in STOP_SIGNALS}
    try:
        ranks.start()
        return ranks.wait()
    except BaseException:
        ranks.kill()
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ckpt_tasks.distributed.launch",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=int(os.environ.get("CKPT_TASKS_RANKS", "1")),
                        help="ranks to start on this machine; default: $CKPT_TASKS_RANKS or 1")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds the other ranks get to fail by themselves after one failed; default: 10")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="-- then the rank's command (a .py runs with this python)")
    options = parser.parse_args(args)
    command = options.command[1:] if options.command[:1] == ["--"] else options.command
    logging.basicConfig(level=logging.INFO, format="%(asctime)s launch %(levelname)s %(message)s")
    if options.nproc < 1 or not command:
        parser.error("need --nproc >= 1 and a command after --")
    return launch(command, options.nproc, options.grace)


if __name__ == "__main__":
    sys.exit(main())
