"""The sidecar trainer's gate, without TensorFlow or Kafka: honest figures (issue #16), a slice training
never sees, a quality floor, and one trainer at a time.

Retrains here use tiny ONNX models (``onnx_fixtures``): training is replaced by committing a chosen model
as the candidate, and the ModelEvent is recorded instead of sent.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fabwatch.export.registry import Registry
from fabwatch.models.sidecar.store import ReadingStore
from fabwatch.models.sidecar.trainer import Trainer, TrainerLock, TrainerOptions, gate_metric, hold_out
from fabwatch.stream.kafka.config import Settings
from onnx_fixtures import add_version, feature_names, readings

ENTITIES = ["OHT-000", "OHT-001", "OHT-002"]
SPIKE_EVERY = 4       # a spike (an event, or a delay) every 4th reading
SPIKE_SIGMA = 16.0    # the spike model scores such a reading about 8 + the window's level


class StubTrainer(Trainer):
    """Training replaced by committing ``candidate`` (add_version keywords); keeps the rows training was given."""

    def __init__(self, options: TrainerOptions, candidate: dict):
        super().__init__(Settings(), options)
        self.candidate = candidate
        self.trained_on: pa.Table | None = None
        self.events: list[str] = []

    def train_candidate(self, overrides: dict) -> tuple[str, float]:
        self.trained_on = pq.read_table(overrides["data"])
        return add_version(self.options.registry, promote=False, **self.candidate), 0.0

    def publish_event(self, version: str, version_dir: Path, action: str = "promoted") -> None:
        self.events.append(version)


def _store(root: Path, labels: str) -> ReadingStore:
    """300 readings per entity, feature 0 spiking every 4th; ``labels``: "events" (1 at a spike), "delays"
    (minutes at a spike, what the spike model predicts there), or "none" (-1)."""
    rows = readings(ENTITIES, 300, seed=5, spike_sigma=SPIKE_SIGMA,
                    spikes={e: range(3, 300, SPIKE_EVERY) for e in ENTITIES})
    spike = np.array([(r["ts"] - rows[0]["ts"]) // 1000 % SPIKE_EVERY == 3 for r in rows])
    label = {"events": spike.astype(np.int8), "delays": (spike * SPIKE_SIGMA / 2).astype(np.int8),
             "none": np.full(len(rows), -1, np.int8)}[labels]
    store = ReadingStore(root, feature_names(4))
    store.write([r["entity"] for r in rows], np.array([r["ts"] for r in rows], np.int64),
                np.array([r["values"] for r in rows], np.float32), label)
    return store


def _retrain(tmp_path: Path, serving: dict, candidate: dict, labels: str) -> tuple[dict, StubTrainer]:
    registry = tmp_path / "registry"
    add_version(registry, **serving)
    _store(tmp_path / "store", labels)
    options = TrainerOptions(registry=registry, store=tmp_path / "store", retention_days=None, margin=0.02)
    trainer = StubTrainer(options, candidate)
    return trainer.retrain_once(), trainer


# ---- the gate's figures ---------------------------------------------------------------------------------

def test_regress_gate_scores_error_on_labelled_delays_so_always_zero_loses() -> None:
    rng = np.random.default_rng(0)
    delays = np.where(rng.random(2000) < 0.2, rng.uniform(5, 60, 2000), 0.0).astype(np.float32)
    labels = np.where(rng.random(2000) < 0.3, -1.0, delays).astype(np.float32)  # some windows unlabelled
    reasonable = np.maximum(delays + rng.normal(0, 2, 2000), 0).astype(np.float32)
    reasonable[labels < 0] = 500.0  # unlabelled windows say nothing about the error
    zero = np.zeros(2000, np.float32)
    metric, serving, candidate = gate_metric("regress", reasonable, zero, labels, (np.inf, np.inf))
    assert metric == "minus_mae"
    assert candidate < serving - 0.5 * abs(serving)  # always 0 loses by far
    _, serving, candidate = gate_metric("regress", zero, reasonable, labels, (np.inf, np.inf))
    assert candidate > serving


def test_forecast_gate_scores_both_models_on_the_same_windows() -> None:
    """A candidate worse on every window must not win by alerting on its worst ones (its own, lower threshold
    used to drop them from its mean)."""
    serving = np.r_[np.full(90, 1.0), np.full(10, 5.0)].astype(np.float32)
    candidate = np.r_[np.full(90, 1.2), np.full(10, 5.0)].astype(np.float32)
    metric, serving_value, candidate_value = gate_metric("forecast", serving, candidate, np.full(100, -1.0),
                                                         (10.0, 3.0))
    assert metric == "minus_mean_quiet_score"
    assert (serving_value, candidate_value) == (pytest.approx(-1.0), pytest.approx(-1.2))


# ---- retrains end to end ----------------------------------------------------------------------------------

def test_the_gate_slice_is_held_out_of_training(tmp_path: Path) -> None:
    """Training (and so its early stopping) gets each entity's oldest rows only; the gate judges the newest."""
    record, trainer = _retrain(tmp_path, {"task": "forecast"}, {"task": "forecast"}, "none")
    assert record["decision"] == "promoted", record
    table = ReadingStore(tmp_path / "store", feature_names(4)).load()
    seen, cuts = hold_out(table, trainer.options.val_fraction)
    assert trainer.trained_on.num_rows == seen.num_rows == sum(c - s for s, c, _ in cuts)
    ts, trained_ts = table.column("ts").to_numpy(), trainer.trained_on.column("ts").to_numpy()
    trained_entities = np.array(trainer.trained_on.column("entity").to_pylist())
    for s, c, e in cuts:
        entity = table.column("entity")[s].as_py()
        assert c < e and trained_ts[trained_entities == entity].max() < ts[c:e].min()
    assert record["gate_windows"] == sum(e - c for _, c, e in cuts)  # one window ending at each held-out row
    assert trainer.events == [record["candidate"]]


def test_an_always_zero_regress_candidate_is_rejected(tmp_path: Path) -> None:
    """The serving spike model predicts the delays; a candidate predicting 0 everywhere (the no-op graph)
    used to win: the old gate rewarded the smallest mean prediction."""
    record, trainer = _retrain(tmp_path, {"task": "regress"}, {"task": "regress", "kind": "noop"}, "delays")
    assert record["decision"] == "rejected" and record["metric"] == "minus_mae", record
    assert "worse than the serving" in record["reason"]
    assert Registry(tmp_path / "registry").current_version() == record["serving"] and not trainer.events


def test_a_candidate_no_better_than_chance_is_rejected_by_the_quality_floor(tmp_path: Path) -> None:
    """Serving and candidate are both the constant no-op graph: the gate sees a tie, the floor sees chance."""
    record, trainer = _retrain(tmp_path, {"kind": "noop"}, {"kind": "noop"}, "events")
    assert record["serving_value"] == record["candidate_value"], record
    assert record["decision"] == "rejected" and "quality floor" in record["reason"], record
    assert record["quality"]["ok"] is False and not trainer.events


# ---- one trainer at a time ----------------------------------------------------------------------------

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from fabwatch.models.sidecar.trainer import TrainerLock
    lock = TrainerLock(sys.argv[1])
    print(lock.acquire(), flush=True)
    time.sleep(600)
""")


def test_the_trainer_lock_is_exclusive_and_dies_with_its_holder(tmp_path: Path) -> None:
    first, second = TrainerLock(tmp_path), TrainerLock(tmp_path)
    assert first.acquire() and not second.acquire()
    first.release()
    assert second.acquire()
    second.release()

    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "True"
        assert not TrainerLock(tmp_path).acquire()  # held by another process
        (tmp_path / ".trainer.lock").write_text('{"pid": 1, "host": "elsewhere", "since": 0}')
        assert not TrainerLock(tmp_path).acquire()  # however old it says it is: a retrain may take a day
    finally:
        holder.kill()
        holder.wait(30)
    lock = TrainerLock(tmp_path)
    assert lock.acquire()  # the kernel released it with the process: no stale lock to clear
    lock.release()
