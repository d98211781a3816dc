"""Alert policy: hysteresis, consecutive windows, cooldown, severity, kind, top features, ids (no broker)."""

from __future__ import annotations

import numpy as np

from fabwatch.export.registry import Manifest, Scaler, Thresholds
from fabwatch.export.runtime import ModelOutput
from fabwatch.stream.policy import AlertPolicy, PolicyConfig, ScoredWindows
from fabwatch.stream.schemas import alert_id_for

F = 3


def _manifest(task: str = "classify", members: list[str] | None = None) -> Manifest:
    return Manifest(version="v0007", created="", task=task, feature_names=["a", "b", "c"], window=4,
                    scaler=Scaler(mean=[0.0] * F, std=[1.0] * F),
                    thresholds=Thresholds(alert=1.0, close=0.5, critical=2.0), members=members or ["spike", "level"])


def _run(policy: AlertPolicy, scores: list[float], entity: str = "e", member_scores: np.ndarray | None = None,
         feature_error: np.ndarray | None = None, windows: np.ndarray | None = None):
    m = len(scores)
    ms = member_scores if member_scores is not None else np.tile([[0.0, 1.0]], (m, 1)).astype(np.float32)
    out = ModelOutput(np.asarray(scores, np.float32), ms, np.full_like(ms, 0.5), feature_error)
    batch = ScoredWindows([entity] * m, np.arange(m, dtype=np.int64) * 10, np.arange(m, dtype=np.int64) * 10 + 30,
                          windows if windows is not None else np.zeros((m, 4, F), np.float32),
                          np.zeros(m, np.int32), np.arange(m, dtype=np.int64), np.full(m, np.nan), "t")
    return policy.evaluate(batch, out)


def test_hysteresis_opens_once_and_closes_below_the_lower_threshold() -> None:
    alerts = _run(AlertPolicy(_manifest()), [0.2, 1.5, 0.8, 1.2, 0.4, 0.3, 1.1])
    assert [(a.state, a.window_end_ts) for a in alerts] == [("open", 40), ("closed", 70), ("open", 90)]
    assert alerts[0].alert_id == alert_id_for("e", 40, "v0007", "open")
    assert alerts[0].severity == "warning" and alerts[1].severity == "info"
    assert alerts[0].threshold == 1.0 and alerts[1].threshold == 0.5
    assert alerts[0].source is not None and alerts[0].source.offset == 1


def test_min_consecutive_and_cooldown() -> None:
    policy = AlertPolicy(_manifest(), PolicyConfig(min_consecutive=2, cooldown_ms=40))
    alerts = _run(policy, [1.5, 0.2, 1.5, 1.6, 0.1, 1.7, 1.8, 1.9, 1.9, 1.9])
    # open at the second high window in a row; after the close at 70, windows ending before 110 are cooling,
    # so the run restarts at 110 and opens at 120
    assert [(a.state, a.window_end_ts) for a in alerts] == [("open", 60), ("closed", 70), ("open", 120)]


def test_severity_kind_and_top_features() -> None:
    spike = np.array([[3.0, 0.1]], np.float32)
    window = np.zeros((1, 4, F), np.float32)
    window[0, -1] = [0.5, -4.0, 1.0]
    a = _run(AlertPolicy(_manifest()), [2.5], member_scores=spike, windows=window)[0]
    assert a.severity == "critical" and a.kind == "spike"
    assert [f.name for f in a.top_features] == ["b", "c", "a"]
    assert a.model_scores == {"spike": 3.0, "level": 0.1} and a.weights == {"spike": 0.5, "level": 0.5}
    fe = np.array([[0.1, 0.2, 9.0]], np.float32)
    f = _run(AlertPolicy(_manifest("forecast", ["lstm", "cnn"])), [1.5], feature_error=fe)[0]
    assert f.kind == "anomaly" and f.top_features[0].name == "c" and f.top_features[0].contribution == 9.0
    assert _run(AlertPolicy(_manifest("regress")), [1.5])[0].kind == "delay"


def test_state_round_trip_resumes_an_open_alert() -> None:
    scores = [0.1, 1.5, 1.4, 0.9, 0.2, 1.3]
    whole = _run(AlertPolicy(_manifest()), scores)
    first = AlertPolicy(_manifest())
    _run(first, scores[:3])
    resumed = AlertPolicy(_manifest())
    resumed.import_state(0, first.export_state(0))
    ms = np.tile([[0.0, 1.0]], (3, 1)).astype(np.float32)
    out = ModelOutput(np.asarray(scores[3:], np.float32), ms, np.full_like(ms, 0.5), None)
    batch = ScoredWindows(["e"] * 3, np.arange(3, 6) * 10, np.arange(3, 6) * 10 + 30, np.zeros((3, 4, F), np.float32),
                          np.zeros(3, np.int32), np.arange(3, 6), np.full(3, np.nan), "t")
    tail = resumed.evaluate(batch, out)
    assert [a.alert_id for a in whole if a.window_end_ts > 50] == [a.alert_id for a in tail]
    assert AlertPolicy(_manifest()).export_state(0) == ""
