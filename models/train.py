"""Training: members one by one, then the gate with the members frozen; export to ONNX; registry commit.

The design documents' approach: each member learns the task on its own (early stopping on validation loss),
then the gating network learns per-input weights over the frozen members. Mixed precision on a GPU,
``MirroredStrategy`` over several GPUs, reproducible with a seed. The result is one registry version holding
``model.onnx`` (+ ``model.fp16.onnx``), the Keras model under ``keras/`` (warm start) and the manifest.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from export.errors import UsageError
from export.registry import Manifest, Registry
from models import calibrate, data
from models.common import Size, Task

log = logging.getLogger(__name__)
KERAS_FILE = "keras/ensemble.keras"


class TrainConfig(BaseModel):
    """Everything a training run depends on (recorded in the manifest)."""

    data: Path
    registry: Path
    task: Task = "classify"
    label_col: str | None = "label"
    features: list[str] | None = None
    size: Size = "full"
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(128, ge=1)
    learning_rate: float = 1e-3
    patience: int = Field(3, ge=1, description="early stopping: epochs without validation improvement")
    window: int = Field(100, ge=2)
    stride: int = Field(1, ge=1, description="training windows start every STRIDE steps")
    val_fraction: float = Field(0.2, gt=0, lt=1)
    nan_tolerance: float = Field(0.01, ge=0, le=1)
    target_far: float | None = Field(None, gt=0, lt=1, description="choose the threshold for this false-alarm rate")
    delay_alert_min: float = Field(5.0, ge=0, description="regress: a delay above this many minutes is an event")
    seed: int = 0
    fp16: bool = False
    promote: bool = True
    warm_start: bool = Field(False, description="start from the current version's Keras weights")

    @classmethod
    def quick(cls, **overrides: Any) -> "TrainConfig":
        """The tiny ensemble for a few epochs on every 4th window: CI and demos, about a minute on 2 cores."""
        settings = {"size": "tiny", "epochs": 4, "batch_size": 64, "stride": 4, "patience": 2,
                    "learning_rate": 3e-3} | overrides
        return cls(**settings)


class TrainResult(BaseModel):
    version: str
    promoted: bool
    manifest: Manifest
    seconds: float


def _strategy():
    """MirroredStrategy across GPUs when there are several; mixed precision whenever there is a GPU."""
    from models.tf import keras, tf

    gpus = tf.config.list_physical_devices("GPU")
    keras.mixed_precision.set_global_policy("mixed_float16" if gpus else "float32")
    return (tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()), bool(gpus)


def _dataset(x: np.ndarray, y: np.ndarray | None, task: Task, batch: int, seed: int, shuffle: bool, member: bool):
    """tf.data over windows. Forecast: members get (context, next step); the ensemble gets the whole window."""
    from models.tf import tf

    ds = tf.data.Dataset.from_tensor_slices(x if task == "forecast" else (x, y))
    if shuffle:
        ds = ds.shuffle(min(len(x), 20_000), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch)
    if task == "forecast":
        ds = ds.map((lambda w: (w[:, :-1], w[:, -1])) if member else (lambda w: (w, tf.zeros(tf.shape(w)[0]))),
                    num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def _loss(task: Task, target_std: float, ensemble: bool):
    from models.common import prediction_loss
    from models.tf import keras

    if task == "classify":
        return keras.losses.BinaryCrossentropy()
    if task == "regress":
        return keras.losses.Huber(delta=max(target_std, 1e-3))
    return prediction_loss if ensemble else keras.losses.MeanSquaredError()


def _fit(model, train_ds, val_ds, cfg: TrainConfig, loss, what: str) -> dict[str, float]:
    from models.tf import keras

    model.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate), loss=loss)
    stop = keras.callbacks.EarlyStopping(patience=cfg.patience, restore_best_weights=True)
    log.info("training %s (%s parameters trainable)", what, f"{sum(np.prod(w.shape) for w in model.trainable_weights):,}")
    start = time.perf_counter()
    history = model.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs, callbacks=[stop],
                        verbose=1 if sys.stderr.isatty() else 2)
    epochs = len(history.history["loss"])
    return {"epochs": epochs, "seconds": time.perf_counter() - start,
            "best_val_loss": float(min(history.history["val_loss"]))}


def _float32_copy(model, build_args: dict):
    """The same weights in a float32 model: export and saving never carry mixed-precision casts."""
    from models import ensemble
    from models.tf import keras

    keras.mixed_precision.set_global_policy("float32")
    clone = ensemble.build(**build_args)
    clone.set_weights(model.get_weights())
    return clone


def train(cfg: TrainConfig) -> TrainResult:
    """Load, split, train members and gate, calibrate, export, commit (and promote)."""
    started = time.perf_counter()
    table = data.load(cfg.data, cfg.features, cfg.label_col, cfg.task, cfg.nan_tolerance, cfg.window)
    split = data.split(table, cfg.window, cfg.val_fraction, cfg.stride, val_stride=1)
    if cfg.task == "classify" and not split.train.y.any():
        raise UsageError(f"label column {cfg.label_col!r} has no positive windows in the training split")
    log.info("%d training / %d validation windows of %d x %d (%s)", len(split.train.x), len(split.val.x),
             cfg.window, len(split.feature_names), ", ".join(split.feature_names))

    from models import ensemble
    from models.tf import keras, tf

    keras.utils.set_random_seed(cfg.seed)
    tf.config.experimental.enable_op_determinism()
    strategy, mixed = _strategy()
    n_features = len(split.feature_names)
    target_mean, target_std = ((float(split.train.y.mean()), float(split.train.y.std() or 1.0))
                               if cfg.task == "regress" else (0.0, 1.0))
    build_args = dict(window=cfg.window, n_features=n_features, task=cfg.task, size=cfg.size,
                      target_mean=target_mean, target_std=target_std)
    batch = cfg.batch_size * strategy.num_replicas_in_sync
    report: dict[str, Any] = {}
    with strategy.scope():
        model = ensemble.build(**build_args)
        if cfg.warm_start:
            _warm_start(model, Registry(cfg.registry), split.feature_names, cfg)
        members, gate = ensemble.members_of(model)
        member_train = _dataset(split.train.x, split.train.y, cfg.task, batch, cfg.seed, True, member=True)
        member_val = _dataset(split.val.x, split.val.y, cfg.task, batch, cfg.seed, False, member=True)
        for member in members:
            report[member.name] = _fit(member, member_train, member_val, cfg, _loss(cfg.task, target_std, False),
                                       member.name)
            member.trainable = False
        report["gate"] = _fit(model, _dataset(split.train.x, split.train.y, cfg.task, batch, cfg.seed, True, member=False),
                              _dataset(split.val.x, split.val.y, cfg.task, batch, cfg.seed, False, member=False),
                              cfg, {"score": _loss(cfg.task, target_std, True)}, "gate (members frozen)")
    for member in members:
        member.trainable = True
    if mixed:
        model = _float32_copy(model, build_args)

    fit_windows = sum(r["epochs"] for r in report.values()) * len(split.train.x)
    fit_seconds = sum(r["seconds"] for r in report.values())
    score, member_scores = (np.asarray(o) for o in model.predict(split.val.x, batch_size=512, verbose=0)[:2])
    thresholds = calibrate.choose_thresholds(cfg.task, score, split.val.y, target_far=cfg.target_far,
                                             delay_alert_min=cfg.delay_alert_min)
    normal = np.ones(len(score), bool) if split.val.y is None else (
        split.val.y <= cfg.delay_alert_min if cfg.task == "regress" else split.val.y < 0.5)
    metrics = calibrate.score_metrics(cfg.task, score, split.val.y, thresholds, cfg.delay_alert_min)
    metrics["member_roc_auc"] = calibrate.member_aucs(member_scores, split.val.y, list(ensemble.MEMBERS), cfg.task,
                                                      cfg.delay_alert_min)
    metrics["training"] = {**report, "train_windows": len(split.train.x), "windows_per_s": fit_windows / fit_seconds}
    log.info("validation: %s", {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})

    manifest = Manifest(
        version="", created="", task=cfg.task, feature_names=split.feature_names, window=cfg.window,
        scaler=split.scaler, thresholds=thresholds, calibration=calibrate.calibration(score, normal),
        members=list(ensemble.MEMBERS), data_fingerprint=table.fingerprint, metrics=metrics,
        extra={"size": cfg.size, "parameters": ensemble.parameter_counts(model),
               "config": cfg.model_dump(mode="json"), "target": {"mean": target_mean, "std": target_std}})
    version, promoted = write_version(model, manifest, Registry(cfg.registry), fp16=cfg.fp16, promote=cfg.promote)
    return TrainResult(version=version, promoted=promoted, manifest=Registry(cfg.registry).manifest(version),
                       seconds=time.perf_counter() - started)


def _warm_start(model, registry: Registry, feature_names: list[str], cfg: TrainConfig) -> None:
    """Copy the current version's weights when it has the same features, task and size."""
    vdir, manifest = registry.resolve()
    same = (manifest.feature_names == feature_names and manifest.task == cfg.task
            and manifest.extra.get("size") == cfg.size and manifest.window == cfg.window)
    if not same:
        raise UsageError(f"cannot warm-start from {manifest.version}: its features, task, size or window differ")
    model.set_weights(load_keras(vdir).get_weights())
    log.info("warm start from %s", manifest.version)


def load_keras(version_dir: Path):
    """The Keras ensemble saved in a registry version (custom layers registered on import)."""
    from models import ensemble  # noqa: F401  registers the custom layers
    from models.tf import keras

    return keras.models.load_model(version_dir / KERAS_FILE, compile=False)


def write_version(model, manifest: Manifest, registry: Registry, fp16: bool = False,
                  promote: bool = True) -> tuple[str, bool]:
    """Export ``model`` to ONNX (+ fp16) beside its Keras file, commit a registry version, promote it."""
    from export.onnx_export import keras_to_onnx, to_fp16
    from models import ensemble

    staging = registry.stage()
    try:
        outputs = list(ensemble.output_names(manifest.task))
        report = keras_to_onnx(model, staging / "model.onnx", output_names=outputs)
        manifest.parity = {"model.onnx": report.parity_max_abs}
        if fp16:
            manifest.parity["model.fp16.onnx"] = to_fp16(staging / "model.onnx", staging / "model.fp16.onnx")
        manifest.inputs = {"window": [None, manifest.window, len(manifest.feature_names)]}
        manifest.outputs = report.outputs
        manifest.extra["onnx_ops"] = report.op_histogram
        (staging / "keras").mkdir()
        model.save(staging / KERAS_FILE, save_format="keras")
        version = registry.commit(staging, manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("registry %s: wrote %s (parity %s)", registry.root, version, manifest.parity)
    if promote:
        registry.promote(version)
    return version, promote
