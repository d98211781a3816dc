"""Offline evaluation: score a recorded file through the processor's own engine (windows, model,
alert policy), without Kafka, and measure how good the detector is.

Because ``run_offline`` is the same ``ScoringEngine`` the processor feeds from Kafka, the alerts here
carry the same ``alert_id``s a live replay produces; ``compare_with_topic`` checks exactly that.
"""

from __future__ import annotations

import csv
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from fabwatch.export.errors import UsageError
from fabwatch.export.runtime import ScoringModel
from fabwatch.models.training.metrics import average_precision, eventwise, pointwise, roc_auc
from fabwatch.stream.engine import ScoringEngine, run_offline
from fabwatch.stream.offline.files import Records
from fabwatch.stream.policy import Figures, PolicyConfig
from fabwatch.stream.offline.replay import load_records
from fabwatch.stream.schemas import Alert, Silence
from fabwatch.stream.silences import SilenceGate, SilenceSet
from fabwatch.stream.windows import CONFLICT, DEFAULT_GRACE_MS, DUPLICATE, LATE, REORDERED


@dataclass
class Evaluation:
    records: Records
    rows_in_file: int
    score: np.ndarray       # float32 [N] per record, NaN until the entity's first full window
    pred: np.ndarray        # int8 [N]: 1 while an alert is open for the entity
    status: np.ndarray      # int8 [N]: windows.OK / DUPLICATE / LATE / CONFLICT / REORDERED, the processor's verdict
    alerts: list[Alert]
    threshold: float
    close_threshold: float
    figures: Callable[[str], Figures]  # an entity's thresholds (its own with ``thresholds_by``, else these two)
    model_version: str
    metrics: dict
    seconds: float


def _alert_state(records: Records, alerts: Sequence[Alert]) -> np.ndarray:
    """pred[i] = 1 from the reading that opened an alert up to (not including) the one that closed it."""
    pred = np.zeros(len(records.ts), np.int8)
    entity = np.asarray(records.entity, dtype=object)
    by_entity: dict[str, list[Alert]] = {}
    for a in alerts:
        by_entity.setdefault(a.entity, []).append(a)
    for ent, items in by_entity.items():
        idx = np.flatnonzero(entity == ent)
        ts = records.ts[idx]
        items.sort(key=lambda a: a.window_end_ts)
        change_ts = np.asarray([a.window_end_ts for a in items], np.int64)
        is_open = np.asarray([a.state == "open" for a in items], bool)
        last = np.searchsorted(change_ts, ts, side="right") - 1  # latest change at or before each reading
        pred[idx] = np.where(last >= 0, is_open[np.maximum(last, 0)], False)
    return pred


def _carry_forward(score: np.ndarray, entity: Sequence[str]) -> np.ndarray:
    """With a stride, readings between scored windows keep the entity's last score."""
    out = score.copy()
    last: dict[str, float] = {}
    for i, e in enumerate(entity):
        if np.isnan(out[i]):
            out[i] = last.get(e, np.nan)
        else:
            last[e] = out[i]
    return out


def evaluate_file(registry: Path, data: Path, *, label_col: str | None = None, fmt: str | None = None,
                  entity_col: str | None = None, ts_col: str | None = None, features: Sequence[str] | None = None,
                  entity: str | None = None, skip_rows: int = 0, stride: int = 1, policy: PolicyConfig | None = None,
                  providers: Sequence[str] | None = None, silences: Sequence[Silence] | None = None,
                  grace_ms: int = DEFAULT_GRACE_MS) -> Evaluation:
    """Score ``data`` with the registry's current model. ``features`` is there so `train`'s column options can be
    passed as they are: the model reads the features it was trained on, by name. ``silences``: the alerts they
    cover are dropped as the processor drops them, before ``pred`` and the metrics see them."""
    model = ScoringModel.from_registry(registry, providers=providers)
    manifest = model.manifest
    if manifest.thresholds is None:
        raise UsageError(f"model {manifest.version} has no thresholds: evaluation needs one")
    if features and set(features) != set(manifest.feature_names):
        raise UsageError(f"--features must name the model's features: {manifest.version} reads "
                         f"{', '.join(manifest.feature_names)}")
    records = load_records(data, fmt, entity_col=entity_col, ts_col=ts_col, features=manifest.feature_names,
                           label_col=label_col, entity=entity)
    if len(records.ts) == 0:
        raise UsageError(f"{data.name}: no valid rows")
    engine = ScoringEngine(model, policy, stride=stride, grace_ms=grace_ms)
    start = time.perf_counter()
    alerts, score_cols, status = run_offline(engine, records.entity, records.ts, records.values.astype(np.float32))
    seconds = time.perf_counter() - start
    silenced: list[Alert] = []
    if silences is not None:
        alerts, silenced = SilenceGate(SilenceSet(silences)).apply(alerts, score_cols)

    score = np.full(len(records.ts), np.nan, np.float32)
    for cols in score_cols:
        score[cols.index] = cols.score
    score = _carry_forward(score, records.entity)
    pred = _alert_state(records, alerts)

    metrics: dict = {"rows_in_file": len(records.ts) + len(records.rejected), "rows_scored": int(np.isfinite(score).sum()),
                     "rows_rejected": len(records.rejected),
                     # what the processor drops (duplicates) or dead-letters (late, conflicting_duplicate)
                     "duplicates_dropped": int(np.count_nonzero(status == DUPLICATE)),
                     "rows_late": int(np.count_nonzero(status == LATE)),
                     "rows_reordered": int(np.count_nonzero(status == REORDERED)),
                     "rows_conflicting_duplicate": int(np.count_nonzero(status == CONFLICT)),
                     "alerts_opened": sum(a.state == "open" for a in alerts),
                     **({"alerts_silenced": len(silenced)} if silences is not None else {}),
                     "model_version": manifest.version, "threshold": manifest.thresholds.alert,
                     "thresholds_by": manifest.thresholds_by.by if manifest.thresholds_by else None,
                     "readings_per_s": round(len(records.ts) / seconds) if seconds > 0 else None}
    if records.label is not None:
        entity = np.asarray(records.entity, dtype=object)
        position = np.zeros(len(entity), np.int64)  # index of each reading within its entity
        for ent in np.unique(entity):
            idx = np.flatnonzero(entity == ent)
            position[idx] = np.arange(len(idx))
        use = (records.label >= 0) & (position >= skip_rows)
        scored = use & np.isfinite(score)
        point = pointwise(records.label[use], pred[use], None)
        # ranking metrics only where a score exists (no full window yet means no opinion)
        point["roc_auc"] = roc_auc(records.label[scored], score[scored])
        point["pr_auc"] = average_precision(records.label[scored], score[scored])
        codes = np.unique(entity, return_inverse=True)[1]
        metrics["pointwise"] = point
        metrics["eventwise"] = eventwise(records.label[use], pred[use], records.ts[use], codes[use])
        metrics["rows_evaluated"] = int(use.sum())
    return Evaluation(records=records, rows_in_file=metrics["rows_in_file"], score=score, pred=pred, status=status,
                      alerts=alerts,
                      threshold=manifest.thresholds.alert, close_threshold=manifest.thresholds.close,
                      figures=engine.policy.figures,
                      model_version=manifest.version, metrics=metrics, seconds=seconds)


def write_predictions(ev: Evaluation, out: Path) -> None:
    """One row per input row, in file order: rejected rows and rows without a full window get pred 0."""
    n = ev.rows_in_file
    by_row = np.full(n, -1, np.int64)
    by_row[ev.records.row] = np.arange(len(ev.records.row))
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "entity", "ts", "score", "pred", "label"])
        for row in range(n):
            i = by_row[row]
            if i < 0:
                w.writerow([row, "", "", "", 0, ""])
                continue
            s = ev.score[i]
            label = "" if ev.records.label is None or ev.records.label[i] < 0 else int(ev.records.label[i])
            w.writerow([row, ev.records.entity[i], int(ev.records.ts[i]), "" if np.isnan(s) else f"{s:.6g}",
                        int(ev.pred[i]), label])


def plot_entity(ev: Evaluation, out: Path, entity: str | None = None) -> str:
    """Features, score against the thresholds, labelled periods and alerts for one entity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ents = np.asarray(ev.records.entity, dtype=object)
    if entity is None:  # the entity with the most labelled readings, else the most alerts
        labelled = ev.records.label if ev.records.label is not None else np.zeros(len(ents), np.int8)
        candidates, counts = np.unique(ents[labelled > 0], return_counts=True)
        if len(candidates):
            entity = str(candidates[np.argmax(counts)])
        else:
            alerted = [a.entity for a in ev.alerts]
            entity = max(set(alerted), key=alerted.count) if alerted else str(ents[0])
    idx = np.flatnonzero(ents == entity)
    if not len(idx):
        raise UsageError(f"entity {entity!r} is not in the data")
    t0 = ev.records.ts[idx][0]
    span_h = (ev.records.ts[idx][-1] - t0) / 3_600_000.0
    unit, unit_ms = ("hours", 3_600_000.0) if span_h >= 2 else ("minutes", 60_000.0)
    t = (ev.records.ts[idx] - t0) / unit_ms
    values = ev.records.values[idx]
    z = (values - values.mean(axis=0)) / np.maximum(values.std(axis=0), 1e-9)

    fig, (ax_f, ax_s) = plt.subplots(2, 1, figsize=(13, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    names = ev.records.feature_names
    for j in range(values.shape[1]):
        ax_f.plot(t, z[:, j] + 4 * j, lw=0.7, label=names[j])
    ax_f.set_yticks([4 * j for j in range(len(names))], names, fontsize=7)
    ax_f.set_title(f"{entity}: features (standardized, offset) — model {ev.model_version}")
    figures = ev.figures(entity)
    ax_s.plot(t, ev.score[idx], color="black", lw=0.9, label="score")
    ax_s.axhline(figures.alert, color="red", ls="--", lw=1, label=f"alert threshold {figures.alert:.3g}")
    ax_s.axhline(figures.close, color="orange", ls=":", lw=1, label=f"close threshold {figures.close:.3g}")
    for ax in (ax_f, ax_s):
        if ev.records.label is not None:
            lab = ev.records.label[idx] > 0
            edges = np.diff(np.r_[0, lab.astype(np.int8), 0])
            for k, (a, b) in enumerate(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1))):
                ax.axvspan(t[a], t[min(b, len(t) - 1)], color="tab:red", alpha=0.15,
                           label="labelled event" if (ax is ax_s and k == 0) else None)
    opens = [a for a in ev.alerts if a.entity == entity and a.state == "open"]
    if opens:
        t_open = [(a.window_end_ts - t0) / unit_ms for a in opens]
        ax_s.scatter(t_open, [a.score for a in opens], marker="v", color="red", zorder=5, label="alert opened")
    ax_s.set_xlabel(f"{unit} since the entity's first reading")
    ax_s.set_ylabel("score")
    ax_s.legend(loc="upper left", fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return entity


def compare_with_topic(ev: Evaluation, settings, topic: str, idle_s: float = 5.0, timeout_s: float = 120.0) -> dict:
    """Read every alert on ``topic`` (read_committed) and compare its alert_ids with the offline run."""
    from confluent_kafka import Consumer

    consumer = Consumer(settings.client_config(**{"group.id": f"fabwatch-evaluate-{uuid.uuid4().hex[:8]}",
                                                  "auto.offset.reset": "earliest", "enable.auto.commit": False,
                                                  "isolation.level": "read_committed"}))
    consumer.subscribe([topic])
    live: set[str] = set()
    deadline, last_msg = time.monotonic() + timeout_s, time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - last_msg < idle_s:
        for msg in consumer.consume(1000, timeout=0.5):
            if msg.error() is None:
                live.add(Alert.model_validate_json(msg.value()).alert_id)
                last_msg = time.monotonic()
    consumer.close()
    offline = {a.alert_id for a in ev.alerts}
    return {"offline_alerts": len(offline), "live_alerts": len(live), "matched": len(offline & live),
            "only_offline": sorted(offline - live)[:20], "only_live": sorted(live - offline)[:20],
            "identical": offline == live}
