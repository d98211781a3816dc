"""Multi-scale CNN-LSTM: Conv1D with 64 filters at kernel sizes 3, 7 and 15 (short bursts to slow trends),
concatenated, then a bidirectional LSTM 128 and an LSTM 64, then Dense 64 (design: ~450K)."""

from __future__ import annotations

from fabwatch.models.common import Size, units
from fabwatch.models.tf import keras, tf

NAME = "cnn_lstm"
DESIGN_PARAMS = 450_000
KERNELS = (3, 7, 15)


def trunk(x: tf.Tensor, size: Size) -> tf.Tensor:
    branches = [keras.layers.Conv1D(units(64, size), k, padding="same", activation="relu", name=f"conv_k{k}")(x)
                for k in KERNELS]
    x = keras.layers.Concatenate(name="scales")(branches)
    x = keras.layers.Bidirectional(keras.layers.LSTM(units(128, size), return_sequences=True), name="bilstm")(x)
    x = keras.layers.LSTM(units(64, size), name="lstm")(x)
    return keras.layers.Dense(units(64, size), activation="relu", name="dense1")(x)
