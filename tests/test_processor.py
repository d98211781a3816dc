"""The stream processor against a real broker, run as ``fabwatch serve`` subprocesses.

The reference for "an uninterrupted run" is the offline engine (``run_offline``) over the same
readings: the processor and offline evaluation share that code, so their alert ids must match.
"""

from __future__ import annotations

import base64
import json
import re
import signal
import threading
import urllib.request
from pathlib import Path

import orjson
import pytest

from fabwatch.export.registry import Registry, atomic_write_text
from fabwatch.export.runtime import ScoringModel
from fabwatch.stream.decode import BatchDecoder
from fabwatch.stream.engine import ScoringEngine, run_offline
from fabwatch.stream.processor import Processor, ProcessorConfig
from fabwatch.stream.schemas import ModelEvent
from onnx_fixtures import add_version, readings
from stream_helpers import (PARTITIONS, committed_offsets, log_has, produce, read_all, start_serve, stop,
                            wait_for)

pytestmark = pytest.mark.integration
ENTITIES = [f"OHT-{i:03d}" for i in range(20)]


def reference_ids(registry: Path, records: list[dict]) -> set[str]:
    """Alert ids of an uninterrupted run: the offline engine over the readings in production order."""
    model = ScoringModel.from_registry(registry)
    cols = BatchDecoder(model.feature_names).decode([orjson.dumps(r) for r in records])
    alerts, _, _ = run_offline(ScoringEngine(model), cols.keys, cols.ts, cols.values)
    return {a.alert_id for a in alerts}


def alerts_of(raw: list[bytes]) -> list[dict]:
    return [json.loads(v) for v in raw]


def test_spike_raises_an_alert_for_that_entity_and_clean_data_none(topics, registry, tmp_path) -> None:
    spiky = readings(ENTITIES, 260, spikes={"OHT-007": [180, 181]}, seed=1)
    clean = readings(ENTITIES, 260, seed=2, t0=1_750_000_000_000)  # later, not future (clock_skew)
    produce(topics, topics.topics.sensors, clean)
    log = tmp_path / "serve.log"
    proc = start_serve(topics, registry, "--emit-scores", log_path=log)
    try:
        scores = read_all(topics, topics.topics.scores, expect=len(ENTITIES) * 161, timeout_s=90)
        assert len(scores) == len(ENTITIES) * 161  # every window of the clean data was scored...
        assert read_all(topics, topics.topics.alerts, idle_s=1.0) == []  # ...and raised nothing
        produce(topics, topics.topics.sensors, [{**r, "entity": r["entity"] + "-b"} for r in spiky])
        got = alerts_of(read_all(topics, topics.topics.alerts, expect=2, timeout_s=60))
    finally:
        assert stop(proc) == 0
    opened = [a for a in got if a["state"] == "open"]
    assert {a["entity"] for a in got} == {"OHT-007-b"} and len(opened) == 1
    a = opened[0]
    spike_ts = spiky[180 * len(ENTITIES)]["ts"]
    assert a["window_start_ts"] <= spike_ts <= a["window_end_ts"]
    assert a["kind"] == "spike" and a["model_version"] == "v0001" and a["top_features"][0]["name"] == "f00"
    assert a["source"]["topic"] == topics.topics.sensors and a["ingest_to_alert_ms"] is not None


def test_bad_input_goes_to_the_dlq_with_its_reason_and_good_readings_still_score(topics, registry, tmp_path) -> None:
    good = readings(ENTITIES[:2], 150, spikes={"OHT-001": [140]}, seed=3)
    first, rest = good[:100], good[100:]
    table = [
        (b"{not json", "bad_json"),
        (b'{"ts": 1, "values": [1, 2, 3, 4]}', "schema"),
        (b'{"entity": "X", "ts": "yesterday", "values": [1, 2, 3, 4]}', "bad_timestamp"),
        (b'{"entity": "X", "ts": 1, "values": [1, 2, NaN, 4]}', "non_finite"),
        (b'{"entity": "X", "ts": 1, "values": [1, 2, 3]}', "wrong_width"),
        (b'{"entity": "X", "ts": 1, "features": {"f00": 1, "f01": 1, "f02": 1, "f03": 1, "zz": 1}}', "unknown_feature"),
        (b'{"entity": "X", "ts": 1, "features": {"f00": 1}}', "missing_feature"),
        (b'{"entity": "X", "ts": 1, "values": [1, 2, 3, 1e39]}', "non_finite"),
        (b'{"entity": "X", "ts": 1, "values": ' + b"[" + b"1," * 2000 + b"1]}", "too_large"),
        (orjson.dumps({**first[0], "ts": first[0]["ts"] - 1}), "late"),
    ]
    dup = orjson.dumps(first[-1])
    corrected = orjson.dumps({**first[-1], "values": [v + 1 for v in first[-1]["values"]]})
    table.append((corrected, "conflicting_duplicate"))
    raw = [orjson.dumps(r) for r in first] + [v for v, _ in table[:-1]] + [dup, corrected] + \
        [orjson.dumps(r) for r in rest]
    keys = [r["entity"].encode() for r in first] + [b"bad"] * (len(table) - 1) + [b"OHT-001"] * 2 + \
        [r["entity"].encode() for r in rest]
    produce(topics, topics.topics.sensors, raw, keys=keys)
    topics.max_message_bytes = 2048
    log = tmp_path / "serve.log"
    proc = start_serve(topics, registry, log_path=log)
    try:
        dead = alerts_of(read_all(topics, topics.topics.dlq, expect=len(table), timeout_s=90))
        alerts = alerts_of(read_all(topics, topics.topics.alerts, expect=1, timeout_s=60))
    finally:
        assert stop(proc) == 0
    assert sorted(d["reason"] for d in dead) == sorted(r for _, r in table)  # one each, nothing for the identical re-send
    by_reason = {d["reason"]: d for d in dead}
    assert base64.b64decode(by_reason["bad_json"]["value_b64"]) == b"{not json"
    assert by_reason["late"]["source"]["topic"] == topics.topics.sensors and by_reason["late"]["detail"]
    assert [a["entity"] for a in alerts if a["state"] == "open"] == ["OHT-001"]


def _kill_and_restart(topics, registry: Path, tmp_path: Path, *extra: str) -> tuple[list[dict], set[str]]:
    """Phase 1 (an alert opens for OHT-005), SIGKILL, phase 2 produced while down, restart, collect."""
    data = readings(ENTITIES, 400, seed=4, spikes={"OHT-005": list(range(290, 300)), "OHT-011": [305, 306],
                                                   "OHT-017": [380]})
    cut = 300 * len(ENTITIES)
    expected = reference_ids(registry, data)
    produce(topics, topics.topics.sensors, data[:cut])
    log = tmp_path / "serve.log"
    proc = start_serve(topics, registry, "--max-batch", "64", *extra, log_path=log)
    wait_for(lambda: len(read_all(topics, topics.topics.alerts, idle_s=0.3, timeout_s=15)) >= 1, 90,
             what="first alert")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    produce(topics, topics.topics.sensors, data[cut:])
    proc = start_serve(topics, registry, "--max-batch", "64", *extra, log_path=log)
    try:
        got = alerts_of(read_all(topics, topics.topics.alerts, expect=len(expected), timeout_s=90))
    finally:
        assert stop(proc) == 0
    return got, expected


def test_sigkill_restart_at_least_once_loses_no_alert(topics, registry, tmp_path) -> None:
    # a small rebuild step makes the restart re-read several chunks backwards
    got, expected = _kill_and_restart(topics, registry, tmp_path, "--rebuild-chunk", "300")
    assert len(expected) == 6  # open + close for OHT-005 (open before the kill, closed after), -011, -017
    assert {a["alert_id"] for a in got} == expected  # duplicates allowed, only with the same ids


def test_sigkill_restart_exactly_once_read_committed_sees_each_alert_once(topics, registry, tmp_path) -> None:
    got, expected = _kill_and_restart(topics, registry, tmp_path, "--exactly-once")
    ids = [a["alert_id"] for a in got]
    assert sorted(ids) == sorted(expected)


def test_two_instances_emit_the_same_alerts_as_one(topics, registry, tmp_path) -> None:
    """The second instance joins mid-stream: the rebalance moves partitions with committed offsets to
    it, and it rebuilds their windows from the history before them."""
    data = readings(ENTITIES, 300, seed=5, spikes={e: [150 + 7 * i] for i, e in enumerate(ENTITIES[::3])})
    half = len(data) // 2
    expected = reference_ids(registry, data)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [start_serve(topics, registry, "--instance-id", "i0", "--exactly-once", log_path=logs[0])]
    try:
        wait_for(lambda: log_has(logs[0], "assigned partitions ["), 60, what="first instance assigned")
        produce(topics, topics.topics.sensors, data[:half])
        group, sensors = "fabwatch-processor", topics.topics.sensors
        wait_for(lambda: sum(max(o, 0) for o in committed_offsets(topics, group, sensors, PARTITIONS).values())
                 == half, 60, what="first half committed")
        procs.append(start_serve(topics, registry, "--instance-id", "i1", "--exactly-once", log_path=logs[1]))
        wait_for(lambda: re.search(r"assigned partitions \[\d", logs[1].read_text()) is not None, 60,
                 what="second instance holding partitions")
        produce(topics, topics.topics.sensors, data[half:])
        got = alerts_of(read_all(topics, topics.topics.alerts, expect=len(expected), timeout_s=90))
    finally:
        assert [stop(p) for p in procs] == [0] * len(procs)
    rebuilt = re.findall(r"windows rebuilt for (\d+) keys", logs[1].read_text())
    assert rebuilt and int(rebuilt[-1]) > 0  # the newcomer re-read history for its partitions
    assert sorted(a["alert_id"] for a in got) == sorted(expected)


def test_hot_reload_mid_stream(topics, registry, tmp_path) -> None:
    first = readings(ENTITIES[:4], 200, seed=6, spikes={"OHT-001": [150]})
    second = readings(ENTITIES[:4], 200, seed=7, t0=first[-1]["ts"] + 1000, spikes={"OHT-002": [150]})
    produce(topics, topics.topics.sensors, first)
    log = tmp_path / "serve.log"
    proc = start_serve(topics, registry, "--emit-scores", log_path=log)
    try:
        read_all(topics, topics.topics.scores, expect=4 * 101, timeout_s=60)  # the first part is scored by v0001
        add_version(registry, weights=(0.6, 0.4))  # promoted: ``current`` moves to v0002
        wait_for(lambda: log_has(log, "hot reload: v0001 -> v0002"), 30, what="hot reload")
        bad = add_version(registry, promote=False)
        (registry / bad / "model.onnx").write_bytes(b"tampered")
        atomic_write_text(registry / "current", bad + "\n")
        wait_for(lambda: log_has(log, f"hot reload of {bad} failed"), 30, what="failed reload logged")
        def announce(version: str) -> None:
            event = ModelEvent(version=version, action="promoted", ts=0,
                               sha256=Registry(registry).manifest(version).files["model.onnx"])
            produce(topics, topics.topics.models, [event.model_dump_json().encode()])

        rejected = add_version(registry, promote=False, weights=(0.9, 0.1))  # a candidate the gate turned down
        announce(rejected)  # a message alone cannot put it into service
        wait_for(lambda: log_has(log, f"model event names {rejected} but current is {bad}: ignored"), 30,
                 what="a model event for an unpromoted version ignored")
        event_version = add_version(registry, promote=False, weights=(0.7, 0.3))
        atomic_write_text(registry / "current", event_version + "\n")  # promoted, then announced
        announce(event_version)
        wait_for(lambda: log_has(log, f"hot reload: v0002 -> {event_version}"), 30, what="reload of the promoted version")
        produce(topics, topics.topics.sensors, second)
        scores = alerts_of(read_all(topics, topics.topics.scores, expect=4 * 301, timeout_s=60))
        alerts = alerts_of(read_all(topics, topics.topics.alerts, idle_s=1.0))
    finally:
        assert stop(proc) == 0
    assert len(scores) == 4 * 301  # no reading skipped: 101 windows per key, then 200 more
    assert {s["model_version"] for s in scores if s["window_end_ts"] >= second[0]["ts"]} == {event_version}
    assert {s["model_version"] for s in scores if s["window_end_ts"] <= first[-1]["ts"]} == {"v0001"}
    versions = {a["entity"]: a["model_version"] for a in alerts if a["state"] == "open"}
    assert versions == {"OHT-001": "v0001", "OHT-002": event_version}
    assert not log_has(log, f"-> {rejected}") and not log_has(log, f"-> {bad}")  # neither ever served


def test_a_promotion_made_while_the_processor_starts_is_served(topics, registry) -> None:
    processor = Processor(topics, ProcessorConfig(registry=registry, group_id="startup-promotion",
                                                  reload_interval_s=0.2))
    assert processor.engine.version == "v0001"
    promoted = add_version(registry, weights=(0.6, 0.4))  # after the model was loaded, before the watcher runs
    runner = threading.Thread(target=processor.run, name="processor")
    runner.start()
    try:
        wait_for(lambda: processor.engine.version == promoted, 60, what=f"{promoted} swapped in")
        assert processor.liveness.failure() is None
    finally:
        processor.stop()
        runner.join(60)
    assert not runner.is_alive()


def test_sigterm_commits_and_exits_zero(topics, registry, tmp_path) -> None:
    data = readings(ENTITIES[:5], 150, seed=8, spikes={"OHT-003": [120]})
    produce(topics, topics.topics.sensors, data)
    log = tmp_path / "serve.log"
    proc = start_serve(topics, registry, "--metrics-port", "0", "--metrics-host", "127.0.0.1", "--group",
                       "sigterm-group", log_path=log)
    try:
        wait_for(lambda: log_has(log, "metrics on port"), 30, what="metrics server")
        port, host = re.search(r"metrics on port (\d+) of (\S+)", log.read_text()).groups()
        assert host == "127.0.0.1"  # bound where asked, not on every interface
        read_all(topics, topics.topics.alerts, expect=1, timeout_s=60)
        wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2).status == 200, 20,
                 what="ready")
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).read() == b"ok\n"
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    finally:
        rc = stop(proc, signal.SIGTERM)
    assert rc == 0 and log_has(log, "stopped cleanly")
    assert "fabwatch_readings_consumed_total" in metrics and 'fabwatch_model_info{provider=' in metrics
    offsets = committed_offsets(topics, "sigterm-group", topics.topics.sensors, PARTITIONS)
    assert sum(o for o in offsets.values() if o >= 0) == len(data)  # everything consumed is committed
