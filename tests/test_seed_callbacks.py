"""The Keras and Lightning callbacks used as the seed project's users use them: the seed's
constructor arguments, its backup directory layout, its completed-training clean-up, its
own backups (Keras' BackupAndRestore files and the seed's checkpoint.zip), and the seed's
example scripts run with only the import line changed (tests/helpers/seed_*_script.py)."""
from __future__ import annotations

import os
import shutil
import signal
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402

from background_run import BackgroundRun  # noqa: E402
from ckpt_tasks.errors import CkptTasksError  # noqa: E402
from ckpt_tasks.integrations.keras import KerasCheckpointerCallback  # noqa: E402

HELPERS = Path(__file__).resolve().parent / "helpers"
TIMEOUT = 180


# -- Keras, in-process ---------------------------------------------------------------------------

def _model(seed: int = 0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(10)])
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _data():
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.data[:320] / 16.0).astype("float32"), digits.target[:320]  # 5 batches of 64


def _fit(model, callback, epochs: int, extra=()):
    x, y = _data()
    return model.fit(x, y, epochs=epochs, batch_size=64, verbose=0, callbacks=[callback, *extra])


class StopAt(keras.callbacks.Callback):
    """Interrupts fit at the start of an epoch, as a crash would (no on_train_end)."""

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt(f"stopped at epoch {epoch}")


def test_keras_seed_attributes_and_layout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    callback = KerasCheckpointerCallback("checkpoint")
    assert callback.zip_file == "checkpoint/checkpoint.zip"
    assert callback.local_parent_dir == ""
    assert callback.backup_dir == "checkpoint" and callback.delete_checkpoint is True
    assert callback.checkpointer.local_checkpoint_file == Path("checkpoint/checkpoint.zip")
    nested = KerasCheckpointerCallback(tmp_path / "runs" / "backup")
    assert nested.zip_file == f"{tmp_path}/runs/backup/checkpoint.zip"
    assert nested.local_parent_dir == str(tmp_path / "runs")


def test_keras_seed_mode_trains_again_after_a_completed_fit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    callback = KerasCheckpointerCallback(local_checkpoint_file="checkpoint", checkpoint_every=1)
    model = _model()
    assert _fit(model, callback, epochs=2).epoch == [0, 1]
    assert not (tmp_path / "checkpoint").exists()  # the seed's backup is deleted at the end
    assert _fit(model, callback, epochs=2).epoch == [0, 1]  # fit again, same callback
    assert _fit(_model(), KerasCheckpointerCallback("checkpoint"), epochs=2).epoch == [0, 1]  # the script again
    kept = KerasCheckpointerCallback("checkpoint")
    kept.delete_checkpoint = False
    assert _fit(_model(), kept, epochs=2).epoch == [0, 1]
    assert (tmp_path / "checkpoint" / "checkpoint.zip").exists()
    assert _fit(_model(), KerasCheckpointerCallback("checkpoint"), epochs=3).epoch == [2]


def test_keras_seed_shared_mode_trains_again_after_a_completed_fit(tmp_path):
    kwargs = dict(checkpoint_transfer_mode="shared", checkpoint_transfer_target=tmp_path / "store" / "backup.zip")
    interrupted = _model()
    with pytest.raises(KeyboardInterrupt):
        _fit(interrupted, KerasCheckpointerCallback(tmp_path / "backup", **kwargs), epochs=3, extra=[StopAt(2)])
    assert (tmp_path / "store" / "backup.zip").exists()
    shutil.rmtree(tmp_path / "backup")  # a new job: only the stored copy is left
    assert _fit(_model(), KerasCheckpointerCallback(tmp_path / "backup", **kwargs), epochs=3).epoch == [2]
    # completed: the next run starts from the beginning, as with the seed
    assert _fit(_model(), KerasCheckpointerCallback(tmp_path / "backup", **kwargs), epochs=3).epoch == [0, 1, 2]


def _keras_backup(backup_dir: Path, stop_epoch: int) -> list[np.ndarray]:
    """A backup written by Keras' own BackupAndRestore (what the seed's callback leaves): the
    weights after ``stop_epoch`` epochs."""
    model = _model()
    with pytest.raises(KeyboardInterrupt):
        _fit(model, keras.callbacks.BackupAndRestore(str(backup_dir)), epochs=5, extra=[StopAt(stop_epoch)])
    assert (backup_dir / "latest.weights.h5").exists() and (backup_dir / "training_metadata.json").exists()
    return [np.array(w) for w in model.get_weights()]


class Weights(keras.callbacks.Callback):
    """Records the weights at the start of training."""

    def on_train_begin(self, logs=None):
        self.at_start = [np.array(w) for w in self.model.get_weights()]


def test_keras_resumes_a_backup_of_keras_backup_and_restore(tmp_path):
    expected = _keras_backup(tmp_path / "backup", stop_epoch=2)
    model, start = _model(seed=5), Weights()
    callback = KerasCheckpointerCallback(tmp_path / "backup")
    history = _fit(model, callback, epochs=4, extra=[start])
    assert history.epoch == [2, 3]  # epochs 0 and 1 came from the seed's backup
    assert all(np.array_equal(a, b) for a, b in zip(start.at_start, expected))
    assert int(model.optimizer.iterations.numpy()) == 20  # the optimizer state too


def _seed_zip(backup_dir: Path) -> Path:
    """The seed's checkpoint.zip: a gzipped tar of the backup directory, inside it."""
    archive = backup_dir / "checkpoint.zip"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(backup_dir.iterdir()):
            if path != archive:
                tar.add(path, arcname=f"{backup_dir.name}/{path.name}")
    return archive


def test_keras_resumes_the_seeds_checkpoint_zip_from_the_storage(tmp_path):
    expected = _keras_backup(tmp_path / "backup", stop_epoch=3)
    target = tmp_path / "store" / "backup.zip"
    target.parent.mkdir()
    shutil.move(_seed_zip(tmp_path / "backup"), target)
    shutil.rmtree(tmp_path / "backup")  # a new job: only the seed's stored copy is left
    model, start = _model(seed=5), Weights()
    callback = KerasCheckpointerCallback(tmp_path / "backup", checkpoint_transfer_mode="shared",
                                         checkpoint_transfer_target=target)
    assert _fit(model, callback, epochs=4, extra=[start]).epoch == [3]
    assert all(np.array_equal(a, b) for a, b in zip(start.at_start, expected))


def test_keras_resumes_the_seeds_checkpoint_zip_in_the_backup_directory(tmp_path):
    expected = _keras_backup(tmp_path / "backup", stop_epoch=1)
    _seed_zip(tmp_path / "backup")
    for name in ("latest.weights.h5", "training_metadata.json"):
        (tmp_path / "backup" / name).unlink()  # only the seed's archive is left
    model, start = _model(seed=5), Weights()
    assert _fit(model, KerasCheckpointerCallback(tmp_path / "backup"), epochs=3, extra=[start]).epoch == [1, 2]
    assert all(np.array_equal(a, b) for a, b in zip(start.at_start, expected))


def test_keras_refuses_a_checkpoint_zip_it_cannot_read_and_names_it(tmp_path):
    backup = tmp_path / "backup"
    backup.mkdir()
    (backup / "notes.txt").write_text("not a backup")
    archive = _seed_zip(backup)
    (backup / "notes.txt").unlink()
    with pytest.raises(CkptTasksError, match=str(archive)):
        _fit(_model(), KerasCheckpointerCallback(backup), epochs=1)
    archive.write_bytes(b"garbage")
    with pytest.raises(CkptTasksError, match=str(archive)):
        _fit(_model(), KerasCheckpointerCallback(backup), epochs=1)


def test_keras_backup_method_writes_and_transfers_now(tmp_path):
    target = tmp_path / "store" / "backup.zip"
    callback = KerasCheckpointerCallback(tmp_path / "backup", checkpoint_transfer_mode="shared",
                                         checkpoint_transfer_target=target)
    callback.set_model(_model())
    callback.backup()
    assert target.exists() and target.stat().st_size > 0


# -- Keras, the seed's example as a script ---------------------------------------------------------

class Script(BackgroundRun):
    timeout = TIMEOUT

    def __init__(self, name: str, *args: str, cwd: Path, env: dict | None = None):
        super().__init__([sys.executable, str(HELPERS / name), *args], cwd=cwd,
                         env={"KERAS_BACKEND": "torch", **(env or {})})


JOB_AD = 'ClusterId = 1\nProcId = 0\nTransferCheckpoint = "checkpoint"\nCheckpointExitCode = 85\n'


def _sandbox(path: Path) -> dict:
    path.mkdir()
    (path / ".job.ad").write_text(JOB_AD)
    return {"_CONDOR_JOB_AD": str(path / ".job.ad"), "_CONDOR_SCRATCH_DIR": str(path)}


def test_keras_seed_script_in_htcondor_mode_with_the_seeds_submit_file(tmp_path):
    """transfer_checkpoint_files = checkpoint (the backup directory) as in the seed's submit file:
    HTCondor brings back that directory alone, and the job resumes from it."""
    first_sandbox, second_sandbox = tmp_path / "first", tmp_path / "second"
    first = Script("seed_keras_script.py", "htcondor", "4", "0.2", cwd=first_sandbox,
                   env=_sandbox(first_sandbox))
    first.wait_for(r"^epoch 1 ended")
    first.proc.send_signal(signal.SIGTERM)
    assert first.finish() == 85, first.output[-3000:]
    assert (first_sandbox / "checkpoint" / "checkpoint.zip").exists()
    env = _sandbox(second_sandbox)
    shutil.copytree(first_sandbox / "checkpoint", second_sandbox / "checkpoint")  # what HTCondor transfers
    second = Script("seed_keras_script.py", "htcondor", "4", "0", cwd=second_sandbox, env=env)
    assert second.finish() == 0, second.output[-3000:]
    started = [int(line.split()[1]) for line in second.lines if line.startswith("epoch ") and "began" in line]
    assert started[0] >= 2 and started[-1] == 3, second.output[-3000:]
    assert not (second_sandbox / "checkpoint").exists()  # completed: the backup is gone


# -- Lightning ------------------------------------------------------------------------------------

def test_lightning_seed_script_with_pytorch_lightning_stops_with_85_and_resumes(tmp_path):
    """The seed's example imports pytorch_lightning (not lightning.pytorch); a SIGTERM in the
    first epoch, before any epoch-end checkpoint, still saves one: on_fit_start gave the
    Checkpointer the trainer."""
    first = Script("seed_lightning_script.py", "3", "0.2", cwd=tmp_path)
    assert first.wait_for(r"^restored (\w+) ").group(1) == "NoneType"
    first.wait_for(r"^epoch 0 batch 2 ")
    first.proc.send_signal(signal.SIGTERM)
    assert first.finish() == 85, first.output[-3000:]
    import torch

    stopped = torch.load(tmp_path / "trainer_checkpoint.ckpt", weights_only=False)["global_step"]
    assert 3 <= stopped < 6  # committed at the end of the batch the signal came in

    second = Script("seed_lightning_script.py", "3", "0", cwd=tmp_path)
    assert second.finish() == 0, second.output[-3000:]
    assert "restored PosixPath trainer_checkpoint.ckpt" in second.output  # the seed's restore: a Path
    steps = [int(line.rsplit(" ", 1)[1]) for line in second.lines if line.startswith("epoch ")]
    assert steps[0] == stopped and steps[-1] == 17, second.output[-3000:]  # 3 epochs of 6 batches
    assert "done after 18 steps" in second.output


def _lightning_fit(callback, max_epochs: int, ckpt_path=None, extra=()):
    import pytorch_lightning as ptl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    class Tiny(ptl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    ptl.seed_everything(0)
    data = DataLoader(TensorDataset(torch.randn(12, 4), torch.randn(12, 1)), batch_size=4)
    trainer = ptl.Trainer(max_epochs=max_epochs, callbacks=[callback, *extra], accelerator="cpu", logger=False,
                          enable_checkpointing=bool(extra), enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Tiny(), data, ckpt_path=ckpt_path)
    return trainer


def test_lightning_restore_returns_a_path_as_the_seeds(tmp_path):
    from ckpt_tasks.integrations.lightning import LightningCheckpointerCallback

    local = tmp_path / "last.ckpt"
    _lightning_fit(LightningCheckpointerCallback(local_checkpoint_file=local), max_epochs=1)
    restored = LightningCheckpointerCallback(local_checkpoint_file=str(local)).restore()
    assert isinstance(restored, Path) and restored == local
    assert LightningCheckpointerCallback(local_checkpoint_file=tmp_path / "none.ckpt").restore() is None
    store = tmp_path / "store"
    _lightning_fit(LightningCheckpointerCallback(store=store, checkpoint_every=1), max_epochs=1)
    assert isinstance(LightningCheckpointerCallback(store=store).restore(), Path)


def test_lightning_on_save_checkpoint_transfers_the_local_checkpoint(tmp_path):
    """The seed transfers local_checkpoint_file whenever Lightning saves a checkpoint, also one
    that another callback (here ModelCheckpoint) asks for."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    from ckpt_tasks.integrations.lightning import LightningCheckpointerCallback

    transferred = []

    def copy(source, destination):
        transferred.append((Path(source), Path(destination).name))
        if Path(source).exists():
            shutil.copy(source, destination)
        elif source == "stored.ckpt":
            raise FileNotFoundError(source)

    callback = LightningCheckpointerCallback(local_checkpoint_file=tmp_path / "last.ckpt", checkpoint_every=100,
                                             checkpoint_transfer_mode="manual",
                                             checkpoint_transfer_target=tmp_path / "stored.ckpt",
                                             checkpoint_transfer_callback=copy,
                                             checkpoint_transfer_callback_kwargs={})
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "models", every_n_epochs=1, save_top_k=-1)
    _lightning_fit(callback, max_epochs=3, extra=[every_epoch])
    stores = [t for t in transferred if t == (tmp_path / "last.ckpt", "stored.ckpt")]
    # the Checkpointer's own (epoch 0 end; checkpoint_every=100) and one per later ModelCheckpoint save
    assert len(stores) >= 3, transferred
    assert len(list((tmp_path / "models").iterdir())) == 3


@pytest.mark.xrootd
def test_keras_seed_xrootd_mode_resumes_then_trains_again_after_completion(tmp_path, xrootd_server):
    remote = f"/keras-seed-{tmp_path.name}/checkpoint.zip"
    kwargs = dict(checkpoint_transfer_mode="xrootd", checkpoint_transfer_target=remote,
                  xrootd_server_name=xrootd_server.url)
    with pytest.raises(KeyboardInterrupt):
        _fit(_model(), KerasCheckpointerCallback(tmp_path / "backup", **kwargs), epochs=3, extra=[StopAt(2)])
    stored = xrootd_server.data_dir / remote.lstrip("/")
    assert stored.exists()
    shutil.rmtree(tmp_path / "backup")  # a new job on another node
    assert _fit(_model(), KerasCheckpointerCallback(tmp_path / "backup", **kwargs), epochs=3).epoch == [2]
    with tarfile.open(stored) as archive:  # completed: the stored copy says so
        assert [m.name for m in archive.getmembers()] == ["backup/training-completed.json"]
    assert _fit(_model(), KerasCheckpointerCallback(tmp_path / "backup", **kwargs), epochs=3).epoch == [0, 1, 2]


def test_keras_completed_fit_whose_marker_cannot_be_stored_still_returns(tmp_path, caplog):
    state = {"broken": False}

    def copy(source, destination):
        if state["broken"]:
            raise OSError("storage gone")
        if not Path(source).exists():
            raise FileNotFoundError(source)
        shutil.copy(source, destination)

    class Break(keras.callbacks.Callback):
        def on_train_end(self, logs=None):
            state["broken"] = True

    callback = KerasCheckpointerCallback(tmp_path / "backup", checkpoint_transfer_mode="manual",
                                         checkpoint_transfer_target=tmp_path / "stored.zip",
                                         checkpoint_transfer_callback=copy, checkpoint_transfer_callback_kwargs={})
    x, y = _data()
    with caplog.at_level("WARNING", logger="ckpt_tasks.integrations.keras"):
        history = _model().fit(x, y, epochs=2, batch_size=64, verbose=0, callbacks=[Break(), callback])
    assert history.epoch == [0, 1]  # the training's result is not lost to the marker
    assert "could not be marked completed (storage gone)" in caplog.text
