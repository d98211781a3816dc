"""Alert policy: hysteresis, consecutive windows, cooldown, severity, kind, top features, ids, the changed keys
written to the state topic (their encoding) and their expiry (no broker)."""

from __future__ import annotations

import numpy as np

from fabwatch.export.registry import Manifest, Scaler, Thresholds
from fabwatch.export.runtime import ModelOutput
import pytest

from fabwatch.stream.kafka.state import decode_state, encode_state
from fabwatch.stream.policy import MINUTE_MS, AlertPolicy, KeyState, PolicyConfig, PolicyCounters, ScoredWindows
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


def _written(policy: AlertPolicy, topic: dict[str, bytes | None] | None = None) -> dict[str, bytes | None]:
    """What the state topic holds after the policy's changes are written to it (last value per key wins)."""
    topic = {} if topic is None else topic
    for entity, _, st in policy.take_changes():
        topic[entity] = None if st is None else encode_state(st)
    return topic


def _restored(topic: dict[str, bytes | None], partition: int = 0, ttl_s: float | None = None) -> AlertPolicy:
    policy = AlertPolicy(_manifest(), ttl_s=ttl_s)
    policy.restore(partition, {e: decode_state(v, partition) for e, v in topic.items() if v is not None})
    return policy


def test_state_round_trip_resumes_an_open_alert() -> None:
    scores = [0.1, 1.5, 1.4, 0.9, 0.2, 1.3]
    whole = _run(AlertPolicy(_manifest()), scores)
    first = AlertPolicy(_manifest())
    _run(first, scores[:3])
    resumed = _restored(_written(first))
    ms = np.tile([[0.0, 1.0]], (3, 1)).astype(np.float32)
    out = ModelOutput(np.asarray(scores[3:], np.float32), ms, np.full_like(ms, 0.5), None)
    batch = ScoredWindows(["e"] * 3, np.arange(3, 6) * 10, np.arange(3, 6) * 10 + 30, np.zeros((3, 4, F), np.float32),
                          np.zeros(3, np.int32), np.arange(3, 6), np.full(3, np.nan), "t")
    tail = resumed.evaluate(batch, out)
    assert [a.alert_id for a in whole if a.window_end_ts > 50] == [a.alert_id for a in tail]
    assert AlertPolicy(_manifest()).take_changes() == []


# ---- state across restarts and its expiry ---------------------------------------------------------------------


def _windows(policy: AlertPolicy, entities: list[str], end_ts: list[int], scores: list[float],
             partition: int = 0) -> list:
    """One scored window per entity, in the order given."""
    m = len(entities)
    ms = np.tile([[0.0, 1.0]], (m, 1)).astype(np.float32)
    out = ModelOutput(np.asarray(scores, np.float32), ms, np.full_like(ms, 0.5), None)
    end = np.asarray(end_ts, np.int64)
    batch = ScoredWindows(entities, end - 30, end, np.zeros((m, 4, F), np.float32), np.full(m, partition, np.int32),
                          np.arange(m, dtype=np.int64), np.full(m, np.nan), "t")
    return policy.evaluate(batch, out)


def test_encoded_state_round_trips_every_kind_of_key() -> None:
    t0 = 1_790_000_000_000
    states = [KeyState(partition=3, open=True, last_min=t0 // MINUTE_MS),
              KeyState(partition=3, run=2, last_min=t0 // MINUTE_MS - 5),
              KeyState(partition=3, closed_at=t0 - 61_234, last_min=t0 // MINUTE_MS),
              KeyState(partition=3, open=True, closed_at=t0 - 7, last_min=t0 // MINUTE_MS),
              KeyState(partition=3, closed_at=0, last_min=0),
              KeyState(partition=3, run=70_000, last_min=t0 // MINUTE_MS - 300)]
    assert [decode_state(encode_state(st), 3) for st in states] == states


def test_three_thousand_open_alerts_of_one_partition_survive_a_restart() -> None:
    n, t0 = 3000, 1_790_000_000_000
    entities = [f"fab{i % 3}/etch-{i // 12:03d}/ch-{i % 4}" for i in range(n)]
    uninterrupted = AlertPolicy(_manifest())
    before = AlertPolicy(_manifest())
    # the alerts opened over half an hour, so their last-seen minutes differ
    first = [t0 + i * 600 for i in range(n)]
    for policy in (uninterrupted, before):
        assert len(_windows(policy, entities, first, [1.5] * n)) == n
    restarted = _restored(_written(before))
    assert len(restarted.states) == n
    # next windows: the even entities recover (closed), the odd ones stay high (no second open)
    then = [t + 60_000 for t in first]
    scores = [0.2 if i % 2 == 0 else 1.4 for i in range(n)]
    expected = _windows(uninterrupted, entities, then, scores)
    got = _windows(restarted, entities, then, scores)
    assert [a.alert_id for a in got] == [a.alert_id for a in expected]
    assert len(got) == n // 2 and {a.state for a in got} == {"closed"}


def test_a_key_silent_longer_than_the_ttl_loses_its_open_alert() -> None:
    t0, ttl_s = 1_790_000_000_000, 3600.0
    policy = AlertPolicy(_manifest(), ttl_s=ttl_s)
    assert [a.state for a in _windows(policy, ["e"], [t0], [1.5])] == ["open"]
    # back within the TTL, still high: the same alert stays open
    assert _windows(policy, ["e"], [t0 + 3_540_000], [1.5]) == []
    # back after more than the TTL of silence, still high: the old alert expired, a new one opens
    again = _windows(policy, ["e"], [t0 + 3_540_000 + 3_660_000], [1.5])
    assert [a.state for a in again] == ["open"]
    assert again[0].alert_id == alert_id_for("e", t0 + 7_200_000, "v0007", "open")
    assert policy.counters.expired_open == 1 and policy.counters.expired_pending == 0


def test_keys_that_went_silent_are_pruned_and_leave_a_tombstone() -> None:
    t0, ttl_s = 1_790_000_000_000, 3600.0
    policy = AlertPolicy(_manifest(), PolicyConfig(min_consecutive=1, cooldown_ms=10_000), ttl_s=ttl_s)
    _windows(policy, ["gone", "cooling", "busy"], [t0, t0, t0], [1.5, 1.5, 1.5])
    _windows(policy, ["cooling", "busy"], [t0 + 1000, t0 + 1000], [0.1, 1.5])
    topic = _written(policy)
    assert all(topic[e] is not None for e in ("gone", "cooling", "busy"))
    for ts in (t0 + 1_800_000, t0 + 3_700_000):  # the partition's clock moves past the TTL
        _windows(policy, ["busy"], [ts], [1.5])
    assert policy.prune_expired() == 2 and set(policy.states) == {"busy"}
    _written(policy, topic)
    assert topic["gone"] is None and topic["cooling"] is None  # tombstones: not restored
    assert set(_restored(topic, ttl_s=ttl_s).states) == {"busy"}
    assert policy.counters.expired_open == 1 and policy.counters.expired_pending == 1


def test_a_closed_alert_leaves_a_tombstone() -> None:
    t0 = 1_790_000_000_000
    policy = AlertPolicy(_manifest())
    _windows(policy, ["a", "b"], [t0, t0], [1.5, 1.5])
    topic = _written(policy)
    _windows(policy, ["a"], [t0 + 1000], [0.1])  # a closes; no cooldown: quiet
    _written(policy, topic)
    assert topic["a"] is None and set(_restored(topic).states) == {"b"}


@pytest.mark.parametrize("value", [b'{"e":[1,0,-1]}', b"not json", b'{"v":2,"open":true,"run":0,"closed_at":-1,'
                                   b'"last_min":1}', b'{"v":1,"open":1,"run":0,"closed_at":-1,"last_min":1}',
                                   b'{"v":1,"open":true,"run":0}'])
def test_a_value_that_is_no_state_is_refused(value: bytes) -> None:
    with pytest.raises(ValueError):
        decode_state(value, 0)


def test_the_processor_metrics_follow_the_policy_counters() -> None:
    from prometheus_client import generate_latest

    from fabwatch.stream.metrics import ProcessorMetrics

    metrics, counters = ProcessorMetrics(), PolicyCounters(expired_open=2, expired_pending=1)
    metrics.observe_policy(counters)
    counters.expired_open = 3  # one more expired
    metrics.observe_policy(counters)
    text = generate_latest(metrics.registry).decode()
    assert 'fabwatch_policy_expired_total{state="open"} 3.0' in text
    assert 'fabwatch_policy_expired_total{state="pending"} 1.0' in text


def test_the_changes_follow_every_change_of_their_keys() -> None:
    t0 = 1_790_000_000_000
    policy = AlertPolicy(_manifest(), PolicyConfig(min_consecutive=2))

    def changes() -> dict[str, KeyState | None]:
        return {e: st for e, _, st in policy.take_changes()}

    _windows(policy, ["a", "b"], [t0, t0], [1.5, 1.5])                  # two runs of 1
    assert {e: s.run for e, s in changes().items()} == {"a": 1, "b": 1}
    _windows(policy, ["a", "b"], [t0 + 1000, t0 + 1000], [1.5, 0.1])    # a opens, b goes quiet
    got = changes()
    assert got["a"].open and got["b"] is None and len(got) == 2
    _windows(policy, ["a"], [t0 + 2000], [1.4])                         # still open, same minute: nothing to write
    assert changes() == {}
    _windows(policy, ["a"], [t0 + 2000 + MINUTE_MS], [1.4])             # a new minute: its last-seen time moves
    assert list(changes()) == ["a"]
    _windows(policy, ["a"], [t0 + 2000 + 2 * MINUTE_MS], [1.4])
    policy.drop_partitions([0])                                         # revoked: its untaken changes go too
    assert policy.take_changes() == []
