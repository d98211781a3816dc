"""Training: members one by one, then the gate with the members frozen; export to ONNX; registry commit.

The design documents' approach: each member learns the task on its own (early stopping on validation loss),
then the gating network learns per-input weights over the frozen members. Mixed precision on a GPU,
``MirroredStrategy`` over several GPUs, reproducible with a seed. One run gives one registry version:
``model.onnx`` (+ ``model.fp16.onnx``), the Keras model under ``keras/`` (warm start) and the manifest, whose
thresholds and metrics come from the exported ONNX graph itself on the validation split.

This module imports TensorFlow: the CLI and the trainer import it inside the commands that train.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
from pydantic import BaseModel, Field, field_validator

from fabwatch.export.errors import UsageError
from fabwatch.export.onnx_export import keras_to_onnx, to_fp16
from fabwatch.export.registry import Manifest, Registry, Thresholds, ThresholdsBy
from fabwatch.export.runtime import create_session
from fabwatch.models.training import calibrate, data, drift
from fabwatch.models import ensemble
from fabwatch.models.common import Size, Task, prediction_loss
from fabwatch.models.members import monitor
from fabwatch.models.tf import keras, tf

log = logging.getLogger(__name__)
KERAS_FILE = "keras/ensemble.keras"


class TrainConfig(BaseModel):
    """Everything a training run depends on (recorded in the manifest)."""

    data: Path
    registry: Path
    task: Task = "classify"
    label_col: str | None = "label"
    features: list[str] | None = None
    ts_col: str | None = None
    entity_col: str | None = None
    entity: str | None = Field(None, description="the entity of a file without an entity column")
    size: Size = "full"
    members: list[str] = Field(default_factory=lambda: list(ensemble.MEMBERS),
                               description="the ensemble's architectures (default: the five)")
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(128, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    patience: int = Field(3, ge=1, description="early stopping: epochs without validation improvement")
    window: int = Field(100, ge=2)
    stride: int = Field(1, ge=1, description="training (and early-stopping) windows start every STRIDE steps")
    val_fraction: float = Field(0.2, gt=0, lt=1)
    nan_tolerance: float = Field(0.01, ge=0, le=1)
    target_far: float | None = Field(None, gt=0, lt=1, description="choose the threshold for this false-alarm rate")
    delay_alert_min: float = Field(5.0, ge=0, description="regress: a delay above this many minutes is an event")
    threshold_by: str | None = Field(None, pattern=r"^(entity|group:.+)$", description="calibrate thresholds per "
                                     "entity, or per group of entities named by a column: entity | group:COLUMN")
    threshold_min_windows: int = Field(calibrate.MIN_KEY_WINDOWS, ge=1, description="validation windows an entity "
                                       "or group needs for its own threshold (fewer: the pooled one)")
    entity_groups: dict[str, str] | None = Field(None, description="entity -> group for group:COLUMN, instead of "
                                                 "reading COLUMN (a retrain reuses the serving model's map)")
    seed: int = 0
    fp16: bool = False
    promote: bool = True
    force: bool = Field(False, description="promote even when the model is no better than chance or a simple "
                        "baseline on its validation data")
    warm_start: bool = Field(False, description="start from the current version's Keras weights")
    time_budget_s: float | None = Field(None, gt=0, description="stop training at the first batch past this "
                                        "many seconds (validation scoring, export and the gate come after)")

    @field_validator("members")
    @classmethod
    def _known_members(cls, names: list[str]) -> list[str]:
        if not names:
            raise ValueError("the ensemble needs at least one member")
        return ensemble.check_members(names)

    @classmethod
    def quick(cls, **overrides: Any) -> TrainConfig:
        """The tiny ensemble, a few epochs on every 8th window: CI and demos, a minute or two on 2 cores."""
        return cls(**({"size": "tiny", "epochs": 3, "batch_size": 64, "stride": 8, "patience": 2,
                       "learning_rate": 5e-3} | overrides))


class TrainResult(BaseModel):
    version: str
    promoted: bool
    manifest: Manifest
    seconds: float


class Deadline(keras.callbacks.Callback):
    """Stops a stage at the first batch that ends past the run's time budget, mid-epoch if need be: one epoch
    of the design's 781k windows outlasts a 2-hour budget on a CPU. A stage that starts past the deadline trains
    one batch (from a warm start, the serving weights barely move; the gate judges the result)."""

    def __init__(self, deadline: float):
        super().__init__()
        self.deadline = deadline

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if time.monotonic() > self.deadline:
            self.model.stop_training = True


def _strategy() -> tuple[tf.distribute.Strategy, bool]:
    """MirroredStrategy across GPUs when there are several; mixed precision whenever there is a GPU."""
    gpus = tf.config.list_physical_devices("GPU")
    keras.mixed_precision.set_global_policy("mixed_float16" if gpus else "float32")
    return (tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()), bool(gpus)


def dataset(inputs: np.ndarray | tuple[np.ndarray, ...], target: np.ndarray | None, batch: int, seed: int,
             shuffle: bool, forecast_member: bool = False) -> tf.data.Dataset:
    """tf.data over windows (for the gate: windows and the frozen members' outputs).

    ``forecast_member``: the member sees all steps but the last, and the last is its target.
    """
    n = len(inputs[0] if isinstance(inputs, tuple) else inputs)
    if forecast_member:
        ds = tf.data.Dataset.from_tensor_slices(inputs)
    else:
        ds = tf.data.Dataset.from_tensor_slices((inputs, np.zeros(n, np.float32) if target is None else target))
    if shuffle:
        ds = ds.shuffle(min(n, 20_000), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch)
    if forecast_member:
        ds = ds.map(lambda w: (w[:, :-1], w[:, -1]), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def _loss(task: Task, target_std: float, gate: bool) -> keras.losses.Loss:
    if task == "classify":
        return keras.losses.BinaryCrossentropy()
    if task == "regress":
        return keras.losses.Huber(delta=max(target_std, 1e-3))
    return prediction_loss if gate else keras.losses.MeanSquaredError()


def compile_stage(model: keras.Model, task: Task, learning_rate: float, loss: keras.losses.Loss) -> None:
    """Adam, and validation ROC-AUC for classification (what early stopping watches there)."""
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss,
                  metrics=[keras.metrics.AUC(name="auc")] if task == "classify" else None)


def _fit(model: keras.Model, train_ds: tf.data.Dataset, val_ds: tf.data.Dataset, cfg: TrainConfig,
         loss: keras.losses.Loss, deadline: float) -> dict[str, float]:
    """One stage: Adam, early stopping (best weights kept), Keras' progress bar.

    Classification stops on validation ROC-AUC, not loss: training keeps every event window, so its class
    balance differs from validation's and the validation loss mostly measures that shift.
    """
    by_auc = cfg.task == "classify"
    compile_stage(model, cfg.task, cfg.learning_rate, loss)
    stop = keras.callbacks.EarlyStopping(monitor="val_auc" if by_auc else "val_loss", mode="max" if by_auc else "min",
                                         patience=cfg.patience, restore_best_weights=True)
    callbacks = [stop, Deadline(deadline)]
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    log.info("training %s (%s trainable parameters)", model.name, f"{trainable:,}")
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the progress bar must not mix with `--json` on stdout
        history = model.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs, callbacks=callbacks,
                            verbose=1 if sys.stderr.isatty() else 2)
    best = {f"best_{k}": float(max(v) if k == "val_auc" else min(v))
            for k, v in history.history.items() if k in ("val_loss", "val_auc")}
    return {"epochs": len(history.history["loss"]), "seconds": time.perf_counter() - start, **best}


def member_outputs(members: list[keras.Model], x: np.ndarray, forecast: bool) -> np.ndarray:
    """The frozen members' outputs stacked: [N,M] or, for forecasts, [N,M,F]."""
    context = x[:, :-1] if forecast else x
    outs = [m.predict(context, batch_size=1024, verbose=0) for m in members]
    return np.stack(outs, axis=1) if forecast else np.concatenate(outs, axis=1)


def fit_ensemble(split: data.Split, cfg: TrainConfig, target: tuple[float, float]) -> tuple[keras.Model, dict]:
    """Members one by one, then the gate on their frozen outputs; a float32 ensemble and a per-stage report."""
    keras.utils.set_random_seed(cfg.seed)
    tf.config.experimental.enable_op_determinism()
    strategy, mixed = _strategy()
    n_features = len(split.feature_names)
    build_args = dict(window=cfg.window, n_features=n_features, task=cfg.task, size=cfg.size,
                      target_mean=target[0], target_std=target[1], members=cfg.members)
    batch = cfg.batch_size * strategy.num_replicas_in_sync
    deadline = time.monotonic() + (cfg.time_budget_s or float("inf"))
    forecast = cfg.task == "forecast"
    y_train, y_val = (None, None) if forecast else (split.train.y, split.val.y)
    # early stopping watches validation windows at the training stride; the manifest's figures use all of them
    val_x = split.val.x[::cfg.stride]
    val_y = None if y_val is None else y_val[::cfg.stride]
    report: dict[str, Any] = {}
    with strategy.scope():
        model = ensemble.build(**build_args)
        if cfg.warm_start:
            _warm_start(model, Registry(cfg.registry), split.feature_names, cfg)
        members, gate = ensemble.members_of(model)
        member_train = dataset(split.train.x, y_train, batch, cfg.seed, True, forecast_member=forecast)
        member_val = dataset(val_x, val_y, batch, cfg.seed, False, forecast_member=forecast)
        for member in members:
            report[member.name] = _fit(member, member_train, member_val, cfg, _loss(cfg.task, target[1], False),
                                       deadline)
        trainer = ensemble.gate_trainer(gate, cfg.window, n_features, len(members), cfg.task)
        report["gate"] = _fit(
            trainer, dataset((split.train.x, member_outputs(members, split.train.x, forecast)), y_train, batch,
                              cfg.seed, True),
            dataset((val_x, member_outputs(members, val_x, forecast)), val_y, batch, cfg.seed, False),
            cfg, _loss(cfg.task, target[1], True), deadline)
    if mixed:  # export and the Keras file carry no mixed-precision casts
        keras.mixed_precision.set_global_policy("float32")
        weights = model.get_weights()
        model = ensemble.build(**build_args)
        model.set_weights(weights)
    stages = [report[m.name] for m in members]  # the gate is cheap: members are the training cost
    report["windows_per_s"] = (sum(s["epochs"] for s in stages) * len(split.train.x)
                               / sum(s["seconds"] for s in stages))  # through one member's training step
    report["train_windows"] = len(split.train.x)
    return model, report


def train(cfg: TrainConfig) -> TrainResult:
    """Load, split, fit, export, calibrate on the exported graph, commit (and promote)."""
    started = time.perf_counter()
    table = data.load(cfg.data, cfg.features, cfg.label_col, cfg.task, cfg.nan_tolerance, cfg.window,
                      ts_col=cfg.ts_col, entity_col=cfg.entity_col, entity=cfg.entity,
                      group_col=_group_column(cfg) if cfg.entity_groups is None else None)
    # supervised: event windows train at a quarter of the stride (short events are rare at a sparse stride)
    split = data.split(table, cfg.window, cfg.val_fraction, cfg.stride, val_stride=1,
                       event_stride=None if cfg.task == "forecast" else max(1, cfg.stride // 4))
    if cfg.task == "classify" and not split.train.y.any():
        raise UsageError(f"label column {cfg.label_col!r} has no positive windows in the training split")
    log.info("%d training / %d validation windows of %d x %d (%s)", len(split.train.x), len(split.val.x),
             cfg.window, len(split.feature_names), ", ".join(split.feature_names))
    target = ((float(split.train.y.mean()), float(split.train.y.std() or 1.0)) if cfg.task == "regress"
              else (0.0, 1.0))
    groups = cfg.entity_groups if cfg.entity_groups is not None else table.groups
    model, report = fit_ensemble(split, cfg, target)
    extra: dict[str, Any] = {}
    if cfg.task == "forecast":
        model, extra["monitor"] = _add_monitor(model, table, split, cfg.window)
    manifest = Manifest(
        version="", created="", task=cfg.task, feature_names=split.feature_names, window=cfg.window,
        scaler=split.scaler, members=ensemble.member_names(cfg.task, cfg.members), data_fingerprint=table.fingerprint,
        drift_reference=drift.reference(table.x, split.feature_names),  # every row of the file, as readings arrive
        metrics={"training": report},
        extra=extra | {"size": cfg.size, "parameters": ensemble.parameter_counts(model), "config": cfg.model_dump(mode="json"),
               "target": {"mean": target[0], "std": target[1]}})
    registry = Registry(cfg.registry)
    version, _ = write_version(model, manifest, registry, fp16=cfg.fp16, promote=False,
                               calibrate_with=partial(calibrate_on, split=split, cfg=cfg, groups=groups))
    verdict = registry.manifest(version).metrics["quality"]
    promoted = cfg.promote and (verdict["ok"] is not False or cfg.force)
    if promoted:
        registry.promote(version)
    elif cfg.promote:
        log.warning("%s not promoted: %s (--force promotes it anyway)", version, verdict["reason"])
    return TrainResult(version=version, promoted=promoted, manifest=registry.manifest(version),
                       seconds=time.perf_counter() - started)


def _add_monitor(model: keras.Model, table: data.Table, split: data.Split,
                 window: int) -> tuple[keras.Model, dict[str, Any]]:
    """Fit the statistical monitor on every row (it holds its own rows out: out-of-fold limits, split-half
    margins) and wire it into the ensemble as the forecast task's score."""
    started = time.perf_counter()
    scaled = data.apply_scaler(table.x, split.scaler)
    segments = [scaled[s:e].astype(np.float64) for s, e in table.entity_bounds()]
    try:
        params = monitor.fit(segments, window)
    except ValueError as exc:
        raise UsageError(f"{exc} (try a shorter --window)") from None
    members, gate = ensemble.members_of(model)
    model = ensemble.assemble(members, gate, window, len(split.feature_names), "forecast", monitor.layer(params))
    summary = {"statistics": params.names, "components": len(params.p[0]), "margins": params.margin,
               "limit_quantile": monitor.LIMIT_QUANTILE, "folds": monitor.FOLDS, "rows": int(len(scaled)),
               "seconds": round(time.perf_counter() - started, 2)}
    log.info("statistical monitor: %s", summary)
    return model, summary


def calibrate_on(onnx_path: Path, manifest: Manifest, *, split: data.Split, cfg: TrainConfig,
                 groups: dict[str, str] | None = None) -> None:
    """Thresholds, calibration, validation metrics and the quality verdict from the exported graph's own scores."""
    val = split.val
    session = create_session(onnx_path, ["CPUExecutionProvider"])
    outs = [session.run(["score", "member_scores"], {"window": val.x[i:i + 1024]}) for i in range(0, len(val.x), 1024)]
    score = np.concatenate([o[0] for o in outs]).reshape(-1)
    member_scores = np.concatenate([o[1] for o in outs])
    if monitor.NAME in manifest.members:
        manifest.thresholds = calibrate.monitor_thresholds(score, val.y)
    else:
        manifest.thresholds = calibrate.choose_thresholds(cfg.task, score, val.y, target_far=cfg.target_far,
                                                          delay_alert_min=cfg.delay_alert_min)
    normal = calibrate.normal_mask(cfg.task, len(score), val.y, cfg.delay_alert_min)
    manifest.calibration = calibrate.calibration(score, normal)
    manifest.metrics.update(calibrate.score_metrics(cfg.task, score, val.y, manifest.thresholds, cfg.delay_alert_min))
    manifest.metrics["member_roc_auc"] = calibrate.member_aucs(member_scores, val.y, manifest.members, cfg.task,
                                                               cfg.delay_alert_min)
    manifest.metrics["quality"] = calibrate.quality(cfg.task, split.train.x, split.train.y, val.x, val.y, score,
                                                    cfg.delay_alert_min)
    log.info("validation: %s", {k: round(v, 4) for k, v in manifest.metrics.items() if isinstance(v, float)})
    if cfg.threshold_by:
        manifest.thresholds_by = thresholds_by(score, split, cfg, groups, monitor.NAME in manifest.members,
                                               manifest.thresholds)


def _group_column(cfg: TrainConfig) -> str | None:
    """COLUMN of ``--threshold-by group:COLUMN``."""
    by = cfg.threshold_by or ""
    return by.removeprefix("group:") if by.startswith("group:") else None


def thresholds_by(score: np.ndarray, split: data.Split, cfg: TrainConfig, groups: dict[str, str] | None,
                  monitor_model: bool, pooled: Thresholds) -> ThresholdsBy:
    """Per-entity or per-group figures from the validation scores (``calibrate.thresholds_by_key``). An entity
    without a group (absent from ``groups``) keeps the pooled figures."""
    if cfg.threshold_by == "entity":
        keys, groups, source = split.val_entity, {}, "entity"
    else:
        groups = dict(groups or {})
        keys, source = np.asarray([groups.get(e) for e in split.val_entity], dtype=object), "group"
    known = np.asarray([k is not None for k in keys], dtype=bool)
    figures = calibrate.thresholds_by_key(cfg.task, score[known], None if split.val.y is None else split.val.y[known],
                                          keys[known].astype(str), pooled, source=source,
                                          min_windows=cfg.threshold_min_windows, monitor=monitor_model,
                                          target_far=cfg.target_far, delay_alert_min=cfg.delay_alert_min)
    own = sum(f.source != "pooled" for f in figures.values())
    log.info("thresholds by %s: %d of %d %ss have their own", cfg.threshold_by, own, len(figures), source)
    return ThresholdsBy(by=cfg.threshold_by, min_windows=cfg.threshold_min_windows, groups=groups, keys=figures)


def _warm_start(model: keras.Model, registry: Registry, feature_names: list[str], cfg: TrainConfig) -> None:
    """Copy the current version's weights when it has the same features, task, size and window."""
    vdir, manifest = registry.resolve()
    if (manifest.feature_names, manifest.task, manifest.extra.get("size"), manifest.window, manifest.members) != (
            feature_names, cfg.task, cfg.size, cfg.window, ensemble.member_names(cfg.task, cfg.members)):
        raise UsageError(f"cannot warm-start from {manifest.version}: its features, task, size, window or members "
                         "differ")
    model.set_weights(load_keras(vdir).get_weights())
    log.info("warm start from %s", manifest.version)


def load_keras(version_dir: Path) -> keras.Model:
    """The Keras ensemble saved in a registry version (its custom layers are registered by ``fabwatch.models.ensemble``)."""
    return keras.models.load_model(version_dir / KERAS_FILE, compile=False)


def write_version(model: keras.Model, manifest: Manifest, registry: Registry, fp16: bool = False, promote: bool = True,
                  calibrate_with: Callable[[Path, Manifest], None] | None = None) -> tuple[str, bool]:
    """Export ``model`` to ONNX (+ fp16) beside its Keras file, let ``calibrate_with`` fill thresholds and metrics
    from the exported graph, commit a registry version and promote it. A failure leaves the registry as it was."""
    staging = registry.stage()
    try:
        report = keras_to_onnx(model, staging / "model.onnx", output_names=list(ensemble.output_names(manifest.task)))
        manifest.parity = {"model.onnx": report.parity_max_abs}
        if fp16:
            manifest.parity["model.fp16.onnx"] = to_fp16(staging / "model.onnx", staging / "model.fp16.onnx")
        manifest.inputs = {"window": [None, manifest.window, len(manifest.feature_names)]}
        manifest.outputs = report.outputs
        manifest.extra["onnx_ops"] = report.op_histogram
        if calibrate_with is not None:
            calibrate_with(staging / "model.onnx", manifest)
        (staging / KERAS_FILE).parent.mkdir()
        model.save(staging / KERAS_FILE, save_format="keras")
        version = registry.commit(staging, manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("registry %s: wrote %s (parity %s)", registry.root, version, manifest.parity)
    if promote:
        registry.promote(version)
    return version, promote
