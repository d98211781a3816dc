"""Metrics against values computed by hand on small fixed examples."""

import numpy as np
import pytest

from fabwatch.models.training.metrics import average_precision, eventwise, pointwise, roc_auc


def test_pointwise_by_hand():
    y = np.array([0, 0, 1, 1, 0, 1, 0, 0])
    pred = np.array([0, 1, 1, 0, 0, 1, 0, 0])
    score = np.array([0.1, 0.7, 0.9, 0.4, 0.2, 0.8, 0.3, 0.35])
    m = pointwise(y, pred, score)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 1, 1, 4)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["false_alarm_rate"] == pytest.approx(1 / 5)
    assert m["missed_alarm_rate"] == pytest.approx(1 / 3)
    # positives 0.9, 0.4, 0.8 vs negatives 0.1, 0.7, 0.2, 0.3, 0.35: 0.9 and 0.8 beat all 5, 0.4 beats 4
    assert m["roc_auc"] == pytest.approx(14 / 15)
    # ranked: 0.9(+) 0.8(+) 0.7(-) 0.4(+) ... -> AP = (1 + 1 + 3/4) / 3
    assert m["pr_auc"] == pytest.approx((1 + 1 + 0.75) / 3)


def test_ties_count_half_in_roc_auc():
    assert roc_auc(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert average_precision(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(0.5)


def test_no_positives_is_defined_not_a_crash():
    y = np.zeros(6, int)
    pred = np.array([0, 1, 1, 0, 0, 1])
    m = pointwise(y, pred, np.linspace(0, 1, 6))
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (0, 3, 0, 3)
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0
    assert m["false_alarm_rate"] == pytest.approx(0.5)
    assert m["missed_alarm_rate"] == 0.0
    assert m["roc_auc"] is None and m["pr_auc"] is None
    ev = eventwise(y, pred, np.arange(6) * 3_600_000, np.zeros(6))
    assert ev["events"] == 0 and ev["event_recall"] == 0.0 and ev["mean_detection_delay_steps"] is None
    assert ev["false_alarms"] == 2  # two separate runs of predictions
    assert ev["false_alarms_per_day"] == pytest.approx(2 / (5 / 24))


def test_eventwise_by_hand():
    # entity A: event at steps 2-4, detected at step 3 (delay 1 step = 60 s); false alarm at step 7
    # entity B: event at steps 1-2, missed
    ts = np.r_[np.arange(10), np.arange(5)] * 60_000
    entity = np.r_[np.zeros(10), np.ones(5)]
    y = np.array([0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0])
    pred = np.array([0, 0, 0, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0])
    ev = eventwise(y, pred, ts, entity)
    assert ev["events"] == 2 and ev["events_detected"] == 1 and ev["event_recall"] == 0.5
    assert ev["mean_detection_delay_steps"] == 1.0 and ev["mean_detection_delay_s"] == 60.0
    assert ev["false_alarms"] == 1
    assert ev["false_alarms_per_day"] == pytest.approx(1 / ((9 + 4) * 60_000 / 86_400_000))
