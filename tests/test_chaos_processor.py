"""Fault injection, part 2: ``fabwatch serve`` on a real broker, fed readings mixed with poison pills.

It must keep going, dead-letter every pill with its reason, and raise exactly the alerts an undisturbed
run raises on the readings alone (spikes after the pills included: none lost, none duplicated).
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import orjson
import pytest

from fabwatch.stream.kafka.topics import ensure_topics
from onnx_fixtures import make_registry, readings
from stream_helpers import produce, read_all, start_serve, stop
from test_processor import reference_ids

pytestmark = [pytest.mark.integration, pytest.mark.chaos]
ENTITIES = [f"OHT-{i:03d}" for i in range(4)]
Y2100_MS = 4_102_444_800_000


def poison_pills(t_ms: int) -> list[tuple[bytes, bytes, str]]:
    """(key, value, expected reason) for each pill of issue #16; ``t_ms`` is the stream's current time."""
    big = b'{"entity": "OHT-000", "ts": 1, "values": [1, 2, 3, "' + b"x" * 900_000 + b'"]}'
    return [
        (b"OHT-000", b'{"entity": "OHT-000", "ts": 1' + b"0" * 309 + b', "values": [1, 2, 3, 4]}', "bad_timestamp"),
        (b"OHT-001", b'{"entity": "OHT-001", "ts": ' + str(t_ms * 1000).encode() + b', "values": [1, 2, 3, 4]}',
         "bad_timestamp"),  # microseconds
        (b"OHT-002", orjson.dumps({"entity": "OHT-002", "ts": Y2100_MS, "values": [1, 2, 3, 4]}), "clock_skew"),
        (b"OHT-003", b'{"entity": "OHT-003", "ts": 1e400, "values": [1, 2, 3, 4]}', "bad_timestamp"),
        (b"OHT-003", b'{"entity": "OHT-003", "ts": 1, "values": [1, 2, 3, 1' + b"0" * 400 + b"]}", "non_finite"),
        (b"OHT-000", b'{"entity": "OHT-000", "ts": "9999-12-31T23:59:59-23:59", "values": [1, 2, 3, 4]}',
         "bad_timestamp"),
        (b"OHT-000", big, "schema"),  # a dead letter of it in full would be over 1 MB
    ]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["at-least-once", "exactly-once"])
def test_processor_survives_poison_pills_and_alerts_on_the_spike_after_them(settings, tmp_path: Path, mode) -> None:
    ensure_topics(settings, settings.topics.all(), partitions=3)
    registry = tmp_path / "registry"
    make_registry(registry)
    data = readings(ENTITIES, 220, seed=11, spikes={"OHT-001": [190], "OHT-002": [200]})
    cut = 120 * len(ENTITIES)
    pills = poison_pills(data[cut]["ts"])
    raw = [orjson.dumps(r) for r in data[:cut]] + [v for _, v, _ in pills] + [orjson.dumps(r) for r in data[cut:]]
    keys = [r["entity"].encode() for r in data[:cut]] + [k for k, _, _ in pills] + \
        [r["entity"].encode() for r in data[cut:]]
    produce(settings, settings.topics.sensors, raw, keys=keys)
    expected = reference_ids(registry, data)
    assert len(expected) >= 2  # both spikes come after the pills

    log = tmp_path / "serve.log"
    proc = start_serve(settings, registry, *(["--exactly-once"] if mode == "exactly-once" else []), log_path=log)
    try:
        dead = [json.loads(v) for v in read_all(settings, settings.topics.dlq, expect=len(pills), timeout_s=90)]
        alerts = [json.loads(v) for v in read_all(settings, settings.topics.alerts, expect=len(expected),
                                                  timeout_s=60)]
        assert proc.poll() is None, log.read_text()[-3000:]  # still serving
    finally:
        rc = stop(proc)
    assert rc == 0, log.read_text()[-3000:]
    assert sorted(d["reason"] for d in dead) == sorted(r for _, _, r in pills)
    ids = [a["alert_id"] for a in alerts]
    assert sorted(ids) == sorted(expected)  # none lost, none duplicated
    letter = next(d for d in dead if d["value_bytes"] == len(pills[-1][1]))
    assert letter["truncated"] and letter["value_sha256"] == hashlib.sha256(pills[-1][1]).hexdigest()
    assert pills[-1][1].startswith(base64.b64decode(letter["value_b64"]))
    for d in dead:
        assert d["detail"] and d["source"]["topic"] == settings.topics.sensors


def test_a_dead_letter_the_producer_refuses_is_retried_without_payload_then_counted(settings) -> None:
    """A producer limit of 1000 bytes (librdkafka's least) stands for any limit a dead letter can hit."""
    from confluent_kafka import Consumer, Producer

    from fabwatch.stream.kafka.outputs import DeadLetters
    from fabwatch.stream.schemas import RejectReason

    ensure_topics(settings, [settings.topics.sensors, settings.topics.dlq], partitions=1)
    value = b"x" * 5000
    produce(settings, settings.topics.sensors, [value], keys=[b"k"])
    consumer = Consumer(settings.client_config(**{"group.id": "dl-test", "auto.offset.reset": "earliest"}))
    consumer.subscribe([settings.topics.sensors])
    msgs: list = []
    while not msgs:
        msgs = [m for m in consumer.consume(1, 10) if m.error() is None]
    consumer.close()
    lost: list[RejectReason] = []
    producer = Producer(settings.client_config(**{"message.max.bytes": 1000}))
    letters = DeadLetters(producer, settings.topics.dlq, lost.append)
    letters.send(msgs[0], RejectReason.bad_json, "not JSON", 0)  # fits once its payload is dropped
    letters.send(msgs[0], RejectReason.bad_json, "d" * 1500, 0)  # does not fit even then: counted
    assert producer.flush(10) == 0
    assert lost == [RejectReason.bad_json]
    (got,) = [json.loads(v) for v in read_all(settings, settings.topics.dlq, expect=1, timeout_s=30)]
    assert got["value_b64"] == "" and got["truncated"] and got["value_bytes"] == 5000
    assert got["value_sha256"] == hashlib.sha256(value).hexdigest() and got["detail"] == "not JSON"
