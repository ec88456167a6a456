"""A Keras 3 training (torch backend, no TensorFlow) on the digits data that survives being killed.

    KERAS_BACKEND=torch python train.py --store /tmp/ckpt-keras --epochs 4 --step-delay 0.05
    ^C or kill -TERM <pid>        # commits a checkpoint at the end of the batch, exits 85
    KERAS_BACKEND=torch python train.py --store /tmp/ckpt-keras --epochs 4
    resuming from step 37 (epoch 1, batch 14) ...   # continues at the next batch

``--store`` may be a root://host:port//path URL. The final weights go to ``--output``
(an .npz of the model's weights, in order).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from ckpt_tasks.integrations.keras import KerasCheckpointerCallback  # noqa: E402


def digits(seed: int = 0):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype("float32")
    y = data.target.astype("int64")
    order = np.random.default_rng(seed).permutation(len(y))
    n_val = len(y) // 5
    return x[order[n_val:]], y[order[n_val:]], x[order[:n_val]], y[order[:n_val]]


class StepPrinter(keras.callbacks.Callback):
    """One line per batch, for people and for the tests that interrupt this script."""

    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay
        self.last_step = -1

    def on_train_begin(self, logs=None):  # after the checkpoint callback restored the optimizer
        self.last_step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

    def on_train_batch_end(self, batch, logs=None):
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        if step == self.last_step:
            return  # a batch the resumed run read but did not train (trained before the stop)
        self.last_step = step
        print(f"batch {batch} step {step} loss {float((logs or {}).get('loss', float('nan'))):.6f}", flush=True)
        if self.delay:
            time.sleep(self.delay)

    def on_epoch_end(self, epoch, logs=None):
        print(f"epoch {epoch} " + " ".join(f"{k} {v:.6f}" for k, v in sorted(logs.items())), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="checkpoint location: a path or root://host:port//path")
    parser.add_argument("--output", default="model.npz")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--save-freq", type=int, default=10, help="batches between commits")
    parser.add_argument("--step-delay", type=float, default=0.0, help="pause per batch, to have time to interrupt")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)

    keras.utils.set_random_seed(args.seed)   # Python, NumPy and the backend's generators
    x_train, y_train, x_val, y_val = digits()
    model = keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dropout(0.2),
        keras.layers.Dense(10),
    ])
    schedule = keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=20, decay_rate=0.9)
    model.compile(optimizer=keras.optimizers.Adam(schedule),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])

    callback = KerasCheckpointerCallback(store=args.store, save_freq=args.save_freq,
                                         params={"seed": args.seed, "batch_size": args.batch_size})
    model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs, shuffle=True,
              validation_data=(x_val, y_val), verbose=0,
              callbacks=[callback, StepPrinter(args.step_delay)])

    loss, accuracy = model.evaluate(x_val, y_val, verbose=0)
    partial = args.output + ".partial.npz"
    np.savez(partial, *[np.asarray(w) for w in model.get_weights()])
    os.replace(partial, args.output)
    step = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    print(f"done after {step} steps, val_accuracy {accuracy:.4f} -> {args.output}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
