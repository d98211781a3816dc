"""Replay a historical file into Kafka as readings, as fast as possible or at a multiple of the
recorded pace. Keyed by entity, idempotent producer, flushed before returning."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import orjson
from confluent_kafka import KafkaError, Producer
from tqdm import tqdm

from export.errors import UsageError
from stream.config import Settings
from stream.files import ColumnMap, Records, read_table, to_records


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


def load_records(path: Path, fmt: str | None = None, entity: str | None = None, ts: str | None = None,
                 features: Sequence[str] | None = None, label: str | None = None, strict: bool = False) -> Records:
    table = read_table(path, fmt)
    records = to_records(table, ColumnMap.resolve(table, entity, ts, features, label))
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


def replay(records: Records, settings: Settings, topic: str, speed: float | None = None, limit: int | None = None,
           loop: bool = False, progress: bool = True, rows_in_file: int | None = None) -> ReplaySummary:
    """Send ``records`` to ``topic``. ``speed=None`` is as fast as the broker takes; ``speed=X`` keeps
    X times the pace of the recorded timestamps. ``loop`` repeats the file with timestamps shifted
    past its end, so keys keep moving forward in time (the processor would drop repeats as duplicates)."""
    if speed is not None and speed <= 0:
        raise UsageError("--speed must be positive")
    n = len(records.ts)
    if n == 0:
        raise UsageError("no valid rows to replay")
    summary = ReplaySummary(topic=topic, rows_in_file=rows_in_file or n,
                            rejected=dict(Counter(str(r) for _, r, _ in records.rejected)))
    errors = 0

    def on_delivery(err: KafkaError | None, _msg) -> None:
        nonlocal errors
        if err is not None:
            errors += 1

    producer = Producer(settings.client_config(**{"enable.idempotence": True, "linger.ms": 5,
                                                  "compression.type": "lz4", "batch.num.messages": 10000}))
    span = int(records.ts[-1] - records.ts[0])
    step = int(np.median(np.diff(records.ts))) if n > 1 else 1000
    total = limit if limit is not None else (None if loop else n)
    bar = tqdm(total=total, unit="msg", desc=f"replay -> {topic}", disable=not progress, smoothing=0.1)
    start = time.perf_counter()
    sent, lap = 0, 0
    chunk = 1 if speed is not None else 1000  # progress-bar granularity
    try:
        while True:
            offset = lap * (span + max(step, 1))
            values = encode_readings(records, offset)
            keys = [e.encode() for e in records.entity]
            rel_s = (records.ts - records.ts[0]).astype(np.float64) / 1000.0
            lap_start = time.perf_counter()
            for i in range(n):
                if limit is not None and sent >= limit:
                    break
                if speed is not None:
                    wait = lap_start + rel_s[i] / speed - time.perf_counter()
                    if wait > 0:
                        producer.poll(0)
                        time.sleep(wait)
                while True:
                    try:
                        producer.produce(topic, values[i], keys[i], on_delivery=on_delivery)
                        break
                    except BufferError:
                        producer.poll(0.05)
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
