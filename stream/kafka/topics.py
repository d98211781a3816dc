"""Idempotent creation of fabwatch's topics."""

from __future__ import annotations

from typing import Iterable

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from fabwatch.stream.kafka.config import Settings


def ensure_topics(settings: Settings, names: Iterable[str] | None = None, partitions: int | None = None,
                  timeout: float = 30.0) -> dict[str, str]:
    """Create the topics that do not exist yet, with ``settings.replication_factor`` (-1 lets the broker apply
    its ``default.replication.factor``). Returns ``{topic: "created" | "exists"}``.

    The silence topic is a table, not a stream: compacted (the latest value per silence id, a null value
    deletes it) and one partition, so its few messages keep one order whatever ``partitions`` says. The policy
    state topic is compacted too, with as many partitions as the sensor topic (co-partitioned: the state of
    sensor partition p lives in its partition p), taken from the sensor topic when that exists already."""
    names = list(names) if names is not None else settings.topics.all()
    admin = AdminClient(settings.client_config())
    existing = admin.list_topics(timeout=timeout).topics
    result = {n: "exists" for n in names if n in existing}
    t = settings.topics
    count = {t.silences: 1}
    if t.sensors in existing:
        count[t.policy_state] = len(existing[t.sensors].partitions)
    compacted = {t.silences, t.policy_state}
    todo = [NewTopic(n, num_partitions=count.get(n, partitions or settings.partitions),
                     replication_factor=settings.replication_factor,
                     config={"cleanup.policy": "compact"} if n in compacted else {})
            for n in names if n not in existing]
    if not todo:
        return result
    for name, fut in admin.create_topics(todo, operation_timeout=timeout, request_timeout=timeout).items():
        try:
            fut.result()
            result[name] = "created"
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
            result[name] = "exists"
    return result
