"""A Keras 3 callback that checkpoints through ckpt_tasks and resumes at the batch where it stopped.

It runs on any Keras 3 backend, including ``KERAS_BACKEND=torch`` without TensorFlow,
and stores into a :class:`~ckpt_tasks.storage.store.CheckpointStore` (a path or
``root://`` URL; Keras' own ``BackupAndRestore`` refuses any ``://`` path without
TensorFlow)::

    from ckpt_tasks.integrations.keras import KerasCheckpointerCallback

    callback = KerasCheckpointerCallback(store="root://eos.example.org:1094//store/user/me/run1",
                                         save_freq=50)          # every 50 batches
    model.fit(x, y, epochs=10, callbacks=[callback])             # restores by itself

What a checkpoint holds (one ``.npz``, read with ``np.load(allow_pickle=False)``):
every model variable (weights, non-trainable state, the dropout layers' seed
generator states), every optimizer variable (iterations, moments, ...), the compiled
metrics' variables, the Python/NumPy/torch/CUDA random states at the start of the
epoch and now, and the position (epoch, batches done, last logs).

Resuming mid-epoch: Keras' fit loop always starts an epoch at batch 0. The callback
starts fit at the checkpoint's epoch with the generators as they were at that
epoch's start (so the shuffled order is the same), lets the loop read the first
``batch`` batches without training on them (``model.train_function`` is bypassed for
them), then puts back the random state and the metrics of the checkpoint. Training
continues at the next batch; nothing is trained twice.

Seed mode (the seed's signature)::

    callback = KerasCheckpointerCallback("checkpoint", save_freq="epoch",
                                         checkpoint_transfer_mode="shared", checkpoint_transfer_target=...)

keeps the checkpoint in the directory ``local_checkpoint_file`` as the seed does:
``<local_checkpoint_file>/checkpoint.zip`` is the file written and transferred (see
:mod:`ckpt_tasks.integrations.keras_backup`), a completed fit deletes the backup, and
a backup of the seed's (Keras' ``BackupAndRestore`` files) is resumed.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

# This project installs torch, not TensorFlow: Keras 3 runs on torch unless told otherwise.
os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

from ckpt_tasks.integrations import FrameworkCheckpointer, open_store
from ckpt_tasks.integrations import keras_backup
from ckpt_tasks.integrations.keras_random import capture_random_state, restore_random_state
from ckpt_tasks.policy import SaveInterval, SaveNever
from ckpt_tasks.transfer import StoreTransfer

logger = logging.getLogger(__name__)

__all__ = ["KerasCheckpointerCallback", "capture_random_state", "restore_random_state"]

FORMAT = 1
STATE_FILE = keras_backup.STATE_FILE
#: the value a completed fit checkpoints in seed mode: "nothing to resume"
_COMPLETED = object()
#: modes whose stored copy outlives the job, so a completed fit must overwrite it
_STORING_MODES = ("shared", "xrootd", "manual")


# -- the callback ---------------------------------------------------------------------------------------

class KerasCheckpointerCallback(keras.callbacks.Callback):
    """Checkpoint a Keras training into a CheckpointStore (``store=``) or the seed's way.

    Args:
        local_checkpoint_file: seed mode: the backup directory; its ``checkpoint.zip`` is the
            file transferred (list the directory in ``transfer_checkpoint_files`` in
            ``htcondor`` mode, as for the seed).
        save_freq: ``"epoch"``: checkpoint at every epoch end; an integer N: every N batches.
            A signal is honoured at the next batch end either way.
        store: new mode: a path, ``file://`` or ``root://host:port//path``, or a CheckpointStore.
        checkpoint_every: commit every N-th time ``save_freq`` says so (the seed's meaning; default 1).
        checkpoint_interval: also commit when this many seconds passed (at a batch end).
        keep_last, storage_timeout, params: new mode, as for ``CheckpointedTask``.
        checkpoint_exit_code: exit code after SIGTERM/SIGINT (default 85).
        hard_exit: leave with ``os._exit`` (for luigi/law tasks).
        **checkpointer_kwargs: seed mode: the Checkpointer's transfer arguments.

    Seed-mode attributes, with the seed's meaning: ``backup_dir`` (as given),
    ``zip_file`` (``"<backup_dir>/checkpoint.zip"``), ``local_parent_dir`` (the directory
    the backup directory is in) and ``delete_checkpoint`` (True: a completed fit deletes
    the backup, locally and, by overwriting it with a "completed" marker, on the storage).
    """

    def __init__(self, local_checkpoint_file: str | os.PathLike | None = None, save_freq: str | int = "epoch",
                 *, store=None, checkpoint_every: int = 1, checkpoint_interval: float | None = None,
                 keep_last: int = 3, storage_timeout: float = 120.0, params: dict | None = None,
                 checkpoint_exit_code: int = 85, hard_exit: bool = False, **checkpointer_kwargs):
        super().__init__()
        if save_freq != "epoch" and (isinstance(save_freq, bool) or not isinstance(save_freq, int)
                                     or save_freq < 1):
            raise ValueError(f"save_freq must be 'epoch' or an integer >= 1, got {save_freq!r}")
        self.save_freq = save_freq
        self._epoch = 0
        self._batches_done = 0  # batches of the current epoch trained
        self._last_logs: dict[str, float] = {}
        self._epoch_rng: dict[str, np.ndarray] | None = None
        self._resume: dict[str, Any] | None = None
        self._skip = 0
        self._original_train_function = None
        # At epoch-end saving, the time-based save between epochs is this policy's.
        self._between_epochs = SaveInterval(checkpoint_interval) if checkpoint_interval else SaveNever()
        common = dict(hard_exit=hard_exit, checkpoint_every=checkpoint_every,
                      checkpoint_interval=checkpoint_interval, checkpoint_exit_code=checkpoint_exit_code)
        if store is not None:
            if local_checkpoint_file is not None or checkpointer_kwargs:
                raise ValueError("give either store= (new mode) or the seed's local_checkpoint_file "
                                 "and transfer arguments, not both")
            self.store = open_store(store, keep_last=keep_last, storage_timeout=storage_timeout)
            self._workdir = Path(tempfile.mkdtemp(prefix="ckpt-keras-", dir=os.environ.get("_CONDOR_SCRATCH_DIR")))
            self.transfer = StoreTransfer(self.store, step_of=self._step, params=dict(params or {}),
                                          metadata_of=lambda: {"epoch": self._epoch, "batch": self._batches_done})
            self.checkpointer = FrameworkCheckpointer(
                self._workdir / STATE_FILE, self._write_npz, self._read_npz,
                store_transfer=self.transfer, current_step=self._step, **common)
            self.backup_dir = None
        else:
            if local_checkpoint_file is None:
                raise TypeError("KerasCheckpointerCallback needs local_checkpoint_file (seed mode) or store=")
            self.store = None
            self.transfer = None
            self.backup_dir = local_checkpoint_file
            self._backup_path = Path(local_checkpoint_file)
            self.zip_file = f"{local_checkpoint_file}/{keras_backup.ARCHIVE_NAME}"
            self.local_parent_dir = os.path.dirname(local_checkpoint_file)
            self.delete_checkpoint = True
            self.checkpointer = FrameworkCheckpointer(Path(self.zip_file), self._write_archive,
                                                      self._read_archive, **common, **checkpointer_kwargs)

    # -- checkpoint contents ----------------------------------------------------------------------

    def _step(self) -> int:
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None or not optimizer.built:
            return 0
        return int(keras.ops.convert_to_numpy(optimizer.iterations))

    def _groups(self) -> dict[str, list]:
        model = self.model
        optimizer = model.optimizer
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        return {"model": list(model.variables), "optimizer": list(optimizer.variables),
                "metrics": list(model.metrics_variables)}

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        names: dict[str, list[str]] = {}
        for group, variables in self._groups().items():
            names[group] = [v.path for v in variables]
            for index, variable in enumerate(variables):
                arrays[f"{group}/{index:05d}"] = np.asarray(keras.ops.convert_to_numpy(variable.value))
        for key, value in capture_random_state().items():
            arrays[f"rng_now/{key}"] = value
        for key, value in (self._epoch_rng or capture_random_state()).items():
            arrays[f"rng_epoch/{key}"] = value
        meta = {"format": FORMAT, "epoch": self._epoch, "batch": self._batches_done, "step": self._step(),
                "logs": self._last_logs, "names": names, "keras": keras.__version__,
                "backend": keras.backend.backend()}
        arrays["meta"] = np.asarray(json.dumps(meta))
        return arrays

    def _write_npz(self, path: Path, _value: Any) -> None:
        with open(path, "wb") as handle:
            np.savez(handle, **self._arrays())

    def _read_npz(self, path: Path | io.BytesIO) -> dict[str, Any]:
        with np.load(path, allow_pickle=False) as data:  # numbers and strings only, never code
            arrays = {key: data[key] for key in data.files}
        meta = json.loads(str(arrays.pop("meta")))
        if meta.get("format") != FORMAT:
            raise ValueError(f"unknown Keras checkpoint format {meta.get('format')!r}")
        return {"kind": "state", "meta": meta, "arrays": arrays}

    def _write_archive(self, path: Path, value: Any) -> None:
        name = self._backup_path.absolute().name
        if value is _COMPLETED:
            keras_backup.write_completed_archive(path, name)
        else:
            keras_backup.write_state_archive(path, name, lambda handle: np.savez(handle, **self._arrays()))

    def _read_archive(self, path: Path) -> dict[str, Any]:
        backup = keras_backup.read_backup(path, self._backup_path)
        if backup.kind == "state":
            return self._read_npz(io.BytesIO(backup.state))
        return {"kind": backup.kind}

    def _apply_variables(self, checkpoint: dict[str, Any]) -> None:
        meta, arrays = checkpoint["meta"], checkpoint["arrays"]
        for group, variables in self._groups().items():
            names = meta["names"][group]
            if len(names) != len(variables):
                raise ValueError(f"the checkpoint has {len(names)} {group} variables, this model "
                                 f"{len(variables)}: was it made by another model?")
            renamed = [(a, v.path) for a, v in zip(names, variables) if a != v.path]
            if renamed:
                logger.warning("%d %s variables have other names than in the checkpoint (first: %s -> %s); "
                               "restored by position", len(renamed), group, *renamed[0])
            if group == "metrics":
                continue  # put back after the skipped batches (fit resets them at the epoch start)
            for index, variable in enumerate(variables):
                value = arrays[f"{group}/{index:05d}"]
                if tuple(value.shape) != tuple(variable.shape):
                    raise ValueError(f"{variable.path}: checkpoint shape {value.shape}, model {variable.shape}")
                variable.assign(value)

    @staticmethod
    def _sub(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
        return {key[len(prefix):]: value for key, value in arrays.items() if key.startswith(prefix)}

    # -- Keras hooks ------------------------------------------------------------------------------

    def on_train_begin(self, logs=None):
        if getattr(self.model, "steps_per_execution", 1) not in (1, None):
            raise ValueError("KerasCheckpointerCallback needs steps_per_execution=1 to resume at a batch")
        # A second fit with the same callback starts where its own restore says.
        self._epoch, self._batches_done, self._skip, self._resume = 0, 0, 0, None
        self._last_logs, self._epoch_rng = {}, None
        checkpoint = self._restore()
        self.checkpointer.checkpoint_value = self.model  # what a stop saves (restore() reset it)
        if checkpoint is not None and checkpoint["kind"] == "state":
            self._apply_variables(checkpoint)
            meta = checkpoint["meta"]
            self._resume = checkpoint
            self.model._initial_epoch = meta["epoch"]  # what Keras' own BackupAndRestore sets
            self._skip = meta["batch"]
            where = self.store.location if self.store is not None else self.checkpointer.local_checkpoint_file
            logger.info("resuming from step %s (epoch %s, batch %s) of %s",
                        meta["step"], meta["epoch"], meta["batch"], where)
        elif checkpoint is not None and checkpoint["kind"] == "keras":
            self._epoch = keras_backup.load_keras_backup(self.model, self._backup_path)
        self._original_train_function = self.model.train_function
        self.model.train_function = self._train_function
        self.checkpointer.install_signal_handlers()

    def _restore(self) -> dict[str, Any] | None:
        if self.store is not None:
            return self.checkpointer.restore(None)
        # The seed's layout: the archive lives in the backup directory, which a completed
        # fit deleted; the retrieved copy is swapped in there.
        self._backup_path.mkdir(parents=True, exist_ok=True)
        checkpoint = self.checkpointer.restore(None)
        if checkpoint is None and keras_backup.has_keras_backup(self._backup_path):
            return {"kind": "keras"}  # the seed's callback stopped before packing it
        if checkpoint is not None and checkpoint["kind"] == "completed":
            logger.info("%s is the backup of a completed training: training from the start", self.zip_file)
            return None
        return checkpoint

    def backup(self) -> None:
        """Write and transfer a checkpoint now (the seed's ``backup()``)."""
        self.checkpointer.write_and_transfer(self.model)

    def _train_function(self, data):
        if self._skip <= 0:
            return self._original_train_function(data)
        # A batch the checkpoint has trained already: read (the loop did), not trained.
        self._skip -= 1
        self._batches_done += 1
        if self._skip == 0:
            self._finish_resume()
            return dict(self._last_logs)
        return {}

    def _finish_resume(self) -> None:
        checkpoint, self._resume = self._resume, None
        arrays = checkpoint["arrays"]
        for index, variable in enumerate(self.model.metrics_variables):
            variable.assign(arrays[f"metrics/{index:05d}"])
        restore_random_state(self._sub(arrays, "rng_now/"))
        self._last_logs = dict(checkpoint["meta"]["logs"])

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._batches_done = 0
        if self._resume is not None:
            arrays = self._resume["arrays"]
            if self._skip:
                # the generators as they were when this epoch began: the same shuffled order
                restore_random_state(self._sub(arrays, "rng_epoch/"))
            else:
                restore_random_state(self._sub(arrays, "rng_now/"))
                self._resume = None
        self._epoch_rng = capture_random_state()

    def on_train_batch_end(self, batch, logs=None):
        if self._resume is not None or self._batches_done > batch:
            return  # a skipped batch
        self._batches_done = batch + 1
        self._last_logs = {key: float(value) for key, value in (logs or {}).items()}
        if self.save_freq != "epoch" and self._batches_done % self.save_freq == 0:
            self.checkpointer.step(self.model)  # commits when due; honours a recorded signal
        elif self.save_freq == "epoch" and self._interval_due():
            self.checkpointer.write_and_transfer(self.model)  # honours a recorded signal after it
        else:
            self.checkpointer.stop_if_requested()

    def _interval_due(self) -> bool:
        now = time.monotonic()
        if not self._between_epochs.due(self._batches_done, now):
            return False
        self._between_epochs.saved(self._batches_done, now)
        return True

    def on_epoch_end(self, epoch, logs=None):
        # The epoch is complete (validation included): the checkpoint says "next epoch, batch 0".
        self._epoch, self._batches_done = epoch + 1, 0
        self._epoch_rng = None
        if self.save_freq == "epoch":
            self.checkpointer.step(self.model)
        else:
            self.checkpointer.stop_if_requested()

    def on_train_end(self, logs=None):
        if self._original_train_function is not None:
            self.model.train_function = self._original_train_function
            self._original_train_function = None
        self.checkpointer.stop_if_requested()
        self.checkpointer.close()
        if self.store is None and self.delete_checkpoint:
            self._delete_backup()

    def _delete_backup(self) -> None:
        # As the seed's BackupAndRestore(delete_checkpoint=True): a completed fit leaves no
        # backup, so the next run trains from the start. The stored copy cannot be deleted
        # in every mode (manual), so it is overwritten with a "completed" marker.
        if self.checkpointer.checkpoint_transfer_mode in _STORING_MODES:
            try:
                self.checkpointer.checkpoint(_COMPLETED)
                self.checkpointer.transfer_checkpoint_files()
            except Exception as error:  # the training is done: its script goes on
                logger.warning("the training completed, but the stored backup could not be marked "
                               "completed (%s): the next run resumes it and trains nothing", error)
        self.checkpointer.checkpoint_value = None
        shutil.rmtree(self._backup_path, ignore_errors=True)
        logger.info("training completed: deleted the backup %s", self.backup_dir)

    def __del__(self):
        workdir = getattr(self, "_workdir", None)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
