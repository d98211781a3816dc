"""Alert state across a restart on a real broker: many open alerts of one partition travel with its
committed offset (``AlertPolicy.export_state``), so the restarted processor closes them under the ids an
uninterrupted run gives, instead of forgetting them."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest

from fabwatch.export.runtime import ScoringModel
from fabwatch.stream.decode import BatchDecoder
from fabwatch.stream.engine import ScoringEngine, run_offline
from fabwatch.stream.kafka.topics import ensure_topics
from onnx_fixtures import make_registry, readings
from stream_helpers import committed_offsets, produce, read_all, start_serve, stop, wait_for

pytestmark = pytest.mark.integration
N_KEYS = 1000
GROUP = "state-restart"


@pytest.mark.parametrize("mode", [[], ["--exactly-once"]], ids=["at-least-once", "exactly-once"])
def test_a_thousand_open_alerts_of_one_partition_are_closed_after_a_restart(settings, tmp_path: Path,
                                                                            mode: list[str]) -> None:
    ensure_topics(settings, settings.topics.all(), partitions=1)  # every key on one partition
    registry = tmp_path / "registry"
    make_registry(registry, window=10)
    entities = [f"fab{i % 3}/etch-{i // 12:03d}/ch-{i % 4}" for i in range(N_KEYS)]
    cut = 20  # steps before the restart; each key spikes over its last five, so its alert is open at the cut
    data = readings(entities, 32, seed=9, spikes={e: range(cut - 5, cut) for e in entities})
    model = ScoringModel.from_registry(registry)
    cols = BatchDecoder(model.feature_names).decode([orjson.dumps(r) for r in data])
    expected, _, _ = run_offline(ScoringEngine(model), cols.keys, cols.ts, cols.values)
    cut_ts = data[cut * N_KEYS]["ts"]
    assert sum(a.state == "open" and a.window_end_ts < cut_ts for a in expected) == N_KEYS
    assert sum(a.state == "closed" and a.window_end_ts >= cut_ts for a in expected) == N_KEYS

    produce(settings, settings.topics.sensors, data[:cut * N_KEYS])
    log = tmp_path / "serve.log"
    proc = start_serve(settings, registry, "--group", GROUP, *mode, log_path=log)
    try:
        wait_for(lambda: committed_offsets(settings, GROUP, settings.topics.sensors, 1)[0] == cut * N_KEYS, 120,
                 what="the first part committed")
    finally:
        assert stop(proc) == 0
    produce(settings, settings.topics.sensors, data[cut * N_KEYS:])
    proc = start_serve(settings, registry, "--group", GROUP, *mode, log_path=log)
    try:
        got = [json.loads(v) for v in read_all(settings, settings.topics.alerts, expect=len(expected), timeout_s=120)]
    finally:
        assert stop(proc) == 0
    assert {a["alert_id"] for a in got} == {a.alert_id for a in expected}  # at-least-once: repeats keep their id
    if mode:
        assert len(got) == len(expected)
    assert "not carried" not in log.read_text()
