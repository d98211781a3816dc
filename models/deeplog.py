"""DeepLog (Du et al., CCS 2017): an LSTM that predicts the next log key from the previous h keys.

Architecture: key embedding -> 2 stacked LSTMs (64 units) -> softmax over the vocabulary (PAD, UNK
and the keys seen in training). Windows come from ``fabwatch.stream.logs.score.build_windows`` so training and
serving frame sessions identically (leading padding, see that module).

Training is on distinct windows: HDFS's ~100k training windows are ~4k distinct ones, so each
distinct window is one sample whose target is the empirical distribution of its next keys. Weighting
each by its count would reproduce the plain cross-entropy over all windows at a 25th of the cost; we
weight by ``count ** count_power`` (0.5 by default) instead, so that rare but normal contexts still
rank their next keys within the top-g: on HDFS, count weighting left 1.4 % of distinct training
windows with a next key outside the top-9 after 20 epochs and doubled the false positives.

Backoff targets (``backoff``, 0.1 by default): each window's target is blended with the next-key
distribution after its last key alone. With ~14 keys, g = 9-11 reaches deep into keys the model
has never seen in a context, and without the blend their order there is arbitrary: two seeds gave
recall 0.93 and 0.9996 at g = 9 on hdfs_test_abnormal. With it, keys seen after the same last key
rank above keys never seen there, and seeds 0 and 1 agree (g = 10: recall 0.962 / 0.964, 3 false
positives of 1,000 normal sessions each).

Where the false positives come from (HDFS, h = 10). 83 of the 1,000 normal sessions of
``labeled_sessions_dev.csv`` hold a (window, next key) pair that never occurs in ``hdfs_train``, so
passing them rests on how the model ranks keys it never saw in that context. The ones flagged at
g = 9-10 across the models below: #638 holds key 20, never seen in training (flagged at every g);
#644 has 25 after ``5 22 11 9 11 9 11 9 26 26``, a context seen 1,268 times in training and always
followed by 26 (26 -> 25 occurs 13 times), rank 10; #796 has 2 -> 25, a transition that never occurs
in the 4,855 training sessions, and then ``4 4 -> 3`` ranked last because its window holds the
unseen ``25 18 5 26 6 16``; #724 and #29 come and go with the seed. Six models (count_power 0.5 with
seeds 0 and 1; backoff 0.3; backoff 0.2 over the last 1-2 keys; count_power 0.25) all sit on the
same curve: recall >= 0.96 only at g <= 10, with 3 false positives (2 with 0.944 recall); a single
false positive (#638) only at g >= 11, with recall 0.85-0.91. The issue's target (recall >= 0.96 with
FPR <= 0.15 %, i.e. no false positive besides #638) is off that curve: even g picked on the
evaluation labels gives at most F1 0.94 at the paper's balance. None of these variants is better on
held-out training sessions either (``choose_top_g``'s split: 0-2 held-out false positives per g,
chosen g 10-12 depending on the seed alone), so the defaults stay. Reproduce with
``fabwatch bench logs --json --seed S [--top-g G] [--backoff B] [--count-power P]``.

With the count invariants beside it (``fabwatch.stream.logs.invariants``; seed 0, g = 11 chosen for
the combined verdict on held-out sessions) recall rises to 0.966 at 3 false positives: #638, #796
and #644, which break count relations that held in all but one training session, so the two
detectors agree on which normal sessions look abnormal and the OR cannot lower the rate.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fabwatch.stream.logs.invariants import INVARIANTS, CountModel
from fabwatch.stream.logs.parse import DRAIN_STATE, DrainState
from fabwatch.stream.logs.score import SPECIALS, Vocabulary, build_windows, next_key_ranks, session_max_rank, window_codes


@dataclass
class DeepLogConfig:
    h: int = 10
    top_g: int = 9
    units: int = 64
    layers: int = 2
    embedding: int = 16
    epochs: int = 100
    batch_size: int = 256
    learning_rate: float = 3e-3
    count_power: float = 0.5
    backoff: float = 0.1
    backoff_order: int = 1
    seed: int = 0


@dataclass
class TrainingSet:
    """Distinct windows, their next-key distributions and counts."""

    windows: np.ndarray  # [U, h] int32
    targets: np.ndarray  # [U, V] float32, rows sum to 1 (backoff blended in)
    observed: np.ndarray  # [U, V] bool: next keys actually seen after the window
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
    observed = targets > 0
    targets /= counts[:, None]
    windows = np.ascontiguousarray(w.windows[first])
    if backoff > 0:
        # blend in the next-key distribution after the last 1..backoff_order keys (see the module doc)
        blend = np.zeros_like(targets)
        for k in range(1, backoff_order + 1):
            _, short_inv = np.unique(window_codes(w.windows[:, -k:], len(vocab)), return_inverse=True)
            short_inv = short_inv.reshape(-1)
            table = np.zeros((short_inv.max() + 1, len(vocab)), dtype=np.float32)
            np.add.at(table, (short_inv, w.next_keys), 1.0)
            table /= table.sum(axis=1, keepdims=True)
            blend += table[short_inv[first]]
        targets = (1 - backoff) * targets + backoff * blend / backoff_order
    return TrainingSet(windows=windows, targets=targets, observed=observed, counts=counts,
                       total_windows=len(w.windows))


def build_model(vocab_size: int, config: DeepLogConfig):
    """Integer keys ``[B, h]`` -> next-key probabilities ``[B, V]`` (tf_keras, fused-LSTM friendly)."""
    from fabwatch.models.tf import keras

    keys = keras.Input(shape=(config.h,), dtype="int32", name="keys")
    x = keras.layers.Embedding(vocab_size, config.embedding, name="embed")(keys)
    for i in range(config.layers):
        x = keras.layers.LSTM(config.units, return_sequences=i < config.layers - 1, name=f"lstm{i + 1}")(x)
    probs = keras.layers.Dense(vocab_size, activation="softmax", name="probs")(x)
    return keras.Model(keys, probs, name="deeplog")


def train(sessions: Sequence[Sequence[str]], config: DeepLogConfig, verbose: int = 0) -> tuple[Any, Vocabulary, dict]:
    """Fit DeepLog on normal sessions; returns the Keras model, the vocabulary and training figures."""
    from fabwatch.models.tf import keras, tf

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
    # share of distinct training windows whose every next key ranks within the top-g (fit on normal data)
    ranks = np.argsort(np.argsort(-probs[:, len(SPECIALS):], axis=1), axis=1)
    worst = np.where(data.observed[:, len(SPECIALS):], ranks, -1).max(axis=1)
    figures = {"sessions": len(sessions), "windows": data.total_windows, "distinct_windows": len(data.windows),
               "vocabulary": len(vocab.keys), "epochs": config.epochs, "train_seconds": seconds,
               "final_loss": float(history.history["loss"][-1]),
               "distinct_windows_all_next_in_top_g": float((worst < config.top_g).mean())}
    return model, vocab, figures


def holdout_split(sessions: Sequence[Sequence[str]], seed: int, holdout: float = 0.2
                  ) -> tuple[list[Sequence[str]], list[Sequence[str]]]:
    """Normal sessions -> (fit on, held out): the one split every choice made on held-out data shares."""
    order = np.random.default_rng(seed).permutation(len(sessions))
    cut = int(len(sessions) * (1 - holdout))
    return [sessions[i] for i in order[:cut]], [sessions[i] for i in order[cut:]]


def choose_top_g(sessions: Sequence[Sequence[str]], config: DeepLogConfig, holdout: float = 0.2,
                 max_fpr: float = 0.0015, flagged_elsewhere: np.ndarray | None = None) -> tuple[int, dict]:
    """Pick g on normal sessions held out from training: the smallest g (most sensitive) whose
    held-out false-positive rate is at most ``max_fpr``, else the g with the fewest false positives.

    g = 9 is the paper's choice for 29 keys; with HDFS's ~14 keys in training the same g leaves far
    fewer impossible keys, so it is chosen from data here rather than assumed. Only normal data is
    used: the abnormal sets stay untouched for the benchmark. With ~1,000 held-out sessions a
    0.15 % bound rests on one or two sessions, so the choice moves between seeds (7 and 12 on HDFS
    with seeds 1 and 0, where the evaluation sweep peaks at 10 for both): report the sweep with it.

    ``flagged_elsewhere``: ``[held-out sessions]`` bool, the verdicts of another detector (the count
    model mined on the same split, see ``holdout_split``) ORed in, so g is chosen for the combined
    verdict's false-positive rate.
    """
    fit_on, held = holdout_split(sessions, config.seed, holdout)
    model, vocab, _ = train(fit_on, config)
    w = build_windows([vocab.encode(s) for s in held], config.h)
    _, first, inverse = np.unique(window_codes(w.windows, len(vocab)), return_index=True, return_inverse=True)
    probs = model.predict(w.windows[first], batch_size=4096, verbose=0)[inverse.reshape(-1)]
    worst = session_max_rank(w, next_key_ranks(probs, w.next_keys), held, config.h)
    also = np.zeros(len(held), dtype=bool) if flagged_elsewhere is None else np.asarray(flagged_elsewhere, dtype=bool)
    if len(also) != len(held):
        raise ValueError("flagged_elsewhere must hold one verdict per held-out session")
    fpr = {g: float(((worst >= g) | also).mean()) for g in range(1, len(vocab.keys) + 1)}
    ok = [g for g, rate in fpr.items() if rate <= max_fpr]
    chosen = ok[0] if ok else min(fpr, key=lambda g: (fpr[g], g))
    return chosen, {"holdout_sessions": len(held), "max_fpr": max_fpr, "chosen": chosen,
                    "combined_with_count_model": flagged_elsewhere is not None, "holdout_fpr_by_g": fpr}


def export_to_registry(model: Any, vocab: Vocabulary, config: DeepLogConfig, registry: Path | str,
                       figures: dict, data_fingerprint: str = "", promote: bool = True,
                       drain_state: DrainState | None = None, count_model: CountModel | None = None) -> str:
    """ONNX export (fused LSTM, parity-checked on random windows over the whole vocabulary) into a new
    registry version; promoted unless ``promote`` is False. ``drain_state``: the Drain templates that
    keyed the training lines, stored beside the model (listed with its sha256 like every file);
    ``count_model``: the quantitative detector (``invariants.json``, plain JSON), likewise."""
    from fabwatch.export.onnx_export import keras_to_onnx
    from fabwatch.export.registry import Manifest, Registry

    reg = Registry(registry)
    staging = reg.stage()
    parity_windows = np.random.default_rng(config.seed).integers(0, len(vocab), (256, config.h), dtype=np.int32)
    try:
        report = keras_to_onnx(model, staging / "model.onnx", input_name="keys", output_names=["probs"],
                               sample_inputs=parity_windows)
    except Exception:
        shutil.rmtree(staging, ignore_errors=True)  # never leave a half-built version behind
        raise
    if drain_state is not None:
        drain_state.write(staging / DRAIN_STATE)
    if count_model is not None:
        count_model.write(staging / INVARIANTS)
    manifest = Manifest(
        version="pending", created="", task="logkeys", feature_names=["log_key"], window=config.h,
        inputs={"keys": [None, config.h]}, outputs=["probs"], parity={"model.onnx": report.parity_max_abs},
        data_fingerprint=data_fingerprint, metrics={"training": figures},
        extra={"vocabulary": vocab.keys, "h": config.h, "top_g": config.top_g,
               "specials": {"pad": 0, "unk": 1}, "config": asdict(config),
               "onnx_ops": report.op_histogram})
    version = reg.commit(staging, manifest)
    if promote:
        reg.promote(version)
    return version
