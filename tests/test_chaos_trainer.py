"""Fault injection, part 3: sidecar trainers on a real broker racing each other and an operator.

Each trainer is a process (``held_trainer.py``) whose training is held open until the test releases it, so
the test can start a second trainer, or roll the registry back, while a retrain runs. Exactly one trainer
retrains however long it takes, and what an operator sets during a retrain is what serves after it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from fabwatch.export.registry import Registry
from fabwatch.stream.kafka.config import Settings
from fabwatch.stream.kafka.topics import ensure_topics
from onnx_fixtures import add_version, readings
from stream_helpers import produce, read_all, serve_env, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.chaos]
HELPER = Path(__file__).with_name("held_trainer.py")
ENTITIES = [f"OHT-{i:03d}" for i in range(4)]


def _registry(root: Path, versions: int) -> Registry:
    """``versions`` promoted versions of the tiny spike model (forecast: the store needs no labels)."""
    for _ in range(versions):
        add_version(root, task="forecast")
    return Registry(root)


def _start(settings: Settings, registry: Path, tmp_path: Path, name: str, *args: str,
           env: dict[str, str] | None = None) -> subprocess.Popen:
    log = open(tmp_path / f"{name}.log", "wb")
    return subprocess.Popen([sys.executable, str(HELPER), str(registry), str(tmp_path / "store"),
                             str(tmp_path / "control"), *args], env=serve_env(settings) | (env or {}),
                            stdout=subprocess.PIPE, stderr=log)


def _record(proc: subprocess.Popen, tmp_path: Path, name: str) -> dict:
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    return json.loads(out.decode().strip().splitlines()[-1])


def _training(control: Path) -> list[Path]:
    return sorted(control.glob("training-*"))


@pytest.fixture
def produced(settings: Settings) -> Settings:
    """``settings`` with sensor and models topics, and 300 steps of readings already on the sensor topic."""
    ensure_topics(settings, [settings.topics.sensors, settings.topics.models], partitions=3)
    produce(settings, settings.topics.sensors, readings(ENTITIES, 300, seed=3))
    return settings


@pytest.mark.timeout(480)
def test_two_trainers_racing_exactly_one_retrains_however_long_it_takes(produced: Settings, tmp_path: Path) -> None:
    """The second trainer starts while the first has been retraining for 7 h by its clock (retrains are
    projected at 11-21 h): it must not take the lock over. Once the first ends, the lock is free at once."""
    reg = _registry(tmp_path / "registry", 1)
    control = tmp_path / "control"
    control.mkdir()
    first = _start(produced, reg.root, tmp_path, "first")
    wait_for(lambda: _training(control) or first.poll() is not None, timeout_s=120, what="the first retrain")
    second = _start(produced, reg.root, tmp_path, "second", "--no-ingest", env={"HELD_TRAINER_HOURS_LATER": "7"})
    try:
        wait_for(lambda: second.poll() is not None or len(_training(control)) > 1, timeout_s=120,
                 what="the second trainer to give up or take the lock")
        assert [p.name for p in _training(control)] == [f"training-{first.pid}"]  # only the first retrains
    finally:
        (control / "release").touch()
    late, early = _record(second, tmp_path, "second"), _record(first, tmp_path, "first")
    assert late["decision"] == "skipped" and "another trainer holds" in late["reason"], late
    assert early["decision"] == "promoted", early
    assert reg.current_version() == early["candidate"] == reg.versions()[-1]

    third = _start(produced, reg.root, tmp_path, "third", "--no-ingest")  # the first has exited: no stale lock
    after = _record(third, tmp_path, "third")
    assert after["decision"] == "promoted" and after["serving"] == early["candidate"], after


@pytest.mark.timeout(480)
def test_rollback_during_a_retrain_stands(produced: Settings, tmp_path: Path) -> None:
    """An operator rolls back while a retrain runs: at its end ``current`` is what the operator set, the
    candidate is registered but not promoted, the decision says why, and no "promoted" event goes out."""
    reg = _registry(tmp_path / "registry", 2)
    old, serving = reg.versions()
    assert reg.current_version() == serving
    control = tmp_path / "control"
    control.mkdir()
    trainer = _start(produced, reg.root, tmp_path, "trainer")
    wait_for(lambda: _training(control) or trainer.poll() is not None, timeout_s=120, what="the retrain")
    try:
        rollback = subprocess.run([sys.executable, "-m", "fabwatch.stream.cli.main", "registry", "rollback",
                                   "--registry", str(reg.root), "--json"], capture_output=True, text=True,
                                  timeout=60)
        assert rollback.returncode == 0, rollback.stderr[-2000:]
        assert json.loads(rollback.stdout)["current"] == old
    finally:
        (control / "release").touch()
    record = _record(trainer, tmp_path, "trainer")
    assert record["decision"] == "conflict" and record["serving"] == serving, record
    assert reg.current_version() == old                      # the operator's choice stands
    assert record["candidate"] in reg.versions()             # kept for inspection, not serving
    decisions = [json.loads(line) for line in (reg.root / "decisions.jsonl").read_text().splitlines()]
    assert decisions[-1]["decision"] == "conflict"
    events = [orjson.loads(m) for m in read_all(produced, produced.topics.models, idle_s=2.0)]
    assert not [e for e in events if e["action"] == "promoted"], events
