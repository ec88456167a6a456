"""``--ranks N`` for a CheckpointedTask: the task's run becomes the parent of N ranks.

Mixed in before :class:`~ckpt_tasks.tasks.CheckpointedTask`::

    class TrainTask(RanksMixin, CheckpointedTask, law.LocalWorkflow, HTCondorWorkflow): ...

With ``--ranks 1`` nothing changes. With more, ``run()`` (inside luigi's worker, the
job's top process) starts the ranks through :mod:`ckpt_tasks.distributed.launch`,
passes SIGTERM/SIGINT on to them and leaves with their agreed exit code (85 after a
stop). Each rank is a plain process (``python -m ckpt_tasks.distributed.task``) that
rebuilds the task from its parameters and trains: no rank runs luigi's scheduler.
Rank 0 writes the outputs (``finish``) once training is over.

The subclass's ``train`` sees the world through the task: ``self.rank_info`` (rank,
world size), ``self.parallel(model)`` (the DDP wrapper, or the model itself on one
rank) and :func:`~ckpt_tasks.distributed.sampler.rank_order` for its data order.
"""
from __future__ import annotations

import importlib
import json
import logging
import sys
from typing import Any

from ckpt_tasks.distributed.launch import launch
from ckpt_tasks.distributed.ranks import RankInfo
from ckpt_tasks.parameters import PositiveFloatParameter, PositiveIntParameter
from ckpt_tasks.state import TrainingState
from ckpt_tasks.stop import exit_process

logger = logging.getLogger(__name__)


class RankSession:
    """What ``train`` talks to on a rank: ``step()`` after every optimizer step."""

    def __init__(self, state: TrainingState, checkpointer: Any):
        self.state = state
        self.checkpointer = checkpointer

    def step(self, **metrics: float) -> None:
        """Record metrics, checkpoint when due, stop here (exit 85) after an agreed stop."""
        if metrics:
            self.state.record(**metrics)
        self.checkpointer.step()

    def close(self) -> None:
        pass


class RanksMixin:
    """Adds ``--ranks`` to a CheckpointedTask (see the module docstring)."""

    ranks = PositiveIntParameter(default=1, significant=False,
                                 description="processes (ranks) that train together in this job, one per GPU "
                                             "or sharing the CPU; default: 1")
    rank_timeout = PositiveFloatParameter(default=120.0, significant=False,
                                          description="seconds a rank waits for a hung peer before all fail; "
                                                      "default: 120")

    #: set on each rank before create_state
    rank_info: RankInfo = RankInfo(0, 1, 0, "127.0.0.1", 0)

    def checkpoint_params(self) -> dict[str, Any]:
        """The training's parameters, with the world size when it is more than one.

        A rank's share of the data, and so the position in an epoch, depends on the
        world size: a checkpoint of 2 ranks is refused by 1 and the other way round
        (one rank keeps the fingerprints it always had).
        """
        params = super().checkpoint_params()
        if self.ranks > 1:
            params["ranks"] = self.ranks
        return params

    def rank_backend(self) -> str | None:
        """torch.distributed's backend: gloo for ``--device cpu``, else the default (NCCL on CUDA)."""
        return "gloo" if getattr(self, "device", None) == "cpu" else None

    def parallel(self, model: Any) -> Any:
        """``model`` wrapped for data-parallel training on several ranks (itself on one)."""
        if self.rank_info.world_size == 1:
            return model
        import torch

        return torch.nn.parallel.DistributedDataParallel(model)

    def run(self):
        if self.ranks == 1:
            return super().run()
        cls = type(self)
        params = json.dumps(self.to_str_params(only_significant=False))
        code = launch([sys.executable, "-m", "ckpt_tasks.distributed.task", cls.__module__, cls.__qualname__,
                       params], self.ranks)
        if code != 0:
            # luigi would report SystemExit as a failure: 85 must reach the batch system as it is.
            exit_process(code, hard=True)
        self.publish_message(f"training on {self.ranks} ranks complete")

    def run_rank(self) -> None:
        """The training on one rank (in a rank process, without luigi's scheduler)."""
        from ckpt_tasks.distributed.checkpointer import DistributedCheckpointer
        from ckpt_tasks.distributed.ranks import init_ranks

        self.rank_info = init_ranks(self.rank_backend(), timeout=self.rank_timeout)
        state = self.create_state()
        checkpointer = DistributedCheckpointer(
            self.checkpoint_store(), state, params=self.checkpoint_params(),
            checkpoint_every=self.checkpoint_every, checkpoint_interval=self.checkpoint_interval or None,
            stop_deadline=self.stop_deadline, control_timeout=self.rank_timeout,
            asynchronous=self.async_checkpoint)
        if checkpointer.restore():
            logger.info("rank %d resuming from step %d", self.rank_info.rank, state.step)
        self.train(state, RankSession(state, checkpointer))
        checkpointer.close()
        if self.rank_info.is_coordinator:
            self.finish(state)


def main(argv: list[str] | None = None) -> None:
    """``python -m ckpt_tasks.distributed.task MODULE CLASS PARAMS_JSON``: one rank of a task."""
    module, name, params = argv if argv is not None else sys.argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cls: Any = importlib.import_module(module)
    for part in name.split("."):
        cls = getattr(cls, part)
    task = cls.from_str_params(json.loads(params))
    task.run_rank()
    import torch.distributed as dist

    dist.destroy_process_group()


if __name__ == "__main__":
    main()
