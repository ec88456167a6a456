"""Several ranks in one job: one agreed stop, per-rank state, a launcher that stands for them.

- :mod:`~ckpt_tasks.distributed.ranks`: a rank's place (torchrun's variables) and the
  process group with a timeout;
- :mod:`~ckpt_tasks.distributed.agreement`: every rank stops after the same step;
- :mod:`~ckpt_tasks.distributed.sampler`: a rank's data order from (seed, epoch, rank);
- :mod:`~ckpt_tasks.distributed.checkpointer`: replicated state saved once, every rank's
  RNG states with it, the agreed stop committed and left with exit 85;
- :mod:`~ckpt_tasks.distributed.launch`: ``python -m ckpt_tasks.distributed.launch --nproc N -- ...``.
"""
from ckpt_tasks.distributed.agreement import Decision, StopAgreement
from ckpt_tasks.distributed.checkpointer import DistributedCheckpointer, PeerFailure
from ckpt_tasks.distributed.ranks import RankInfo, free_port, init_ranks
from ckpt_tasks.distributed.sampler import batches_per_epoch, rank_batches, rank_order

__all__ = ["Decision", "DistributedCheckpointer", "PeerFailure", "RankInfo", "StopAgreement", "batches_per_epoch",
           "free_port", "init_ranks", "rank_batches", "rank_order"]
