"""`make demo` on a small data set: the same code path a newcomer runs, against the test broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_shows_alerts_and_writes_the_report(kafka_bootstrap: str, tmp_path: Path):
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "FABWATCH_HOME": str(tmp_path / "home"),
           "COLUMNS": "160"}
    proc = subprocess.run([sys.executable, "-m", "fabwatch.stream.cli.demo", "--workdir", str(tmp_path / "demo"), "--entities", "4",
                           "--history-days", "1.5", "--replay-days", "0.5", "--anomaly-rate", "0.2"],
                          env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, (out + proc.stderr)[-3000:]
    assert "fabwatch alerts" in out and "model" in out          # the live alert table was drawn
    opened = int(out.split(" alerts opened")[0].rsplit(";", 1)[1])
    assert opened >= 1, out[-2000:]
    report = json.loads((tmp_path / "demo" / "evaluation.json").read_text())
    assert report["alerts_opened"] >= 1 and report["pointwise"]["roc_auc"] is not None
    png = tmp_path / "demo" / "evaluation.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 20_000
    assert "done" in out and str(tmp_path / "demo") in out
    chatter = ("oneDNN", "cuInit", "absl::InitializeLog", "tf2onnx")  # library start-up logs go to the step logs
    assert not [c for c in chatter if c in out + proc.stderr], (out + proc.stderr)[-3000:]
