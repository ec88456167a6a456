"""TrainTask: the project's own training, one branch per hyperparameter point.

A small fully connected network classifies scikit-learn's bundled handwritten
digits (8x8 images, no download). Each branch trains one (seed, learning rate)
point, checkpoints into its own location and resumes from it::

    law run TrainTask --branch 0                 # one branch, here
    law run TrainTask --branch 0 --print-status 0
    law run TrainTask --branch 0 --ranks 2       # one branch on 2 ranks (DDP) in one job
    law run TrainTask --workflow local           # every branch, one after the other
    law run TrainTask --workflow htcondor        # every branch as an HTCondor job
"""
from __future__ import annotations

import os
import time

import law
import luigi

from ckpt_tasks.fingerprint import parameter_fingerprint
from ckpt_tasks.distributed.sampler import rank_order
from ckpt_tasks.distributed.task import RanksMixin
from ckpt_tasks.htcondor.workflow import HTCondorWorkflow
from ckpt_tasks.parameters import CheckedChoiceParameter, NonNegativeFloatParameter, PositiveIntParameter
from ckpt_tasks.state import TrainingState
from ckpt_tasks.tasks import CheckpointedTask, TrainingSession

#: the hyperparameter points, one per branch
GRID = [
    {"seed": 1, "learning_rate": 0.05},
    {"seed": 2, "learning_rate": 0.05},
    {"seed": 1, "learning_rate": 0.01},
    {"seed": 2, "learning_rate": 0.01},
]
#: samples held out for the final test accuracy (split with a fixed seed, the same for all branches)
TEST_FRACTION = 0.2


def load_digits_split(device):
    """The digits data as tensors on ``device``: (x_train, y_train, x_test, y_test)."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(y)))
    n_test = int(len(y) * TEST_FRACTION)
    test, train = order[:n_test], order[n_test:]
    return x[train].to(device), y[train].to(device), x[test].to(device), y[test].to(device)


def build_model(hidden: int):
    import torch

    return torch.nn.Sequential(
        torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Dropout(0.2),
        torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Dropout(0.2),
        torch.nn.Linear(hidden, 10),
    )


class TrainTask(RanksMixin, CheckpointedTask, law.LocalWorkflow, HTCondorWorkflow):
    """Train the digits classifier of one hyperparameter point (branch) with checkpoints."""

    version = luigi.Parameter(default="v1", description="output version; default: v1")
    epochs = PositiveIntParameter(default=20, description="training epochs; default: 20")
    batch_size = PositiveIntParameter(default=32, description="batch size; default: 32")
    hidden = PositiveIntParameter(default=64, description="hidden units per layer; default: 64")
    device = CheckedChoiceParameter(default="auto", choices=["auto", "cpu", "cuda"], significant=False,
                                        description="where to train: auto (cuda when present), cpu, cuda")
    step_delay = NonNegativeFloatParameter(default=0.0, significant=False,
                                           description="seconds to wait after each step, to make the short "
                                                       "demo training last long enough to interrupt; "
                                                       "default: 0")

    # More epochs continue the same training from its checkpoint.
    fingerprint_exclude = ("epochs",)
    required_environment = ("CKPT_TASKS_DATA",)  # output() writes there

    def create_branch_map(self):
        return dict(enumerate(GRID))

    def output(self):
        params = {name: getattr(self, name) for name in ("version", "epochs", "batch_size", "hidden")}
        directory = os.path.join(os.path.expandvars("$CKPT_TASKS_DATA"), self.task_family,
                                 parameter_fingerprint({**params, **self.branch_data}), f"branch-{self.branch}")
        return {
            "model": law.LocalFileTarget(os.path.join(directory, "model.pt")),
            "checkpoints": self.checkpoint_target(),
        }

    # -- training ------------------------------------------------------------------------------

    def _device(self):
        import torch

        if self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available()):
            if not torch.cuda.is_available():
                raise RuntimeError("--device cuda, but torch sees no CUDA device")
            return torch.device("cuda")
        return torch.device("cpu")

    def steps_per_epoch(self) -> int:
        n_train = 1797 - int(1797 * TEST_FRACTION)
        per_rank = -(-n_train // self.ranks)  # each rank trains on its share (--ranks)
        return -(-per_rank // self.batch_size)

    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch()

    def create_state(self) -> TrainingState:
        import torch

        # Bit-identical resumes need deterministic kernels (and, on CUDA, a fixed cuBLAS workspace).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.manual_seed(self.branch_data["seed"])
        self._data = load_digits_split(self._device())
        model = build_model(self.hidden).to(self._device())
        optimizer = torch.optim.SGD(model.parameters(), lr=self.branch_data["learning_rate"], momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
        return TrainingState(model=model, optimizer=optimizer, scheduler=scheduler)

    def batch_order(self, epoch: int):
        """The shuffled sample order of an epoch: a function of seed and epoch only, so a resumed
        run continues exactly the order it was in."""
        import torch

        if self.ranks > 1:
            return rank_order(len(self._data[1]), self.branch_data["seed"], epoch, self.rank_info.rank, self.ranks)
        generator = torch.Generator().manual_seed(self.branch_data["seed"] * 100_003 + epoch)
        return torch.randperm(len(self._data[1]), generator=generator)

    def train(self, state: TrainingState, session: TrainingSession) -> None:
        import torch

        x_train, y_train, _, _ = self._data
        model, optimizer, scheduler = (state.objects[k] for k in ("model", "optimizer", "scheduler"))
        model.train()
        forward = self.parallel(model)  # DDP on several ranks
        while state.epoch < self.epochs:
            order = self.batch_order(state.epoch).to(x_train.device)
            for start in range(state.batch * self.batch_size, len(order), self.batch_size):
                index = order[start:start + self.batch_size]
                loss = torch.nn.functional.cross_entropy(forward(x_train[index]), y_train[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                state.batch += 1
                state.step += 1
                if state.batch == self.steps_per_epoch():
                    scheduler.step()
                    state.epoch, state.batch = state.epoch + 1, 0
                session.step(loss=loss.item())
                if self.step_delay:
                    time.sleep(self.step_delay)
            if state.batch:  # only when the epoch's loop ended without the last batch
                raise RuntimeError("epoch ended early; batch bookkeeping is wrong")

    def test_accuracy(self, state: TrainingState) -> float:
        import torch

        _, _, x_test, y_test = self._data
        model = state.objects["model"]
        model.eval()
        with torch.no_grad():
            return (model(x_test).argmax(dim=1) == y_test).float().mean().item()

    def finish(self, state: TrainingState) -> None:
        import torch

        accuracy = self.test_accuracy(state)
        output = self.output()["model"]
        output.parent.touch()
        payload = {
            "model": state.objects["model"].state_dict(),
            "test_accuracy": accuracy,
            "steps": state.step,
            "branch": self.branch,
            **{f"param_{k}": v for k, v in self.branch_data.items()},
        }
        # Written under a temporary name and renamed, so the task is never half complete.
        partial = output.path + ".partial"
        torch.save(payload, partial)
        os.replace(partial, output.path)
        self.publish_message(f"branch {self.branch}: test accuracy {accuracy:.4f} after {state.step} steps "
                             f"-> {output.path}")
