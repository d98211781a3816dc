"""Detection metrics, pointwise and event-wise (numpy + scikit-learn, no TensorFlow: offline
evaluation runs on the serving install)."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

DAY_MS = 86_400_000


def _safe_div(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0


def roc_auc(y: np.ndarray, score: np.ndarray) -> float | None:
    """ROC-AUC; None when only one class is present (it is undefined there)."""
    y = np.asarray(y).astype(bool)
    return float(skm.roc_auc_score(y, score)) if 0 < y.sum() < len(y) else None


def average_precision(y: np.ndarray, score: np.ndarray) -> float | None:
    """PR-AUC as average precision; None without positives."""
    y = np.asarray(y).astype(bool)
    return float(skm.average_precision_score(y, score)) if y.any() else None


def pointwise(y: np.ndarray, pred: np.ndarray, score: np.ndarray | None) -> dict[str, float | int | None]:
    """Confusion counts and rates of ``pred``; ROC-AUC and PR-AUC of ``score`` (None without scores)."""
    y, pred = np.asarray(y).astype(bool), np.asarray(pred).astype(bool)
    tp, fp = int((y & pred).sum()), int((~y & pred).sum())
    fn, tn = int((y & ~pred).sum()), int((~y & ~pred).sum())
    precision, recall = _safe_div(tp, tp + fp), _safe_div(tp, tp + fn)
    return {
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "precision": precision, "recall": recall,
        "f1": _safe_div(2 * precision * recall, precision + recall),
        "false_alarm_rate": _safe_div(fp, fp + tn),
        "missed_alarm_rate": _safe_div(fn, fn + tp),
        "roc_auc": roc_auc(y, score) if score is not None else None,
        "pr_auc": average_precision(y, score) if score is not None else None,
    }


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    edges = np.diff(np.r_[0, mask.astype(np.int8), 0])
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def eventwise(y: np.ndarray, pred: np.ndarray, ts_ms: np.ndarray, entity: np.ndarray) -> dict[str, float | int | None]:
    """An event is a run of positive labels of one entity; it is detected when a prediction fires
    inside it. Delay: steps (and seconds) from the event's start to the first prediction in it.
    A false alarm is a run of predictions that touches no event."""
    y, pred = np.asarray(y).astype(bool), np.asarray(pred).astype(bool)
    ts_ms, entity = np.asarray(ts_ms), np.asarray(entity)
    events = detected = false_alarms = 0
    delays_steps: list[int] = []
    delays_s: list[float] = []
    span_ms = 0
    for ent in np.unique(entity):
        idx = np.flatnonzero(entity == ent)
        idx = idx[np.argsort(ts_ms[idx], kind="stable")]
        ye, pe, te = y[idx], pred[idx], ts_ms[idx]
        span_ms += int(te[-1] - te[0]) if len(te) > 1 else 0
        for start, end in _runs(ye):
            events += 1
            hits = np.flatnonzero(pe[start:end])
            if hits.size:
                detected += 1
                delays_steps.append(int(hits[0]))
                delays_s.append(float(te[start + hits[0]] - te[start]) / 1000.0)
        false_alarms += sum(1 for start, end in _runs(pe) if not ye[start:end].any())
    days = span_ms / DAY_MS
    return {
        "events": events, "events_detected": detected,
        "event_recall": _safe_div(detected, events),
        "mean_detection_delay_steps": float(np.mean(delays_steps)) if delays_steps else None,
        "mean_detection_delay_s": float(np.mean(delays_s)) if delays_s else None,
        "false_alarms": false_alarms,
        "false_alarms_per_day": _safe_div(false_alarms, days) if days > 0 else None,
    }
