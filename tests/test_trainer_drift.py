"""The sidecar trainer's drift check against a real broker: readings from the serving version's training
distribution score low, a shifted feature scores high and is named, both land in ``decisions.jsonl`` and the
metrics, ``retrain_on_drift`` retrains before the schedule (once: the gap holds the next), and a version made
before drift checks reports drift as unavailable."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from fabwatch.models.sidecar.trainer import Trainer, TrainerOptions
from fabwatch.models.training import drift
from fabwatch.stream.kafka.config import Settings
from fabwatch.stream.kafka.topics import ensure_topics
from onnx_fixtures import make_registry, readings
from stream_helpers import produce

pytestmark = [pytest.mark.integration]
ENTITIES = [f"OHT-{i:03d}" for i in range(4)]
STEPS = 400  # per entity and batch: 1,600 readings, more than a check needs (drift.MIN_ROWS)
T0 = 1_700_000_000_000  # readings()' default start; one step a second
SHIFTED = "f02"


def _values(records: list[dict]) -> np.ndarray:
    return np.array([r["values"] for r in records], np.float32)


def _same() -> list[dict]:
    """Readings from the training distribution (another seed)."""
    return readings(ENTITIES, STEPS, seed=3)


def _shifted() -> list[dict]:
    """The next STEPS seconds, with SHIFTED 1.5 standard deviations higher."""
    later = readings(ENTITIES, STEPS, seed=4, t0=T0 + STEPS * 1000)
    j = int(SHIFTED[1:])
    for r in later:
        r["values"][j] += 3.0
    return later


def _history(registry: Path) -> list[dict]:
    return [json.loads(line) for line in (registry / "decisions.jsonl").read_text().splitlines()]


@pytest.fixture
def referenced(tmp_path: Path) -> Path:
    """A registry whose serving version (the tiny forecast model: no labels needed) carries the training
    distribution of 2,000 steps of ``readings(seed=0)`` as its drift reference."""
    reg = make_registry(tmp_path / "registry", task="forecast")
    serving_dir, serving = reg.resolve()
    staging = reg.stage()
    shutil.copytree(serving_dir, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns("manifest.json"))
    ref = drift.reference(_values(readings(ENTITIES, 2000, seed=0)), serving.feature_names)
    reg.promote(reg.commit(staging, serving.model_copy(update={"drift_reference": ref})))
    return reg.root


def _options(registry: Path, tmp_path: Path, **kw) -> TrainerOptions:
    # the drift window is the newest STEPS seconds of event time: one batch of readings
    return TrainerOptions(registry=registry, store=tmp_path / "store", drift_window_s=STEPS, **kw)


def test_drift_is_low_on_the_training_distribution_and_high_on_a_shifted_feature(
        settings: Settings, referenced: Path, tmp_path: Path):
    ensure_topics(settings, [settings.topics.sensors])
    same, shifted = _same(), _shifted()
    trainer = Trainer(settings, _options(referenced, tmp_path))
    gauge = trainer.metrics.registry.get_sample_value
    try:
        produce(settings, settings.topics.sensors, same)
        trainer.ingest()
        calm = trainer.check_drift()
        calm_gauges = {f: gauge("fabwatch_trainer_feature_drift", {"feature": f}) for f in calm["psi"]}
        produce(settings, settings.topics.sensors, shifted)
        trainer.ingest()
        drifted = trainer.check_drift()
    finally:
        trainer.close()

    assert calm["decision"] == "none" and calm["rows"] == len(same), calm
    assert len(calm["psi"]) == 4 and calm["max_psi"] < 0.1
    assert calm_gauges == pytest.approx(calm["psi"], abs=1e-4)
    assert drifted["decision"] == "drifted" and drifted["rows"] == len(shifted), drifted  # the window: new readings only
    assert drifted["feature"] == SHIFTED and drifted["max_psi"] > 0.25
    assert all(v < 0.1 for f, v in drifted["psi"].items() if f != SHIFTED), drifted["psi"]
    assert gauge("fabwatch_trainer_drift_max") == pytest.approx(drifted["max_psi"], abs=1e-4)
    assert gauge("fabwatch_trainer_feature_drift", {"feature": SHIFTED}) > 0.25
    assert gauge("fabwatch_trainer_drift_limit") == 0.25
    assert [(r["check"], r["decision"]) for r in _history(referenced)] == [("drift", "none"), ("drift", "drifted")]
    assert _history(referenced)[-1]["psi"] == drifted["psi"]


class CopyingTrainer(Trainer):
    """Training replaced by a copy of the serving version: what starts a retrain is under test, not TensorFlow."""

    def train_candidate(self, overrides: dict) -> tuple[str, float]:
        serving_dir, serving = self.registry.resolve()
        staging = self.registry.stage()
        shutil.copytree(serving_dir, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns("manifest.json"))
        return self.registry.commit(staging, serving.model_copy()), 0.0


def test_retrain_on_drift_retrains_before_the_schedule_and_the_gap_stops_a_loop(
        settings: Settings, referenced: Path, tmp_path: Path):
    ensure_topics(settings, [settings.topics.sensors, settings.topics.models])
    produce(settings, settings.topics.sensors, _same() + _shifted())
    # the copied candidate keeps the serving reference, so the drift stays: only the gap prevents a second retrain
    trainer = CopyingTrainer(settings, _options(referenced, tmp_path, retrain_on_drift=True, drift_every_s=0.5))
    try:
        # a check that retrains, the retrain, the next check (each check writes a line, so this ends)
        trainer.run(every_s=86_400, stop=lambda: (referenced / "decisions.jsonl").exists()
                    and len(_history(referenced)) >= 3)
    finally:
        trainer.close()
    history = _history(referenced)
    checks = [r for r in history if r.get("check") == "drift"]
    retrains = [r for r in history if "check" not in r]
    assert checks[0]["decision"] == "retrain" and checks[0]["feature"] == SHIFTED, checks[0]
    assert len(retrains) == 1 and retrains[0]["trigger"] == "drift", retrains
    assert history.index(retrains[0]) == 1                     # right after the check that asked for it
    assert [c["decision"] for c in checks[1:]] == ["too_soon"]


def test_a_version_without_a_reference_reports_drift_unavailable_once(
        settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    registry = make_registry(tmp_path / "registry", task="forecast").root  # as made before drift checks
    ensure_topics(settings, [settings.topics.sensors])
    produce(settings, settings.topics.sensors, _same())
    trainer = Trainer(settings, _options(registry, tmp_path))
    try:
        trainer.ingest()
        with caplog.at_level(logging.INFO, logger="fabwatch.trainer"):
            records = [trainer.check_drift(), trainer.check_drift()]
    finally:
        trainer.close()
    assert [r["decision"] for r in records] == ["unavailable", "unavailable"] and "psi" not in records[0]
    assert "no drift reference" in records[0]["reason"]
    assert math.isnan(trainer.metrics.registry.get_sample_value("fabwatch_trainer_drift_max"))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "drift unavailable" in r.getMessage()]
    assert len(warnings) == 1
