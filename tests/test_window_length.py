"""The window length travels in the model's manifest: `train --window 30` gives a 30-step model, and `evaluate`
and `fabwatch serve` window by it (nothing assumes 100), with the same alert ids offline and live."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest

from fabwatch.export.registry import Registry
from fabwatch.models.training import synth
from fabwatch.stream.kafka.config import Settings
from fabwatch.stream.offline.evaluate import evaluate_file
from onnx_fixtures import feature_names, make_registry, readings
from stream_helpers import replay_and_serve

WINDOW = 30


def _fabwatch(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fabwatch.stream.cli.main", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def _first_scored(ev) -> dict[str, int]:
    """Per entity, the position of its first scored reading (window - 1 when windows are ``window`` long)."""
    entity = np.asarray(ev.records.entity, dtype=object)
    return {e: int(np.argmax(np.isfinite(ev.score[entity == e]))) for e in np.unique(entity)}


def test_evaluate_windows_by_the_manifest(tmp_path: Path) -> None:
    registry = make_registry(tmp_path / "registry", window=WINDOW).root
    rows = [{"entity": r["entity"], "ts": r["ts"], **dict(zip(feature_names(4), r["values"]))}
            for r in readings(["E00", "E01"], 120, spikes={"E00": [80]})]
    data = tmp_path / "rec.jsonl"
    data.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    ev = evaluate_file(registry, data)
    assert _first_scored(ev) == {"E00": WINDOW - 1, "E01": WINDOW - 1}
    assert [a.entity for a in ev.alerts if a.state == "open"] == ["E00"]


@pytest.fixture(scope="module")
def window_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A quick tiny ensemble with 30-step windows on synthetic fab data (well under a minute on 2 cores)."""
    root = tmp_path_factory.mktemp("window-30")
    data = root / "fab.parquet"
    synth.write(synth.generate(entities=3, steps=900, seed=1, anomaly_rate=0.2), data)
    proc = _fabwatch("train", "--data", str(data), "--registry", str(root / "registry"), "--quick",
                     "--window", str(WINDOW), "--no-promote", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    Registry(root / "registry").promote(json.loads(proc.stdout)["version"])  # this test is about windows, not quality
    return data, root / "registry"


@pytest.mark.slow
def test_train_window_option_reaches_the_manifest_and_evaluate(window_model: tuple[Path, Path]) -> None:
    data, registry = window_model
    manifest = Registry(registry).resolve()[1]
    assert manifest.window == WINDOW and manifest.inputs["window"][1] == WINDOW
    assert manifest.extra["config"]["window"] == WINDOW
    ev = evaluate_file(registry, data)
    assert set(_first_scored(ev).values()) == {WINDOW - 1}


@pytest.mark.slow
@pytest.mark.integration
def test_window_30_model_serves_the_alert_ids_of_evaluate(window_model: tuple[Path, Path], settings: Settings,
                                                          tmp_path: Path) -> None:
    data, registry = window_model
    offline = {a.alert_id for a in evaluate_file(registry, data).alerts}
    assert offline

    live = replay_and_serve(settings, data, registry, "window-30", len(offline), tmp_path / "serve.log")
    assert live == offline
