"""`fabwatch replay`: file formats, column inference, bad rows, pacing, against the real broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from confluent_kafka import Consumer

from fabwatch.export.errors import UsageError
from fabwatch.stream.offline.files import ColumnMap, arrival_order, read_table, to_records
from fabwatch.stream.offline.replay import load_records



def _write_rows(path: Path, rows: list[dict]) -> Path:
    fmt = path.suffix
    if fmt == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        cols = list(rows[0])
        path.write_text(",".join(cols) + "\n" + "".join(",".join(str(r[c]) for c in cols) + "\n" for r in rows))
    return path


def test_rows_come_in_arrival_order_by_time_but_each_entity_in_file_order() -> None:
    """Grouped by entity or by time, a file replays interleaved in time; a row older than an earlier row of its
    entity stays after it (the out-of-order reading the processor would meet), not sorted back."""
    grouped = arrival_order(["a", "a", "a", "b", "b", "b"], np.array([10, 20, 30, 15, 25, 35]))
    assert grouped.tolist() == [0, 3, 1, 4, 2, 5]
    late = arrival_order(["a", "b", "a", "a", "b"], np.array([10, 12, 30, 20, 40]))
    assert late.tolist() == [0, 1, 2, 3, 4]  # "a" at 20 arrives after "a" at 30, before "b" at 40


def _rows(n: int = 20, span_s: float = 10.0) -> list[dict]:
    step = int(span_s * 1000 / (n - 1))
    return [{"entity": f"OHT-{i % 2}", "ts": 1_790_000_000_000 + i * step, "speed": float(i), "temp": 20.0 + i,
             "label": int(i == 5)} for i in range(n)]


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_all_formats_give_the_same_records(tmp_path: Path, suffix: str):
    records = load_records(_write_rows(tmp_path / f"r{suffix}", _rows()))
    assert records.feature_names == ["speed", "temp"]
    assert records.entity[:3] == ["OHT-0", "OHT-1", "OHT-0"]
    assert records.values[:, 0].tolist() == [float(i) for i in range(20)]
    assert records.label.tolist() == [int(i == 5) for i in range(20)]
    assert records.rejected == []


def test_ambiguous_or_missing_columns_are_clear_usage_errors(tmp_path: Path):
    table = pa.table({"entity": ["a"], "device": ["b"], "ts": [1], "x": [1.0]})
    with pytest.raises(UsageError, match="ambiguous entity column: entity, device"):
        ColumnMap.resolve(table)
    assert ColumnMap.resolve(table, entity_col="device").features == ["x"]
    with pytest.raises(UsageError, match="no timestamp column"):
        ColumnMap.resolve(pa.table({"entity": ["a"], "x": [1.0]}))
    with pytest.raises(UsageError, match="feature column.*nope"):
        ColumnMap.resolve(table, entity_col="entity", features=["nope"])


def test_bad_rows_are_reported_with_reasons_and_skipped(tmp_path: Path):
    path = tmp_path / "bad.csv"
    path.write_text("entity,ts,speed,temp\n"
                    "A,1000,1.0,2.0\n"
                    "A,yesterday,1.0,2.0\n"     # bad timestamp
                    "A,3000,fast,2.0\n"         # non-numeric
                    "A,4000,,2.0\n"             # missing value
                    ",5000,1.0,2.0\n"           # no entity
                    "A,6000,1.5,2.5\n")
    records = to_records(read_table(path), ColumnMap.resolve(read_table(path)))
    assert records.ts.tolist() == [1000, 6000]
    assert [(row, str(reason)) for row, reason, _ in records.rejected] == [
        (1, "bad_timestamp"), (2, "schema"), (3, "non_finite"), (4, "schema")]
    with pytest.raises(UsageError, match=r"row 2: bad_timestamp"):
        load_records(path, strict=True)


def _cli(*args: str, bootstrap: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ}
    if bootstrap:
        env["KAFKA_BOOTSTRAP_SERVERS"] = bootstrap
    return subprocess.run([sys.executable, "-m", "fabwatch.stream.cli.main", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_unreadable_files_exit_2_with_one_line(tmp_path: Path):
    garbage = tmp_path / "x.parquet"
    garbage.write_bytes(b"not parquet at all")
    for path in (garbage, tmp_path / "missing.csv", tmp_path / "data.xlsx"):
        if path.suffix == ".xlsx":
            path.write_text("x")
        proc = _cli("replay", str(path), "--topic", "t", bootstrap="127.0.0.1:1")
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("fabwatch: ")


@pytest.mark.integration
def test_replay_sends_every_good_row_keyed_by_entity(kafka_bootstrap: str, tmp_path: Path, unique_topic: str):
    path = _write_rows(tmp_path / "r.parquet", _rows(50))
    proc = _cli("replay", str(path), "--topic", unique_topic, "--max-speed", "--json", bootstrap=kafka_bootstrap)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["sent"] == 50 and summary["rejected"] == {}

    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": uuid.uuid4().hex,
                         "auto.offset.reset": "earliest"})
    consumer.subscribe([unique_topic])
    got = []
    deadline = time.monotonic() + 30
    while len(got) < 50 and time.monotonic() < deadline:
        got += [m for m in consumer.consume(100, timeout=1.0) if m.error() is None]
    consumer.close()
    assert len(got) == 50
    first = json.loads(got[0].value())
    assert got[0].key().decode() == first["entity"]
    assert set(first["features"]) == {"speed", "temp"} and "ts" in first


@pytest.mark.integration
def test_speed_five_replays_ten_seconds_in_about_two(kafka_bootstrap: str, tmp_path: Path, unique_topic: str):
    path = _write_rows(tmp_path / "r.csv", _rows(21, span_s=10.0))
    proc = _cli("replay", str(path), "--topic", unique_topic, "--speed", "5", "--json", bootstrap=kafka_bootstrap)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["sent"] == 21
    assert 1.6 <= summary["seconds"] <= 4.0, summary
