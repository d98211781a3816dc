"""PatchTST (Nie et al., ICLR 2023): a transformer over patches of each feature's history (design: ~460K).

For slow, window-wide changes (drifts, level and variance shifts, changed periodicity) that recurrent members
see one step at a time: a patch of ``PATCH_LEN`` steps is one token, so attention compares whole stretches of
the window (10 patches at window 100). Not made for single-step spikes (a spike is one tenth of one token):
``spike`` and ``rule_based`` cover those.

Per window ``x`` [B, T, F], at full size (D 128, 8 heads, 3 layers, feed-forward 256):

1. reversible instance normalisation (RevIN, no affine: the patch embedding is affine already):
   ``x̂ = (x - μ) / σ`` with ``μ, σ`` per window and feature over its T steps, ``σ = sqrt(var + 1e-5)``;
2. patches: feature f's series cut into ``P = ceil((T - L) / S) + 1`` patches of length ``L`` every ``S`` steps,
   aligned to the newest step; missing oldest steps repeat the first one (T 100: 10 patches, none padded; the
   forecast's context of 99 steps: 10 patches, the first starting with a repeated step). One gather with
   constant indices, so the graph keeps static shapes;
3. channel independence: [B, F, P, L] -> [B·F, P, L]; every feature shares the patch embedding
   ``e = W·patch + b + pos[p]`` and the encoder;
4. a transformer encoder over the P tokens: ``h = LN(e + MHA(e)); out = LN(h + FFN(h))`` per layer
   (LayerNormalization instead of the paper's BatchNorm: no batch statistics to carry into serving; ReLU in the
   FFN instead of GELU: tf2onnx has no ONNX op for the exact GELU's Erfc at opset 17);
5. heads: forecast, a Dense(1) on each feature's flattened tokens (shared across features), then de-normalised
   ``ŷ = y·σ + μ`` (RevIN's restore); classify and regress, a Dense 32 per feature on the flattened tokens,
   concatenated over features with ``μ`` and ``log σ`` (RevIN removes level and scale, which are evidence of an
   event there; its restore is a forecast-only step) -> Dense 64, then the shared task head.

Failure modes: a feature flat over the window normalises to 0 (σ is the epsilon): the head still sees it through
``log σ``; with very few features the flattened head is small and the encoder does most of the work; patch length
above the window collapses to one padded patch (no attention to speak of).
"""

from __future__ import annotations

import numpy as np

from fabwatch.models.common import Size, serializable, units
from fabwatch.models.tf import keras, tf

NAME = "patchtst"
DESIGN_PARAMS = 460_000
PATCH_LEN = 10
STRIDE = 10
HEADS = 8
LAYERS = 3
EPS = 1e-5


def patch_starts(steps: int, patch_len: int = PATCH_LEN, stride: int = STRIDE) -> np.ndarray:
    """First step of each patch, aligned so the last patch ends at the newest step (negative: padded)."""
    n = max(0, -(-(steps - patch_len) // stride)) + 1
    return steps - patch_len - stride * np.arange(n)[::-1]


@serializable
class InstanceNorm(keras.layers.Layer):
    """RevIN's normalisation: [B,T,F] -> normalised [B,T,F], mean [B,F], std [B,F] (float32 under mixed precision)."""

    def call(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        mean = tf.reduce_mean(x, axis=1)
        std = tf.sqrt(tf.reduce_mean(tf.square(x - mean[:, None, :]), axis=1) + EPS)
        return (x - mean[:, None, :]) / std[:, None, :], mean, std


@serializable
class InstanceRestore(keras.layers.Layer):
    """RevIN's restore: a normalised forecast [B,F] back to the window's scale, ``y·σ + μ``."""

    def call(self, inputs: list[tf.Tensor]) -> tf.Tensor:
        y, mean, std = inputs
        return y * std + mean


@serializable
class Patches(keras.layers.Layer):
    """[B,T,F] -> [B·F, P, L]: each feature's patches, features folded into the batch (channel independence)."""

    def __init__(self, patch_len: int = PATCH_LEN, stride: int = STRIDE, **kwargs):
        super().__init__(**kwargs)
        self.patch_len, self.stride = patch_len, stride

    def call(self, x: tf.Tensor) -> tf.Tensor:
        steps = x.shape[1]
        index = np.clip(patch_starts(steps, self.patch_len, self.stride)[:, None] + np.arange(self.patch_len), 0,
                        steps - 1)
        patches = tf.gather(tf.transpose(x, [0, 2, 1]), tf.constant(index, tf.int32), axis=2)  # [B,F,P,L]
        return tf.reshape(patches, [-1, *index.shape])

    def get_config(self) -> dict:
        return {**super().get_config(), "patch_len": self.patch_len, "stride": self.stride}


@serializable
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned vector per patch position: [N, P, D] -> [N, P, D]."""

    def build(self, input_shape: tf.TensorShape) -> None:
        self.position = self.add_weight("position", shape=tuple(input_shape[1:]), initializer="random_normal")

    def call(self, x: tf.Tensor) -> tf.Tensor:
        return x + tf.cast(self.position, x.dtype)


@serializable
class Log(keras.layers.Layer):
    def call(self, x: tf.Tensor) -> tf.Tensor:
        return tf.math.log(x)


@serializable
class ChannelFold(keras.layers.Layer):
    """[B·F, P, D] -> [B, F, P·D]: each feature's tokens flattened, features back on their own axis."""

    def __init__(self, n_features: int, **kwargs):
        super().__init__(**kwargs)
        self.n_features = n_features

    def call(self, x: tf.Tensor) -> tf.Tensor:
        return tf.reshape(x, [-1, self.n_features, x.shape[1] * x.shape[2]])

    def get_config(self) -> dict:
        return {**super().get_config(), "n_features": self.n_features}


def _encode(x: tf.Tensor, size: Size, patch_len: int, stride: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Normalise, patch, embed and encode: per-feature tokens [B, F, P·D], and RevIN's mean and std [B, F]."""
    n_features = x.shape[-1]
    width = units(128, size)
    normed, mean, std = InstanceNorm(dtype="float32", name="revin")(x)
    h = Patches(patch_len, stride, name="patches")(normed)
    h = keras.layers.Dense(width, name="patch_embed")(h)
    h = keras.layers.Dropout(0.1, name="embed_dropout")(PositionEmbedding(name="position")(h))
    for i in range(1, LAYERS + 1):
        att = keras.layers.MultiHeadAttention(HEADS, key_dim=max(1, width // HEADS), dropout=0.1,
                                              name=f"attention{i}")(h, h)
        h = keras.layers.LayerNormalization(name=f"norm{i}a")(keras.layers.Add(name=f"residual{i}a")([h, att]))
        ff = keras.layers.Dense(units(256, size), activation="relu", name=f"ff{i}a")(h)
        ff = keras.layers.Dropout(0.1, name=f"ff_dropout{i}")(keras.layers.Dense(width, name=f"ff{i}b")(ff))
        h = keras.layers.LayerNormalization(name=f"norm{i}b")(keras.layers.Add(name=f"residual{i}b")([h, ff]))
    return ChannelFold(n_features, name="fold")(h), mean, std


def trunk(x: tf.Tensor, size: Size, patch_len: int = PATCH_LEN, stride: int = STRIDE) -> tf.Tensor:
    """classify / regress: per-feature summaries of the encoded patches, with the level and scale RevIN took out."""
    tokens, mean, std = _encode(x, size, patch_len, stride)
    h = keras.layers.Dense(units(32, size), activation="relu", name="channel_head")(tokens)
    log_std = Log(dtype="float32", name="log_std")(std)
    h = keras.layers.Concatenate(name="evidence")([keras.layers.Flatten(name="channels")(h), mean, log_std])
    return keras.layers.Dense(units(64, size), activation="relu", name="dense1")(keras.layers.Dropout(0.1, name="head_dropout")(h))


def forecast(x: tf.Tensor, size: Size, patch_len: int = PATCH_LEN, stride: int = STRIDE) -> tf.Tensor:
    """forecast: the next step [B, F], one shared linear head per feature, de-normalised by RevIN."""
    tokens, mean, std = _encode(x, size, patch_len, stride)
    y = keras.layers.Reshape((x.shape[-1],), name="next_normed")(keras.layers.Dense(1, name="next_step")(tokens))
    return InstanceRestore(dtype="float32", name="revin_restore")([y, mean, std])
