"""A training written for the seed project's Keras callback, as its example is (the callback,
constructed with ``local_checkpoint_file="checkpoint"`` and ``checkpoint_every=1``, next to
EarlyStopping in ``model.fit``), with only the import line changed to this project's.

Usage: seed_keras_script.py MODE EPOCHS BATCH_DELAY  (MODE: None or htcondor)
Prints "epoch N began" and "epoch N ended" for the tests.
"""
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from ckpt_tasks.integrations.keras import KerasCheckpointerCallback  # the only changed line  # noqa: E402

mode, epochs, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])


class Progress(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        print(f"epoch {epoch} began", flush=True)

    def on_train_batch_end(self, batch, logs=None):
        time.sleep(delay)

    def on_epoch_end(self, epoch, logs=None):
        print(f"epoch {epoch} ended", flush=True)


digits = load_digits()
x, y = (digits.data[:640] / 16.0).astype("float32"), digits.target[:640]
keras.utils.set_random_seed(1)
model = keras.Sequential([keras.layers.Input(shape=(64,)), keras.layers.Dense(32, activation="relu"),
                          keras.layers.Dropout(0.5), keras.layers.Dense(10, activation="softmax")])
model.compile(loss=keras.losses.SparseCategoricalCrossentropy(),
              optimizer=keras.optimizers.Adam(learning_rate=1e-3),
              metrics=[keras.metrics.SparseCategoricalAccuracy(name="acc")])
callbacks = [
    KerasCheckpointerCallback(local_checkpoint_file="checkpoint", checkpoint_every=1,
                              **({"checkpoint_transfer_mode": "htcondor"} if mode == "htcondor" else {})),
    keras.callbacks.EarlyStopping(monitor="val_loss", patience=2),
    Progress(),
]
model.fit(x, y, batch_size=64, epochs=epochs, validation_split=0.15, callbacks=callbacks, verbose=0)
print("done", flush=True)
