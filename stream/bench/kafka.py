"""Benchmark plumbing shared by every ``fabwatch bench`` command, and the raw Kafka baseline."""

from __future__ import annotations

import os
import platform
import sys
import time
import uuid

import numpy as np
import orjson
from confluent_kafka import Consumer, Producer

from fabwatch.stream.kafka.config import Settings
from fabwatch.stream.kafka.outputs import produce_waiting
from fabwatch.stream.kafka.topics import ensure_topics


def machine_info() -> dict:
    """What the figures were measured on, and the command that produced them."""
    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "command": " ".join(["fabwatch", *sys.argv[1:]])}


def percentiles_ms(samples_s: list[float] | np.ndarray) -> dict[str, float]:
    arr = np.asarray(samples_s, dtype=np.float64) * 1000.0
    return {"p50_ms": round(float(np.percentile(arr, 50)), 3), "p99_ms": round(float(np.percentile(arr, 99)), 3)}


def synthetic_readings(count: int, entities: int = 100, features: int = 12, seed: int = 0) -> list[tuple[bytes, bytes]]:
    """(key, value) pairs of ~200-byte JSON readings, as sensors would send them."""
    rng = np.random.default_rng(seed)
    values = np.round(rng.standard_normal((count, features)) * 1000, 7)
    base = 1_790_000_000_000
    return [(f"OHT-{i % entities:03d}".encode(),
             orjson.dumps({"entity": f"OHT-{i % entities:03d}", "ts": base + i * 1000, "values": values[i].tolist()}))
            for i in range(count)]


def kafka_baseline(settings: Settings, messages: int = 200_000) -> dict:
    """Raw produce rate (idempotent producer, acks=all, until flushed) and consume rate of one consumer."""
    topic = f"fabwatch.bench.{uuid.uuid4().hex[:8]}"
    ensure_topics(settings, [topic])
    payload = synthetic_readings(messages)
    producer = Producer(settings.client_config(**{"enable.idempotence": True, "linger.ms": 5,
                                                  "batch.num.messages": 10000, "compression.type": "lz4"}))
    start = time.perf_counter()
    for key, value in payload:
        produce_waiting(producer, topic, value, key)
        producer.poll(0)
    producer.flush(60)
    produce_s = time.perf_counter() - start

    consumer = Consumer(settings.client_config(**{"group.id": f"bench-{uuid.uuid4().hex[:8]}",
                                                  "auto.offset.reset": "earliest", "enable.auto.commit": False}))
    consumer.subscribe([topic])
    received, start = 0, None
    deadline = time.monotonic() + 120
    while received < messages and time.monotonic() < deadline:
        batch = consumer.consume(10_000, timeout=1.0)
        if batch and start is None:
            start = time.perf_counter()
        received += sum(1 for m in batch if m.error() is None)
    consume_s = time.perf_counter() - (start or time.perf_counter())
    consumer.close()
    return {
        "machine": machine_info(),
        "messages": messages,
        "message_bytes": round(float(np.mean([len(v) for _, v in payload[:1000]])), 1),
        "produce_msgs_per_s": round(messages / produce_s),
        "consumed": received,
        "consume_msgs_per_s": round(received / consume_s) if consume_s > 0 else None,
    }
