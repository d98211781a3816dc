"""Replay a historical file into Kafka, as fast as possible or at a multiple of the recorded pace:
readings from CSV / Parquet / JSONL (keyed by entity) or log keys parsed from a raw HDFS log (keyed by
session). Both become ``Messages`` and go through the one producer loop: idempotent, flushed before
returning."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import orjson
from confluent_kafka import KafkaError, Producer
from tqdm import tqdm

from fabwatch.export.errors import UsageError
from fabwatch.stream.kafka.config import Settings
from fabwatch.stream.offline.files import ColumnMap, Records, read_table, to_records
from fabwatch.stream.kafka.outputs import produce_waiting
from fabwatch.stream.kafka.topics import ensure_topics

if TYPE_CHECKING:
    from fabwatch.stream.logs.parse import DrainState


@dataclass
class Messages:
    """What ``replay`` sends, in order: Kafka keys, values and event times (epoch ms, what ``--speed``
    paces by). ``shifted(offset_ms)`` re-encodes the values with their timestamps moved forward for
    each ``--loop`` lap; None where a repeat would not be new data."""

    keys: list[bytes]
    values: list[bytes]
    ts: np.ndarray
    rows_in_file: int
    rejected: dict[str, int] = field(default_factory=dict)
    shifted: Callable[[int], list[bytes]] | None = None


@dataclass
class ReplaySummary:
    topic: str
    rows_in_file: int
    sent: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    delivery_errors: int = 0
    seconds: float = 0.0

    @property
    def msgs_per_s(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {"topic": self.topic, "rows_in_file": self.rows_in_file, "sent": self.sent,
                "rejected": self.rejected, "delivery_errors": self.delivery_errors,
                "seconds": round(self.seconds, 3), "msgs_per_s": round(self.msgs_per_s)}


def load_records(path: Path, fmt: str | None = None, *, entity_col: str | None = None, ts_col: str | None = None,
                 features: Sequence[str] | None = None, label_col: str | None = None, entity: str | None = None,
                 strict: bool = False) -> Records:
    """A file's readings as `replay` sends them and `evaluate` scores them (column options as in `train`)."""
    table = read_table(path, fmt)
    records = to_records(table, ColumnMap.resolve(table, entity_col=entity_col, ts_col=ts_col, features=features,
                                                  label_col=label_col, entity=entity))
    if strict and records.rejected:
        row, reason, detail = min(records.rejected)
        raise UsageError(f"{Path(path).name} row {row + 1}: {reason}: {detail} (--strict)")
    return records


def encode_readings(records: Records, ts_offset_ms: int = 0) -> list[bytes]:
    """One JSON reading per row, features by name so any model's feature order can consume them."""
    names = records.feature_names
    values = records.values.tolist()
    labels = records.label.tolist() if records.label is not None else None
    out = []
    for i, (entity, ts) in enumerate(zip(records.entity, (records.ts + ts_offset_ms).tolist())):
        msg = {"entity": entity, "ts": ts, "features": dict(zip(names, values[i]))}
        if labels is not None and labels[i] >= 0:
            msg["label"] = labels[i]
        out.append(orjson.dumps(msg))
    return out


def reading_messages(records: Records, rows_in_file: int | None = None) -> Messages:
    """Readings keyed by entity; ``--loop`` laps shift their timestamps."""
    return Messages(keys=[e.encode() for e in records.entity], values=encode_readings(records), ts=records.ts,
                    rows_in_file=rows_in_file or len(records.ts),
                    rejected=dict(Counter(str(r) for _, r, _ in records.rejected)),
                    shifted=partial(encode_readings, records))


def log_messages(path: Path, templates: Path | None = None, drain: DrainState | None = None) -> Messages:
    """Raw HDFS log -> one ``LogKey`` per (line, block), keyed by session, in line order; keys as
    ``parse_file`` makes them (``drain``: the Drain state of the model that will score them).

    No ``--loop``: the serving side orders a session's keys by line number, so a repeat would be
    dropped as duplicates (readings repeat with shifted timestamps instead).
    """
    from fabwatch.stream.logs.parse import parse_file

    rows, _ = parse_file(path, templates, drain)
    if not rows:
        raise UsageError(f"{Path(path).name}: no HDFS log line names a block")
    values = [orjson.dumps({"session": r.block_id, "ts": r.ts, "key": r.event_id, "line": r.line_id}) for r in rows]
    return Messages(keys=[r.block_id.encode() for r in rows], values=values,
                    ts=np.fromiter((r.ts for r in rows), dtype=np.int64, count=len(rows)), rows_in_file=len(rows))


def replay(messages: Messages, settings: Settings, topic: str, speed: float | None = None, limit: int | None = None,
           loop: bool = False, progress: bool = True) -> ReplaySummary:
    """Send ``messages`` to ``topic`` (created when missing). ``speed=None`` is as fast as the broker takes; ``speed=X`` keeps
    X times the pace of the recorded timestamps. ``loop`` repeats them with timestamps shifted past
    their end, so keys keep moving forward in time (the processor would drop repeats as duplicates)."""
    if speed is not None and speed <= 0:
        raise UsageError("--speed must be positive")
    if loop and messages.shifted is None:
        raise UsageError("--loop: these messages cannot be repeated (log keys are ordered by line number)")
    n = len(messages.ts)
    if n == 0:
        raise UsageError("no valid rows to replay")
    ensure_topics(settings, [topic])
    summary = ReplaySummary(topic=topic, rows_in_file=messages.rows_in_file, rejected=messages.rejected)
    errors = 0

    def on_delivery(err: KafkaError | None, _msg) -> None:
        nonlocal errors
        if err is not None:
            errors += 1

    producer = Producer(settings.client_config(**{"enable.idempotence": True, "linger.ms": 5,
                                                  "compression.type": "lz4", "batch.num.messages": 10000}))
    ts, keys = messages.ts, messages.keys
    span = int(ts.max() - ts.min())
    step = int(np.median(np.diff(ts))) if n > 1 else 1000
    rel_s = (ts - ts[0]).astype(np.float64) / 1000.0
    total = limit if limit is not None else (None if loop else n)
    bar = tqdm(total=total, unit="msg", desc=f"replay -> {topic}", disable=not progress, smoothing=0.1)
    start = time.perf_counter()
    sent, lap = 0, 0
    chunk = 1 if speed is not None else 1000  # progress-bar granularity
    try:
        while True:
            values = messages.values if lap == 0 else messages.shifted(lap * (span + max(step, 1)))
            lap_start = time.perf_counter()
            for i in range(n):
                if limit is not None and sent >= limit:
                    break
                if speed is not None:
                    wait = lap_start + rel_s[i] / speed - time.perf_counter()
                    if wait > 0:
                        producer.poll(0)
                        time.sleep(wait)
                produce_waiting(producer, topic, values[i], keys[i], on_delivery=on_delivery)
                producer.poll(0)
                sent += 1
                if sent % chunk == 0:
                    bar.update(chunk)
            lap += 1
            if not loop or (limit is not None and sent >= limit):
                break
        remaining = producer.flush(60)
    finally:
        bar.update(sent % chunk)
        bar.close()
    summary.seconds = time.perf_counter() - start
    summary.sent = sent - remaining
    summary.delivery_errors = errors + remaining
    return summary
