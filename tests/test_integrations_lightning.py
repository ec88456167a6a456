"""The Lightning callback for real: examples/lightning_example run as subprocesses, signalled,
killed and resumed, compared with an uninterrupted run; the seed's signature; the law task."""
from __future__ import annotations

import re
import signal
import sys
from pathlib import Path

import pytest
import torch

from ckpt_tasks.errors import CkptTasksError, FingerprintMismatch
from ckpt_tasks.storage.store import CheckpointStore
from background_run import BackgroundRun

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "lightning_example"
TRAIN = EXAMPLE / "train.py"
LAW_TASK = EXAMPLE / "law_task.py"
EPOCHS = "3"  # 23 batches of 64 per epoch: 69 steps
TIMEOUT = 120


class Run(BackgroundRun):
    """A script of the example running in the background."""

    timeout = TIMEOUT

    def __init__(self, *args: str, cwd: Path, env: dict | None = None):
        super().__init__([sys.executable, *args], cwd=cwd, env=env)

    def steps(self) -> list[tuple[int, int, int]]:
        """(epoch, batch, step) of every trained batch the example printed."""
        return [tuple(int(g) for g in m.groups()) for line in self.lines
                if (m := re.match(r"epoch (\d+) batch (\d+) step (\d+) ", line))]


def train(store, output: Path, *args: str, cwd: Path) -> Run:
    return Run(str(TRAIN), "--store", str(store), "--output", str(output), "--epochs", EPOCHS, *args, cwd=cwd)


def run_to_end(run: Run) -> Run:
    code = run.finish()
    assert code == 0, run.output[-4000:]
    return run


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name} differs"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("uninterrupted")
    run = run_to_end(train(directory / "store", directory / "model.pt", cwd=directory))
    assert "starting from scratch" in run.output and "done after 69 steps" in run.output
    return directory / "model.pt", run.steps()


def interrupt(run: Run, after_step: int, signum: int) -> int:
    run.wait_for(rf"step {after_step} ")
    run.proc.send_signal(signum)
    return run.finish()


def test_sigterm_mid_epoch_commits_exits_85_and_resumes_at_the_next_batch_identically(tmp_path, uninterrupted):
    reference, reference_steps = uninterrupted
    store = tmp_path / "store"
    first = train(store, tmp_path / "model.pt", "--step-delay", "0.1", "--checkpoint-every", "1000", cwd=tmp_path)
    assert interrupt(first, 30, signal.SIGTERM) == 85, first.output[-3000:]
    assert "checkpoint saved after SIGTERM; exiting with code 85" in first.output
    latest = CheckpointStore(store).latest()
    # committed at the end of the batch the signal interrupted, not at a scheduled step
    assert 31 <= latest.step < 69
    assert 0 < latest.metadata["batch"] < 23, latest.metadata  # in the middle of an epoch
    # Lightning's checkpoint loads without unpickling code
    local = tmp_path / "latest.ckpt"
    CheckpointStore(store).fetch(latest, local)
    payload = torch.load(local, weights_only=True)
    assert {"state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks"} <= payload.keys()

    second = run_to_end(train(store, tmp_path / "model.pt", cwd=tmp_path))
    assert "resuming" in second.output and f"resuming from step {latest.step}" in second.output
    trained = [s for s in first.steps() if s[2] <= latest.step] + second.steps()
    # the batch the signal interrupted is trained (its print comes after the callback's exit)
    assert [s for s in reference_steps if s[2] != latest.step] == trained
    assert second.steps()[0][2] == latest.step + 1  # no batch trained twice, none skipped
    assert_same_weights(reference, tmp_path / "model.pt")


def test_sigkill_loses_only_the_steps_after_the_last_commit(tmp_path, uninterrupted):
    reference, _ = uninterrupted
    store = tmp_path / "store"
    first = train(store, tmp_path / "model.pt", "--step-delay", "0.05", "--checkpoint-every", "7", cwd=tmp_path)
    first.wait_for(r"committed checkpoint of step 29 ")
    first.proc.kill()
    assert first.finish() == -signal.SIGKILL
    second = run_to_end(train(store, tmp_path / "model.pt", "--checkpoint-every", "7", cwd=tmp_path))
    match = re.search(r"resuming from step (\d+)", second.output)
    assert match and int(match.group(1)) >= 29, second.output[-3000:]
    assert_same_weights(reference, tmp_path / "model.pt")


@pytest.mark.xrootd
def test_sigint_with_an_xrootd_store_resumes_identically(tmp_path, xrootd_server, uninterrupted):
    reference, _ = uninterrupted
    store = f"{xrootd_server.url}//lightning-{tmp_path.name}"
    first = train(store, tmp_path / "model.pt", "--step-delay", "0.1", cwd=tmp_path)
    # at an epoch's last batch (22 of 0..22): the checkpoint is at the end of the epoch
    assert interrupt(first, 22, signal.SIGINT) == 85, first.output[-3000:]
    remote = xrootd_server.data_dir / f"lightning-{tmp_path.name}"
    assert (remote / "LATEST").exists()
    latest = CheckpointStore(store).latest()
    assert latest.step == 23 and CheckpointStore(store).verify(latest)
    second = run_to_end(train(store, tmp_path / "model.pt", cwd=tmp_path))
    assert "resuming from step 23" in second.output
    assert second.steps()[0] == (1, 0, 24)  # the next epoch's first batch
    assert_same_weights(reference, tmp_path / "model.pt")


def test_law_task_stops_with_85_and_resumes_to_the_same_weights(tmp_path, uninterrupted):
    reference, _ = uninterrupted
    env = {"CKPT_TASKS_DATA": str(tmp_path / "data")}
    args = (str(LAW_TASK), "--store", str(tmp_path / "ckpt"), "--output-dir", str(tmp_path / "out"),
            "--checkpoint-every", "10", "--epochs", EPOCHS)
    first = Run(*args, "--step-delay", "0.1", cwd=tmp_path, env=env)
    assert interrupt(first, 15, signal.SIGTERM) == 85, first.output[-3000:]  # os._exit through luigi
    assert not list((tmp_path / "out").glob("*.pt"))
    (location,) = (tmp_path / "ckpt" / "LightningDigitsTask").glob("*/main")
    stopped = CheckpointStore(location).latest()
    assert stopped.step >= 16 and stopped.metadata["params"]["seed"] == 1
    second = Run(*args, cwd=tmp_path, env=env)
    assert second.finish() == 0, second.output[-3000:]
    assert f"resuming from step {stopped.step}" in second.output
    (model,) = (tmp_path / "out").glob("*.pt")
    assert_same_weights(reference, model)  # the same training as train.py


# -- in-process: the seed's signature, refusals --------------------------------------------------------

def _fit(callback, max_epochs: int, ckpt_path=None):
    import lightning.pytorch as pl

    sys.path.insert(0, str(EXAMPLE))
    from train import DigitsClassifier, digits

    from ckpt_tasks.integrations.lightning import SeededBatches

    pl.seed_everything(3)
    x, y, _, _ = digits()
    model = DigitsClassifier()
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=[callback], accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_train_batches=5)
    trainer.fit(model, SeededBatches(x, y, batch_size=64), ckpt_path=ckpt_path, weights_only=True)
    return trainer


def test_seed_signature_checkpoints_each_epoch_and_restore_gives_the_ckpt_path(tmp_path):
    from ckpt_tasks.integrations.lightning import LightningCheckpointerCallback

    target = tmp_path / "persistent" / "last.ckpt"
    kwargs = dict(local_checkpoint_file=tmp_path / "local.ckpt", checkpoint_transfer_mode="shared",
                  checkpoint_transfer_target=target)
    before = signal.getsignal(signal.SIGTERM)
    first = LightningCheckpointerCallback(**kwargs)
    assert first.restore() is None
    _fit(first, max_epochs=2)
    assert torch.load(target, weights_only=True)["epoch"] == 1  # written at the second epoch end
    assert signal.getsignal(signal.SIGTERM) is before  # the handler in place before fit is back

    second = LightningCheckpointerCallback(**kwargs)
    path = second.restore()
    assert path == tmp_path / "local.ckpt"  # a Path, as the seed's restore() returns
    trainer = _fit(second, max_epochs=3, ckpt_path=path)
    assert trainer.global_step == 15  # 2 epochs restored, 1 trained


def test_refuses_to_train_from_scratch_over_a_checkpoint_and_other_parameters(tmp_path):
    from ckpt_tasks.integrations.lightning import LightningCheckpointerCallback

    store = tmp_path / "store"
    _fit(LightningCheckpointerCallback(store=store, checkpoint_every=2, params={"lr": 1}), max_epochs=1)
    assert CheckpointStore(store).latest().step == 5
    with pytest.raises(CkptTasksError, match="ckpt_path=callback.restore"):
        _fit(LightningCheckpointerCallback(store=store, params={"lr": 1}), max_epochs=2)  # restore() forgotten
    with pytest.raises(FingerprintMismatch, match="lr: checkpoint 1, task 2"):
        LightningCheckpointerCallback(store=store, params={"lr": 2}).restore()


def test_a_sigterm_during_the_sanity_check_stops_with_85_and_a_checkpoint(tmp_path):
    import subprocess
    import sys

    script = Path(__file__).parent / "helpers" / "lightning_early_sigterm.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 85, done.stdout[-2000:] + done.stderr[-3000:]
    assert "fit returned normally" not in done.stdout
    assert (tmp_path / "ckpt.ckpt").is_file()
