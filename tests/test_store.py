"""The trainer's Parquet store: day partitions, durable-then-commit, dedupe, retention, real broker."""

from __future__ import annotations

import json
import time
import uuid

import numpy as np
import pytest
from confluent_kafka import Producer

from fabwatch.stream.kafka.config import Settings
from fabwatch.models.sidecar.store import ReadingStore, StoreWriter
from fabwatch.stream.kafka.topics import ensure_topics

DAY = 86_400_000
T0 = 1_790_000_000_000 - (1_790_000_000_000 % DAY)  # midnight UTC


def _store(tmp_path) -> ReadingStore:
    return ReadingStore(tmp_path / "store", ["a", "b"])


def test_rows_land_in_their_day_and_load_dedupes(tmp_path):
    store = _store(tmp_path)
    ts = np.array([T0 + 1000, T0 + DAY + 5, T0 + 2000], np.int64)
    values = np.arange(6, dtype=np.float32).reshape(3, 2)
    store.write(["x", "x", "y"], ts, values, np.array([0, 1, -1], np.int8))
    store.write(["x"], ts[:1], values[:1], np.array([0], np.int8))  # re-read after a crash: a duplicate
    assert sorted(p.parent.name for p in store.files()) == ["day=2026-09-21", "day=2026-09-21", "day=2026-09-22"]
    table = store.load()
    assert table.num_rows == 3
    assert table.column("entity").to_pylist() == ["x", "x", "y"]
    assert table.column("ts").to_pylist() == [T0 + 1000, T0 + DAY + 5, T0 + 2000]
    assert store.load(recent_days=1).column("ts").to_pylist() == [T0 + DAY + 5]
    assert store.load(recent_days=1, older_sample=1).num_rows == 2


def test_retention_by_age_then_size(tmp_path):
    store = _store(tmp_path)
    for day in range(5):
        store.write(["e"] * 100, T0 + day * DAY + np.arange(100, dtype=np.int64), np.ones((100, 2), np.float32),
                    np.zeros(100, np.int8))
    assert store.enforce_retention(max_age_days=2.5, now_ms=T0 + 4 * DAY) == 1  # day 1 ends only 2 days ago
    assert store.enforce_retention(max_age_days=2, now_ms=T0 + 4 * DAY) == 1
    assert [p.parent.name for p in store.files()][0] == "day=2026-09-23"
    # without a clock, age counts from the newest day held: replayed history is not wiped
    assert store.enforce_retention(max_age_days=1.5) == 1
    assert [p.parent.name for p in store.files()] == ["day=2026-09-24", "day=2026-09-25"]
    one = store.files()[0].stat().st_size
    store.enforce_retention(max_bytes=one + 1)
    assert len(store.files()) == 1 and store.files()[0].parent.name == "day=2026-09-25"


def test_retention_is_not_counted_from_a_day_in_the_future(tmp_path):
    """A reading dated 2100 that got in (before the clock-skew bounds) must not make every real day old."""
    store = _store(tmp_path)
    for t in (T0, 4_102_444_800_000):
        store.write(["e"], np.array([t], np.int64), np.ones((1, 2), np.float32), np.zeros(1, np.int8))
    store.enforce_retention(max_age_days=3650)
    assert [p.parent.name for p in store.files()] == ["day=2026-09-21", "day=2100-01-01"]


@pytest.mark.integration
def test_writer_stores_valid_readings_and_commits_after_the_file(settings: Settings, tmp_path):
    ensure_topics(settings, [settings.topics.sensors])
    producer = Producer(settings.client_config())
    for i in range(300):
        producer.produce(settings.topics.sensors, json.dumps(
            {"entity": f"e{i % 3}", "ts": T0 + i * 1000, "values": [i, -i], "label": i % 2}).encode())
    pills = [b"not json", b'{"entity": "e0", "ts": 1' + b"0" * 309 + b', "values": [1, 2]}',  # OverflowError once
             json.dumps({"entity": "e0", "ts": (T0 + 5) * 1000, "values": [1, 2]}).encode(),  # microseconds
             json.dumps({"entity": "e0", "ts": 4_102_444_800_000, "values": [1, 2]}).encode()]  # 2100: clock_skew
    for pill in pills:
        producer.produce(settings.topics.sensors, pill)
    producer.flush(10)

    store = _store(tmp_path)
    group = f"store-{uuid.uuid4().hex[:6]}"
    writer = StoreWriter(settings, store, group_id=group, flush_rows=10_000, flush_interval_s=3600)
    deadline = time.monotonic() + 30
    while writer.poll_once(1.0) < 300 and time.monotonic() < deadline:
        pass
    writer.close()
    assert writer.stats.rows_written == 300 and writer.stats.skipped_invalid == len(pills)
    assert store.rows() == 300

    # a restart resumes from the committed offsets: nothing is read twice
    again = StoreWriter(settings, store, group_id=group, flush_rows=10_000, flush_interval_s=3600)
    for _ in range(5):
        again.poll_once(1.0)
    again.close()
    assert again.stats.rows_written == 0 and store.rows() == 300
