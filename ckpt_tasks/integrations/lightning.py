"""A PyTorch Lightning callback that checkpoints through ckpt_tasks and stops cleanly on eviction.

New mode, with a :class:`~ckpt_tasks.storage.store.CheckpointStore` (local or ``root://``)::

    from ckpt_tasks.integrations.lightning import LightningCheckpointerCallback

    callback = LightningCheckpointerCallback(store="root://eos.example.org:1094//store/user/me/run1",
                                             checkpoint_every=100)       # optimizer steps
    trainer = lightning.Trainer(max_epochs=10, callbacks=[callback])
    trainer.fit(model, datamodule, ckpt_path=callback.restore(), weights_only=True)

The checkpoint is Lightning's own (``trainer.save_checkpoint``: model, optimizers,
LR schedulers, loops, callbacks, precision plugin, resumable data loaders) plus the
Python/NumPy/torch/CUDA random states, which Lightning does not save. ``restore()``
downloads the newest checkpoint that verifies (size and adler32) to a local file
and returns its path, or None when the store is empty.

On SIGTERM or SIGINT during training the callback commits a checkpoint at the end
of the current batch and exits with code 85 (see "Signals" in the README's "Lightning and Keras" section
for how it shares SIGTERM with Lightning's own handler).

Seed mode, unchanged from the seed project except for the import::

    callback = LightningCheckpointerCallback(local_checkpoint_file="last.ckpt",
                                             checkpoint_transfer_mode="xrootd", ...)
    trainer.fit(model, ckpt_path=callback.restore())

It checkpoints at every epoch end (``checkpoint_every`` counts epochs) through the
seed's transfer modes, and, as the seed's, transfers ``local_checkpoint_file`` again
whenever Lightning saves a checkpoint. It runs under ``pytorch_lightning.Trainer``
(the seed's imports) as under ``lightning.pytorch.Trainer``.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any, Iterator

import lightning.pytorch as pl
import torch

from ckpt_tasks.errors import CkptTasksError
from ckpt_tasks.integrations import FrameworkCheckpointer, open_store
from ckpt_tasks.integrations.lightning_ranks import LightningRanks, is_distributed
from ckpt_tasks.state import capture_rng_state, restore_rng_state
from ckpt_tasks.transfer import StoreTransfer

logger = logging.getLogger(__name__)

__all__ = ["LightningCheckpointerCallback", "SeededBatches"]

#: format of the callback's own entry in Lightning's checkpoint
STATE_FORMAT = 1


class LightningCheckpointerCallback(pl.Callback):
    """Checkpoint a Lightning training into a CheckpointStore (``store=``) or the seed's way.

    Args:
        store: where checkpoints go (a path, ``file://``, ``root://host:port//path``, or a
            ``CheckpointStore``). Selects the new mode.
        checkpoint_every: new mode: commit every N optimizer steps (default 100); seed
            mode: the seed's meaning, every N-th epoch end (default 1).
        checkpoint_interval: also commit when this many seconds passed (new mode default 600).
        keep_last: checkpoints the store keeps (new mode).
        storage_timeout: seconds to retry an unanswering storage (new mode).
        params: the training's parameters, recorded in every manifest; a checkpoint made
            with other parameters is refused at ``restore()`` (new mode).
        checkpoint_exit_code: exit code after a signal (default 85).
        hard_exit: leave with ``os._exit`` instead of ``SystemExit`` (for luigi/law tasks).
        workdir: local scratch directory for the checkpoint file (new mode; default a
            temporary directory, in ``$_CONDOR_SCRATCH_DIR`` when set).
        **checkpointer_kwargs: seed mode: the Checkpointer's arguments
            (``local_checkpoint_file``, ``checkpoint_transfer_mode``, ...).
    """

    def __init__(self, store=None, *, checkpoint_every: int | None = None,
                 checkpoint_interval: float | None = None, keep_last: int = 3,
                 storage_timeout: float = 120.0, params: dict | None = None,
                 checkpoint_exit_code: int = 85, hard_exit: bool = False,
                 workdir: str | os.PathLike | None = None, **checkpointer_kwargs):
        super().__init__()
        self._trainer: pl.Trainer | None = None
        self._pending_state: dict | None = None
        self._ranks: LightningRanks | None = None
        self._restore_called = False
        self._restored_path: Path | None = None
        self.store = None
        if store is not None:
            if "local_checkpoint_file" in checkpointer_kwargs or "checkpoint_transfer_mode" in checkpointer_kwargs:
                raise ValueError("give either store= (new mode) or the seed's local_checkpoint_file and "
                                 "transfer mode, not both")
            if checkpointer_kwargs:
                raise TypeError(f"unexpected arguments in store mode: {', '.join(sorted(checkpointer_kwargs))}")
            self.store = open_store(store, keep_last=keep_last, storage_timeout=storage_timeout)
            self._workdir = Path(workdir or tempfile.mkdtemp(
                prefix="ckpt-lightning-", dir=os.environ.get("_CONDOR_SCRATCH_DIR")))
            self._own_workdir = workdir is None
            self._cadence = (checkpoint_every or 100,
                             600.0 if checkpoint_interval is None else (checkpoint_interval or None))
            self.transfer = StoreTransfer(self.store, step_of=self._step, params=dict(params or {}),
                                          metadata_of=self._position)
            self.checkpointer = FrameworkCheckpointer(
                self._workdir / "lightning.ckpt", self._save, self._load,
                store_transfer=self.transfer, current_step=self._step, hard_exit=hard_exit,
                checkpoint_every=checkpoint_every or 100,
                checkpoint_interval=600.0 if checkpoint_interval is None else (checkpoint_interval or None),
                checkpoint_exit_code=checkpoint_exit_code)
        else:
            if "local_checkpoint_file" not in checkpointer_kwargs:
                raise TypeError("LightningCheckpointerCallback needs store= or the seed's local_checkpoint_file=")
            self.transfer = None
            self._own_workdir = False
            self.checkpointer = FrameworkCheckpointer(
                checkpointer_kwargs.pop("local_checkpoint_file"), self._save, self._load,
                hard_exit=hard_exit, checkpoint_every=checkpoint_every or 1,
                checkpoint_interval=checkpoint_interval, checkpoint_exit_code=checkpoint_exit_code,
                **checkpointer_kwargs)

    # -- saving and loading ----------------------------------------------------------------------

    @staticmethod
    def _save(path: Path, trainer: pl.Trainer) -> None:
        # weights_only=False: the full training state (optimizers, schedulers, loops, callbacks).
        trainer.save_checkpoint(path, weights_only=False)

    @staticmethod
    def _load(path: Path) -> Path:
        return Path(path)  # Lightning loads it: trainer.fit(..., ckpt_path=<this>), a Path as the seed's

    def _step(self) -> int:
        return int(self._trainer.global_step) if self._trainer is not None else 0

    def _position(self) -> dict:
        trainer = self._trainer
        if trainer is None:
            return {}
        return {"epoch": int(trainer.current_epoch),
                "batch": int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)}

    def state_dict(self) -> dict[str, Any]:
        # Lightning saves no random states; a resumed run needs them to draw the same
        # dropout masks (and anything else) as an uninterrupted one. On several ranks
        # rank 0 writes the checkpoint: it carries every rank's states, gathered at the save.
        state = {"format": STATE_FORMAT, "rng": capture_rng_state()}
        if self._ranks is not None and self._ranks.rank_rngs is not None:
            state["ranks"] = self._ranks.rank_rngs
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown {type(self).__name__} state format {state_dict.get('format')!r}")
        # Applied when training starts: sanity checks and set-up between here and there
        # must not shift the generators.
        self._pending_state = state_dict

    # -- the seed's API ---------------------------------------------------------------------------

    def restore(self) -> Path | None:
        """The local path (a ``pathlib.Path``, as the seed's) of the newest checkpoint, for
        ``trainer.fit(..., ckpt_path=)``; None if none.

        Raises when the storage does not answer (never taken for "no checkpoint"), and
        refuses a checkpoint made with other ``params``.
        """
        path = self.checkpointer.restore(None)
        self._restore_called = True
        self._restored_path = path
        if path is not None:
            where = self.store.location if self.store is not None else self.checkpointer.local_checkpoint_file
            step = self.transfer.restored.step if self.transfer is not None else "?"
            logger.info("resuming from step %s of %s", step, where)
        return path

    # -- Lightning hooks ---------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        self.checkpointer.checkpoint_value = trainer
        if self.store is None:
            if is_distributed(trainer):
                raise CkptTasksError("the seed's local_checkpoint_file mode runs on one process; on several "
                                     "ranks give store= (a CheckpointStore location)")
            return
        # Never train from scratch over an existing checkpoint (the most common way to lose work).
        if not self._restore_called:
            latest = self.store.latest()
            if latest is not None:
                raise CkptTasksError(
                    f"{self.store.location} holds a checkpoint of step {latest.step}, but trainer.fit was "
                    "not given it: call trainer.fit(..., ckpt_path=callback.restore())")
        elif self._restored_path is not None and trainer.ckpt_path is not None \
                and os.path.abspath(trainer.ckpt_path) != os.path.abspath(self._restored_path):
            raise CkptTasksError(f"callback.restore() gave {self._restored_path}, but trainer.fit loads "
                                 f"{trainer.ckpt_path}")
        elif self._restored_path is not None and trainer.ckpt_path is None:
            raise CkptTasksError("callback.restore() found a checkpoint but trainer.fit was not given it: "
                                 "trainer.fit(..., ckpt_path=callback.restore())")
        if is_distributed(trainer):
            self._ranks = LightningRanks(
                trainer, commit=lambda: self.checkpointer.write_and_transfer(trainer),
                save_checkpoint=lambda: self._save(self._workdir / "rank-part.ckpt", trainer),
                exit_code_for=self.checkpointer.exit_code_for, clean_up=self._remove_local_files,
                checkpoint_every=self._cadence[0],
                checkpoint_interval=self._cadence[1],
                restored_step=self.transfer.restored.step if self._restored_path is not None else None)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            ranks = state.get("ranks") if self._ranks is not None else None
            own = ranks[self._ranks.rank] if ranks and self._ranks.rank < len(ranks) else state["rng"]
            restore_rng_state(own)
        # Lightning registered its SIGTERM handler just before; ours replaces it while the
        # training loop runs (see the README, "Signals") and gives it back at the end.
        if self._ranks is not None:
            self._ranks.install()
        else:
            self.checkpointer.install_signal_handlers()
        # A SIGTERM between Lightning's handler and ours (the sanity check, data set-up) set
        # received_sigterm: Lightning would raise SystemExit() (exit 0) at the first batch end.
        if getattr(trainer, "received_sigterm", False):
            # The property has no setter; its connector holds the flag (Lightning 2.x).
            connector = getattr(trainer, "_signal_connector", None)
            if connector is not None and hasattr(connector, "received_sigterm"):
                connector.received_sigterm = False
            if self._ranks is not None:
                self._ranks.request(signal.SIGTERM)
            else:
                self.checkpointer.stop_guard.request(signal.SIGTERM)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self._at_optimizer_step(trainer, batch_idx):
            return  # in the middle of gradient accumulation the state is not complete
        if self._ranks is not None:
            self._ranks.after_step(int(trainer.global_step))  # every rank: agree, then save or stop alike
        elif self.store is not None:
            self.checkpointer.step(trainer)  # commits when due; honours a recorded signal
        else:
            self.checkpointer.stop_if_requested()

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # The seed transfers local_checkpoint_file whenever Lightning saves a checkpoint (also one
        # another callback asks for). During the callback's own save the file is moved aside, so
        # this is a no-op then. With a stop pending, the stop's own commit comes at the next batch
        # end: not in the middle of Lightning's save.
        if self.store is None and not self.checkpointer.stop_requested:
            self.checkpointer.transfer_checkpoint_files()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.store is None:
            self.checkpointer.step(trainer)  # the seed's cadence: epochs

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A signal after the last batch: the training is done; commit it and stop as asked.
        if self._ranks is not None:
            self._ranks.after_training(int(trainer.global_step))
            self._ranks.close()
        self.checkpointer.stop_if_requested()
        self.checkpointer.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._ranks is not None:
            self._ranks.close()
        self.checkpointer.close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._ranks is not None:
            self._ranks.close()
        self.checkpointer.close()
        if self._own_workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def _remove_local_files(self) -> None:
        """After a stop on several ranks, which leaves without teardown: the store holds the
        checkpoint, the local copies go (the whole work directory when the callback made it)."""
        if self._own_workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
        elif self.store is not None:
            for name in ("lightning.ckpt", "rank-part.ckpt"):
                (self._workdir / name).unlink(missing_ok=True)

    @staticmethod
    def _at_optimizer_step(trainer: pl.Trainer, batch_idx: int) -> bool:
        accumulate = trainer.accumulate_grad_batches
        return accumulate == 1 or (batch_idx + 1) % accumulate == 0 \
            or batch_idx + 1 == trainer.num_training_batches


class SeededBatches:
    """A resumable, shuffled batch iterable for Lightning: the order of an epoch depends only on
    ``seed`` and the epoch, and a restored run continues at the batch where the checkpoint was made.

    Lightning saves and restores it with the trainer's checkpoint (it has ``state_dict`` and
    ``load_state_dict``) and tells it the epoch (``sampler.set_epoch``). It never draws from
    the global random generators.

    On several ranks (a ``torch.distributed`` process group, as ``strategy="ddp"`` makes)
    each rank takes its share of the epoch's permutation,
    :func:`~ckpt_tasks.distributed.sampler.rank_order`: every ``world_size``-th sample from
    its rank, padded so that every rank has the same number of batches.

    Args:
        *tensors: tensors with the same first dimension (e.g. features and labels).
        batch_size: samples per batch (the last batch may be smaller).
        seed: seed of the shuffling.
        shuffle: False keeps the order.
    """

    def __init__(self, *tensors: torch.Tensor, batch_size: int, seed: int = 0, shuffle: bool = True):
        if not tensors or any(len(t) != len(tensors[0]) for t in tensors):
            raise ValueError("SeededBatches needs tensors of the same length")
        self.tensors = tensors
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.sampler = self  # Lightning calls dataloader.sampler.set_epoch(epoch)
        self.batch_sampler = None  # (what Lightning looks at next to .sampler)
        self._epoch = 0
        self._position = 0  # batches of the current epoch handed out
        self._resume: dict | None = None

    @staticmethod
    def _world() -> tuple[int, int]:
        # Read when iterated and sized, after Lightning has joined the process group.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def __len__(self) -> int:
        per_rank = -(-len(self.tensors[0]) // self._world()[1])
        return -(-per_rank // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def order(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices in ``epoch`` (all of them on one rank)."""
        from ckpt_tasks.distributed.sampler import rank_order

        rank, world_size = self._world()
        return rank_order(len(self.tensors[0]), self.seed, epoch, rank, world_size, shuffle=self.shuffle)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return self._batches()

    def _batches(self) -> Iterator[tuple[torch.Tensor, ...]]:
        # A generator: runs at the first next(), after Lightning's set_epoch.
        start = 0
        if self._resume is not None and self._resume["epoch"] == self._epoch:
            start = self._resume["position"]
        self._resume = None
        order = self.order(self._epoch)
        for self._position in range(start, len(self)):
            index = order[self._position * self.batch_size:(self._position + 1) * self.batch_size]
            batch = tuple(t[index] for t in self.tensors)
            self._position += 1
            yield batch

    def state_dict(self) -> dict:
        state = {"epoch": self._epoch, "position": self._position, "seed": self.seed}
        world_size = self._world()[1]
        if world_size > 1:
            state["world_size"] = world_size
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed:
            raise ValueError(f"the checkpoint's batches were shuffled with seed {state.get('seed')}, "
                             f"these with {self.seed}")
        if state.get("world_size", 1) != self._world()[1]:
            raise ValueError(f"the checkpoint's position is in an epoch split over {state.get('world_size', 1)} "
                             f"ranks, this training has {self._world()[1]}")
        self._resume = {"epoch": int(state["epoch"]), "position": int(state["position"])}
        self._epoch = int(state["epoch"])
