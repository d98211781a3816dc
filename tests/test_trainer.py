"""The sidecar trainer against a real broker: store -> retrain (warm start) -> gate -> promote ->
processor hot-swaps; a worse candidate is rejected; SIGKILL never leaves the registry unusable."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pytest

from fabwatch.export.registry import Registry
from fabwatch.export.runtime import ScoringModel
from fabwatch.models.training import synth
from fabwatch.models.sidecar.trainer import Trainer, TrainerLock, TrainerOptions
from fabwatch.stream.kafka.config import Settings
from fabwatch.models.sidecar.store import ReadingStore
from fabwatch.stream.kafka.topics import ensure_topics
from stream_helpers import produce, read_all, serve_env, start_serve, stop, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ENTITIES, STEPS = 6, 700


def _readings(table: pa.Table, labels: np.ndarray | None = None) -> list[dict]:
    feats = np.column_stack([table.column(f).to_numpy() for f in synth.FEATURES]).round(5).tolist()
    label = table.column("label").to_numpy() if labels is None else labels
    return [{"entity": e, "ts": int(t), "values": v, "label": int(lab)}
            for e, t, v, lab in zip(table.column("entity").to_pylist(), table.column("ts").to_pylist(), feats, label)]


@pytest.fixture
def serving(trained) -> Path:
    """The shared quick-trained registry (ROC-AUC ~0.95 on its validation split): a model worth keeping."""
    return trained[1].root


def _copy(registry: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "registry"
    shutil.copytree(registry, dst)
    return dst


def _trainer(settings: Settings, registry: Path, tmp_path: Path, **kw) -> Trainer:
    options = TrainerOptions(registry=registry, store=tmp_path / "store", quick=True, epochs=1, val_fraction=0.3,
                             **kw)
    return Trainer(settings, options)


def test_retrain_promotes_and_the_running_processor_switches(settings: Settings, serving: Path, tmp_path: Path):
    registry = _copy(serving, tmp_path)
    ensure_topics(settings, [settings.topics.sensors, settings.topics.alerts, settings.topics.models], partitions=3)
    recent = synth.generate(entities=ENTITIES, steps=STEPS, seed=4, anomaly_rate=0.2)
    produce(settings, settings.topics.sensors, _readings(recent))

    log = tmp_path / "serve.log"
    proc = start_serve(settings, registry, "--group", "proc", log_path=log)
    try:
        before = Registry(registry).current_version()
        wait_for(lambda: any(orjson.loads(a)["model_version"] == before
                             for a in read_all(settings, settings.topics.alerts, idle_s=1.0)),
                 timeout_s=120, what="alerts from the serving version")
        # any candidate passes: this test is the path
        trainer = _trainer(settings, registry, tmp_path, margin=1.0, quality_floor=False)
        try:
            assert trainer.ingest() == ENTITIES * STEPS
            retrain_started = time.time()
            record = trainer.retrain_once()
        finally:
            trainer.close()
        assert record["decision"] == "promoted", record
        # the rule FabwatchModelNotReloaded compares each processor's model load with this
        promoted_at = trainer.metrics.registry.get_sample_value("fabwatch_trainer_last_promotion_timestamp_seconds")
        assert retrain_started <= promoted_at <= time.time()
        serving_version = record["serving"]
        assert Registry(registry).current_version() == record["candidate"] == Registry(registry).versions()[-1]
        history = [json.loads(line) for line in (registry / "decisions.jsonl").read_text().splitlines()]
        assert history[-1]["decision"] == "promoted" and "serving_value" in history[-1]

        later = synth.generate(entities=ENTITIES, steps=STEPS, seed=5, anomaly_rate=0.2)
        shift = STEPS * synth.STEP_MS
        more = [{**r, "ts": r["ts"] + shift} for r in _readings(later)]
        produce(settings, settings.topics.sensors, more)
        wait_for(lambda: any(orjson.loads(a)["model_version"] == record["candidate"]
                             for a in read_all(settings, settings.topics.alerts, idle_s=1.0)),
                 timeout_s=120, what="alerts from the new version after the promotion")
    finally:
        assert stop(proc) == 0, log.read_text()[-2000:]
    models_topic = [orjson.loads(m) for m in read_all(settings, settings.topics.models)]
    assert [(e["version"], e["action"]) for e in models_topic] == [(record["candidate"], "promoted")]
    assert serving_version == before


def test_candidate_trained_on_shuffled_labels_is_rejected(settings: Settings, serving: Path, tmp_path: Path):
    registry = _copy(serving, tmp_path)
    ensure_topics(settings, [settings.topics.sensors])
    table = synth.generate(entities=ENTITIES, steps=STEPS, seed=6, anomaly_rate=0.2)
    labels = table.column("label").to_numpy().copy()
    # shuffle each entity's training part; the validation tail keeps the truth. From scratch (a warm
    # start would keep the serving model's skill), the candidate learns nothing.
    rng = np.random.default_rng(0)
    for e in range(ENTITIES):
        head = slice(e * STEPS, e * STEPS + int(STEPS * 0.7))
        labels[head] = rng.permutation(labels[head])
    produce(settings, settings.topics.sensors, _readings(table, labels))
    trainer = _trainer(settings, registry, tmp_path, margin=0.02, warm_start=False)
    try:
        trainer.ingest()
        record = trainer.retrain_once()
    finally:
        trainer.close()
    assert record["decision"] == "rejected", record
    assert trainer.metrics.registry.get_sample_value("fabwatch_trainer_last_promotion_timestamp_seconds") == 0
    assert record["candidate_value"] < record["serving_value"]
    assert Registry(registry).current_version() == record["serving"]
    assert record["candidate"] in Registry(registry).versions()  # kept for inspection, not serving


def test_sigkill_during_training_leaves_the_registry_serving(settings: Settings, serving: Path, tmp_path: Path):
    registry = _copy(serving, tmp_path)
    ensure_topics(settings, [settings.topics.sensors])
    produce(settings, settings.topics.sensors, _readings(synth.generate(entities=ENTITIES, steps=STEPS, seed=7)))
    args = [sys.executable, "-m", "fabwatch.stream.cli.main", "trainer", "--registry", str(registry), "--store",
            str(tmp_path / "store"), "--once", "--quick", "--epochs", "1", "--margin", "1.0", "--no-quality-floor",
            "--json"]
    log = tmp_path / "trainer.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, env=serve_env(settings), stdout=out, stderr=subprocess.STDOUT)
    wait_for(lambda: any(registry.glob(".staging-*")) or proc.poll() is not None, timeout_s=180,
             what="training to reach export")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    reg = Registry(registry)
    serving_version = reg.current_version()
    assert serving_version == Registry(serving).current_version()  # the kill changed nothing that serves
    ScoringModel.from_registry(registry)               # current still verifies and loads
    lock = TrainerLock(registry)
    assert lock.acquire()                              # the kernel released the killed trainer's lock
    lock.release()

    rerun = subprocess.run(args, env=serve_env(settings), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads(rerun.stdout)["decision"] == "promoted", rerun.stdout
    assert reg.current_version() == reg.versions()[-1] != serving_version
    ScoringModel.from_registry(registry)


def test_sigkill_during_promotion_leaves_the_registry_consistent(settings: Settings, serving: Path, tmp_path: Path):
    """Killed after the candidate's commit, then after the switch of ``current``: each time every visible
    version verifies, ``current`` loads, the store reads back whole; a final run promotes normally."""
    registry = _copy(serving, tmp_path)
    reg, store = Registry(registry), tmp_path / "store"
    ensure_topics(settings, [settings.topics.sensors])
    readings = _readings(synth.generate(entities=ENTITIES, steps=STEPS, seed=8))
    produce(settings, settings.topics.sensors, readings)
    args = ["trainer", "--registry", str(registry), "--store", str(store), "--once", "--quick", "--epochs", "1",
            "--margin", "1.0", "--no-quality-floor", "--json"]
    helper = Path(__file__).with_name("kill_at_promotion.py")
    env = serve_env(settings) | {"PYTHONPATH": str(Path(__file__).parents[1])}

    def killed_at(point: str) -> None:
        run = subprocess.run([sys.executable, str(helper), point, *args], env=env, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == -signal.SIGKILL, (point, run.returncode, run.stderr[-2000:])
        for version in reg.versions():
            reg.verify(version)                        # no half-written version is visible
        ScoringModel.from_registry(registry)           # current verifies and loads
        assert ReadingStore(store, synth.FEATURES).load().num_rows == len(readings)  # store readable, no duplicates
        lock = TrainerLock(registry)
        assert lock.acquire()                          # released with the killed process: the next run takes it
        lock.release()

    before, count = reg.current_version(), len(reg.versions())
    killed_at("commit")
    assert reg.current_version() == before and len(reg.versions()) == count + 1  # committed, never promoted
    killed_at("switch")
    switched = reg.current_version()
    assert switched == reg.versions()[-1] != before                       # the switch itself is whole

    rerun = subprocess.run([sys.executable, "-m", "fabwatch.stream.cli.main", *args], env=env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads(rerun.stdout)["decision"] == "promoted", rerun.stdout
    assert reg.current_version() == reg.versions()[-1] != switched
    assert [r["previous"] for r in reg.promotion_history()][-1] == switched
    ScoringModel.from_registry(registry)


MAX_POLL_S = 10  # the store consumer's max.poll.interval.ms in the next test, in seconds


def test_a_retrain_longer_than_the_poll_interval_keeps_the_group_and_the_store_whole(
        settings: Settings, serving: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture):
    """Issue #20: two --every cycles whose training outlasts max.poll.interval.ms (10 s here, 5 min by
    default); readings arrive during the first. Both decisions are recorded, the second cycle trains on
    what arrived meanwhile, the store holds each reading once, and closing commits without error."""
    registry = _copy(serving, tmp_path)
    ensure_topics(settings, [settings.topics.sensors, settings.topics.models])
    # events often enough that each entity's training rows hold some once the gate slice is held out
    before = _readings(synth.generate(entities=ENTITIES, steps=STEPS, seed=9, anomaly_rate=0.2))
    shift = STEPS * synth.STEP_MS
    during = [{**r, "ts": r["ts"] + shift}
              for r in _readings(synth.generate(entities=ENTITIES, steps=STEPS, seed=10, anomaly_rate=0.2))]
    produce(settings, settings.topics.sensors, before)

    from fabwatch.models.training import train as train_module

    real_train = train_module.train
    calls: list[float] = []

    def slow_train(cfg: train_module.TrainConfig) -> train_module.TrainResult:
        """TensorFlow holds the trainer's thread past the poll interval; readings keep arriving."""
        if not calls:
            produce(settings, settings.topics.sensors, during)
        calls.append(time.monotonic())
        time.sleep(MAX_POLL_S + 5)
        return real_train(cfg)

    monkeypatch.setattr(train_module, "train", slow_train)
    # session.timeout.ms may not exceed max.poll.interval.ms; 6 s is the broker's minimum
    short_poll = settings.model_copy(update={"kafka_options": {"max.poll.interval.ms": str(MAX_POLL_S * 1000),
                                                               "session.timeout.ms": "6000"}})
    decisions = registry / "decisions.jsonl"
    trainer = _trainer(short_poll, registry, tmp_path, margin=1.0, quality_floor=False)

    def retrains() -> list[dict]:
        """The retrains' records (the drift checks' are marked ``check``)."""
        records = [json.loads(line) for line in decisions.read_text().splitlines()] if decisions.exists() else []
        return [r for r in records if "check" not in r]

    try:
        trainer.run(every_s=10, stop=lambda: len(retrains()) >= 2)
    finally:
        trainer.close()  # the old trainer died here: Commit failed: Local: Group partition assignment lost

    first, second = retrains()
    assert len(calls) == 2 and first["duration_s"] > MAX_POLL_S and second["duration_s"] > MAX_POLL_S
    assert first["decision"] == second["decision"] == "promoted", (first, second)
    assert first["store_rows"] == len(before)
    assert second["store_rows"] == len(before) + len(during)  # ingested after the first retrain
    store = ReadingStore(tmp_path / "store", synth.FEATURES)
    assert store.rows() == store.load().num_rows == len(before) + len(during)  # every reading, each once
    assert not [r.getMessage() for r in caplog.records if r.name == "fabwatch.store"]  # never _MAX_POLL_EXCEEDED

