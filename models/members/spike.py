"""Spike detector: two Conv1D layers (local shape of a burst), 4-head self-attention over the window (is this
step unlike the others?), a bidirectional LSTM(128), then Dense 128 -> 64 (design: ~520K)."""

from __future__ import annotations

from fabwatch.models.common import Size, units
from fabwatch.models.tf import keras, tf

NAME = "spike"
DESIGN_PARAMS = 520_000
HEADS = 4


def trunk(x: tf.Tensor, size: Size) -> tf.Tensor:
    width = units(128, size)
    x = keras.layers.Conv1D(width, 3, padding="same", activation="relu", name="conv1")(x)
    x = keras.layers.Conv1D(width, 5, padding="same", activation="relu", name="conv2")(x)
    att = keras.layers.MultiHeadAttention(HEADS, key_dim=units(64, size), name="attention")(x, x)
    x = keras.layers.LayerNormalization(name="norm")(keras.layers.Add(name="residual")([x, att]))
    x = keras.layers.Bidirectional(keras.layers.LSTM(units(128, size)), name="bilstm")(x)
    x = keras.layers.Dense(units(128, size), activation="relu", name="dense1")(x)
    return keras.layers.Dense(units(64, size), activation="relu", name="dense2")(x)
