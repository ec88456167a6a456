"""The Keras callback for real (KERAS_BACKEND=torch, no TensorFlow): examples/keras_example run as
subprocesses, signalled and resumed at the batch where they stopped, compared with an
uninterrupted run; a remote XRootD store; the seed's signature; safe loading."""
from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")

from ckpt_tasks.errors import FingerprintMismatch  # noqa: E402
from ckpt_tasks.storage.store import CheckpointStore  # noqa: E402
from background_run import BackgroundRun  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "keras_example" / "train.py"
EPOCHS = "3"  # 23 batches of 64 per epoch: 69 steps
TIMEOUT = 180


class Run(BackgroundRun):
    """The example running in the background."""

    timeout = TIMEOUT

    def __init__(self, store, output: Path, *args: str, cwd: Path):
        super().__init__([sys.executable, str(TRAIN), "--store", str(store), "--output", str(output),
                          "--epochs", EPOCHS, *args], cwd=cwd, env={"KERAS_BACKEND": "torch"})

    def steps(self) -> list[int]:
        return [int(m.group(1)) for line in self.lines if (m := re.match(r"batch \d+ step (\d+) ", line))]

    def epoch_logs(self) -> list[str]:
        return [line for line in self.lines if line.startswith("epoch ")]


def run_to_end(run: Run) -> Run:
    assert run.finish() == 0, run.output[-4000:]
    return run


def assert_same_weights(a: Path, b: Path) -> None:
    with np.load(a) as wa, np.load(b) as wb:
        assert wa.files == wb.files
        for name in wa.files:
            assert np.array_equal(wa[name], wb[name]), f"weight {name} differs"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("uninterrupted")
    run = run_to_end(Run(directory / "store", directory / "model.npz", cwd=directory))
    assert "done after 69 steps" in run.output and "resuming" not in run.output
    assert run.steps() == list(range(1, 70))
    return directory / "model.npz", run


def test_sigterm_mid_epoch_resumes_at_the_next_batch_identically(tmp_path, uninterrupted):
    reference, reference_run = uninterrupted
    store = tmp_path / "store"
    first = Run(store, tmp_path / "model.npz", "--step-delay", "0.1", "--save-freq", "1000", cwd=tmp_path)
    first.wait_for(r"^batch 5 step 29 ")
    first.proc.send_signal(signal.SIGTERM)
    assert first.finish() == 85, first.output[-3000:]
    latest = CheckpointStore(store).latest()
    assert latest.step == 30 and latest.metadata["epoch"] == 1 and latest.metadata["batch"] == 7
    # the checkpoint is numbers only: it loads without pickle
    local = CheckpointStore(store).fetch(latest, tmp_path / "latest.npz")
    with np.load(local, allow_pickle=False) as data:
        assert any(k.startswith("optimizer/") for k in data.files) and "meta" in data.files

    second = run_to_end(Run(store, tmp_path / "model.npz", cwd=tmp_path))
    assert "resuming from step 30 (epoch 1, batch 7)" in second.output
    assert second.steps() == list(range(31, 70))  # nothing trained twice: Keras alone restarts at batch 0
    assert_same_weights(reference, tmp_path / "model.npz")
    # the epoch's metrics include the batches before the stop: the same logs as uninterrupted
    assert first.epoch_logs() + second.epoch_logs() == reference_run.epoch_logs()


@pytest.mark.xrootd
def test_xrootd_store_sigint_at_an_epochs_last_batch_resumes_identically(tmp_path, xrootd_server, uninterrupted):
    reference, reference_run = uninterrupted
    store = f"{xrootd_server.url}//keras-{tmp_path.name}"
    first = Run(store, tmp_path / "model.npz", "--step-delay", "0.1", cwd=tmp_path)
    first.wait_for(r"^batch 21 step 45 ")
    first.proc.send_signal(signal.SIGINT)
    assert first.finish() == 85, first.output[-3000:]
    assert (xrootd_server.data_dir / f"keras-{tmp_path.name}" / "LATEST").exists()
    latest = CheckpointStore(store).verify()
    assert latest.step == 46 and latest.metadata["batch"] == 23  # trained, not yet validated

    second = run_to_end(Run(store, tmp_path / "model.npz", cwd=tmp_path))
    assert "resuming from step 46 (epoch 1, batch 23)" in second.output
    assert second.steps() == list(range(47, 70))
    assert_same_weights(reference, tmp_path / "model.npz")
    assert first.epoch_logs() + second.epoch_logs() == reference_run.epoch_logs()


# -- in-process: the seed's signature, refusals ----------------------------------------------------

def _model():
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(10)])
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _data():
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.data[:320] / 16.0).astype("float32"), digits.target[:320]


def test_seed_signature_backs_up_each_epoch_and_resumes_at_the_next_epoch(tmp_path):
    import keras

    from ckpt_tasks.integrations.keras import KerasCheckpointerCallback

    class Crash(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise KeyboardInterrupt  # the job dies before its third epoch: no on_train_end

    x, y = _data()
    target = tmp_path / "persistent" / "backup.tar.gz"
    kwargs = dict(checkpoint_transfer_mode="shared", checkpoint_transfer_target=target)
    model = _model()
    with pytest.raises(KeyboardInterrupt):
        model.fit(x, y, epochs=3, batch_size=64, verbose=0,
                  callbacks=[KerasCheckpointerCallback(tmp_path / "backup", save_freq="epoch", **kwargs), Crash()])
    assert target.exists()
    weights = [np.array(w) for w in model.get_weights()]

    resumed = _model()
    history = resumed.fit(x, y, epochs=3, batch_size=64, verbose=0,
                          callbacks=[KerasCheckpointerCallback(tmp_path / "backup", "epoch", **kwargs)])
    assert history.epoch == [2]  # epochs 0 and 1 restored, not trained again
    assert int(resumed.optimizer.iterations.numpy()) == 15
    assert not all(np.array_equal(a, np.array(b)) for a, b in zip(weights, resumed.get_weights()))


def test_checkpoint_of_other_parameters_is_refused(tmp_path):
    from ckpt_tasks.integrations.keras import KerasCheckpointerCallback

    x, y = _data()
    _model().fit(x, y, epochs=1, batch_size=64, verbose=0,
                 callbacks=[KerasCheckpointerCallback(store=tmp_path, params={"seed": 1})])
    assert CheckpointStore(tmp_path).latest().step == 5
    with pytest.raises(FingerprintMismatch, match="seed: checkpoint 1, task 2"):
        _model().fit(x, y, epochs=2, batch_size=64, verbose=0,
                     callbacks=[KerasCheckpointerCallback(store=tmp_path, params={"seed": 2})])


def test_bad_arguments_are_refused():
    from ckpt_tasks.integrations.keras import KerasCheckpointerCallback

    with pytest.raises(ValueError, match="save_freq"):
        KerasCheckpointerCallback("backup", save_freq="batch")
    with pytest.raises(TypeError, match="store="):
        KerasCheckpointerCallback()
