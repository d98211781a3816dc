"""Command-line contract: one-line setting errors with exit 2, options from the environment, --version."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq


def _fabwatch(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fabwatch.stream.cli.main", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=120)


def test_bad_setting_exits_2_with_one_line_naming_the_variable() -> None:
    proc = _fabwatch("topics", env={"FABWATCH_PARTITIONS": "abc"})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "FABWATCH_PARTITIONS" in lines[0], proc.stderr


def test_options_read_the_environment(tmp_path: Path) -> None:
    out = tmp_path / "s.parquet"
    proc = _fabwatch("synth", "--out", str(out), "--steps", "50",
                     env={"FABWATCH_SYNTH_ENTITIES": "3", "FABWATCH_SYNTH_SEED": "5"})
    assert proc.returncode == 0, proc.stderr
    assert len(set(pq.read_table(out).column("entity").to_pylist())) == 3


def test_version_and_missing_dataset(tmp_path: Path) -> None:
    version = _fabwatch("--version")
    assert version.returncode == 0 and version.stdout.startswith("fabwatch 0.")
    missing = _fabwatch("bench", "logs", env={"FABWATCH_DATASETS": str(tmp_path)}, cwd=tmp_path)
    assert missing.returncode == 2 and "--data-dir" in missing.stderr


def test_kafka_options_take_json_numbers_and_booleans(monkeypatch) -> None:
    from confluent_kafka import Consumer

    from fabwatch.stream.kafka.config import Settings

    monkeypatch.setenv("FABWATCH_KAFKA_OPTIONS", '{"fetch.min.bytes": 1, "enable.partition.eof": true}')
    conf = Settings(bootstrap="127.0.0.1:9").client_config()
    assert conf["fetch.min.bytes"] == 1 and conf["enable.partition.eof"] is True
    Consumer({**conf, "group.id": "g"}).close()  # librdkafka takes them as they are
