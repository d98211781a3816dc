"""Stacked LSTM: a per-step feature embedding, LSTM 128 -> 128 -> 64, then Dense 128 -> 64 (design: ~340K).

The embedding (Dense 128 on every step) makes the trunk's size nearly independent of the number of features.
"""

from __future__ import annotations

from fabwatch.models.common import Size, units
from fabwatch.models.tf import keras, tf

NAME = "stacked_lstm"
DESIGN_PARAMS = 340_000


def trunk(x: tf.Tensor, size: Size) -> tf.Tensor:
    x = keras.layers.Dense(units(128, size), name="embed")(x)
    x = keras.layers.LSTM(units(128, size), return_sequences=True, name="lstm1")(x)
    x = keras.layers.LSTM(units(128, size), return_sequences=True, name="lstm2")(x)
    x = keras.layers.LSTM(units(64, size), name="lstm3")(x)
    x = keras.layers.Dense(units(128, size), activation="relu", name="dense1")(x)
    return keras.layers.Dense(units(64, size), activation="relu", name="dense2")(x)
