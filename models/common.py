"""Pieces every member shares: model sizes, the task head, and the small custom layers of the ensemble.

Custom layers (not ``Lambda``) so the Keras files hold configs and weights only, never Python bytecode, and
so tf2onnx sees plain TF ops.
"""

from __future__ import annotations

from fabwatch.models.training.data import Task
from fabwatch.models.sizes import Size, units  # noqa: F401  (re-exported: the members import them from here)
from fabwatch.models.tf import keras, tf

serializable = keras.saving.register_keras_serializable(package="fabwatch")


def task_head(x: tf.Tensor, task: Task, n_features: int, target_mean: float = 0.0,
              target_std: float = 1.0) -> tf.Tensor:
    """The output a member needs for its task: probability [B,1], delay minutes [B,1] or next step [B,F].

    The final float32 ``Activation`` keeps outputs float32 under mixed precision.
    """
    if task == "classify":
        x = keras.layers.Dense(1, activation="sigmoid", name="prob")(x)
    elif task == "regress":
        x = keras.layers.Dense(1, name="delay_scaled")(x)
        x = keras.layers.Rescaling(scale=target_std, offset=target_mean, name="delay_minutes")(x)
    else:
        x = keras.layers.Dense(n_features, name="next_step")(x)
    return keras.layers.Activation("linear", dtype="float32", name="out")(x)


@serializable
class DropLastStep(keras.layers.Layer):
    """The context of a forecast: every step of the window but the last."""

    def call(self, x: tf.Tensor) -> tf.Tensor:
        return x[:, :-1, :]


@serializable
class LastStep(keras.layers.Layer):
    """The newest reading of the window: the forecast target."""

    def call(self, x: tf.Tensor) -> tf.Tensor:
        return x[:, -1, :]


@serializable
class WindowStats(keras.layers.Layer):
    """Per-feature mean, std and last value of a window: the gate's cheap view of the input."""

    def call(self, x: tf.Tensor) -> tf.Tensor:
        mean = tf.reduce_mean(x, axis=1)
        std = tf.sqrt(tf.reduce_mean(tf.square(x - mean[:, None, :]), axis=1) + 1e-6)
        return tf.concat([mean, std, x[:, -1, :]], axis=-1)


@serializable
class WeightedSum(keras.layers.Layer):
    """``sum_m w[b,m] * s[b,m]`` -> [B] (supervised tasks)."""

    def call(self, inputs: list[tf.Tensor]) -> tf.Tensor:
        scores, weights = inputs
        return tf.reduce_sum(scores * weights, axis=-1)


@serializable
class StaticWeights(keras.layers.Layer):
    """The same member weights for every window, window [B,W,F] -> [B,M]: the gate's stand-in when weights
    searched on out-of-fold scores beat it (``train --weight-search``)."""

    def __init__(self, member_weights: list[float], **kwargs):
        super().__init__(**kwargs)
        self.member_weights = [float(w) for w in member_weights]

    def call(self, x: tf.Tensor) -> tf.Tensor:
        return tf.ones_like(x[:, 0, :1]) * tf.constant(self.member_weights, dtype=x.dtype)

    def get_config(self) -> dict:
        return super().get_config() | {"member_weights": self.member_weights}


@serializable
class ForecastCombine(keras.layers.Layer):
    """Member forecasts [B,M,F], weights [B,M], target [B,F] -> member errors [B,M], feature errors [B,F].

    Errors are squared, in scaled (z) units, so they compare across features.
    """

    def call(self, inputs: list[tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        forecasts, weights, target = inputs
        member_err = tf.reduce_mean(tf.square(forecasts - target[:, None, :]), axis=-1)
        combined = tf.reduce_sum(forecasts * weights[:, :, None], axis=1)
        return member_err, tf.square(target - combined)


@serializable
class MonitorWeight(keras.layers.Layer):
    """Gate weights [B,M] -> [B,M+1] with weight 1 for the statistical monitor (it always applies)."""

    def call(self, weights: tf.Tensor) -> tf.Tensor:
        return tf.concat([weights, tf.ones_like(weights[:, :1])], axis=-1)


@serializable
class MeanOverFeatures(keras.layers.Layer):
    def call(self, x: tf.Tensor) -> tf.Tensor:
        return tf.reduce_mean(x, axis=-1)


@serializable
def prediction_loss(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    """The output is itself the loss (forecast gate: the ensemble's squared error); ``y_true`` is ignored."""
    return tf.reduce_mean(y_pred) + 0.0 * tf.reduce_mean(y_true)
