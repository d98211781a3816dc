"""Thresholds, score calibration and validation metrics from validation-split scores (numpy + scikit-learn).

No TensorFlow: these work on scores, so evaluation and serving-side tools can reuse them.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from fabwatch.export.registry import KeyThresholds, Thresholds
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


def best_f1_threshold(positive: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) of the best F1 over every cut of ``scores``."""
    precision, recall, cuts = skm.precision_recall_curve(positive, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1]))
    return float(cuts[best]), float(f1[best])


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
        alert, f1 = best_f1_threshold(positive, scores)
        method = f"best F1 {f1:.3f} on validation"
    cal = calibration(scores, normal)
    return Thresholds(alert=alert, close=CLOSE_RATIO * alert, critical=alert + CRITICAL_Z * cal["std"], method=method)


def monitor_thresholds(scores: np.ndarray, y: np.ndarray | None, fault_factor: float | None = None) -> Thresholds:
    """The statistical monitor's score is a ratio to limits it set on training data itself: alert at 1.
    ``fault_factor``: how far labelled faults raised those limits (``train --monitor``)."""
    cal = calibration(scores, normal_mask("forecast", len(scores), y))
    raised = "" if fault_factor is None else f", times {fault_factor:.3g} that labelled faults allow"
    return Thresholds(alert=1.0, close=CLOSE_RATIO, critical=1.0 + CRITICAL_Z * cal["std"],
                      method="statistical monitor: limits at the 0.999 quantile of 5-fold out-of-fold training "
                             f"windows, times a split-half margin for drift{raised}; alert at ratio 1")


MIN_KEY_WINDOWS = 200   # default --threshold-min-windows: a 0.99 quantile of fewer windows rests on one or two of them
KEY_MONITOR_QUANTILE = 0.999  # a key's monitor threshold: this quantile of its normal validation scores, as the
                              # monitor's own limits (0.999 of its training windows)


def key_monitor_thresholds(scores: np.ndarray, y: np.ndarray | None, pooled_alert: float) -> Thresholds:
    """One key's figures for the statistical monitor: the ``KEY_MONITOR_QUANTILE`` of its normal validation
    scores, never below the pooled limit. Raise-only: the monitor's limit is set on far more windows than one
    key's validation holds, and the top quantile of a few hundred overlapping windows underestimates a quiet key's
    tail; a noisy key, whose normal windows cross the pooled limit, is what per-key figures are for here."""
    normal = normal_mask("forecast", len(scores), y)
    cal = calibration(scores, normal)
    alert = max(pooled_alert, float(np.quantile(scores[normal] if normal.any() else scores, KEY_MONITOR_QUANTILE)))
    return Thresholds(alert=alert, close=CLOSE_RATIO * alert, critical=alert + CRITICAL_Z * cal["std"],
                      method=f"q{KEY_MONITOR_QUANTILE:g} of its normal validation score, at least the pooled limit")


def thresholds_by_key(task: Task, scores: np.ndarray, y: np.ndarray | None, keys: np.ndarray, pooled: Thresholds, *,
                      source: str, min_windows: int = MIN_KEY_WINDOWS, monitor: bool = False,
                      target_far: float | None = None, delay_alert_min: float = 5.0) -> dict[str, KeyThresholds]:
    """Figures per key (entity or group) of the validation windows, ``keys[i]`` the key of window ``i``.

    A key gets the pooled rule applied to its own windows (``choose_thresholds``, or ``key_monitor_thresholds``
    for the statistical monitor), with ``source`` (entity or group), when it has at least ``min_windows``
    windows and, where the pooled rule is best F1, both events and normal windows. Otherwise it gets the pooled
    figures (source pooled, ``method`` says why): a threshold from a handful of windows would be noise, and
    a key without events has no F1 to maximise.
    """
    best_f1 = not monitor and task != "forecast" and target_far is None and y is not None
    out: dict[str, KeyThresholds] = {}
    for key in np.unique(keys).tolist():
        mine = keys == key
        n = int(mine.sum())
        s, yk = scores[mine], None if y is None else y[mine]
        events = 0 if yk is None else int(positives(task, yk, delay_alert_min).sum())
        why = (f"pooled: {n} validation windows, fewer than {min_windows}" if n < min_windows else
               "pooled: its validation windows are not both events and normal" if best_f1 and not 0 < events < n
               else None)
        if why:
            out[str(key)] = KeyThresholds(**(pooled.model_dump() | {"method": why}), n_windows=n, source="pooled")
            continue
        figures = key_monitor_thresholds(s, yk, pooled.alert) if monitor else choose_thresholds(
            task, s, yk, target_far=target_far, delay_alert_min=delay_alert_min)
        out[str(key)] = KeyThresholds(**figures.model_dump(), n_windows=n, source=source)
    return out


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
    ranking = ranking_metrics(task, scores, y, delay_alert_min)
    if ranking:
        out.update(ranking, f1=float(skm.f1_score(positive, scores >= thresholds.alert)))
    return out


def ranking_metrics(task: Task, scores: np.ndarray, y: np.ndarray, delay_alert_min: float = 5.0) -> dict[str, float]:
    """ROC-AUC and PR-AUC (average precision) of ``scores`` for the events in ``y``; empty with one class only."""
    positive = positives(task, y, delay_alert_min)
    if not 0 < positive.sum() < len(positive):
        return {}
    return {"roc_auc": float(skm.roc_auc_score(positive, scores)),
            "pr_auc": float(skm.average_precision_score(positive, scores))}


def member_aucs(member_scores: np.ndarray, y: np.ndarray | None, names: list[str], task: Task,
                delay_alert_min: float = 5.0) -> dict[str, float]:
    """Each member's own ROC-AUC on validation (how much each contributes)."""
    if y is None:
        return {}
    positive = positives(task, y, delay_alert_min)
    if not 0 < positive.sum() < len(positive):
        return {}
    return {n: float(skm.roc_auc_score(positive, member_scores[:, i])) for i, n in enumerate(names)}


CHANCE_MARGIN = 0.05    # a validation ROC-AUC within this of 0.5 is a coin toss
BASELINE_MARGIN = 0.05  # a model this far below the simple baseline's ROC-AUC is worse than the baseline


def window_features(x: np.ndarray) -> np.ndarray:
    """Per-feature mean, std and last value of windows ``[N, W, F]`` -> ``[N, 3F]`` (the baseline's view)."""
    return np.concatenate([x.mean(axis=1), x.std(axis=1), x[:, -1, :]], axis=1)


def quality(task: Task, train_x: np.ndarray, train_y: np.ndarray | None, val_x: np.ndarray,
            val_y: np.ndarray | None, score: np.ndarray, delay_alert_min: float = 5.0) -> dict[str, object]:
    """Is the model better than chance and than a simple baseline on its validation windows?

    Baselines: classify, a logistic regression on window mean/std/last; regress, a ridge regression on the same;
    forecast (unsupervised), the largest |z| of the newest reading (a 3-sigma rule). ``ok`` is False when the
    model is no better than chance or clearly below the baseline; ``ok`` is None when validation holds too few
    labels to tell. ``above_chance`` (the sidecar trainer's floor) is the chance half of ``ok`` alone.
    """
    from sklearn.linear_model import LogisticRegression, Ridge

    if val_y is None:
        return {"ok": None, "reason": "no validation labels: quality not checked"}
    if task == "regress":
        base = Ridge().fit(window_features(train_x), train_y).predict(window_features(val_x))
        mae, base_mae = float(np.mean(np.abs(score - val_y))), float(np.mean(np.abs(base - val_y)))
        chance = float(np.mean(np.abs(float(train_y.mean()) - val_y)))
        above_chance = mae < chance
        ok = above_chance and mae <= base_mae * (1 + BASELINE_MARGIN)
        return {"ok": ok, "above_chance": above_chance, "metric": "mae_min", "model": mae, "baseline": base_mae,
                "chance": chance,
                "reason": f"validation MAE {mae:.3g} min against {base_mae:.3g} for a ridge baseline and "
                          f"{chance:.3g} for predicting the mean"}
    positive = positives(task, val_y, delay_alert_min)
    if not 0 < positive.sum() < len(positive):
        return {"ok": None, "reason": "validation holds one class only: quality not checked"}
    if task == "classify" and train_y is not None and 0 < train_y.sum() < len(train_y):
        clf = LogisticRegression(max_iter=1000, class_weight="balanced").fit(window_features(train_x), train_y > 0.5)
        base, name = clf.predict_proba(window_features(val_x))[:, 1], "logistic regression on window mean/std/last"
    else:
        base, name = np.abs(val_x[:, -1, :]).max(axis=1), "largest |z| of the newest reading"
    auc, base_auc = float(skm.roc_auc_score(positive, score)), float(skm.roc_auc_score(positive, base))
    above_chance = auc > 0.5 + CHANCE_MARGIN
    ok = above_chance and auc >= base_auc - BASELINE_MARGIN
    verdict = ("no better than chance" if not above_chance else
               "below the simple baseline" if not ok else "better than chance and the baseline")
    return {"ok": ok, "above_chance": above_chance, "metric": "roc_auc", "model": auc, "baseline": base_auc,
            "baseline_method": name,
            "reason": f"validation ROC-AUC {auc:.3f} against {base_auc:.3f} for the baseline ({name}): {verdict}"}
