"""Rebalances, window rebuild and the exactly-once rewind against a real broker (issue #16, items 5 and 7)."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

import fabwatch.stream.processor as processor_module
import fabwatch.stream.kafka.transactions as transactions_module
from fabwatch.stream.processor import Processor, ProcessorConfig
from onnx_fixtures import make_registry, readings
from stream_helpers import (PARTITIONS, committed_offsets, log_has, produce, read_all, start_serve, stop,
                            wait_for)
from test_processor import ENTITIES, reference_ids

pytestmark = pytest.mark.integration


class AbortFirstCommit(Producer):
    """A transactional producer whose first ``commit_transaction`` fails with an abortable error."""

    aborted = 0

    def commit_transaction(self, *args: object) -> None:
        if not type(self).aborted:
            type(self).aborted += 1
            raise KafkaException(KafkaError(KafkaError._STATE, "injected abortable error", txn_requires_abort=True))
        super().commit_transaction(*args)


def consume_n(proc: Processor, n: int, timeout_s: float = 60.0) -> list:
    """Up to ``n`` messages from the processor's consumer (its assignment callbacks run meanwhile)."""
    msgs: list = []
    deadline = time.monotonic() + timeout_s
    while len(msgs) < n and time.monotonic() < deadline:
        msgs += [m for m in proc.consumer.consume(1000, 1.0) if m.error() is None]
    return msgs


class WedgeFirstSendOffsets(Producer):
    """A transactional producer whose first ``send_offsets_to_transaction`` never returns (until ``release``),
    as librdkafka's can after a broker restart (confluentinc/librdkafka#5456)."""

    created: list[Producer] = []
    release = threading.Event()

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        type(self).created.append(self)

    def send_offsets_to_transaction(self, *args: object) -> None:
        if self is type(self).created[0]:
            type(self).release.wait(300)
            return
        super().send_offsets_to_transaction(*args)


def test_a_wedged_transactional_producer_is_replaced_and_the_batch_redone_once(topics, tmp_path,
                                                                              monkeypatch) -> None:
    """The first transaction's send_offsets never returns: past the transaction timeout the processor gives the
    producer up, a new one with the same transactional.id fences it (its open transaction, holding the batch's
    alerts, is aborted), the assignment is rewound, and the redone batch commits every alert exactly once."""
    monkeypatch.setattr(transactions_module, "Producer", WedgeFirstSendOffsets)
    WedgeFirstSendOffsets.created, WedgeFirstSendOffsets.release = [], threading.Event()
    registry = tmp_path / "registry"
    make_registry(registry, window=10)
    data = readings(ENTITIES, 40, seed=23, spikes={e: [25] for e in ENTITIES})
    expected = reference_ids(registry, data)
    assert expected
    produce(topics, topics.topics.sensors, data)
    group = f"wedge-{uuid.uuid4().hex[:8]}"
    proc = Processor(topics, ProcessorConfig(registry=registry, group_id=group, exactly_once=True,
                                             transaction_timeout_ms=3000))
    try:
        proc.txn.init()
        first = proc.producer
        proc.consumer.subscribe([topics.topics.sensors], on_assign=proc._on_assign, on_revoke=proc._on_revoke)
        msgs = consume_n(proc, len(data))
        assert len(msgs) == len(data)
        proc._handle(msgs)  # wedged, given up, replaced, rewound
        assert proc.producer is not first and proc.dead_letters.producer is proc.producer
        assert proc.metrics.registry.get_sample_value("fabwatch_producer_recreated_total") == 1
        again = consume_n(proc, len(data))
        assert sorted((m.partition(), m.offset()) for m in again) == sorted((m.partition(), m.offset()) for m in msgs)
        proc._handle(again)
        got = committed_offsets(topics, group, topics.topics.sensors, PARTITIONS)
    finally:
        WedgeFirstSendOffsets.release.set()
        proc._close()
    assert got == {p: sum(1 for m in msgs if m.partition() == p) for p in range(PARTITIONS)}
    ids = [json.loads(v)["alert_id"] for v in read_all(topics, topics.topics.alerts)]
    assert sorted(ids) == sorted(expected)  # read_committed: the wedged transaction's copies were aborted
    assert len(read_all(topics, topics.topics.alerts, committed_only=False)) == 2 * len(expected)


class CoordinatorLostOnRewind(Consumer):
    """A consumer whose committed-offsets read fails once the first one's rewind begins (``lost`` set), as when
    librdkafka keeps a group coordinator that went away (confluentinc/librdkafka#5511)."""

    created: list[Consumer] = []
    lost = threading.Event()

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        type(self).created.append(self)

    def committed(self, *args: object, **kwargs: object) -> list:
        if self is type(self).created[0] and type(self).lost.is_set():
            raise KafkaException(KafkaError(KafkaError._STATE, "injected: no group coordinator"))
        return super().committed(*args, **kwargs)


def test_a_consumer_that_cannot_rewind_is_replaced_and_the_batch_redone_once(topics, tmp_path, monkeypatch) -> None:
    """The transaction is given up (wedged producer) and the consumer cannot read the committed offsets for the
    rewind: a new consumer joins the group in its place, gets the partitions, and the batch is redone once."""
    monkeypatch.setattr(transactions_module, "Producer", WedgeFirstSendOffsets)
    monkeypatch.setattr(processor_module, "Consumer", CoordinatorLostOnRewind)
    CoordinatorLostOnRewind.created, CoordinatorLostOnRewind.lost = [], threading.Event()
    WedgeFirstSendOffsets.created, WedgeFirstSendOffsets.release = [], threading.Event()
    registry = tmp_path / "registry"
    make_registry(registry, window=10)
    data = readings(ENTITIES, 40, seed=24, spikes={e: [25] for e in ENTITIES})
    expected = reference_ids(registry, data)
    produce(topics, topics.topics.sensors, data)
    group = f"coordlost-{uuid.uuid4().hex[:8]}"
    proc = Processor(topics, ProcessorConfig(registry=registry, group_id=group, exactly_once=True,
                                             transaction_timeout_ms=3000))
    first = proc.consumer
    try:
        proc.txn.init()
        proc._subscribe()
        msgs = consume_n(proc, len(data))
        assert len(msgs) == len(data)
        CoordinatorLostOnRewind.lost.set()
        proc._handle(msgs)  # producer replaced, rewind fails, consumer replaced
        assert proc.consumer is not first
        assert proc.metrics.registry.get_sample_value("fabwatch_consumer_recreated_total") == 1
        again = consume_n(proc, len(data))  # the new consumer's assignment starts from the committed offsets
        assert sorted((m.partition(), m.offset()) for m in again) == sorted((m.partition(), m.offset()) for m in msgs)
        proc._handle(again)
        got = committed_offsets(topics, group, topics.topics.sensors, PARTITIONS)
    finally:
        WedgeFirstSendOffsets.release.set()
        proc._close()
    assert got == {p: sum(1 for m in msgs if m.partition() == p) for p in range(PARTITIONS)}
    assert sorted(json.loads(v)["alert_id"] for v in read_all(topics, topics.topics.alerts)) == sorted(expected)


def test_an_aborted_transaction_never_lets_a_later_one_commit_past_unprocessed_messages(topics, registry,
                                                                                         monkeypatch) -> None:
    """No partition has a committed offset yet: after the abort, the positions of the aborted batch must be
    forgotten, or the next transaction (here holding partition ``first`` alone) commits them for the others."""
    monkeypatch.setattr(transactions_module, "Producer", AbortFirstCommit)
    data = readings(ENTITIES, 30, seed=21)
    produce(topics, topics.topics.sensors, data)
    group = f"rewind-{uuid.uuid4().hex[:8]}"
    proc = Processor(topics, ProcessorConfig(registry=registry, group_id=group, exactly_once=True))
    try:
        proc.txn.init()
        proc.consumer.subscribe([topics.topics.sensors], on_assign=proc._on_assign, on_revoke=proc._on_revoke)
        consume_all = lambda: consume_n(proc, len(data))  # noqa: E731
        msgs = consume_all()
        assert len({m.partition() for m in msgs}) == PARTITIONS
        proc._handle(msgs)  # every partition in one transaction: aborted, rewound
        assert AbortFirstCommit.aborted == 1
        again = consume_all()  # the rewind sought every partition back to its start
        assert sorted((m.partition(), m.offset()) for m in again) == sorted((m.partition(), m.offset()) for m in msgs)
        first = msgs[0].partition()
        proc._handle([m for m in again if m.partition() == first])  # the redo reaches ``first`` before the others
        got = committed_offsets(topics, group, topics.topics.sensors, PARTITIONS)
    finally:
        proc._close()
    assert got[first] == sum(1 for m in msgs if m.partition() == first)
    assert all(off < 0 for p, off in got.items() if p != first), got  # nothing committed for unprocessed data


def test_a_sparse_key_does_not_hold_the_rebuild_past_its_limits(topics, tmp_path, caplog) -> None:
    """``RARE`` has a reading before a long history of others and one after it: the rebuild stops at its
    message cap instead of chasing ``RARE``'s older reading back to the start, and says which key stayed short."""
    registry = tmp_path / "registry"
    make_registry(registry, window=10)
    rare = {"entity": "RARE", "ts": 1_700_000_000_000, "values": [10.0] * 4}
    busy = readings(ENTITIES, 150, seed=22, t0=1_700_000_100_000)
    produce(topics, topics.topics.sensors, [rare, *busy, {**rare, "ts": busy[-1]["ts"] + 1000}])
    group = f"sparse-{uuid.uuid4().hex[:8]}"
    committer = Processor(topics, ProcessorConfig(registry=registry, group_id=group))
    ends = {p: committer.rebuilder.get_watermark_offsets(TopicPartition(topics.topics.sensors, p), timeout=10)[1]
            for p in range(PARTITIONS)}
    committer.consumer.commit(offsets=[TopicPartition(topics.topics.sensors, p, o) for p, o in ends.items()],
                              asynchronous=False)
    committer._close()
    proc = Processor(topics, ProcessorConfig(registry=registry, group_id=group, rebuild_chunk=100,
                                             rebuild_max_messages=400))
    caplog.set_level(logging.INFO, logger="fabwatch.processor")
    loop = threading.Thread(target=proc.run, daemon=True)
    loop.start()
    try:
        wait_for(lambda: "assigned partitions" in caplog.text, 60, what="assignment")
    finally:
        proc.stop()
        loop.join(30)
    stopped = [r.getMessage() for r in caplog.records if "rebuild stopped at the 400-message cap" in r.getMessage()]
    assert len(stopped) == 1 and "RARE" in stopped[0] and "re-read offsets [" in stopped[0]
    start, end = map(int, re.search(r"re-read offsets \[(\d+), (\d+)\)", stopped[0]).groups())
    assert end - start == 400 and start > 0  # the cap, not the partition's start


def test_a_second_instance_takes_partitions_without_the_first_rebuilding_what_it_keeps(topics, registry,
                                                                                     tmp_path) -> None:
    """Cooperative-sticky: the joiner is handed partitions the first instance gives up; the first is never
    re-assigned (no rebuild) the partitions it keeps, and the alerts are those of one uninterrupted run."""
    data = readings(ENTITIES, 300, seed=23, spikes={e: [150 + 7 * i] for i, e in enumerate(ENTITIES[::3])})
    half = len(data) // 2
    expected = reference_ids(registry, data)
    group = f"coop-{uuid.uuid4().hex[:8]}"
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [start_serve(topics, registry, "--group", group, "--instance-id", "a", log_path=logs[0])]
    try:
        wait_for(lambda: log_has(logs[0], "assigned partitions ["), 60, what="first instance assigned")
        produce(topics, topics.topics.sensors, data[:half])
        wait_for(lambda: sum(max(o, 0) for o in committed_offsets(topics, group, topics.topics.sensors,
                                                                  PARTITIONS).values()) == half, 60,
                 what="first half committed")
        procs.append(start_serve(topics, registry, "--group", group, "--instance-id", "b", log_path=logs[1]))
        wait_for(lambda: re.search(r"assigned partitions \[\d", logs[1].read_text()) is not None, 60,
                 what="second instance holding partitions")
        produce(topics, topics.topics.sensors, data[half:])
        got = read_all(topics, topics.topics.alerts, expect=len(expected), timeout_s=90)
    finally:
        assert [stop(p) for p in procs] == [0] * len(procs)
    first, second = logs[0].read_text(), logs[1].read_text()
    assert len(re.findall(r"assigned partitions \[", first)) == 1, first  # only the initial assignment
    revoked = re.findall(r"revoked partitions \[([\d, ]+)\], keeping \[([\d, ]+)\]", first)
    assert revoked, first  # gave some up and kept the rest
    kept = {int(p) for p in revoked[0][1].split(",")}
    taken = {int(p) for p in re.search(r"assigned partitions \[([\d, ]+)\]", second).group(1).split(",")}
    assert taken == {int(p) for p in revoked[0][0].split(",")} and not kept & taken
    assert int(re.search(r"windows rebuilt for (\d+) keys", second).group(1)) > 0  # the joiner re-read history
    assert sorted(json.loads(v)["alert_id"] for v in got) == sorted(expected)
