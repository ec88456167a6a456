"""Where a rank stands: its number, the world size, and the process group it joins.

A rank reads what its launcher set (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``: torchrun's names, which
:mod:`ckpt_tasks.distributed.launch` sets too). Without them the process is a world of
one, so the same training script runs alone as well.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

logger = logging.getLogger(__name__)

#: seconds a collective may wait for a peer before it fails (a dead peer fails it at once)
DEFAULT_TIMEOUT = 120.0


@dataclass(frozen=True)
class RankInfo:
    """One rank's place in the world, as its launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @property
    def is_coordinator(self) -> bool:
        """Whether this rank writes what is written once (rank 0)."""
        return self.rank == 0

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> "RankInfo":
        """The rank the launcher's variables describe; a world of one when they are absent."""
        environ = os.environ if environ is None else environ
        if "WORLD_SIZE" not in environ:
            return cls(0, 1, 0, "127.0.0.1", 0)
        try:
            info = cls(int(environ["RANK"]), int(environ["WORLD_SIZE"]),
                       int(environ.get("LOCAL_RANK", environ["RANK"])),
                       environ.get("MASTER_ADDR", "127.0.0.1"), int(environ.get("MASTER_PORT", "0")))
        except (KeyError, ValueError) as error:
            raise RuntimeError(f"WORLD_SIZE is set but the rank variables are incomplete or not integers: "
                               f"{error}") from error
        if not 0 <= info.rank < info.world_size:
            raise RuntimeError(f"RANK={info.rank} is outside WORLD_SIZE={info.world_size}")
        return info


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on at the moment (for the rendezvous of one job's ranks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def init_ranks(backend: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> RankInfo:
    """Join the process group the environment describes and return this rank's place.

    ``backend`` defaults to ``nccl`` where CUDA is present, else ``gloo``. ``timeout``
    bounds every collective of the default group: a peer that hangs fails the others
    after it (a peer that dies closes its connections and fails them at once).
    """
    import torch
    import torch.distributed as dist

    info = RankInfo.from_environment()
    if dist.is_initialized():
        return info
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if info.world_size == 1 and "MASTER_PORT" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend, rank=info.rank, world_size=info.world_size,
                            timeout=timedelta(seconds=timeout))
    logger.info("rank %d of %d joined (%s, collectives time out after %.0f s)",
                info.rank, info.world_size, backend, timeout)
    return info


def control_group(timeout: float):
    """A gloo group over all ranks for small CPU messages (flags, states) with its own timeout.

    Called by every rank at the same point. The control messages need a CPU backend
    whatever the training uses (NCCL moves only device tensors).
    """
    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
