"""Residual GRU: a projection to the GRU width, then 3 GRU layers each added to its input and layer-normalised
(residual connections keep gradients flowing through the stack), then Dense 64 (design: ~280K)."""

from __future__ import annotations

from fabwatch.models.common import LastStep, Size, units
from fabwatch.models.tf import keras, tf

NAME = "residual_gru"
DESIGN_PARAMS = 280_000


def trunk(x: tf.Tensor, size: Size) -> tf.Tensor:
    width = units(120, size)
    x = keras.layers.Dense(width, name="project")(x)
    for i in (1, 2, 3):
        last = i == 3
        h = keras.layers.GRU(width, return_sequences=not last, name=f"gru{i}")(x)
        skip = LastStep(name="skip_last")(x) if last else x
        x = keras.layers.LayerNormalization(name=f"norm{i}")(keras.layers.Add(name=f"residual{i}")([h, skip]))
    return keras.layers.Dense(units(64, size), activation="relu", name="dense1")(x)
