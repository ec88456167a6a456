"""The data order of a rank: a function of (seed, epoch, rank, world size) alone.

Every rank draws the same permutation of the data set for an epoch (from a generator
seeded by seed and epoch, never from the global RNG) and takes every
``world_size``-th sample starting at its rank, as torch's DistributedSampler does. A
resumed rank recomputes its order and skips the batches the checkpoint's position
says are done, so it continues with exactly the samples it would have seen.
"""
from __future__ import annotations

from typing import Any, Iterator

#: mixes the epoch into the seed (a prime, so that (seed, epoch) pairs do not collide early)
_EPOCH_STRIDE = 1_000_003


def rank_order(size: int, seed: int, epoch: int, rank: int, world_size: int, shuffle: bool = True) -> Any:
    """The indices rank ``rank`` trains on in ``epoch``, as an int64 tensor.

    The order is padded by repeating its start so that every rank gets the same number
    of samples (``ceil(size / world_size)``), and therefore the same number of steps.
    """
    import torch

    if size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need size >= 1 and 0 <= rank < world_size, got {size}, {rank}, {world_size}")
    if shuffle:
        generator = torch.Generator().manual_seed(seed * _EPOCH_STRIDE + epoch)
        order = torch.randperm(size, generator=generator)
    else:
        order = torch.arange(size)
    per_rank = -(-size // world_size)
    padding = per_rank * world_size - size
    if padding:
        order = torch.cat([order, order[:padding]])
    return order[rank::world_size]


def rank_batches(size: int, batch_size: int, seed: int, epoch: int, rank: int, world_size: int,
                 start_batch: int = 0) -> Iterator[Any]:
    """The index batches of a rank's epoch, from batch ``start_batch`` on (a resumed position)."""
    order = rank_order(size, seed, epoch, rank, world_size)
    for start in range(start_batch * batch_size, len(order), batch_size):
        yield order[start:start + batch_size]


def batches_per_epoch(size: int, batch_size: int, world_size: int) -> int:
    """Steps in one epoch: the same on every rank."""
    per_rank = -(-size // world_size)
    return -(-per_rank // batch_size)
