"""Alert state across a restart on a real broker: the open alerts of one partition, more than any offset's
metadata could carry, live on the compacted policy state topic (``fabwatch.stream.kafka.state``), so the
restarted processor closes them under the ids an uninterrupted run gives, instead of forgetting them; what
closed leaves a tombstone; an aborted transaction's state writes are never restored."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Producer

from fabwatch.export.runtime import ScoringModel
from fabwatch.stream.decode import BatchDecoder
from fabwatch.stream.engine import ScoringEngine, run_offline
from fabwatch.stream.kafka.state import ChangeLog, state_key
from fabwatch.stream.kafka.topics import ensure_topics
from fabwatch.stream.policy import KeyState
from onnx_fixtures import make_registry, readings
from stream_helpers import committed_offsets, log_has, produce, read_all, start_serve, stop, wait_for

pytestmark = pytest.mark.integration
N_KEYS = 3000  # the offset-metadata state of earlier versions carried at most ~1,600 open alerts of a partition
GROUP = "state-restart"


def _restored(settings, group: str = GROUP) -> dict[str, KeyState]:
    log = ChangeLog(settings, group)
    try:
        return log.restore([0], timeout_s=60)[0]
    finally:
        log.close()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", [[], ["--exactly-once"]], ids=["at-least-once", "exactly-once"])
def test_three_thousand_open_alerts_of_one_partition_are_closed_after_a_restart(settings, tmp_path: Path,
                                                                                mode: list[str]) -> None:
    ensure_topics(settings, settings.topics.all(), partitions=1)  # every key on one partition
    registry = tmp_path / "registry"
    make_registry(registry, window=10)
    entities = [f"fab{i % 3}/etch-{i // 12:03d}/ch-{i % 4}" for i in range(N_KEYS)]
    cut = 20  # steps before the restart; each key spikes over its last five, so its alert is open at the cut
    data = readings(entities, 32, seed=9, spikes={e: range(cut - 5, cut) for e in entities})
    model = ScoringModel.from_registry(registry)
    cols = BatchDecoder(model.feature_names).decode([orjson.dumps(r) for r in data])
    expected, _, _ = run_offline(ScoringEngine(model), cols.keys, cols.ts, cols.values)
    cut_ts = data[cut * N_KEYS]["ts"]
    assert sum(a.state == "open" and a.window_end_ts < cut_ts for a in expected) == N_KEYS
    assert sum(a.state == "closed" and a.window_end_ts >= cut_ts for a in expected) == N_KEYS

    produce(settings, settings.topics.sensors, data[:cut * N_KEYS])
    log = tmp_path / "serve.log"
    proc = start_serve(settings, registry, "--group", GROUP, *mode, log_path=log)
    try:
        wait_for(lambda: committed_offsets(settings, GROUP, settings.topics.sensors, 1)[0] == cut * N_KEYS, 180,
                 what="the first part committed")
    finally:
        assert stop(proc) == 0
    at_cut = _restored(settings)
    assert len(at_cut) == N_KEYS and all(st.open for st in at_cut.values())
    assert _restored(settings, "another-group") == {}  # two groups on one sensor topic keep their state apart

    produce(settings, settings.topics.sensors, data[cut * N_KEYS:])
    proc = start_serve(settings, registry, "--group", GROUP, *mode, log_path=log)
    try:
        got = [json.loads(v) for v in read_all(settings, settings.topics.alerts, expect=len(expected), timeout_s=180)]
    finally:
        assert stop(proc) == 0
    assert log_has(log, f"alert state restored for {N_KEYS}")
    assert {a["alert_id"] for a in got} == {a.alert_id for a in expected}  # at-least-once: repeats keep their id
    if mode:
        assert len(got) == len(expected)
    else:  # a clean stop commits everything: nothing is redone, no alert opens twice
        assert sorted(a["alert_id"] for a in got if a["state"] == "open") == \
            sorted(a.alert_id for a in expected if a.state == "open")
    # every alert closed (no cooldown: the keys are quiet), so each key's last record is a tombstone
    assert _restored(settings) == {}
    last = {}
    for m in _read_state(settings):
        last[m[0]] = m[1]
    assert len(last) == N_KEYS and all(v is None for v in last.values())


def _read_state(settings, isolation: str = "read_committed") -> list[tuple[bytes, bytes | None]]:
    """(key, value) of every record on the state topic, tombstones included."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

    c = Consumer(settings.client_config(**{"group.id": "state-reader", "enable.partition.eof": True,
                                           "isolation.level": isolation}))
    c.assign([TopicPartition(settings.topics.policy_state, 0, OFFSET_BEGINNING)])
    out = []
    try:
        while True:
            m = c.poll(30)
            assert m is not None, "the state topic was not read to its end"
            if m.error() is not None:
                if m.error().code() == KafkaError._PARTITION_EOF:
                    return out
                continue
            out.append((m.key(), m.value()))
    finally:
        c.close()


def test_an_aborted_transactions_state_writes_are_not_restored(settings) -> None:
    ensure_topics(settings, settings.topics.all(), partitions=1)
    changelog = ChangeLog(settings, GROUP)
    producer = Producer(settings.client_config(**{"transactional.id": "state-abort-test"}))
    producer.init_transactions(30)
    kept, aborted = KeyState(partition=0, open=True, last_min=100), KeyState(partition=0, run=2, last_min=100)
    noop = lambda err, msg: None  # noqa: E731
    try:
        producer.begin_transaction()
        changelog.produce(producer, [("kept", 0, kept), ("later-tombstoned", 0, kept)], noop)
        producer.commit_transaction(30)
        producer.begin_transaction()
        changelog.produce(producer, [("aborted", 0, aborted), ("kept", 0, None)], noop)
        producer.flush(30)  # on the broker, uncommitted
        producer.abort_transaction(30)
        producer.begin_transaction()
        changelog.produce(producer, [("later-tombstoned", 0, None)], noop)
        producer.commit_transaction(30)
        restored = changelog.restore([0], timeout_s=60)
    finally:
        changelog.close()
    assert restored == {0: {"kept": kept}}
    # the aborted record is on the log all the same: read_committed is what keeps it out
    assert state_key(GROUP, "aborted") in {k for k, _ in _read_state(settings, "read_uncommitted")}
