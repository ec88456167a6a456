"""TrainingState: everything a training needs to continue exactly where it stopped.

It gathers any number of objects that follow torch's ``state_dict`` /
``load_state_dict`` protocol (models, optimizers, LR schedulers, GradScalers,
samplers), the random number generators (Python, NumPy, torch CPU and every CUDA
device), the position in the data (epoch, batch inside the epoch), the global
step and the metric history.

It is saved with ``torch.save`` and loaded with ``torch.load(weights_only=True)``:
only tensors and plain containers, never pickled code, so a checkpoint from
shared storage cannot execute anything on load.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Protocol

FORMAT_VERSION = 1


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state_dict: dict) -> Any: ...


def capture_rng_state() -> dict[str, Any]:
    """The state of every random number generator a training draws from, as safe types."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put every generator back in the state ``capture_rng_state`` recorded."""
    import numpy as np
    import torch

    python = state["python"]
    random.setstate((python["version"], tuple(int(x) for x in python["internal"].tolist()), python["gauss"]))
    numpy_state = state["numpy"]
    np.random.set_state({
        "bit_generator": numpy_state["bit_generator"],
        "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
        "has_gauss": numpy_state["has_gauss"],
        "gauss": numpy_state["gauss"],
    })
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states:
        if not torch.cuda.is_available():
            raise RuntimeError("the checkpoint holds CUDA RNG states but no CUDA device is available")
        if len(cuda_states) != torch.cuda.device_count():
            raise RuntimeError(f"the checkpoint holds {len(cuda_states)} CUDA RNG states, "
                               f"this machine has {torch.cuda.device_count()} devices")
        torch.cuda.set_rng_state_all(cuda_states)


class TrainingState:
    """The complete, resumable state of a training.

    Args:
        **objects: named objects with ``state_dict``/``load_state_dict`` (model,
            optimizer, scheduler, scaler, a torch.Generator through ``GeneratorState``...).

    Attributes:
        step: optimizer steps done so far.
        epoch: the current epoch (0-based).
        batch: batches of the current epoch already trained.
        metrics: metric name -> list of values, appended by the training.
    """

    def __init__(self, **objects: Stateful):
        for name, obj in objects.items():
            if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
                raise TypeError(f"{name} has no state_dict/load_state_dict; wrap it or leave it out")
        self.objects = objects
        self.step = 0
        self.epoch = 0
        self.batch = 0
        self.metrics: dict[str, list[float]] = {}

    def record(self, **values: float) -> None:
        """Append values to the metric history."""
        for name, value in values.items():
            self.metrics.setdefault(name, []).append(float(value))

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "objects": {name: obj.state_dict() for name, obj in self.objects.items()},
            "rng": capture_rng_state(),
            "position": {"step": self.step, "epoch": self.epoch, "batch": self.batch},
            "metrics": {name: list(values) for name, values in self.metrics.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != FORMAT_VERSION:
            raise ValueError(f"unknown checkpoint format {state.get('format')!r}")
        missing = set(self.objects) - set(state["objects"])
        if missing:
            raise KeyError(f"the checkpoint lacks the state of {', '.join(sorted(missing))}")
        for name, obj in self.objects.items():
            obj.load_state_dict(state["objects"][name])
        restore_rng_state(state["rng"])
        position = state["position"]
        self.step, self.epoch, self.batch = position["step"], position["epoch"], position["batch"]
        self.metrics = {name: list(values) for name, values in state["metrics"].items()}

    def save(self, path: str | os.PathLike) -> None:
        """Write the state with ``torch.save`` (tensors and plain containers only)."""
        import torch

        torch.save(self.state_dict(), Path(path))

    def load(self, path: str | os.PathLike) -> None:
        """Load a state written by ``save``, without unpickling arbitrary objects."""
        import torch

        self.load_state_dict(torch.load(Path(path), map_location="cpu", weights_only=True))


class GeneratorState:
    """Adapts a ``torch.Generator`` (e.g. a DataLoader's shuffling) to the state_dict protocol."""

    def __init__(self, generator):
        self.generator = generator

    def state_dict(self) -> dict:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["state"])
