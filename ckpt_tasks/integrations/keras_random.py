"""Python, NumPy, torch (CPU, CUDA) and Keras' global seed generator, as plain numeric arrays
(what the Keras callback stores in its ``.npz``, read without pickle)."""
from __future__ import annotations

import os
import random

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["capture_random_state", "restore_random_state"]


def capture_random_state() -> dict[str, np.ndarray]:
    """Python, NumPy, torch (CPU, CUDA) and Keras' global seed generator, as numeric arrays."""
    version, internal, gauss = random.getstate()
    state = {
        "python/internal": np.asarray(internal, dtype=np.int64),
        "python/version": np.asarray(version),
        "python/gauss": np.asarray(np.nan if gauss is None else gauss, dtype=np.float64),
    }
    numpy_state = np.random.get_state(legacy=False)
    if numpy_state["bit_generator"] != "MT19937":
        raise ValueError(f"unsupported NumPy bit generator {numpy_state['bit_generator']}")
    state.update({
        "numpy/key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32),
        "numpy/pos": np.asarray(numpy_state["state"]["pos"]),
        "numpy/has_gauss": np.asarray(numpy_state["has_gauss"]),
        "numpy/gauss": np.asarray(numpy_state["gauss"], dtype=np.float64),
    })
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        state["torch/cpu"] = torch.get_rng_state().numpy().copy()
        if torch.cuda.is_available():
            for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
                state[f"torch/cuda/{index}"] = cuda_state.numpy().copy()
    generator = _keras_global_seed_generator()
    if generator is not None:
        state["keras/global_seed"] = np.asarray(keras.ops.convert_to_numpy(generator.state.value))
    return state


def restore_random_state(state: dict[str, np.ndarray]) -> None:
    """Put back the generators :func:`capture_random_state` captured."""
    gauss = float(state["python/gauss"])
    random.setstate((int(state["python/version"]), tuple(int(x) for x in state["python/internal"]),
                     None if np.isnan(gauss) else gauss))
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": state["numpy/key"], "pos": int(state["numpy/pos"])},
                         "has_gauss": int(state["numpy/has_gauss"]), "gauss": float(state["numpy/gauss"])})
    if "torch/cpu" in state:
        import torch

        torch.set_rng_state(torch.from_numpy(np.array(state["torch/cpu"], dtype=np.uint8)))
        cuda = sorted((k for k in state if k.startswith("torch/cuda/")), key=lambda k: int(k.rsplit("/", 1)[1]))
        if cuda:
            if torch.cuda.device_count() != len(cuda):
                raise RuntimeError(f"the checkpoint holds {len(cuda)} CUDA RNG states, this machine has "
                                   f"{torch.cuda.device_count()} devices")
            torch.cuda.set_rng_state_all([torch.from_numpy(np.array(state[k], dtype=np.uint8)) for k in cuda])
    generator = _keras_global_seed_generator()
    if generator is not None and "keras/global_seed" in state:
        generator.state.assign(state["keras/global_seed"])


def _keras_global_seed_generator():
    # Only an existing one: creating it would draw from Python's generator.
    try:
        from keras.src.backend.common import global_state

        return global_state.get_global_attribute("global_seed_generator")
    except Exception:  # a Keras without it
        return None
