"""Real plant recordings (#15): a test-rig file with an ISO `datetime` column and no entity column is read the
same way by `train`, `evaluate` and `replay`, with no renaming; bad files are one-line usage errors (exit 2)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from confluent_kafka import Consumer

from fabwatch.export.errors import UsageError
from fabwatch.export.registry import Registry
from fabwatch.models.training import data
from fabwatch.stream.offline.evaluate import evaluate_file
from fabwatch.stream.offline.files import SINGLE_ENTITY, ColumnMap, timestamps_ms
from fabwatch.stream.offline.replay import load_records
from onnx_fixtures import feature_names, make_registry

# the sensors of a public pump test rig, with its spaced ISO timestamps
RIG_SENSORS = ("Accelerometer1RMS", "Accelerometer2RMS", "Current", "Pressure", "Temperature", "Thermocouple",
               "Voltage", "Volume Flow RateRMS")
RIG_START = np.datetime64("2020-03-09T10:14:33", "s")


def rig_csv(path: Path, rows: int = 400, sensors=RIG_SENSORS, spike_at: int | None = None) -> Path:
    """One rig in normal operation, one reading a second: `datetime` ("2020-03-09 10:14:33") and the sensors."""
    rng = np.random.default_rng(0)
    stamps = (RIG_START + np.arange(rows).astype("timedelta64[s]")).astype(str)
    cols: dict[str, object] = {"datetime": pa.array([s.replace("T", " ") for s in stamps])}
    for j, name in enumerate(sensors):
        values = 10.0 + 0.5 * j + np.sin(np.arange(rows) / 15.0 + j) + 0.2 * rng.standard_normal(rows)
        if spike_at is not None and j == 0:
            values[spike_at] += 40.0
        cols[name] = values.round(4)
    pacsv.write_csv(pa.table(cols), path)
    return path


def _fabwatch(*args: str, bootstrap: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"KAFKA_BOOTSTRAP_SERVERS": bootstrap} if bootstrap else {})}
    return subprocess.run([sys.executable, "-m", "fabwatch.stream.cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The single `fabwatch:` line of a usage error (TensorFlow's start-up chatter aside)."""
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fabwatch:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def _consume(bootstrap: str, topic: str, n: int) -> list:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex, "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    got: list = []
    deadline = time.monotonic() + 30
    while len(got) < n and time.monotonic() < deadline:
        got += [m for m in consumer.consume(100, timeout=1.0) if m.error() is None]
    consumer.close()
    return got


def test_rig_file_reads_the_same_for_train_and_for_evaluate_and_replay(tmp_path: Path) -> None:
    path = rig_csv(tmp_path / "rig.csv")
    table = data.load(path, label_col=None, task="forecast")
    records = load_records(path)
    expected_ts = (RIG_START.astype(np.int64) + np.arange(400)) * 1000
    assert table.feature_names == records.feature_names == list(RIG_SENSORS)
    assert table.entity_names == [SINGLE_ENTITY] and set(records.entity) == {SINGLE_ENTITY}
    assert records.ts.tolist() == expected_ts.tolist() and records.rejected == []
    np.testing.assert_allclose(table.x, records.values, rtol=1e-6)  # same rows, same order
    named = load_records(path, entity="rig-7")
    assert set(named.entity) == {"rig-7"}
    assert data.load(path, label_col=None, task="forecast", entity="rig-7").entity_names == ["rig-7"]


def test_semicolon_separated_export_reads_like_a_comma_separated_one(tmp_path: Path) -> None:
    comma = rig_csv(tmp_path / "rig.csv", rows=20)
    semicolon = tmp_path / "rig-eu.csv"
    semicolon.write_text(comma.read_text().replace(",", ";"))
    a, b = load_records(comma), load_records(semicolon)
    assert a.feature_names == b.feature_names and a.ts.tolist() == b.ts.tolist()
    np.testing.assert_array_equal(a.values, b.values)


def test_timestamp_units_are_decided_once_per_column() -> None:
    def ms(values) -> list[int]:
        out, ok = timestamps_ms(pa.chunked_array([pa.array(values)]))
        assert ok.all()
        return out.tolist()

    assert ms([1_583_748_873, 1_583_748_874.5]) == [1_583_748_873_000, 1_583_748_874_500]  # epoch seconds
    assert ms([1_583_748_873_000, 1_583_748_874_000]) == [1_583_748_873_000, 1_583_748_874_000]  # epoch ms
    assert ms([0, 1000, 6000]) == [0, 1000, 6000]  # small counters stay milliseconds
    assert ms([1000, 1_583_748_873]) == [1000, 1_583_748_873]  # one unit per column: not all seconds -> ms
    assert ms(["2020-03-09 10:14:33", "2020-03-09T10:14:34+00:00"]) == [1_583_748_873_000, 1_583_748_874_000]
    assert ms(["1583748873", "1583748874"]) == [1_583_748_873_000, 1_583_748_874_000]


def test_column_options_are_the_same_everywhere(tmp_path: Path) -> None:
    table = pa.table({"Date": ["2020-03-09"], "time": ["10:14:33"], "x": [1.0]})
    with pytest.raises(UsageError, match="ambiguous timestamp column: Date, time all qualify; choose one with --ts"):
        ColumnMap.resolve(table)
    cmap = ColumnMap.resolve(table, ts_col="Date")
    assert (cmap.entity, cmap.single_entity, cmap.features) == (None, SINGLE_ENTITY, ["x"])
    with pytest.raises(UsageError, match="--entity names the one entity"):
        ColumnMap.resolve(pa.table({"entity": ["a"], "ts": [1], "x": [1.0]}), entity_col="entity", entity="a")
    # a named entity reads the file as one entity: a column named like one is neither entity nor feature
    one = ColumnMap.resolve(pa.table({"id": [1, 2], "ts": [1, 2], "x": [1.0, 2.0]}), entity="rig")
    assert (one.entity, one.single_entity, one.features) == (None, "rig", ["x"])


def test_file_without_entity_column_evaluates_as_one_entity(tmp_path: Path) -> None:
    registry = make_registry(tmp_path / "registry").root
    path = rig_csv(tmp_path / "rig.csv", rows=300, sensors=feature_names(4), spike_at=200)
    ev = evaluate_file(registry, path)
    opened = [a for a in ev.alerts if a.state == "open"]
    assert [a.entity for a in opened] == [SINGLE_ENTITY]
    assert opened[0].window_end_ts == (RIG_START.astype(np.int64) + 200) * 1000
    assert {a.alert_id for a in evaluate_file(registry, path, entity="rig-7").alerts}.isdisjoint(
        {a.alert_id for a in ev.alerts})  # the entity name is part of the alert id


def test_bad_files_exit_2_with_one_line(tmp_path: Path) -> None:
    registry = make_registry(tmp_path / "registry").root
    ambiguous = tmp_path / "ambiguous.csv"
    ambiguous.write_text("date,time,f00,f01,f02,f03\n2020-03-09,10:14:33,1,2,3,4\n")
    for args in (["train", "--data", str(ambiguous), "--registry", str(tmp_path / "reg"), "--quick", "--unsupervised"],
                 ["evaluate", "--registry", str(registry), "--data", str(ambiguous)],
                 ["replay", str(ambiguous), "--topic", "t", "--bootstrap", "127.0.0.1:1"]):
        line = _one_line_error(_fabwatch(*args))
        assert "ambiguous timestamp column: date, time" in line and "--ts-col" in line, line
    short = rig_csv(tmp_path / "short.csv", rows=150)  # more than a window of 100, too few to train on
    line = _one_line_error(_fabwatch("train", "--data", str(short), "--registry", str(tmp_path / "reg"), "--quick",
                                     "--unsupervised"))
    minimum = re.search(r"(?:at least|more than) (\d+) rows", line)
    assert minimum and int(minimum.group(1)) > 150, line  # says how many rows it takes
    assert not (tmp_path / "reg").exists()


@pytest.mark.integration
def test_file_without_entity_column_replays_keyed_by_the_single_entity(kafka_bootstrap: str, tmp_path: Path,
                                                                      unique_topic: str) -> None:
    path = rig_csv(tmp_path / "rig.csv")
    proc = _fabwatch("replay", str(path), "--topic", unique_topic, "--max-speed", "--json", bootstrap=kafka_bootstrap)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["sent"] == 400
    got = _consume(kafka_bootstrap, unique_topic, 400)
    assert len(got) == 400 and {m.key() for m in got} == {SINGLE_ENTITY.encode()}
    first = json.loads(got[0].value())
    assert first["entity"] == SINGLE_ENTITY and first["ts"] == int(RIG_START.astype(np.int64)) * 1000
    assert set(first["features"]) == set(RIG_SENSORS)


@pytest.mark.slow
@pytest.mark.integration
def test_rig_recording_trains_evaluates_and_replays_without_renaming(kafka_bootstrap: str, tmp_path: Path,
                                                                     unique_topic: str) -> None:
    """The user's file of #15, as it comes: 400 rows of one rig, ISO `datetime`, no entity column."""
    path = rig_csv(tmp_path / "rig.csv")
    registry = tmp_path / "registry"
    trained = _fabwatch("train", "--data", str(path), "--registry", str(registry), "--quick", "--unsupervised",
                        "--json")
    assert trained.returncode == 0, trained.stderr[-2000:]
    evaluated = _fabwatch("evaluate", "--registry", str(registry), "--data", str(path), "--json")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    report = json.loads(evaluated.stdout)
    window = Registry(registry).resolve()[1].window
    assert report["rows_in_file"] == 400 and report["rows_rejected"] == 0
    assert report["rows_scored"] == 400 - window + 1
    replayed = _fabwatch("replay", str(path), "--topic", unique_topic, "--max-speed", "--json",
                         bootstrap=kafka_bootstrap)
    assert replayed.returncode == 0, replayed.stderr
    assert json.loads(replayed.stdout)["sent"] == 400
