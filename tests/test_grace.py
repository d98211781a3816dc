"""Out-of-order readings against a real broker: within ``--grace-ms`` a reading is put in order in its window
(and the next window holds it), beyond it the reading is dead-lettered as late; the processor and offline
evaluation of the same arrival order publish the same alert ids."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import orjson
import pytest

from fabwatch.export.runtime import ScoringModel
from fabwatch.stream.decode import BatchDecoder
from fabwatch.stream.engine import ScoringEngine, run_offline
from fabwatch.stream.offline.evaluate import evaluate_file
from fabwatch.stream.windows import LATE, REORDERED
from onnx_fixtures import add_version, feature_names, readings
from stream_helpers import (PARTITIONS, committed_offsets, produce, read_all, replay_and_serve, start_serve,
                            stop, wait_for)

pytestmark = pytest.mark.integration
T0 = 1_700_000_000_000
WINDOW = 10


@pytest.fixture
def level_registry(tmp_path: Path) -> Path:
    """The tiny model with only its "level" member (mean |scaled value| over the window), window 10: a reading
    far off raises every window that holds it, wherever it sits in the window, not only as the newest."""
    root = tmp_path / "registry"
    add_version(root, 4, window=WINDOW, weights=(0.0, 1.0), alert=3.0, close=1.5, critical=None)
    return root


def _off(reading: dict) -> dict:
    return {**reading, "values": [90.0] * 4}  # 40 standard deviations off on every feature


def _delayed(rows: list[dict], entity: str, step: int, by: int) -> list[dict]:
    """``rows`` (time-major) with ``entity``'s reading at ``step`` arriving ``by`` steps later, its values far off."""
    n = len({r["entity"] for r in rows})
    at = next(i for i, r in enumerate(rows) if r["entity"] == entity and r["ts"] == T0 + step * 1000)
    moved = _off(rows[at])
    rest = rows[:at] + rows[at + 1:]
    return rest[:at + by * n] + [moved] + rest[at + by * n:]


def _offline_ids(registry: Path, rows: list[dict], grace_ms: int | None = None) -> set[str]:
    model = ScoringModel.from_registry(registry)
    cols = BatchDecoder(model.feature_names).decode([orjson.dumps(r) for r in rows])
    engine = ScoringEngine(model) if grace_ms is None else ScoringEngine(model, grace_ms=grace_ms)
    alerts, _, _ = run_offline(engine, cols.keys, cols.ts, cols.values)
    return {a.alert_id for a in alerts}


def test_a_reading_2_s_out_of_order_is_scored_and_one_10_s_out_is_dead_lettered(topics, level_registry,
                                                                                 tmp_path) -> None:
    rows = readings(["A", "B", "C"], 60, t0=T0)
    rows = _delayed(rows, "A", 30, by=2)    # inside the default 5 s grace
    rows = _delayed(rows, "B", 30, by=11)   # beyond it
    expected = _offline_ids(level_registry, rows)
    assert expected and not _offline_ids(level_registry, rows, grace_ms=0)  # without the grace, nothing opens
    produce(topics, topics.topics.sensors, rows)
    proc = start_serve(topics, level_registry, "--max-batch", "16", log_path=tmp_path / "serve.log")
    try:
        dead = [json.loads(v) for v in read_all(topics, topics.topics.dlq, expect=1, timeout_s=90)]
        alerts = [json.loads(v) for v in read_all(topics, topics.topics.alerts, expect=len(expected), timeout_s=60)]
    finally:
        assert stop(proc) == 0
    assert [(d["reason"], d["key"]) for d in dead] == [("late", "B")]
    assert "grace (5000 ms)" in dead[0]["detail"]
    opened = [a for a in alerts if a["state"] == "open"]
    assert [a["entity"] for a in opened] == ["A"]
    # the reordered reading closed no window itself: the next newest (step 33) did, with it in order inside
    assert opened[0]["window_end_ts"] == T0 + 33_000 and opened[0]["window_start_ts"] == T0 + 24_000
    assert {a["alert_id"] for a in alerts} == expected


def _jittered(steps: int, seed: int) -> list[dict]:
    """Four entities in arrival order: readings up to 4 s late, a few stragglers 9 s late, far-off values
    among both."""
    rows = readings([f"E{i}" for i in range(4)], steps, t0=T0, seed=seed)
    rng = np.random.default_rng(seed)
    arrival = np.array([r["ts"] for r in rows]) + rng.integers(0, 4001, len(rows))
    arrival[rng.choice(len(rows), steps // 20, replace=False)] += 9_000
    for i in rng.choice(len(rows), steps // 12, replace=False).tolist():
        rows[i] = _off(rows[i])
    return [rows[i] for i in np.argsort(arrival, kind="stable")]


def test_evaluate_and_the_processor_agree_on_a_jittered_recording(settings, level_registry, tmp_path) -> None:
    """`replay` sends a recording's rows as the file orders them per entity, `evaluate` scores them in that
    order: the same alert ids."""
    rows = _jittered(150, seed=5)
    data = tmp_path / "jittered.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["entity", "ts", *feature_names(4)])
        w.writerows([r["entity"], r["ts"], *r["values"]] for r in rows)

    ev = evaluate_file(level_registry, data)
    offline = {a.alert_id for a in ev.alerts}
    assert np.count_nonzero(ev.status == REORDERED) > 50 and np.count_nonzero(ev.status == LATE) >= 1
    assert ev.metrics["rows_reordered"] == np.count_nonzero(ev.status == REORDERED)
    assert offline == _offline_ids(level_registry, rows) and len(offline) >= 4  # the file's order, kept
    live = replay_and_serve(settings, data, level_registry, "grace-check", len(offline), tmp_path / "serve.log",
                            timeout_s=90)
    assert live == offline


def test_a_restart_rebuilds_the_reordered_windows_an_uninterrupted_run_holds(topics, level_registry,
                                                                             tmp_path) -> None:
    """With a 20 s grace, step 30 (far off) arrives right after step 9 and steps 10..29 after it, all put in
    order. The processor stops there; on restart its rebuild must re-read back to step 30, not only the last
    9 arrivals (steps 21..29): else step 31's window misses step 30, the open alert closes at once, and the
    ids differ from an uninterrupted run's."""
    rows = readings(["A"], 60, t0=T0, seed=8)
    rows[30] = _off(rows[30])
    first = rows[:10] + [rows[30]] + rows[10:30]
    expected = _offline_ids(level_registry, first + rows[31:], grace_ms=20_000)
    too_short = _offline_ids(level_registry, rows[21:30] + rows[31:], grace_ms=20_000)  # steps 21..29 rebuilt
    assert expected != too_short
    produce(topics, topics.topics.sensors, first)
    log = tmp_path / "serve.log"
    args = ("--grace-ms", "20000", "--rebuild-chunk", "1")
    proc = start_serve(topics, level_registry, *args, log_path=log)
    try:
        wait_for(lambda: max(committed_offsets(topics, "fabwatch-processor", topics.topics.sensors,
                                               PARTITIONS).values()) == len(first),  # one key, one partition
                 90, what="the first part processed and committed")
    finally:
        assert stop(proc) == 0
    produce(topics, topics.topics.sensors, rows[31:])
    proc = start_serve(topics, level_registry, *args, log_path=log)
    try:
        got = {json.loads(v)["alert_id"] for v in read_all(topics, topics.topics.alerts, expect=len(expected),
                                                           timeout_s=90)}
    finally:
        assert stop(proc) == 0
    assert got == expected
