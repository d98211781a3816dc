"""The real broker: keyed round trip with per-key order, idempotent topic creation with the broker's
replication factor, and the `fabwatch broker` lifecycle leaving no process behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType
from pydantic import ValidationError

from fabwatch.stream.kafka.config import Settings
from fabwatch.stream.kafka.topics import ensure_topics

pytestmark = pytest.mark.integration


def test_thousand_keyed_messages_round_trip_in_per_key_order(settings: Settings, unique_topic: str):
    ensure_topics(settings, [unique_topic], partitions=3)
    producer = Producer(settings.client_config(**{"enable.idempotence": True}))
    for i in range(1000):
        key = f"OHT-{i % 17:03d}"
        producer.produce(unique_topic, json.dumps({"entity": key, "seq": i}).encode(), key.encode())
    assert producer.flush(30) == 0

    consumer = Consumer(settings.client_config(**{"group.id": f"g-{uuid.uuid4().hex[:6]}",
                                                  "auto.offset.reset": "earliest"}))
    consumer.subscribe([unique_topic])
    seen: dict[str, list[int]] = defaultdict(list)
    partitions_of: dict[str, set[int]] = defaultdict(set)
    for _ in range(60):
        for msg in consumer.consume(500, timeout=1.0):
            assert msg.error() is None
            key = msg.key().decode()
            seen[key].append(json.loads(msg.value())["seq"])
            partitions_of[key].add(msg.partition())
        if sum(map(len, seen.values())) >= 1000:
            break
    consumer.close()

    assert sum(map(len, seen.values())) == 1000
    assert all(seq == sorted(seq) for seq in seen.values()), "per-key order lost"
    assert all(len(p) == 1 for p in partitions_of.values()), "a key spread over partitions"
    assert len(set().union(*partitions_of.values())) == 3, "keys did not use all 3 partitions"


def test_topic_creation_is_idempotent(settings: Settings):
    first = ensure_topics(settings, partitions=2)
    assert set(first.values()) == {"created"} and set(first) == set(settings.topics.all())
    assert set(ensure_topics(settings, partitions=2).values()) == {"exists"}
    md = AdminClient(settings.client_config()).list_topics(timeout=10)
    assert len(md.topics[settings.topics.alerts].partitions) == 2
    # the silence topic is a table: one partition, compacted (the latest value per silence id)
    assert len(md.topics[settings.topics.silences].partitions) == 1
    resource = ConfigResource(ResourceType.TOPIC, settings.topics.silences)
    admin = AdminClient(settings.client_config())  # held: a collected client cancels the request
    configs = admin.describe_configs([resource])[resource].result(timeout=10)
    assert configs["cleanup.policy"].value == "compact"


def test_topics_get_the_brokers_replication_factor_by_default(settings: Settings, unique_topic: str, monkeypatch):
    requested: list[int] = []
    create_topics = AdminClient.create_topics

    def spy(self: AdminClient, new_topics: list, **kwargs):
        requested.extend(t.replication_factor for t in new_topics)
        return create_topics(self, new_topics, **kwargs)

    monkeypatch.setattr(AdminClient, "create_topics", spy)
    assert ensure_topics(settings, [unique_topic], partitions=2) == {unique_topic: "created"}
    assert requested == [-1]  # the CreateTopics request leaves the choice to the broker
    admin = AdminClient(settings.client_config())
    deadline = time.monotonic() + 30
    while not (md := admin.list_topics(unique_topic, timeout=10)).topics[unique_topic].partitions:
        assert time.monotonic() < deadline, "the new topic's partitions never showed in the metadata"
        time.sleep(0.2)
    broker = ConfigResource(ResourceType.BROKER, str(next(iter(md.brokers))))
    configs = admin.describe_configs([broker])[broker].result(timeout=10)
    default = int(configs["default.replication.factor"].value)
    assert [len(p.replicas) for p in md.topics[unique_topic].partitions.values()] == [default, default]


@pytest.mark.parametrize(("env", "accepted"), [("-1", True), ("3", True), ("0", False), ("-2", False)])
def test_replication_factor_is_the_brokers_default_or_positive(monkeypatch, env: str, accepted: bool):
    monkeypatch.setenv("FABWATCH_REPLICATION_FACTOR", env)
    if accepted:
        assert Settings().replication_factor == int(env)
    else:
        with pytest.raises(ValidationError, match="replication_factor"):
            Settings()


def test_security_settings_pass_through_to_librdkafka(monkeypatch):
    monkeypatch.setenv("FABWATCH_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("FABWATCH_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("FABWATCH_SASL_USERNAME", "fab")
    monkeypatch.setenv("FABWATCH_SASL_PASSWORD", "secret")
    monkeypatch.setenv("FABWATCH_KAFKA_OPTIONS", '{"client.rack": "bay-3"}')
    conf = Settings(bootstrap="broker:9093").client_config()
    assert conf == {"bootstrap.servers": "broker:9093", "security.protocol": "SASL_SSL",
                    "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "fab", "sasl.password": "secret",
                    "client.rack": "bay-3"}


def _fabwatch(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FABWATCH_HOME": str(home)}
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    return subprocess.run([sys.executable, "-m", "fabwatch.stream.cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=180)


def _process_state(pid: int) -> str | None:
    """Kernel state letter of ``pid``, None once it is gone (Z: exited, waiting for its reaper)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def test_broker_cli_up_twice_status_down_leaves_no_process(tmp_path: Path):
    up = _fabwatch(tmp_path, "broker", "up", "--json")
    assert up.returncode == 0, up.stderr
    first = json.loads(up.stdout)
    assert first["started"] is True
    try:
        again = json.loads(_fabwatch(tmp_path, "broker", "up", "--json").stdout)
        assert again == {**first, "started": False}, "second `up` must be a no-op reporting the same broker"

        status = _fabwatch(tmp_path, "broker", "status", "--json")
        assert status.returncode == 0
        info = json.loads(status.stdout)
        assert info["running"] and info["healthy"] and info["bootstrap"] == first["bootstrap"]
    finally:
        down = _fabwatch(tmp_path, "broker", "down", "--json")
    assert down.returncode == 0 and json.loads(down.stdout) == {"stopped": True}
    assert _process_state(first["pid"]) in (None, "Z"), "broker process survived `down`"
    after = _fabwatch(tmp_path, "broker", "status", "--json")
    assert after.returncode == 1 and json.loads(after.stdout)["running"] is False


def test_missing_java_is_a_one_line_usage_error(tmp_path: Path):
    env = {**os.environ, "FABWATCH_HOME": str(tmp_path), "PATH": "/nonexistent"}
    proc = subprocess.run([sys.executable, "-m", "fabwatch.stream.cli.main", "broker", "up"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("fabwatch: Java not found")


def test_cluster_ids_never_start_with_a_dash():
    """The storage tool reads an id starting with '-' as an option; base64url draws one in 64 of those."""
    from fabwatch.stream.kafka.broker import cluster_id

    ids = [cluster_id() for _ in range(2000)]
    assert not [i for i in ids if i.startswith("-")]
    assert len(set(ids)) == len(ids) and all(len(i) == 22 for i in ids)


def test_the_policy_state_topic_is_compacted_and_co_partitioned_with_the_sensors(settings: Settings,
                                                                                 unique_topic: str):
    from fabwatch.export.errors import UsageError
    from fabwatch.stream.kafka.state import ChangeLog

    t = settings.topics
    ensure_topics(settings, [t.sensors], partitions=4)
    ensure_topics(settings, [t.policy_state], partitions=2)  # the sensor topic's count wins
    admin = AdminClient(settings.client_config())
    deadline = time.monotonic() + 30
    while t.policy_state not in (topics := admin.list_topics(timeout=10).topics) and time.monotonic() < deadline:
        time.sleep(0.2)  # a topic created a moment ago may not be in every broker's metadata yet
    assert len(topics[t.policy_state].partitions) == 4
    resource = ConfigResource(ResourceType.TOPIC, t.policy_state)
    assert admin.describe_configs([resource])[resource].result(timeout=10)["cleanup.policy"].value == "compact"
    ChangeLog(settings, "g").check_copartitioned(t.sensors)
    ensure_topics(settings, [unique_topic], partitions=1)  # a state topic short of partitions is refused
    short = settings.model_copy(update={"topics": t.model_copy(update={"policy_state": unique_topic})})
    with pytest.raises(UsageError, match="add partitions"):
        ChangeLog(short, "g").check_copartitioned(t.sensors)
