"""Thresholds, score calibration and validation metrics from validation-split scores (numpy + scikit-learn).

No TensorFlow: these work on scores, so evaluation and serving-side tools can reuse them.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from fabwatch.export.registry import Thresholds
from fabwatch.models.training.data import Task

CLOSE_RATIO = 0.8        # hysteresis: an open alert closes below 80 % of the alert threshold
CRITICAL_Z = 3.0         # "critical" this many normal-score standard deviations above the alert threshold


def positives(task: Task, y: np.ndarray, delay_alert_min: float = 5.0) -> np.ndarray:
    """Which windows are events: label 1, or (regress) a delay above ``delay_alert_min`` minutes."""
    return y > delay_alert_min if task == "regress" else y > 0.5


def normal_mask(task: Task, n: int, y: np.ndarray | None, delay_alert_min: float = 5.0) -> np.ndarray:
    """Windows that are not events (all of them when there are no labels)."""
    return np.ones(n, bool) if y is None else ~positives(task, y, delay_alert_min)


def calibration(scores: np.ndarray, normal: np.ndarray) -> dict[str, float]:
    """Mean and std of the score on normal validation windows: ``z = (score - mean) / std``."""
    ref = scores[normal] if normal.any() else scores
    return {"mean": float(ref.mean()), "std": float(max(ref.std(), 1e-12))}


def choose_thresholds(task: Task, scores: np.ndarray, y: np.ndarray | None, *, target_far: float | None = None,
                      quantile: float = 0.99, delay_alert_min: float = 5.0) -> Thresholds:
    """Alert threshold by task, then close (hysteresis) and critical from the calibration.

    - classify: best F1 on validation, or the score with ``target_far`` false alarms among normal windows;
    - regress: best F1 for "delay above ``delay_alert_min`` minutes", on predicted minutes;
    - forecast: the ``quantile`` of the validation error on normal windows (all windows when unlabelled).
    """
    positive = None if y is None else positives(task, y, delay_alert_min)
    normal = normal_mask(task, len(scores), y, delay_alert_min)
    if task == "forecast" or positive is None or not positive.any() or positive.all():
        alert, method = float(np.quantile(scores[normal], quantile)), f"q{quantile:g} of normal validation score"
        if task == "regress" and (positive is None or not positive.any()):
            alert, method = delay_alert_min, f"fixed {delay_alert_min:g} min (no delays in validation)"
    elif target_far is not None:
        alert = float(np.quantile(scores[normal], 1 - target_far))
        method = f"false-alarm rate {target_far:g} on validation"
    else:
        precision, recall, cuts = skm.precision_recall_curve(positive, scores)
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        best = int(np.argmax(f1[:-1]))
        alert, method = float(cuts[best]), f"best F1 {f1[best]:.3f} on validation"
    cal = calibration(scores, normal)
    return Thresholds(alert=alert, close=CLOSE_RATIO * alert, critical=alert + CRITICAL_Z * cal["std"], method=method)


def score_metrics(task: Task, scores: np.ndarray, y: np.ndarray | None, thresholds: Thresholds,
                  delay_alert_min: float = 5.0) -> dict[str, float]:
    """ROC-AUC, PR-AUC and F1 at the alert threshold where labels allow; MAE/RMSE for regression."""
    out: dict[str, float] = {"val_windows": float(len(scores)), "mean_score": float(scores.mean())}
    if y is None:
        return out
    if task == "regress":
        out.update(mae_min=float(np.mean(np.abs(scores - y))), rmse_min=float(np.sqrt(np.mean((scores - y) ** 2))))
    positive = positives(task, y, delay_alert_min)
    out["positive_rate"] = float(positive.mean())
    if 0 < positive.sum() < len(positive):
        out.update(roc_auc=float(skm.roc_auc_score(positive, scores)),
                   pr_auc=float(skm.average_precision_score(positive, scores)),
                   f1=float(skm.f1_score(positive, scores >= thresholds.alert)))
    return out


def member_aucs(member_scores: np.ndarray, y: np.ndarray | None, names: list[str], task: Task,
                delay_alert_min: float = 5.0) -> dict[str, float]:
    """Each member's own ROC-AUC on validation (how much each contributes)."""
    if y is None:
        return {}
    positive = positives(task, y, delay_alert_min)
    if not 0 < positive.sum() < len(positive):
        return {}
    return {n: float(skm.roc_auc_score(positive, member_scores[:, i])) for i, n in enumerate(names)}
