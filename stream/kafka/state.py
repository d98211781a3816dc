"""The alert policy's changelog: a compacted topic that holds every non-quiet key, so a restarted or rebalanced
processor resumes its open alerts, runs and cooldowns however many there are (the Kafka Streams approach).

Layout (``fabwatch.policy-state``, ``FABWATCH_TOPIC_POLICY_STATE``): compacted, as many partitions as the sensor
topic and co-partitioned with it, the state of sensor partition p lives in state partition p.

- key: the JSON array ``[group id, entity]``, so two processor groups on one sensor topic keep apart;
- value: ``{"v": 1, "open": bool, "run": int, "closed_at": ms or -1, "last_min": minute}`` (``KeyState``'s
  stored fields), or a tombstone (null) when the key went quiet or expired.

Writes: the processor hands the keys a batch changed (``AlertPolicy.take_changes``) to ``ChangeLog.produce``
with the batch's outputs: exactly-once, inside the batch's transaction (atomic with offsets and alerts);
at-least-once, once the outputs are delivered, flushed before the offsets are committed (the processor's
docstring says what a crash between the two flushes and the commit does). Restore: ``ChangeLog.restore`` reads
each assigned partition from its beginning to its end (read_committed: aborted writes are never seen), the last
record per key wins.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from fabwatch.export.errors import UsageError
from fabwatch.stream.kafka.config import Settings
from fabwatch.stream.kafka.retry import retry_transient
from fabwatch.stream.policy import KeyState

log = logging.getLogger("fabwatch.state")

STATE_VERSION = 1  # "v" of every value: a future layout can be told apart


def state_key(group_id: str, entity: str) -> bytes:
    return orjson.dumps([group_id, entity])


def encode_state(st: KeyState) -> bytes:
    return orjson.dumps({"v": STATE_VERSION, "open": st.open, "run": st.run, "closed_at": st.closed_at,
                         "last_min": st.last_min})


def decode_state(value: bytes, partition: int) -> KeyState:
    """Raises ``ValueError`` for a value that is not a version-1 state."""
    d = orjson.loads(value)
    if not isinstance(d, dict) or d.get("v") != STATE_VERSION:
        raise ValueError(f"not a version-{STATE_VERSION} state")
    fields = (d.get("open"), d.get("run"), d.get("closed_at"), d.get("last_min"))
    if not isinstance(fields[0], bool) or not all(type(f) is int for f in fields[1:]):
        raise ValueError("a field is missing or of the wrong type")
    return KeyState(partition=partition, open=fields[0], run=fields[1], closed_at=fields[2], last_min=fields[3])


class ChangeLog:
    """One processor group's keys on the state topic: ``produce`` the changes of a batch, ``restore`` partitions."""

    def __init__(self, settings: Settings, group_id: str):
        self.topic = settings.topics.policy_state
        self.group_id = group_id
        self._prefix = orjson.dumps([group_id])[:-1] + b","  # how every key of this group starts
        # assigned, never subscribed, offsets never committed: a restore always reads a partition whole
        self.reader = Consumer({**settings.client_config(), "group.id": f"{group_id}-state",
                                "enable.auto.commit": False, "isolation.level": "read_committed",
                                "enable.partition.eof": True})

    def check_copartitioned(self, sensors: str) -> None:
        """Raise ``UsageError`` unless the state topic has a partition for every partition of ``sensors``."""
        counts = {t: retry_transient(lambda: self._partition_count(t), f"the partitions of {t}")
                  for t in (sensors, self.topic)}
        if counts[self.topic] < counts[sensors]:
            raise UsageError(f"policy state topic {self.topic} has {counts[self.topic]} partitions, sensor topic "
                             f"{sensors} {counts[sensors]}: add partitions to {self.topic} to match")

    def _partition_count(self, topic: str) -> int:
        md = self.reader.list_topics(topic, timeout=10).topics.get(topic)
        if md is None:
            raise KafkaException(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))
        if md.error is not None:
            raise KafkaException(md.error)
        return len(md.partitions)

    def produce(self, producer: Producer, changes: Sequence[tuple[str, int, KeyState | None]],
                on_delivery: Callable) -> None:
        """Write each change to the partition of its key's sensor partition (a None state as a tombstone)."""
        for entity, partition, st in changes:
            producer.produce(self.topic, None if st is None else encode_state(st), state_key(self.group_id, entity),
                             partition=partition, on_delivery=on_delivery)

    def restore(self, partitions: Sequence[int], timeout_s: float) -> dict[int, dict[str, KeyState]]:
        """The non-quiet keys of this group on each partition, read from the beginning to the end. Past
        ``timeout_s`` the partitions not finished are logged and keep what was read (their other keys start quiet)."""
        records: dict[int, dict[bytes, bytes | None]] = {p: {} for p in partitions}
        behind = set(partitions)
        self.reader.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in partitions])
        deadline = time.monotonic() + timeout_s
        try:
            while behind and time.monotonic() < deadline:
                for m in self.reader.consume(10_000, 0.5):
                    err = m.error()
                    if err is not None:
                        # the end (compaction gaps and transaction markers make offsets no guide)
                        if err.code() == KafkaError._PARTITION_EOF:
                            behind.discard(m.partition())
                        continue
                    key = m.key()
                    if key is not None and key.startswith(self._prefix):
                        records[m.partition()][key] = m.value()
        finally:
            self.reader.unassign()
        if behind:
            log.warning("state topic %s: partitions %s not read to their end in %.0f s; their keys not read yet "
                        "start quiet (an open alert among them re-opens under a new id)", self.topic,
                        sorted(behind), timeout_s)
        return {p: self._decode(p, recs) for p, recs in records.items()}

    def _decode(self, partition: int, records: dict[bytes, bytes | None]) -> dict[str, KeyState]:
        states = {}
        for key, value in records.items():
            if value is None:
                continue
            try:
                states[orjson.loads(key)[1]] = decode_state(value, partition)
            except (ValueError, IndexError, TypeError) as exc:
                log.warning("state topic %s[%d]: ignoring the record of key %r (%s)", self.topic, partition, key, exc)
        return states

    def close(self) -> None:
        self.reader.close()
