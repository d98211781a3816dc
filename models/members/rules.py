"""Rule-based member: explicit rules computed inside the graph, plus an LSTM(32), feeding Dense 64 -> 32
(design: ~85K).

The rules work on the scaled window (z-units against the training scaler), per step and feature:
z-score exceedance ``|z| > 3``, rate of change ``|z_t - z_{t-1}| > 3``, and a flat line (range over the last
10 steps below 1e-4: a stuck sensor). Their flags, averaged over 10-step segments, and the LSTM's outputs,
averaged over 4-step segments, keep *where* in the window something happened: recent matters most.
"""

from __future__ import annotations

from fabwatch.models.common import Size, serializable, units
from fabwatch.models.tf import keras, tf

NAME = "rule_based"
DESIGN_PARAMS = 85_000


@serializable
class RuleFlags(keras.layers.Layer):
    """[B,T,F] scaled readings -> [B,T,3F] float flags: z exceedance, rate of change, stuck."""

    def __init__(self, z_limit: float = 3.0, roc_limit: float = 3.0, stuck_steps: int = 10,
                 stuck_range: float = 1e-4, **kwargs):
        super().__init__(**kwargs)
        self.z_limit, self.roc_limit = z_limit, roc_limit
        self.stuck_steps, self.stuck_range = stuck_steps, stuck_range

    def call(self, x: tf.Tensor) -> tf.Tensor:
        zeros = tf.zeros_like(x[:, :1, :])
        z_flag = tf.cast(tf.abs(x) > self.z_limit, x.dtype)
        step = tf.abs(x[:, 1:, :] - x[:, :-1, :])
        roc_flag = tf.concat([zeros, tf.cast(step > self.roc_limit, x.dtype)], axis=1)
        k = self.stuck_steps
        rng = (tf.nn.max_pool1d(x, k, 1, "VALID") + tf.nn.max_pool1d(-x, k, 1, "VALID"))
        stuck = tf.cast(rng < self.stuck_range, x.dtype)
        stuck_flag = tf.concat([tf.repeat(zeros, k - 1, axis=1), stuck], axis=1)
        return tf.concat([z_flag, roc_flag, stuck_flag], axis=-1)

    def get_config(self) -> dict:
        return {**super().get_config(), "z_limit": self.z_limit, "roc_limit": self.roc_limit,
                "stuck_steps": self.stuck_steps, "stuck_range": self.stuck_range}


def trunk(x: tf.Tensor, size: Size) -> tf.Tensor:
    flags = RuleFlags(name="rule_flags")(x)
    flags = keras.layers.Flatten(name="rule_profile")(keras.layers.AveragePooling1D(10, name="rule_segments")(flags))
    seq = keras.layers.LSTM(units(32, size), return_sequences=True, name="lstm")(x)
    seq = keras.layers.Flatten(name="lstm_profile")(keras.layers.AveragePooling1D(4, name="lstm_segments")(seq))
    x = keras.layers.Concatenate(name="evidence")([flags, seq])
    x = keras.layers.Dense(units(64, size), activation="relu", name="dense1")(x)
    return keras.layers.Dense(units(32, size), activation="relu", name="dense2")(x)
