"""Offline evaluation: predictions row-aligned, metrics, plot, bad input; and the guarantee we
advertise: a live replay through broker and processor yields exactly the offline alert_ids."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from onnx_fixtures import feature_names, readings
from fabwatch.export.runtime import ScoringModel
from fabwatch.stream.decode import BatchDecoder
from fabwatch.stream.engine import ScoringEngine
from fabwatch.stream.kafka.config import Settings
from fabwatch.stream.offline.evaluate import evaluate_file
from fabwatch.stream.windows import CONFLICT, DUPLICATE
from stream_helpers import replay_and_serve

T0 = 1_700_000_000_000
SPIKES = {"E00": [150, 260], "E03": [220]}


def _write_csv(path: Path, entities: list[str], steps: int, spikes=SPIKES, bad_rows: bool = False) -> Path:
    rows = readings(entities, steps, spikes=spikes, t0=T0)
    names = feature_names(4)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["entity", "ts", *names, "label"])
        for r in rows:
            step = (r["ts"] - T0) // 1000
            label = int(any(r["entity"] == e and step in at for e, at in spikes.items()))
            w.writerow([r["entity"], r["ts"], *r["values"], label])
        if bad_rows:
            w.writerow(["E01", "not-a-time", 1, 2, 3, 4, 0])
    return path


def test_offline_alerts_predictions_and_metrics(registry: Path, tmp_path: Path):
    data = _write_csv(tmp_path / "rec.csv", ["E00", "E01", "E02", "E03"], 300, bad_rows=True)
    ev = evaluate_file(registry, data)
    opened = sorted((a.entity, (a.window_end_ts - T0) // 1000) for a in ev.alerts if a.state == "open")
    assert opened == [("E00", 150), ("E00", 260), ("E03", 220)]
    m = ev.metrics
    assert m["rows_in_file"] == 1201 and m["rows_rejected"] == 1
    assert m["eventwise"]["events"] == 3 and m["eventwise"]["events_detected"] == 3
    assert m["eventwise"]["false_alarms"] == 0 and m["eventwise"]["mean_detection_delay_steps"] == 0
    assert m["pointwise"]["roc_auc"] > 0.9 and m["pointwise"]["fp"] == 0


def test_cli_writes_row_aligned_predictions_and_a_plot(registry: Path, tmp_path: Path):
    data = _write_csv(tmp_path / "rec.csv", ["E00", "E01", "E02", "E03"], 300, bad_rows=True)
    out, png = tmp_path / "pred.csv", tmp_path / "plot.png"
    proc = subprocess.run([sys.executable, "-m", "fabwatch.stream.cli.main", "evaluate", "--registry", str(registry),
                           "--data", str(data), "--predictions", str(out), "--plot", str(png), "--skip-rows", "100",
                           "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["rows_evaluated"] == 4 * 200 and report["plot_entity"] == "E00"
    rows = list(csv.DictReader(open(out)))
    source = list(csv.DictReader(open(data)))
    assert len(rows) == len(source) == 1201
    assert all(r["entity"] == s["entity"] and r["ts"] == s["ts"] for r, s in zip(rows[:-1], source[:-1]))
    assert rows[0]["score"] == "" and rows[0]["pred"] == "0"          # no full window yet
    assert rows[-1]["entity"] == "" and rows[-1]["pred"] == "0"        # the rejected row keeps its place
    spike_row = next(r for r in rows if r["entity"] == "E00" and int(r["ts"]) == T0 + 150_000)
    assert spike_row["pred"] == "1" and float(spike_row["score"]) > 3.0
    assert png.stat().st_size > 20_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_bad_input_exits_2_with_one_line(registry: Path, tmp_path: Path):
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("entity,ts,x\nA,1,2\n")
    for args in (["--data", str(tmp_path / "missing.csv")], ["--data", str(wrong)]):
        proc = subprocess.run([sys.executable, "-m", "fabwatch.stream.cli.main", "evaluate", "--registry", str(registry), *args],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert "f00" in proc.stderr  # names the model's feature the file lacks


@pytest.mark.integration
def test_live_replay_yields_exactly_the_offline_alert_ids(settings: Settings, registry: Path, tmp_path: Path):
    data = _write_csv(tmp_path / "rec.csv", [f"E{i:02d}" for i in range(6)], 320)
    offline = {a.alert_id for a in evaluate_file(registry, data).alerts}
    assert len(offline) >= 3

    live = replay_and_serve(settings, data, registry, "replay-check", len(offline), tmp_path / "serve.log",
                            timeout_s=90)
    assert live == offline

    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": settings.resolve_bootstrap()}
    compare = subprocess.run([sys.executable, "-m", "fabwatch.stream.cli.main", "evaluate", "--registry", str(registry), "--data",
                              str(data), "--from-topic", settings.topics.alerts, "--json"], capture_output=True,
                             text=True, env=env, timeout=120)
    assert compare.returncode == 0, compare.stderr
    assert json.loads(compare.stdout)["live_comparison"]["identical"] is True


def test_resends_same_verdict_in_the_engine_and_offline(registry: Path, tmp_path: Path):
    """An identical re-send is dropped and counted; a corrected one (same entity and ts, other values) is a
    conflict, which the processor dead-letters as conflicting_duplicate; evaluate reports both the same way."""
    rows = readings(["E00", "E01"], 120, t0=T0)
    resend, corrected = dict(rows[101]), {**rows[151], "values": [v + 1 for v in rows[151]["values"]]}
    stream = rows[:102] + [resend] + rows[102:152] + [corrected] + rows[152:]
    data = tmp_path / "resends.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["entity", "ts", *feature_names(4)])
        w.writerows([r["entity"], r["ts"], *r["values"]] for r in stream)

    engine = ScoringEngine(ScoringModel.from_registry(registry))
    cols = BatchDecoder(feature_names(4)).decode([json.dumps(r).encode() for r in stream])
    live = engine.process(cols.keys, cols.ts, cols.values)
    offline = evaluate_file(registry, data)

    expected = np.zeros(len(stream), np.int8)
    expected[[102, 153]] = [DUPLICATE, CONFLICT]
    np.testing.assert_array_equal(live.status, expected)
    np.testing.assert_array_equal(offline.status, expected)
    assert (offline.metrics["duplicates_dropped"], offline.metrics["rows_conflicting_duplicate"]) == (1, 1)
    assert engine.windows.counters.duplicates == engine.windows.counters.conflicts == 1
