"""The sidecar trainer: keep a Parquet store of what flowed through Kafka, retrain on a schedule
(warm start from the serving model), gate the candidate against the serving model on the same recent
validation slice, and promote it atomically so running processors hot-reload.

Safety: the registry only ever gains complete versions (stage, commit, rename) and ``current`` is
switched atomically, so a SIGKILL at any moment leaves the serving model loadable; a lock file keeps
two trainers from promoting at once (a lock whose process is gone, or that is too old, is stale).

Ingest and training never share a poll loop. Training blocks the thread for minutes to hours, and a
consumer not polled for ``max.poll.interval.ms`` (5 min by default) is put out of its group: its next
commit fails with ``_ASSIGNMENT_LOST`` (issue #20). So before each retrain the store writer writes its
buffer durably, commits synchronously and closes its consumer, leaving the group; after the retrain
a new consumer resumes from the committed offsets. Every reading consumed is in a file before the
commit and nothing is consumed after it, so none is lost or stored twice, and a closed consumer has
no poll interval to exceed, whatever the retrain's length. Readings that arrive meanwhile wait in
Kafka. Not chosen: a thread that keeps polling a paused consumer would keep the membership, but it
must pause whatever a rebalance assigns and hand its errors to the trainer, all to save one group
join (seconds) per retrain.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Literal, get_args

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from fabwatch.export.errors import UsageError
from fabwatch.export.registry import Registry, sha256_file
from fabwatch.export.runtime import ScoringModel
from fabwatch.models.sidecar.store import ReadingStore, StoreStats, StoreWriter
from fabwatch.models.training.metrics import average_precision
from fabwatch.stream.kafka.config import Settings

log = logging.getLogger("fabwatch.trainer")

Decision = Literal["promoted", "rejected", "skipped"]


def parse_every(text: str) -> float:
    """'90s', '10m', '6h', '1d' -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if not m:
        raise UsageError(f"--every takes a duration like 30s, 10m, 6h or 1d, not {text!r}")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def next_daily(hhmm: str, now: datetime) -> datetime:
    """The next occurrence of HH:MM (UTC) after ``now``."""
    m = re.fullmatch(r"([01]?\d|2[0-3]):([0-5]\d)", hhmm.strip())
    if not m:
        raise UsageError(f"--daily takes HH:MM (UTC), not {hhmm!r}")
    at = now.replace(hour=int(m.group(1)), minute=int(m.group(2)), second=0, microsecond=0)
    return at if at > now else at + timedelta(days=1)


class TrainerLock:
    """An exclusive lock file in the registry: ``{"pid", "host", "since"}``, created with O_EXCL."""

    def __init__(self, registry_root: Path, stale_after_s: float = 6 * 3600.0):
        self.path = Path(registry_root) / ".trainer.lock"
        self.stale_after_s = stale_after_s
        self.held = False

    def _stale(self) -> bool:
        try:
            info = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return True  # unreadable: a writer died mid-write
        if time.time() - float(info.get("since", 0)) > self.stale_after_s:
            return True
        if info.get("host") == socket.gethostname():
            try:
                os.kill(int(info["pid"]), 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
        return False

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._stale():
                    log.warning("removing stale trainer lock %s", self.path)
                    self.path.unlink(missing_ok=True)
                    continue
                return False
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}, f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return True
        return False

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "TrainerLock":
        if not self.acquire():
            raise LockHeld(f"another trainer holds {self.path}")
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


class LockHeld(RuntimeError):
    pass


@dataclass
class TrainerOptions:
    registry: Path
    store: Path
    recent_days: int = 7
    older_sample: int = 200_000
    val_fraction: float = 0.2
    margin: float = 0.02
    time_budget_s: float | None = None
    epochs: int | None = None
    quick: bool = False
    warm_start: bool = True
    seed: int = 0
    retention_days: float | None = 90.0
    retention_bytes: int | None = None


class TrainerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.store_rows = Gauge("fabwatch_trainer_store_rows", "readings in the Parquet store", registry=self.registry)
        self.skipped = Counter("fabwatch_trainer_invalid_readings", "readings skipped as invalid",
                               registry=self.registry)
        self.last_retrain = Gauge("fabwatch_trainer_last_retrain_timestamp_seconds", "end of the last retrain",
                                  registry=self.registry)
        self.duration = Gauge("fabwatch_trainer_last_retrain_duration_seconds", "duration of the last retrain",
                              registry=self.registry)
        self.decisions = Counter("fabwatch_trainer_decisions", "gate decisions", ["decision"], registry=self.registry)
        for decision in get_args(Decision):  # every series from the start: increase() misses a series' first sample
            self.decisions.labels(decision)
        self.serving = Gauge("fabwatch_trainer_serving_version", "serving version number (v0007 -> 7)",
                             registry=self.registry)
        self.last_promotion = Gauge("fabwatch_trainer_last_promotion_timestamp_seconds", "when the trainer last "
                                    "promoted a version (processors should load one after it)", registry=self.registry)
        self.next_retrain = Gauge("fabwatch_trainer_next_retrain_timestamp_seconds", "when the next scheduled "
                                  "retrain is due", registry=self.registry)


def _windows(table: pa.Table, features: list[str], window: int, val_fraction: float
             ) -> tuple[np.ndarray, np.ndarray]:
    """Raw validation windows: the last ``val_fraction`` of each entity's rows (as `train` splits),
    and the label at each window's end (-1 where unlabelled)."""
    from numpy.lib.stride_tricks import sliding_window_view

    ent = table.column("entity").to_numpy(zero_copy_only=False)
    x = np.column_stack([table.column(f).to_numpy(zero_copy_only=False) for f in features]).astype(np.float32)
    y = table.column("label").to_numpy(zero_copy_only=False).astype(np.int8)
    starts = np.r_[0, np.flatnonzero(ent[1:] != ent[:-1]) + 1, len(ent)]
    xs, ys = [], []
    for s, e in zip(starts[:-1], starts[1:]):
        c = s + int(round((e - s) * (1 - val_fraction)))
        if e - c >= window:
            xs.append(sliding_window_view(x[c:e], window, axis=0).transpose(0, 2, 1))
            ys.append(y[c + window - 1:e])
    if not xs:
        return np.zeros((0, window, len(features)), np.float32), np.zeros(0, np.int8)
    return np.concatenate(xs), np.concatenate(ys)


def gate_metric(model: ScoringModel, windows: np.ndarray, labels: np.ndarray) -> tuple[str, float]:
    """Higher is better. Labelled classify: PR-AUC; otherwise minus the mean score on windows the
    model finds normal (forecast error on readings without alerts)."""
    score = np.concatenate([model.predict(windows[i:i + 1024]).score for i in range(0, len(windows), 1024)])
    task = model.manifest.task
    labelled = labels >= 0
    if task == "classify" and labelled.any() and (labels[labelled] > 0).any():
        return "pr_auc", float(average_precision(labels[labelled] > 0, score[labelled]))
    if task == "regress":
        return "minus_mean_score", -float(np.mean(score))
    threshold = model.manifest.thresholds.alert if model.manifest.thresholds else np.inf
    quiet = score < threshold
    return "minus_forecast_error", -float(np.mean(score[quiet] if quiet.any() else score))


class Trainer:
    def __init__(self, settings: Settings, options: TrainerOptions, metrics: TrainerMetrics | None = None):
        self.settings = settings
        self.options = options
        self.registry = Registry(options.registry)
        vdir, manifest = self.registry.resolve()  # a trainer improves a serving model: one must exist
        self.store = ReadingStore(options.store, manifest.feature_names)
        self.metrics = metrics or TrainerMetrics()
        self.store_stats = StoreStats()  # over every writer: one per stretch between retrains
        self.writer: StoreWriter | None = None
        self._skipped_reported = 0

    def _open_writer(self) -> StoreWriter:
        """The store writer, joining the group (from the committed offsets) if it is closed."""
        if self.writer is None:
            self.writer = StoreWriter(self.settings, self.store, flush_interval_s=30.0, stats=self.store_stats)
        return self.writer

    def _close_writer(self) -> None:
        """Store what was read, commit it, and leave the group (before a retrain, and at the end)."""
        if self.writer is None:
            return
        writer, self.writer = self.writer, None
        writer.close()
        self._report_store()

    def _report_store(self) -> None:
        self.metrics.skipped.inc(self.store_stats.skipped_invalid - self._skipped_reported)
        self._skipped_reported = self.store_stats.skipped_invalid
        self.metrics.store_rows.set(self.store.rows())

    def ingest(self, idle_s: float = 3.0, max_s: float = 600.0) -> int:
        """Read the sensor topic into the store until it stays idle for ``idle_s``."""
        writer = self._open_writer()
        before = self.store_stats.rows_written
        deadline, last_rows, last_change = time.monotonic() + max_s, -1, time.monotonic()
        while time.monotonic() < deadline:
            buffered = writer.poll_once(0.5)
            if not writer.assigned():  # joining the group is not idleness
                last_change = time.monotonic()
            elif buffered != last_rows:
                last_rows, last_change = buffered, time.monotonic()
            elif time.monotonic() - last_change > idle_s:
                break
        writer.flush()
        self._report_store()
        return self.store_stats.rows_written - before

    def retrain_once(self) -> dict:
        """Retrain, gate, and promote or reject; every decision is appended to ``decisions.jsonl``.
        The store's consumer is closed first (see the module docstring); ``ingest`` or ``run`` reopens it."""
        lock = TrainerLock(self.options.registry)
        if not lock.acquire():
            record = {"decision": "skipped", "reason": f"another trainer holds {lock.path}"}
            log.warning(record["reason"])
            return record
        started = time.time()
        try:
            self._close_writer()
            record = self._retrain()
        finally:
            lock.release()
        record["duration_s"] = round(time.time() - started, 1)
        self.registry.record_decision(record)
        self.metrics.decisions.labels(record["decision"]).inc()
        self.metrics.last_retrain.set(time.time())
        self.metrics.duration.set(record["duration_s"])
        if record["decision"] == "promoted":
            self.metrics.last_promotion.set_to_current_time()
        serving = self.registry.current_version()
        if serving:
            self.metrics.serving.set(int(serving.lstrip("v")))
        log.info("retrain decision: %s", json.dumps(record))
        return record

    def _retrain(self) -> dict:
        from fabwatch.models.training.train import TrainConfig, train

        opts = self.options
        serving_dir, serving = self.registry.resolve()
        table = self.store.load(opts.recent_days, opts.older_sample, seed=opts.seed)
        if opts.retention_days or opts.retention_bytes:
            self.store.enforce_retention(opts.retention_days, opts.retention_bytes)
        base = {"serving": serving.version, "store_rows": table.num_rows}
        labels = table.column("label").to_numpy(zero_copy_only=False) if table.num_rows else np.zeros(0)
        supervised = serving.task in ("classify", "regress")
        if supervised:
            if not (labels >= 0).any():
                return {**base, "decision": "skipped", "reason": f"task {serving.task} needs labels; the store has none"}
            table = table.filter(pa.array(labels >= 0))
        data_file = self.store.root / f".retrain-{os.getpid()}.parquet"
        pq.write_table(table.drop_columns([] if supervised else ["label"]), data_file)
        try:
            overrides = dict(data=data_file, registry=opts.registry, task=serving.task,
                             label_col="label" if supervised else None, features=serving.feature_names,
                             window=serving.window, val_fraction=opts.val_fraction, seed=opts.seed,
                             warm_start=opts.warm_start, promote=False, time_budget_s=opts.time_budget_s,
                             size=serving.extra.get("size", "full"))
            if opts.epochs:
                overrides["epochs"] = opts.epochs
            cfg = TrainConfig.quick(**overrides) if opts.quick else TrainConfig(**overrides)
            try:
                result = train(cfg)
            except UsageError as exc:
                return {**base, "decision": "skipped", "reason": str(exc)}
        finally:
            data_file.unlink(missing_ok=True)

        windows, val_labels = _windows(table, serving.feature_names, serving.window, opts.val_fraction)
        candidate_dir, candidate = self.registry.resolve(result.version)
        metric, serving_value = gate_metric(ScoringModel(serving_dir, serving), windows, val_labels)
        _, candidate_value = gate_metric(ScoringModel(candidate_dir, candidate), windows, val_labels)
        record = {**base, "candidate": result.version, "metric": metric, "serving_value": serving_value,
                  "candidate_value": candidate_value, "margin": opts.margin, "val_windows": len(windows),
                  "train_seconds": round(result.seconds, 1)}
        if candidate_value < serving_value - opts.margin * max(abs(serving_value), 1e-9):
            return {**record, "decision": "rejected",
                    "reason": f"{metric} {candidate_value:.4f} is worse than the serving {serving_value:.4f} by more than {opts.margin:.0%}"}
        self.registry.promote(result.version)
        self.publish_event(result.version, candidate_dir)
        return {**record, "decision": "promoted"}

    def publish_event(self, version: str, version_dir: Path, action: str = "promoted") -> None:
        """Tell running processors (they also watch ``current``, so a lost event only delays the swap)."""
        from confluent_kafka import Producer

        from fabwatch.stream.schemas import ModelEvent

        event = ModelEvent(version=version, action=action, sha256=sha256_file(version_dir / "model.onnx"),
                           ts=int(time.time() * 1000))
        producer = Producer(self.settings.client_config(**{"enable.idempotence": True}))
        producer.produce(self.settings.topics.models, event.model_dump_json().encode(), version.encode())
        if producer.flush(10):
            log.warning("model event for %s not confirmed by the broker", version)

    def run(self, every_s: float | None = None, daily: str | None = None, once: bool = False,
            stop: Callable[[], bool] = lambda: False) -> None:
        """Ingest continuously; retrain now (``once``), every ``every_s`` seconds, or daily at HH:MM UTC."""
        def due_after(now: datetime) -> datetime:
            if daily:
                return next_daily(daily, now)
            return now + timedelta(seconds=every_s or 6 * 3600)

        self.ingest()
        if once:
            self.retrain_once()
            return
        next_at = due_after(datetime.now(timezone.utc))
        log.info("next retrain at %s", next_at.isoformat(timespec="seconds"))
        self.metrics.next_retrain.set(next_at.timestamp())
        while not stop():
            self._open_writer().poll_once(1.0)
            if datetime.now(timezone.utc) >= next_at:
                self.retrain_once()
                next_at = due_after(datetime.now(timezone.utc))
                log.info("next retrain at %s", next_at.isoformat(timespec="seconds"))
                self.metrics.next_retrain.set(next_at.timestamp())

    def close(self) -> None:
        self._close_writer()


def serve_metrics(metrics: TrainerMetrics, port: int) -> None:
    start_http_server(port, registry=metrics.registry)
