"""Fault injection, part 3: ``fabwatch serve --exactly-once`` SIGKILLed again and again while it works through
a stream with spikes, restarted each time. Whatever transaction a kill interrupts is aborted (the restart's
``init_transactions`` fences it) and redone: read_committed consumers see each alert and each score once."""

from __future__ import annotations

import json
import random
import signal
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from fabwatch.stream.kafka.topics import ensure_topics
from onnx_fixtures import make_registry, readings
from stream_helpers import committed_offsets, produce, read_all, start_serve, stop, wait_for
from test_processor import reference_ids

pytestmark = [pytest.mark.integration, pytest.mark.chaos]
ENTITIES = [f"OHT-{i:03d}" for i in range(20)]
STEPS = 1000  # 20,000 readings
PARTITIONS = 3
KILLS = 6
WINDOW = 100  # the tiny model's


@pytest.mark.timeout(600)
def test_sigkill_during_transactions_loses_and_duplicates_no_alert(settings, tmp_path: Path) -> None:
    ensure_topics(settings, settings.topics.all(), partitions=PARTITIONS)
    registry = tmp_path / "registry"
    make_registry(registry)
    rng = random.Random(16)
    spikes = {e: sorted(rng.sample(range(WINDOW + 20, STEPS - 20), 3)) for e in ENTITIES[::2]}
    data = readings(ENTITIES, STEPS, seed=16, spikes=spikes)
    expected = reference_ids(registry, data)
    produce(settings, settings.topics.sensors, data)
    group, sensors = f"chaos-{uuid.uuid4().hex[:8]}", settings.topics.sensors
    args = ("--group", group, "--instance-id", "chaos", "--exactly-once", "--emit-scores", "--max-batch", "256")
    log = tmp_path / "serve.log"

    def committed() -> int:
        """Readings committed so far. read_uncommitted: an OffsetFetch that waits for stable offsets would
        block on the offsets of a killed transaction until its successor fences it."""
        offsets = committed_offsets(settings, group, sensors, config={"isolation.level": "read_uncommitted"})
        return sum(max(o, 0) for o in offsets.values())

    kills, done = 0, 0
    while kills < KILLS and done < len(data):
        proc = start_serve(settings, registry, *args, log_path=log)
        before = done
        wait_for(lambda: committed() > before, 120, what="progress after a restart")
        time.sleep(rng.uniform(0.0, 0.5))  # mid-stream: most likely inside a transaction
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        kills += 1
        done = committed()
    proc = start_serve(settings, registry, *args, log_path=log)
    try:
        wait_for(lambda: committed() == len(data), 180, what="every reading committed")
        alerts = [json.loads(v)["alert_id"] for v in read_all(settings, settings.topics.alerts,
                                                              expect=len(expected), timeout_s=60)]
        scores = read_all(settings, settings.topics.scores, expect=len(ENTITIES) * (STEPS - WINDOW + 1))
        uncommitted = read_all(settings, settings.topics.scores, committed_only=False,
                               expect=len(scores) + 1, timeout_s=20)
    finally:
        assert stop(proc) == 0, log.read_text()[-3000:]
    got = Counter(alerts)
    lost, duplicated = expected - set(got), sum(n - 1 for n in got.values())
    print(f"\nchaos sigkill: {kills} kills, {len(expected)} alerts expected, {len(lost)} lost, {duplicated} "
          f"duplicated, {len(set(got) - expected)} unexpected; {len(uncommitted) - len(scores)} score records "
          f"written by killed transactions (aborted, unseen by read_committed)")
    assert kills >= 3
    assert not lost and not duplicated and set(got) == expected
    keys = Counter((s["entity"], s["window_end_ts"]) for s in map(json.loads, scores))
    assert len(keys) == len(ENTITIES) * (STEPS - WINDOW + 1) and max(keys.values()) == 1  # each window once
