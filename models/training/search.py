"""Static member weights and threshold searched on out-of-fold scores (Optuna), set against the learned gate.

`train --cv K --weight-search N`: the cross-validation's out-of-fold member scores are combined with one weight
vector for every input (no gate) and a threshold; Optuna's TPE sampler searches both. The gate's out-of-fold
score gets its best threshold on the same rows, so the two are compared on the same data by the same objective:

- F1 at the threshold (the default, as ``calibrate.choose_thresholds`` picks the gate's threshold);
- with ``target_far``, the detection rate at the threshold with that false-alarm rate among normal windows
  (the threshold follows from the weights; only the weights are searched).

Both sides choose on the data they are scored on, and the searched side has M more free parameters: the
comparison is optimistic for the search, which is why the manifest records both figures.
No TensorFlow here.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel
from sklearn import metrics as skm

from fabwatch.models.training.calibrate import best_f1_threshold, normal_mask, positives
from fabwatch.models.training.data import Task


class SearchResult(BaseModel):
    """The best static combination found, and the gate's figure by the same objective."""

    weights: list[float]          # one per member, summing to 1
    threshold: float
    objective: str                # "f1" or "detection_rate@far=<rate>"
    value: float                  # the objective of the static weights on the out-of-fold rows
    gate_value: float             # the objective of the gate's out-of-fold score, at its best threshold
    winner: str                   # "static" or "gate": what the exported model serves
    trials: int
    seed: int


def _f1(positive: np.ndarray, score: np.ndarray, threshold: float) -> float:
    return float(skm.f1_score(positive, score >= threshold, zero_division=0.0))


def far_threshold(score: np.ndarray, normal: np.ndarray, target_far: float) -> float:
    """The score with ``target_far`` of the normal windows at or above it."""
    return float(np.quantile(score[normal], 1 - target_far))


def detection_rate(positive: np.ndarray, score: np.ndarray, threshold: float) -> float:
    return float(np.mean(score[positive] >= threshold))


def search_weights(member_scores: np.ndarray, gate_score: np.ndarray, y: np.ndarray, task: Task, trials: int,
                   seed: int = 0, target_far: float | None = None, delay_alert_min: float = 5.0) -> SearchResult:
    """Search weights (and the threshold) for ``member_scores`` [N, M] against labels ``y`` [N].

    Trial 0 is the uniform average, so the search never reports worse than plain averaging. The same seed on
    the same scores gives the same result (TPE sampler seeded, trials run one at a time).
    """
    import optuna

    positive = positives(task, y, delay_alert_min)
    if not 0 < positive.sum() < len(positive):
        raise ValueError("the out-of-fold rows hold one class only: no weights to search")
    normal = normal_mask(task, len(y), y, delay_alert_min)
    n_members = member_scores.shape[1]
    lo, hi = float(member_scores.min()), float(member_scores.max())

    def combine(trial: optuna.Trial) -> tuple[np.ndarray, np.ndarray]:
        raw = np.array([trial.suggest_float(f"w{i}", 0.0, 1.0) for i in range(n_members)])
        weights = raw / raw.sum() if raw.sum() > 0 else np.full(n_members, 1.0 / n_members)
        return weights, member_scores @ weights

    def objective(trial: optuna.Trial) -> float:
        weights, score = combine(trial)
        if target_far is not None:
            return detection_rate(positive, score, far_threshold(score, normal, target_far))
        return _f1(positive, score, trial.suggest_float("threshold", lo, hi))

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    uniform = {f"w{i}": 1.0 for i in range(n_members)}
    if target_far is None:
        uniform["threshold"] = best_f1_threshold(positive, member_scores.mean(axis=1))[0]
    study.enqueue_trial(uniform)
    study.optimize(objective, n_trials=trials)
    weights, score = combine(optuna.trial.FixedTrial(study.best_params))
    if target_far is not None:
        name = f"detection_rate@far={target_far:g}"
        threshold = far_threshold(score, normal, target_far)
        gate_value = detection_rate(positive, gate_score, far_threshold(gate_score, normal, target_far))
    else:
        name, threshold = "f1", float(study.best_params["threshold"])
        gate_value = best_f1_threshold(positive, gate_score)[1]
    value = float(study.best_value)
    return SearchResult(weights=weights.tolist(), threshold=threshold, objective=name, value=value,
                        gate_value=gate_value, winner="static" if value > gate_value else "gate", trials=trials,
                        seed=seed)
