"""DeepLog (Du et al., CCS 2017): an LSTM that predicts the next log key from the previous h keys.

Architecture: key embedding -> 2 stacked LSTMs (64 units) -> softmax over the vocabulary (PAD, UNK,
EOS and the keys seen in training). Windows come from ``stream.logscore.build_windows`` so training
and serving frame sessions identically (leading padding, trailing EOS; see that module).

Training is on distinct windows: HDFS's ~100k training windows are ~4k distinct ones, so each
distinct window is one sample whose target is the empirical distribution of its next keys and whose
weight is its count. That cross-entropy is exactly the sum over all windows, at a 25th of the cost.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stream.logscore import Vocabulary, build_windows, window_codes


@dataclass
class DeepLogConfig:
    h: int = 10
    top_g: int = 9
    units: int = 64
    layers: int = 2
    embedding: int = 16
    epochs: int = 60
    batch_size: int = 256
    learning_rate: float = 3e-3
    count_power: float = 1.0
    backoff: float = 0.0
    backoff_order: int = 2
    seed: int = 0


@dataclass
class TrainingSet:
    """Distinct windows, their next-key distributions and counts."""

    windows: np.ndarray  # [U, h] int32
    targets: np.ndarray  # [U, V] float32, rows sum to 1
    counts: np.ndarray   # [U] float32
    total_windows: int


def training_set(sessions: Sequence[Sequence[str]], vocab: Vocabulary, h: int, backoff: float = 0.0,
                 backoff_order: int = 2) -> TrainingSet:
    w = build_windows([vocab.encode(s) for s in sessions], h)
    _, first, inverse = np.unique(window_codes(w.windows, len(vocab)), return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    targets = np.zeros((len(first), len(vocab)), dtype=np.float32)
    np.add.at(targets, (inverse, w.next_keys), 1.0)
    counts = targets.sum(axis=1)
    targets /= counts[:, None]
    windows = np.ascontiguousarray(w.windows[first])
    if backoff > 0:
        # blend in the next-key distribution of the last 1..backoff_order keys, so a transition seen in
        # training after the same recent keys ranks above never-seen ones even in a novel long context
        blend = np.zeros_like(targets)
        for k in range(1, backoff_order + 1):
            _, short_inv = np.unique(window_codes(w.windows[:, -k:], len(vocab)), return_inverse=True)
            short_inv = short_inv.reshape(-1)
            table = np.zeros((short_inv.max() + 1, len(vocab)), dtype=np.float32)
            np.add.at(table, (short_inv, w.next_keys), 1.0)
            table /= table.sum(axis=1, keepdims=True)
            blend += table[short_inv[first]]
        targets = (1 - backoff) * targets + backoff * blend / backoff_order
    return TrainingSet(windows=windows, targets=targets, counts=counts, total_windows=len(w.windows))


def build_model(vocab_size: int, config: DeepLogConfig):
    """Integer keys ``[B, h]`` -> next-key probabilities ``[B, V]`` (tf_keras, fused-LSTM friendly)."""
    from models.tf import keras

    keys = keras.Input(shape=(config.h,), dtype="int32", name="keys")
    x = keras.layers.Embedding(vocab_size, config.embedding, name="embed")(keys)
    for i in range(config.layers):
        x = keras.layers.LSTM(config.units, return_sequences=i < config.layers - 1, name=f"lstm{i + 1}")(x)
    probs = keras.layers.Dense(vocab_size, activation="softmax", name="probs")(x)
    return keras.Model(keys, probs, name="deeplog")


def train(sessions: Sequence[Sequence[str]], config: DeepLogConfig, verbose: int = 0) -> tuple[Any, Vocabulary, dict]:
    """Fit DeepLog on normal sessions; returns the Keras model, the vocabulary and training figures."""
    from models.tf import keras, tf

    if not sessions:
        raise ValueError("no training sessions")
    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    vocab = Vocabulary.from_sessions(sessions)
    data = training_set(sessions, vocab, config.h, config.backoff, config.backoff_order)
    model = build_model(len(vocab), config)
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate), loss="categorical_crossentropy")
    weights = data.counts ** config.count_power
    weights = weights / weights.mean()
    t0 = time.perf_counter()
    history = model.fit(data.windows, data.targets, sample_weight=weights, epochs=config.epochs,
                        batch_size=config.batch_size, shuffle=True, verbose=verbose)
    seconds = time.perf_counter() - t0
    probs = model.predict(data.windows, batch_size=4096, verbose=0)
    top = np.argsort(-probs, axis=1)[:, :config.top_g]
    # share of training windows whose next key is within top-g (a normal-data recall check)
    seen = np.array([np.isin(np.flatnonzero(t), row).all() for t, row in zip(data.targets, top)])
    figures = {"sessions": len(sessions), "windows": data.total_windows, "distinct_windows": len(data.windows),
               "vocabulary": len(vocab.keys), "epochs": config.epochs, "train_seconds": seconds,
               "final_loss": float(history.history["loss"][-1]),
               "distinct_windows_all_next_in_top_g": float(seen.mean())}
    return model, vocab, figures


def export_to_registry(model: Any, vocab: Vocabulary, config: DeepLogConfig, registry: Path | str,
                       figures: dict, data_fingerprint: str = "", promote: bool = True,
                       parity_windows: np.ndarray | None = None) -> str:
    """ONNX export (fused LSTM, parity-checked on real windows) into a new registry version."""
    from export.onnx_export import keras_to_onnx
    from export.registry import Manifest, Registry

    reg = Registry(registry)
    staging = reg.stage()
    if parity_windows is None:
        parity_windows = np.random.default_rng(config.seed).integers(0, len(vocab), (256, config.h), dtype=np.int32)
    report = keras_to_onnx(model, staging / "model.onnx", input_name="keys", output_names=["probs"],
                           sample_inputs=np.ascontiguousarray(parity_windows, dtype=np.int32))
    manifest = Manifest(
        version="pending", created="", task="logkeys", feature_names=["log_key"], window=config.h,
        inputs={"keys": [None, config.h]}, outputs=["probs"], parity={"model.onnx": report.parity_max_abs},
        data_fingerprint=data_fingerprint, metrics={"training": figures},
        extra={"vocabulary": vocab.keys, "h": config.h, "top_g": config.top_g,
               "specials": {"pad": 0, "unk": 1, "eos": 2}, "config": asdict(config),
               "onnx_ops": report.op_histogram})
    version = reg.commit(staging, manifest)
    if promote:
        reg.promote(version)
    return version
