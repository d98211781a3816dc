"""Thresholds and calibration per task (numpy + scikit-learn, no TensorFlow)."""

from __future__ import annotations

import numpy as np
import pytest

from fabwatch.models.training import calibrate

RNG = np.random.default_rng(0)
NORMAL = RNG.normal(0.1, 0.05, 2000)
EVENTS = RNG.normal(0.8, 0.05, 100)


def test_classify_threshold_separates_events_by_best_f1() -> None:
    scores = np.r_[NORMAL, EVENTS]
    y = np.r_[np.zeros(2000), np.ones(100)]
    t = calibrate.choose_thresholds("classify", scores, y)
    assert 0.3 < t.alert < 0.7 and t.close == pytest.approx(0.8 * t.alert) and t.critical > t.alert
    metrics = calibrate.score_metrics("classify", scores, y, t)
    assert metrics["roc_auc"] == 1.0 and metrics["f1"] == 1.0
    far = calibrate.choose_thresholds("classify", scores, y, target_far=0.01)
    assert np.mean(NORMAL >= far.alert) == pytest.approx(0.01, abs=0.002) and "false-alarm" in far.method


def test_forecast_uses_a_quantile_of_normal_error_and_calibrates_to_z() -> None:
    t = calibrate.choose_thresholds("forecast", NORMAL, None, quantile=0.99)
    assert np.mean(NORMAL >= t.alert) == pytest.approx(0.01, abs=0.002)
    cal = calibrate.calibration(NORMAL, np.ones(len(NORMAL), bool))
    assert cal["mean"] == pytest.approx(0.1, abs=0.01) and cal["std"] == pytest.approx(0.05, abs=0.01)


def test_regress_threshold_is_in_minutes() -> None:
    delay = np.r_[RNG.uniform(0, 2, 500), RNG.uniform(10, 30, 50)]
    predicted = delay + RNG.normal(0, 1, len(delay))
    t = calibrate.choose_thresholds("regress", predicted, delay, delay_alert_min=5.0)
    assert 2 < t.alert < 12
    assert calibrate.score_metrics("regress", predicted, delay, t)["mae_min"] < 1.5
    quiet = calibrate.choose_thresholds("regress", predicted[:500], delay[:500], delay_alert_min=5.0)
    assert quiet.alert == 5.0 and "no delays" in quiet.method
