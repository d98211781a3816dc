"""The sidecar trainer: keep a Parquet store of what flowed through Kafka, retrain on a schedule
(warm start from the serving model), gate the candidate against the serving model on the same recent
validation slice, and promote it atomically so running processors hot-reload.

Safety: the registry only ever gains complete versions (stage, commit, rename) and ``current`` is
switched atomically, so a SIGKILL at any moment leaves the serving model loadable. One trainer retrains at
a time (an flock the kernel drops when its holder dies), and the promotion is a compare-and-swap against the
version the retrain started from, under the registry lock that `registry promote|rollback` take: an
operator's rollback during a retrain stands, and the candidate stays registered, not promoted.

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

Drift: every ``drift_every_s`` (and once after the first ingest) the trainer compares the store's newest
``drift_window_s`` of readings with the serving version's training distribution, feature by feature
(``models/training/drift.py``), and records the check in ``decisions.jsonl`` and the metrics. With
``retrain_on_drift`` a check over ``drift_limit`` retrains before the schedule, unless a retrain ended less
than ``drift_gap_s`` ago: a candidate the gate rejects leaves the drift where it was, and the gap keeps that
from retraining at every check. The gap counts within one trainer process.
"""

from __future__ import annotations

import fcntl
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
from fabwatch.export.registry import Manifest, PromotionConflict, Registry, sha256_file
from fabwatch.export.runtime import ScoringModel
from fabwatch.models.sidecar.store import ReadingStore, StoreStats, StoreWriter
from fabwatch.models.training import calibrate, data, drift
from fabwatch.models.training.metrics import average_precision
from fabwatch.stream.kafka.config import Settings

log = logging.getLogger("fabwatch.trainer")

Decision = Literal["promoted", "rejected", "skipped", "conflict"]  # conflict: current changed meanwhile
# a drift check's: max PSI within the limit, over it (no retrain asked), over it and retrain now, over it but the
# last retrain is too recent (drift_gap_s), or no figure (no reference in the manifest, too few recent readings)
DriftDecision = Literal["none", "drifted", "retrain", "too_soon", "unavailable"]


def parse_every(text: str, option: str = "--every") -> float:
    """'90s', '10m', '6h', '1d' -> seconds; ``option`` names the flag in the error."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if not m:
        raise UsageError(f"{option} takes a duration like 30s, 10m, 6h or 1d, not {text!r}")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def next_daily(hhmm: str, now: datetime) -> datetime:
    """The next occurrence of HH:MM (UTC) after ``now``."""
    m = re.fullmatch(r"([01]?\d|2[0-3]):([0-5]\d)", hhmm.strip())
    if not m:
        raise UsageError(f"--daily takes HH:MM (UTC), not {hhmm!r}")
    at = now.replace(hour=int(m.group(1)), minute=int(m.group(2)), second=0, microsecond=0)
    return at if at > now else at + timedelta(days=1)


class TrainerLock:
    """An ``fcntl.flock`` on ``<registry>/.trainer.lock``, held for a whole retrain (``retrain_once``).

    The kernel releases it when the holder's process ends, however it ends, so there is no staleness to guess:
    a retrain of any length keeps it, and a killed trainer never blocks the next. The file is never deleted
    (a trainer that deleted it would let a second one lock a new file while the first still holds the old);
    it records ``{"pid", "host", "since"}`` of the holder, for people.
    """

    def __init__(self, registry_root: Path):
        self.path = Path(registry_root) / ".trainer.lock"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> bool:
        """Take the lock without waiting; False when another trainer holds it."""
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder, 0)
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

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
    quality_floor: bool = True  # reject a candidate no better than chance on the gate slice
    time_budget_s: float | None = None
    epochs: int | None = None
    quick: bool = False
    warm_start: bool = True
    seed: int = 0
    retention_days: float | None = 90.0
    retention_bytes: int | None = None
    drift_window_s: float = 86_400.0  # readings the drift check looks at: this much event time to the newest
    drift_every_s: float = 3_600.0
    drift_limit: float = 0.25  # max feature PSI above which the readings have drifted (PSI's "major shift")
    retrain_on_drift: bool = False
    drift_gap_s: float = 6 * 3_600.0  # a drift retrain waits this long after the end of the last retrain


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
        self.feature_drift = Gauge("fabwatch_trainer_feature_drift", "PSI of each feature over the drift window "
                                   "against the serving version's training data", ["feature"], registry=self.registry)
        self.drift_max = Gauge("fabwatch_trainer_drift_max", "largest feature PSI at the last drift check (NaN: "
                               "unavailable)", registry=self.registry)
        self.drift_max.set(float("nan"))
        self.drift_limit = Gauge("fabwatch_trainer_drift_limit", "max PSI above which readings have drifted "
                                 "(--drift-limit)", registry=self.registry)


def hold_out(table: pa.Table, fraction: float) -> tuple[pa.Table, list[tuple[int, int, int]]]:
    """The rows training may see, and each entity's (start, cut, end): rows from ``cut`` on, each entity's
    newest ``fraction``, are the gate slice. Training splits what it sees again for early stopping, so the
    slice that judges the candidate is one its training never looked at."""
    cuts = data.time_cuts(data.entity_bounds(table.column("entity").to_numpy(zero_copy_only=False)), fraction)
    seen = np.concatenate([np.arange(s, c) for s, c, _ in cuts]) if cuts else np.zeros(0, np.int64)
    return table.take(pa.array(seen)), cuts


QUALITY_WINDOWS = 20_000  # training windows the quality floor's baseline fits on, at most


def windows_of(table: pa.Table, features: list[str], window: int, spans: list[tuple[int, int]], stride: int = 1
               ) -> data.Windows:
    """Raw windows of each (start, end) row span, every ``stride``-th, labelled by their last step (-1 where
    unlabelled). Gate windows end in an entity's gate rows; their context may reach back into the rows
    training saw, as validation windows do."""
    x = np.column_stack([table.column(f).to_numpy(zero_copy_only=False) for f in features]).astype(np.float32)
    y = table.column("label").to_numpy(zero_copy_only=False).astype(np.float32)
    parts = [w for w in (data.windows(x[a:b], y[a:b], window, stride) for a, b in spans) if len(w.x)]
    if not parts:
        return data.Windows(np.zeros((0, window, len(features)), np.float32), np.zeros(0, np.float32))
    return data.Windows(np.concatenate([w.x for w in parts]), np.concatenate([w.y for w in parts]))


def model_scores(model: ScoringModel, windows: np.ndarray) -> np.ndarray:
    return np.concatenate([model.predict(windows[i:i + 1024]).score for i in range(0, len(windows), 1024)])


def gate_metric(task: str, serving_score: np.ndarray, candidate_score: np.ndarray, labels: np.ndarray,
                alerts: tuple[float, float]) -> tuple[str, float, float]:
    """The gate's figure for the serving model and the candidate, both on the same windows; higher is better.

    - classify, and forecast when the slice holds labelled events: PR-AUC on the labelled windows;
    - regress: minus the mean absolute error on the labelled windows (a model predicting small delays
      earns nothing for it);
    - otherwise: minus the mean score on the windows neither model alerts on (``alerts``: the serving
      model's and the candidate's alert thresholds), all windows when there are none.
    """
    labelled = labels >= 0
    events = labels[labelled] > 0
    if task in ("classify", "forecast") and events.any() and not events.all():
        return ("pr_auc", float(average_precision(events, serving_score[labelled])),
                float(average_precision(events, candidate_score[labelled])))
    if task == "regress" and labelled.any():
        truth = labels[labelled]
        return ("minus_mae", -float(np.mean(np.abs(serving_score[labelled] - truth))),
                -float(np.mean(np.abs(candidate_score[labelled] - truth))))
    quiet = (serving_score < alerts[0]) & (candidate_score < alerts[1])
    sample = quiet if quiet.any() else np.ones_like(quiet)
    return "minus_mean_quiet_score", -float(np.mean(serving_score[sample])), -float(np.mean(candidate_score[sample]))


def quality_floor(manifest: Manifest, seen: data.Windows, gate: data.Windows, score: np.ndarray) -> dict:
    """``calibrate.quality`` of the candidate on the gate slice, its baseline fitted on the rows training saw.
    The floor is its ``above_chance`` (absent when the slice's labels cannot tell); the baseline comparison is
    recorded, not enforced: the gate already asks for no worse than the serving model, which may itself trail
    the baseline on a given slice, and a bar it cannot pass would stop every retrain."""
    seen_x, gate_x = seen.x, gate.x
    if manifest.scaler:  # the baselines read standardised windows, as at training
        seen_x, gate_x = data.apply_scaler(seen_x, manifest.scaler), data.apply_scaler(gate_x, manifest.scaler)
    delay_alert_min = float(manifest.extra.get("config", {}).get("delay_alert_min", 5.0))
    supervised = manifest.task in ("classify", "regress")
    gate_y = gate.y if (gate.y >= 0).all() else None  # forecast: unlabelled readings, quality not checked
    return calibrate.quality(manifest.task, seen_x, seen.y if supervised else None, gate_x, gate_y, score,
                             delay_alert_min)


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
        self.metrics.drift_limit.set(options.drift_limit)
        self._last_retrain_end: float | None = None  # time.monotonic()
        self._no_drift_reference: set[str] = set()  # versions already logged as lacking one

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

    def check_drift(self) -> dict:
        """PSI of each feature over the store's newest ``drift_window_s`` against the serving version's
        ``drift_reference``; sets the drift metrics and appends the check to ``decisions.jsonl`` (marked
        ``"check": "drift"``). Its ``decision`` is a :data:`DriftDecision`; on ``retrain`` the caller retrains."""
        opts = self.options
        if self.writer is not None:
            self.writer.flush()  # readings consumed so far count
        serving = self.registry.manifest(self.registry.current_version())
        recent = self.store.recent(int(opts.drift_window_s * 1000))
        record: dict = {"check": "drift", "serving": serving.version, "rows": recent.num_rows,
                        "window_s": opts.drift_window_s, "limit": opts.drift_limit}
        psi: dict[str, float] = {}
        reason = "no feature of the store is in the reference"  # unless one of these says why
        if not serving.drift_reference:
            reason = f"{serving.version} has no drift reference (made before drift checks); its successor will"
            if serving.version not in self._no_drift_reference:
                self._no_drift_reference.add(serving.version)
                log.warning("drift unavailable: %s", reason)
        elif recent.num_rows < drift.MIN_ROWS:
            reason = f"{recent.num_rows} readings in the drift window; a check needs {drift.MIN_ROWS}"
        else:
            names = self.store.feature_names
            x = np.column_stack([recent.column(f).to_numpy(zero_copy_only=False) for f in names])
            psi = drift.feature_psi(serving.drift_reference, x, names)
        self.metrics.feature_drift.clear()
        for name, value in psi.items():
            self.metrics.feature_drift.labels(name).set(value)
        if not psi:
            self.metrics.drift_max.set(float("nan"))
            record.update(decision="unavailable", reason=reason)
        else:
            worst = max(psi, key=psi.__getitem__)
            self.metrics.drift_max.set(psi[worst])
            record.update(psi={k: round(v, 4) for k, v in psi.items()}, max_psi=round(psi[worst], 4), feature=worst,
                          decision=self._drift_decision(psi[worst]))
        self.registry.record_decision(record)
        log.info("drift check: %s", json.dumps({k: v for k, v in record.items() if k != "psi"}))
        return record

    def _drift_decision(self, max_psi: float) -> DriftDecision:
        opts = self.options
        if max_psi <= opts.drift_limit:
            return "none"
        if not opts.retrain_on_drift:
            return "drifted"
        if self._last_retrain_end is not None and time.monotonic() - self._last_retrain_end < opts.drift_gap_s:
            return "too_soon"
        return "retrain"

    def retrain_once(self, trigger: Literal["schedule", "drift"] = "schedule") -> dict:
        """Retrain, gate, and promote or reject; every decision is appended to ``decisions.jsonl``.
        The store's consumer is closed first (see the module docstring); ``ingest`` or ``run`` reopens it.
        ``trigger``: what started it, recorded with the decision."""
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
        self._last_retrain_end = time.monotonic()
        record["duration_s"] = round(time.time() - started, 1)
        record["trigger"] = trigger
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
        seen, cuts = hold_out(table, opts.val_fraction)
        features, window = serving.feature_names, serving.window
        gate = windows_of(table, features, window, [(max(s, c - window + 1), e) for s, c, e in cuts])
        if not len(gate.x):
            return {**base, "decision": "skipped",
                    "reason": f"no entity has a {window}-step window in its newest {opts.val_fraction:.0%}"}
        data_file = self.store.root / f".retrain-{os.getpid()}.parquet"
        pq.write_table(seen.drop_columns([] if supervised else ["label"]), data_file)
        try:
            overrides = dict(data=data_file, registry=opts.registry, task=serving.task,
                             label_col="label" if supervised else None, features=features,
                             window=window, val_fraction=opts.val_fraction, seed=opts.seed,
                             warm_start=opts.warm_start, promote=False, time_budget_s=opts.time_budget_s,
                             size=serving.extra.get("size", "full"))
            if opts.epochs:
                overrides["epochs"] = opts.epochs
            if serving.thresholds_by is not None:  # per-entity thresholds carry over; the store has no group column
                by = serving.thresholds_by
                overrides |= dict(threshold_by=by.by, threshold_min_windows=by.min_windows,
                                  entity_groups=None if by.by == "entity" else by.groups)
            if serving.extra.get("config", {}).get("members"):  # the serving model's members (`train --members`)
                overrides["members"] = serving.extra["config"]["members"]
            if serving.extra.get("config", {}).get("monitor"):  # `train --monitor`: the monitor keeps deciding
                overrides["monitor"] = True
            try:
                candidate_version, train_seconds = self.train_candidate(overrides)
            except UsageError as exc:
                return {**base, "decision": "skipped", "reason": str(exc)}
        finally:
            data_file.unlink(missing_ok=True)

        candidate_dir, candidate = self.registry.resolve(candidate_version)
        serving_score = model_scores(ScoringModel(serving_dir, serving), gate.x)
        candidate_score = model_scores(ScoringModel(candidate_dir, candidate), gate.x)
        alerts = tuple(m.thresholds.alert if m.thresholds else np.inf for m in (serving, candidate))
        metric, serving_value, candidate_value = gate_metric(serving.task, serving_score, candidate_score, gate.y,
                                                             alerts)
        seen_windows = windows_of(table, features, window, [(s, c) for s, c, _ in cuts],
                                  stride=max(1, seen.num_rows // QUALITY_WINDOWS))
        quality = quality_floor(candidate, seen_windows, gate, candidate_score)
        record = {**base, "candidate": candidate_version, "metric": metric, "serving_value": serving_value,
                  "candidate_value": candidate_value, "margin": opts.margin, "gate_windows": len(gate.x),
                  "quality": quality, "train_seconds": round(train_seconds, 1)}
        if candidate_value < serving_value - opts.margin * max(abs(serving_value), 1e-9):
            return {**record, "decision": "rejected",
                    "reason": f"{metric} {candidate_value:.4f} is worse than the serving {serving_value:.4f} by more than {opts.margin:.0%}"}
        if opts.quality_floor and quality.get("above_chance") is False:
            return {**record, "decision": "rejected",
                    "reason": f"below the quality floor: {quality['reason']}"}
        try:
            self.registry.promote(candidate_version, expect_current=serving.version)
        except PromotionConflict as exc:
            log.warning("%s kept, not promoted: current changed during the retrain (%s)", candidate_version, exc)
            return {**record, "decision": "conflict", "reason": f"{exc} (an operator's promote or rollback stands)"}
        self.publish_event(candidate_version, candidate_dir)
        return {**record, "decision": "promoted"}

    def train_candidate(self, overrides: dict) -> tuple[str, float]:
        """Train and commit (never promote) a candidate on the rows ``_retrain`` wrote: its version and seconds."""
        from fabwatch.models.training.train import TrainConfig, train

        cfg = TrainConfig.quick(**overrides) if self.options.quick else TrainConfig(**overrides)
        result = train(cfg)
        return result.version, result.seconds

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
        """Ingest continuously; retrain now (``once``), every ``every_s`` seconds, or daily at HH:MM UTC; check
        drift after the first ingest and every ``drift_every_s``, retraining early if it asks to."""
        def due_after(now: datetime) -> datetime:
            if daily:
                return next_daily(daily, now)
            return now + timedelta(seconds=every_s or 6 * 3600)

        self.ingest()
        if once:
            self.check_drift()
            self.retrain_once()
            return
        next_at = due_after(datetime.now(timezone.utc))
        log.info("next retrain at %s", next_at.isoformat(timespec="seconds"))
        self.metrics.next_retrain.set(next_at.timestamp())
        next_drift_check = time.monotonic()  # the first right after the first ingest
        while not stop():
            self._open_writer().poll_once(1.0)
            if time.monotonic() >= next_drift_check:
                next_drift_check = time.monotonic() + self.options.drift_every_s
                if self.check_drift()["decision"] == "retrain":
                    self.retrain_once(trigger="drift")
            if datetime.now(timezone.utc) >= next_at:
                self.retrain_once()
                next_at = due_after(datetime.now(timezone.utc))
                log.info("next retrain at %s", next_at.isoformat(timespec="seconds"))
                self.metrics.next_retrain.set(next_at.timestamp())

    def close(self) -> None:
        self._close_writer()


def serve_metrics(metrics: TrainerMetrics, port: int, host: str) -> tuple[str, int]:
    """Serve ``/metrics`` on a daemon thread; returns the address bound (port 0: a free one)."""
    server, _ = start_http_server(port, addr=host, registry=metrics.registry)
    bound = server.server_address[:2]
    log.info("metrics on port %d of %s (/metrics)", bound[1], bound[0])
    return bound
