"""Re-reading a partition's past, the way the serving loops rebuild their in-memory state on assignment
(sensor windows in the processor, open sessions in the log server): backwards from the committed offset,
``chunk`` messages at a time, until the caller has enough, the partition's start, a message cap or a time
limit (a sparse key must not hold the assignment). The reading consumer never commits."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from fabwatch.stream.kafka.retry import retry_transient


@dataclass
class History:
    chunks: list[list[Message]]  # newest first
    start: int                   # offset of the oldest message read (the range is [start, end))
    limit: str | None            # why the read stopped before the caller had enough, or None


def read_back(reader: Consumer, topic: str, partition: int, end: int, chunk: int, max_messages: int,
              timeout_s: float, enough: Callable[[list[Message]], bool]) -> History:
    """Chunks of ``[.., end)`` newest first; ``enough(chunk)`` sees each chunk as it is read and ends the read
    by returning True."""
    tp = TopicPartition(topic, partition)
    low, _ = retry_transient(lambda: reader.get_watermark_offsets(tp, timeout=10),
                             f"reading the offsets of partition {partition}")
    deadline = time.monotonic() + timeout_s
    chunks: list[list[Message]] = []
    hi, limit = end, None
    while hi > low:
        if end - hi >= max_messages:
            limit = f"the {max_messages}-message cap"
            break
        lo = max(low, hi - chunk)
        msgs = read_range(reader, topic, partition, lo, hi, deadline)
        if msgs is None:
            limit = f"the {timeout_s:g} s time limit"
            break
        chunks.append(msgs)
        hi = lo
        if enough(msgs):
            break
    return History(chunks, hi, limit)


def read_range(reader: Consumer, topic: str, partition: int, lo: int, hi: int, deadline: float) -> list[Message] | None:
    """Messages with offsets in [lo, hi) of one partition; None when ``deadline`` (monotonic) passes first."""
    reader.assign([TopicPartition(topic, partition, lo)])
    out: list[Message] = []
    complete = False
    while not complete and time.monotonic() < deadline:
        # asking for exactly what is left returns as soon as it is there (offset gaps: the timeout)
        batch = reader.consume(max(1, min(10_000, hi - lo - len(out))), 0.5)
        for m in batch:
            if m.error() is None and m.offset() < hi:
                out.append(m)
        last = batch[-1] if batch else None
        complete = (last is not None and ((last.error() is None and last.offset() >= hi - 1) or (
            last.error() is not None and last.error().code() == KafkaError._PARTITION_EOF))) or \
            reader.position([TopicPartition(topic, partition)])[0].offset >= hi
    reader.unassign()
    return out if complete else None
