"""Training: members one by one, then the gate with the members frozen; export to ONNX; registry commit.

The design documents' approach: each member learns the task on its own (early stopping on validation loss),
then the gating network learns per-input weights over the frozen members. Mixed precision on a GPU,
``MirroredStrategy`` over several GPUs, reproducible with a seed. One run gives one registry version:
``model.onnx`` (+ ``model.fp16.onnx``), the Keras model under ``keras/`` (warm start) and the manifest, whose
thresholds and metrics come from the exported ONNX graph itself on the validation split; with ``cv``, from the
out-of-fold scores of K blocked time-series folds instead, the final model fitted on all the data, and with
``weight_search`` the gate replaced by searched static weights when they score better out of fold.

This module imports TensorFlow: the CLI and the trainer import it inside the commands that train.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
from pydantic import BaseModel, Field, field_validator

from fabwatch.export.errors import UsageError
from fabwatch.export.onnx_export import keras_to_onnx, to_fp16
from fabwatch.export.registry import Manifest, Registry, Thresholds, ThresholdsBy
from fabwatch.export.runtime import create_session
from fabwatch.models.training import calibrate, data, drift, search
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
    monitor: bool = Field(False, description="classify: the statistical monitor decides, fitted on the label-0 rows, "
                          "its limits raised as far as the labelled faults allow within the false-alarm budget")
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
    cv: int | None = Field(None, ge=2, description="K blocked time-series folds: out-of-fold figures and threshold, "
                           "the final model fitted on all the data")
    weight_search: int | None = Field(None, ge=1, description="Optuna trials of static member weights and threshold "
                                      "on the out-of-fold scores, against the gate (needs cv)")
    parallel_members: bool = Field(False, description="train the members in processes of their own, as many at a "
                                   "time as there are cores")

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


def member_pool(cfg: TrainConfig) -> contextlib.AbstractContextManager[Executor | None]:
    """Processes for ``parallel_members`` (spawned: TensorFlow does not survive a fork), as many as there are cores
    and members, each with its share of the cores as TensorFlow threads; ``None`` trains members in this process.
    One pool serves every fold of a cross-validation and the final fit."""
    if not cfg.parallel_members:
        return contextlib.nullcontext(None)
    cores = os.cpu_count() or 1
    workers = max(1, min(cores, len(cfg.members)))
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_member_process, initargs=(max(1, cores // workers),))


def _member_process(threads: int) -> None:
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def _fit_member(name: str, build_args: dict[str, Any], train_xy: tuple[np.ndarray, np.ndarray | None],
                val_xy: tuple[np.ndarray, np.ndarray | None], cfg: TrainConfig, target_std: float, deadline: float,
                initial: list[np.ndarray] | None) -> tuple[list[np.ndarray], dict[str, float]]:
    """One member's stage in a member process: the same seed, datasets and early stopping as in-process training.
    ``deadline`` is on the monotonic clock, which processes of one machine share."""
    keras.utils.set_random_seed(cfg.seed)
    tf.config.experimental.enable_op_determinism()
    _strategy()
    member = ensemble.build_member(name, **{k: v for k, v in build_args.items() if k != "members"})
    if initial is not None:
        member.set_weights(initial)
    forecast = cfg.task == "forecast"
    report = _fit(member, dataset(*train_xy, cfg.batch_size, cfg.seed, True, forecast_member=forecast),
                  dataset(*val_xy, cfg.batch_size, cfg.seed, False, forecast_member=forecast), cfg,
                  _loss(cfg.task, target_std, False), deadline)
    return member.get_weights(), report


def fit_ensemble(split: data.Split, cfg: TrainConfig, target: tuple[float, float],
                 pool: Executor | None = None) -> tuple[keras.Model, dict]:
    """Members one by one (or side by side in ``pool``'s processes), then the gate on their frozen outputs;
    a float32 ensemble and a per-stage report."""
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
        if pool is not None:
            jobs = [pool.submit(_fit_member, m.name, build_args, (split.train.x, y_train), (val_x, val_y), cfg,
                                target[1], deadline, m.get_weights() if cfg.warm_start else None) for m in members]
            for member, job in zip(members, jobs):
                weights, report[member.name] = job.result()
                member.set_weights(weights)
        else:
            member_train = dataset(split.train.x, y_train, batch, cfg.seed, True, forecast_member=forecast)
            member_val = dataset(val_x, val_y, batch, cfg.seed, False, forecast_member=forecast)
            for member in members:
                report[member.name] = _fit(member, member_train, member_val, cfg,
                                           _loss(cfg.task, target[1], False), deadline)
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
    report["parallel_members"] = pool is not None
    return model, report


def _target(split: data.Split, task: Task) -> tuple[float, float]:
    """Mean and std of the regression target on training windows (the head's rescaling); (0, 1) otherwise."""
    return (float(split.train.y.mean()), float(split.train.y.std() or 1.0)) if task == "regress" else (0.0, 1.0)


@dataclass
class OutOfFold:
    """Every fold's validation windows scored by that fold's ensemble, concatenated in fold order."""

    y: np.ndarray               # [N] targets
    members: list[str]          # the member names, in the order of ``member_scores``' columns
    member_scores: np.ndarray   # [N, M]
    gate_score: np.ndarray      # [N] the learned gate's combination
    last: data.Split            # the last fold (the quality verdict's baseline trains and scores on it)
    last_rows: slice            # its rows in the arrays above
    figures: dict[str, Any]     # per fold and summarised: the manifest's ``cross_validation``


def cross_validate(table: data.Table, cfg: TrainConfig, pool: Executor | None = None) -> OutOfFold:
    """Fit the ensemble on each of ``cfg.cv`` blocked time-series folds and score its validation windows:
    out-of-fold PR-AUC and ROC-AUC of each member and of the gate, per fold and as mean and spread, timed."""
    started = time.perf_counter()
    folds = data.cv_folds(table, cfg.window, cfg.cv, cfg.stride, max(1, cfg.stride // 4))
    ys, members, gates, per_fold = [], [], [], []
    names: list[str] = []
    for i, fold in enumerate(folds):
        if not fold.split.train.y.any() and cfg.task == "classify":
            raise UsageError(f"fold {i + 1} of --cv {cfg.cv} has no positive training windows (lower --cv)")
        fold_start = time.perf_counter()
        model, _ = fit_ensemble(fold.split, cfg, _target(fold.split, cfg.task), pool)
        names = [m.name for m in ensemble.members_of(model)[0]]
        score, member_scores, _ = model.predict(fold.split.val.x, batch_size=1024, verbose=0)
        val_y = fold.split.val.y
        ys.append(val_y)
        members.append(member_scores)
        gates.append(score.reshape(-1))
        figures = {n: calibrate.ranking_metrics(cfg.task, member_scores[:, j], val_y, cfg.delay_alert_min)
                   for j, n in enumerate(names)}
        figures["gate"] = calibrate.ranking_metrics(cfg.task, gates[-1], val_y, cfg.delay_alert_min)
        per_fold.append({"fold": i + 1, "train_windows": len(fold.split.train.x), "val_windows": len(val_y),
                         "train_rows": fold.train_rows, "val_rows": fold.val_rows, "metrics": figures,
                         "seconds": round(time.perf_counter() - fold_start, 2)})
        log.info("fold %d/%d: gate %s in %.0fs", i + 1, cfg.cv, figures["gate"], per_fold[-1]["seconds"])
    summary: dict[str, dict[str, float]] = {}
    for name in [*names, "gate"]:
        for metric in ("pr_auc", "roc_auc"):
            values = [f["metrics"][name][metric] for f in per_fold if metric in f["metrics"][name]]
            if values:
                summary.setdefault(name, {}).update({f"{metric}_mean": float(np.mean(values)),
                                                     f"{metric}_std": float(np.std(values))})
    y, member_scores, gate_score = np.concatenate(ys), np.concatenate(members), np.concatenate(gates)
    summary["oof"] = calibrate.ranking_metrics(cfg.task, gate_score, y, cfg.delay_alert_min)
    figures = {"k": cfg.cv, "gap_rows": cfg.window, "method": "sklearn TimeSeriesSplit per entity",
               "parallel_members": pool is not None, "folds": per_fold, "summary": summary,
               "seconds": round(time.perf_counter() - started, 2)}
    return OutOfFold(y=y, members=names, member_scores=member_scores, gate_score=gate_score, last=folds[-1].split,
                     last_rows=slice(len(y) - len(ys[-1]), len(y)), figures=figures)


def train(cfg: TrainConfig) -> TrainResult:
    """Load, split, fit, export, calibrate on the exported graph, commit (and promote)."""
    started = time.perf_counter()
    if cfg.cv and cfg.task == "forecast":
        raise UsageError("--cv needs a supervised task: the forecast task's threshold is the statistical monitor's")
    if cfg.weight_search and not cfg.cv:
        raise UsageError("--weight-search searches out-of-fold scores: it needs --cv K")
    if cfg.cv and cfg.threshold_by:
        raise UsageError("--threshold-by calibrates on the validation split, --cv on out-of-fold scores: use one")
    if cfg.monitor and (cfg.task != "classify" or cfg.cv):
        raise UsageError("--monitor calibrates the statistical monitor on labelled faults: it needs --task classify "
                         "and no --cv")
    table = data.load(cfg.data, cfg.features, cfg.label_col, cfg.task, cfg.nan_tolerance, cfg.window,
                      ts_col=cfg.ts_col, entity_col=cfg.entity_col, entity=cfg.entity,
                      group_col=_group_column(cfg) if cfg.entity_groups is None else None)
    # supervised: event windows train at a quarter of the stride (short events are rare at a sparse stride)
    split = data.split(table, cfg.window, cfg.val_fraction, cfg.stride, val_stride=1,
                       event_stride=None if cfg.task == "forecast" else max(1, cfg.stride // 4),
                       train_on_all=bool(cfg.cv))
    if cfg.task == "classify" and not split.train.y.any():
        raise UsageError(f"label column {cfg.label_col!r} has no positive windows in the training split")
    log.info("%d training / %d validation windows of %d x %d (%s)", len(split.train.x), len(split.val.x),
             cfg.window, len(split.feature_names), ", ".join(split.feature_names))
    target = _target(split, cfg.task)
    groups = cfg.entity_groups if cfg.entity_groups is not None else table.groups
    oof, searched = None, None
    with member_pool(cfg) as pool:
        if cfg.cv:
            oof = cross_validate(table, cfg, pool)
        model, report = fit_ensemble(split, cfg, target, pool)
    calibrate_with = partial(calibrate_on, split=split, cfg=cfg, groups=groups)
    if oof is not None:
        if cfg.weight_search:
            try:
                searched = search.search_weights(oof.member_scores, oof.gate_score, oof.y, cfg.task,
                                                 cfg.weight_search, cfg.seed, cfg.target_far, cfg.delay_alert_min)
            except ValueError as exc:
                raise UsageError(f"--weight-search: {exc} (lower --cv or add labelled rows)") from None
            oof.figures["weight_search"] = searched.model_dump()
            log.info("weight search: %s %.4f for static weights %s, %.4f for the gate: serving the %s",
                     searched.objective, searched.value, np.round(searched.weights, 3).tolist(), searched.gate_value,
                     searched.winner)
            if searched.winner == "static":
                model = with_static_weights(model, searched.weights, cfg.task)
        calibrate_with = partial(calibrate_out_of_fold, oof=oof, searched=searched, cfg=cfg)
    extra: dict[str, Any] = {}
    if cfg.task == "forecast" or cfg.monitor:
        model, extra["monitor"] = _add_monitor(model, table, split, cfg)
    manifest = Manifest(
        version="", created="", task=cfg.task, feature_names=split.feature_names, window=cfg.window,
        scaler=split.scaler, members=ensemble.member_names(cfg.task, cfg.members, cfg.monitor),
        data_fingerprint=table.fingerprint,
        drift_reference=drift.reference(table.x, split.feature_names),  # every row of the file, as readings arrive
        metrics={"training": report}, cross_validation=oof.figures if oof is not None else {},
        extra=extra | {"size": cfg.size, "parameters": ensemble.parameter_counts(model), "config": cfg.model_dump(mode="json"),
               "target": {"mean": target[0], "std": target[1]}})
    registry = Registry(cfg.registry)
    version, _ = write_version(model, manifest, registry, fp16=cfg.fp16, promote=False, calibrate_with=calibrate_with)
    verdict = registry.manifest(version).metrics["quality"]
    promoted = cfg.promote and (verdict["ok"] is not False or cfg.force)
    if promoted:
        registry.promote(version)
    elif cfg.promote:
        log.warning("%s not promoted: %s (--force promotes it anyway)", version, verdict["reason"])
    return TrainResult(version=version, promoted=promoted, manifest=registry.manifest(version),
                       seconds=time.perf_counter() - started)


MONITOR_FAULT_BUDGET = 0.01  # --monitor without --target-far: the share of detected fault windows limits may give up


def _add_monitor(model: keras.Model, table: data.Table, split: data.Split,
                 cfg: TrainConfig) -> tuple[keras.Model, dict[str, Any]]:
    """Fit the statistical monitor on every row (it holds its own rows out: out-of-fold limits, split-half
    margins) and wire it into the ensemble as its score. Forecast: every row is normal history. Classify with
    ``monitor``: the label-0 rows are, and the labelled faults raise the limits (``monitor.fault_factor``)."""
    started = time.perf_counter()
    window = cfg.window
    scaled = data.apply_scaler(table.x, split.scaler)
    bounds = table.entity_bounds()
    segments = [scaled[s:e].astype(np.float64) for s, e in bounds]
    factor = None
    try:
        if cfg.task == "forecast":
            params = monitor.fit(segments, window)
        else:
            assert table.y is not None  # classify always has labels
            budget = cfg.target_far or MONITOR_FAULT_BUDGET
            params, factor = monitor.fit_supervised([(x, table.y[s:e]) for x, (s, e) in zip(segments, bounds)],
                                                    window, budget)
    except ValueError as exc:
        raise UsageError(f"{exc} (try a shorter --window)") from None
    members, gate = ensemble.members_of(model)
    model = ensemble.assemble(members, gate, window, len(split.feature_names), cfg.task, monitor.layer(params))
    summary = {"statistics": params.names, "components": len(params.p[0]), "margins": params.margin,
               "fault_factor": factor,
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
        manifest.thresholds = calibrate.monitor_thresholds(score, val.y,
                                                           manifest.extra.get("monitor", {}).get("fault_factor"))
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


def with_static_weights(model: keras.Model, weights: list[float], task: Task) -> keras.Model:
    """The ensemble with its gate replaced by constant member ``weights`` (supervised tasks): the exported graph's
    ``score`` is the weighted sum and its ``weights`` output that vector, so serving and `evaluate` need nothing new."""
    if task == "forecast":
        raise ValueError("static weights combine supervised scores; the forecast task's score is the monitor's")
    _, window, n_features = model.input_shape
    members, _ = ensemble.members_of(model)
    return ensemble.assemble(members, ensemble.static_gate(weights, window, n_features), window, n_features, task)


def calibrate_out_of_fold(onnx_path: Path, manifest: Manifest, *, oof: OutOfFold,
                          searched: search.SearchResult | None, cfg: TrainConfig) -> None:
    """Thresholds, calibration, metrics and the quality verdict from the out-of-fold scores of what is served:
    the gate's combination, or the searched static weights with their searched threshold. (The final model,
    fitted on all the data, has no held-out rows of its own; ``onnx_path`` is not scored.)"""
    static = searched is not None and searched.winner == "static"
    score = oof.member_scores @ np.asarray(searched.weights) if static else oof.gate_score
    thresholds = calibrate.choose_thresholds(cfg.task, score, oof.y, target_far=cfg.target_far,
                                             delay_alert_min=cfg.delay_alert_min)
    if static:
        cal = calibrate.calibration(score, calibrate.normal_mask(cfg.task, len(score), oof.y, cfg.delay_alert_min))
        thresholds = thresholds.model_copy(update={
            "alert": searched.threshold, "close": calibrate.CLOSE_RATIO * searched.threshold,
            "critical": searched.threshold + calibrate.CRITICAL_Z * cal["std"],
            "method": f"static weights and threshold searched on {cfg.cv}-fold out-of-fold scores "
                      f"({searched.objective} {searched.value:.3f}, gate {searched.gate_value:.3f})"})
    else:
        thresholds = thresholds.model_copy(update={"method": f"{thresholds.method} ({cfg.cv}-fold out-of-fold)"})
    manifest.thresholds = thresholds
    normal = calibrate.normal_mask(cfg.task, len(score), oof.y, cfg.delay_alert_min)
    manifest.calibration = calibrate.calibration(score, normal)
    manifest.metrics.update(calibrate.score_metrics(cfg.task, score, oof.y, thresholds, cfg.delay_alert_min))
    manifest.metrics["member_roc_auc"] = calibrate.member_aucs(oof.member_scores, oof.y, manifest.members, cfg.task,
                                                               cfg.delay_alert_min)
    last = oof.last
    manifest.metrics["quality"] = calibrate.quality(cfg.task, last.train.x, last.train.y, last.val.x, last.val.y,
                                                    score[oof.last_rows], cfg.delay_alert_min)
    log.info("out-of-fold: %s", {k: round(v, 4) for k, v in manifest.metrics.items() if isinstance(v, float)})


def _warm_start(model: keras.Model, registry: Registry, feature_names: list[str], cfg: TrainConfig) -> None:
    """Copy the current version's weights when it has the same features, task, size and window."""
    vdir, manifest = registry.resolve()
    if (manifest.feature_names, manifest.task, manifest.extra.get("size"), manifest.window, manifest.members) != (
            feature_names, cfg.task, cfg.size, cfg.window, ensemble.member_names(cfg.task, cfg.members, cfg.monitor)):
        raise UsageError(f"cannot warm-start from {manifest.version}: its features, task, size, window or members "
                         "differ")
    current = load_keras(vdir)
    members, gate = ensemble.members_of(model)
    for layer in members:
        layer.set_weights(current.get_layer(layer.name).get_weights())
    if current.get_layer(gate.name).weights:  # a version that serves searched static weights has no gate to copy
        gate.set_weights(current.get_layer(gate.name).get_weights())
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
