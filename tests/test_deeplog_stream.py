"""DeepLog on the live stream: raw HDFS log -> `fabwatch replay --format hdfs-log` -> broker -> `fabwatch logs
serve` -> `log` alerts, for exactly the sessions (and windows) that offline evaluation flags."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from stream.logparse import parse_file
from stream.schemas import Alert, alert_id_for
from stream_helpers import REPO, committed_offsets, read_all, serve_env, stop

FIXTURES = Path(__file__).parent / "fixtures"
TEMPLATES = FIXTURES / "hdfs_tiny_templates.csv"
H, TOP_G = 3, 2
NORMAL = ["E5 E22 E11 E9 E26"] * 40 + ["E22 E5 E11 E9 E26"] * 10
# session -> its events; E30 (never seen in training) comes from the fixture's line naming two blocks
SESSIONS = {
    "blk_101": "E5 E22 E11 E9 E26", "blk_102": "E5 E22 E11 E9 E26", "blk_103": "E22 E5 E11 E9 E26",
    "blk_104": "E5 E22 E11 E9 E26",
    "blk_-201": "E26 E9 E11 E22 E5",        # impossible order
    "blk_202": "E5 E22 E11 E30 E9 E26",     # unknown key, on one line with blk_203
    "blk_203": "E5 E22 E11 E30 E9 E26",
    "blk_204": "E5 E22 E11 E9 E6",          # unknown key
    "blk_205": "E5 E22 E11",                # shorter than h + 1
}
FLAGGED = {"blk_-201", "blk_202", "blk_203", "blk_204", "blk_205"}


def _raw_log(path: Path) -> Path:
    """Sessions interleaved line by line, each line the fixture's line of that event with the block
    ids replaced; the fixture's non-HDFS line is kept."""
    fixture = (FIXTURES / "hdfs_tiny.log").read_text().splitlines()
    rows, _ = parse_file(FIXTURES / "hdfs_tiny.log", TEMPLATES)
    line_of = {r.event_id: fixture[r.line_id - 1] for r in rows}
    todo = {s: events.split() for s, events in SESSIONS.items()}
    out = [fixture[4]]
    while any(todo.values()):
        for session, events in todo.items():
            if not events:
                continue
            event = events.pop(0)
            if event == "E30":  # blk_202 comes first: its line names blk_203 too
                out.append(line_of["E30"].replace("blk_7503483334202473044", "blk_202")
                           .replace("blk_-3544583377289625738", "blk_203"))
                todo["blk_203"].remove("E30")
            else:
                out.append(re.sub(r"blk_-?\d+", session, line_of[event]))
    path.write_text("\n".join(out) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DeepLog with h = 3, g = 2 trained in seconds on the fixture's normal event orders."""
    from stream.cli import app

    root = tmp_path_factory.mktemp("deeplog-stream")
    (root / "train").write_text("\n".join(NORMAL) + "\n")
    result = CliRunner().invoke(app, ["logs", "train", "--data", str(root / "train"), "--registry", str(root / "reg"),
                                      "--h", str(H), "--top-g", str(TOP_G), "--epochs", "300", "--json"])
    assert result.exit_code == 0, result.output
    return root / "reg"


def _offline(raw: Path, registry: Path) -> tuple[set[str], set[tuple[str, int]]]:
    """Offline evaluation of the parsed log: flagged sessions and the (session, line) of every bad window."""
    from stream.logscore import LogKeyScorer, build_windows, score_sessions

    rows, _ = parse_file(raw, TEMPLATES)
    keys, lines = defaultdict(list), defaultdict(list)
    for r in rows:
        keys[r.block_id].append(r.event_id)
        lines[r.block_id].append(r.line_id)
    names = list(keys)
    scorer = LogKeyScorer.from_registry(registry)
    verdicts = score_sessions(scorer, [keys[s] for s in names])
    w = build_windows([scorer.vocab.encode(keys[s]) for s in names], scorer.h)
    bad = np.flatnonzero(~scorer.check(w.windows, w.next_keys))
    windows = {(names[w.session[i]], lines[names[w.session[i]]][w.position[i]]) for i in bad.tolist()}
    return {s for s, a in zip(names, verdicts.anomalous) if a}, windows


def _cli(settings, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stream.cli", *args], cwd=REPO, env=serve_env(settings),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.integration
def test_raw_log_replay_alerts_exactly_the_offline_flags(settings, tiny_model: Path, tmp_path: Path) -> None:
    raw = _raw_log(tmp_path / "hdfs.log")
    flagged, bad_windows = _offline(raw, tiny_model)
    assert flagged == FLAGGED  # the model learned the fixture's orders: the comparison below means something

    replayed = _cli(settings, "replay", str(raw), "--format", "hdfs-log", "--templates", str(TEMPLATES), "--json")
    assert replayed.returncode == 0, replayed.stderr
    sent = json.loads(replayed.stdout)
    n_rows = sum(len(e.split()) for e in SESSIONS.values())
    assert (sent["sent"], sent["topic"]) == (n_rows, settings.topics.logkeys)

    group = f"logs-{uuid.uuid4().hex[:8]}"
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        serve = subprocess.Popen([sys.executable, "-m", "stream.cli", "logs", "serve", "--registry", str(tiny_model),
                                  "--idle-timeout-s", "2", "--group", group, "--max-wait-ms", "20"],
                                 cwd=REPO, env=serve_env(settings), stdout=log, stderr=subprocess.STDOUT)
    try:
        expected = len(bad_windows) + 1  # + the short session's alert when it closes
        raw_alerts = read_all(settings, settings.topics.alerts, expect=expected, idle_s=4.0, timeout_s=60)
    finally:
        rc = stop(serve)
    output = log_path.read_text(errors="replace")
    assert rc == 0, output
    assert "stopped cleanly" in output

    alerts = [Alert.model_validate_json(a) for a in raw_alerts]
    assert {a.entity for a in alerts} == flagged
    assert all(a.kind == "log" and a.model_version == "v0001" for a in alerts)
    assert len({a.alert_id for a in alerts}) == len(alerts) == expected
    by_window = {(a.entity, a.detail["line"]): a for a in alerts if a.detail["reason"] != "short_session"}
    assert set(by_window) == bad_windows
    for (session, line), a in by_window.items():
        assert a.alert_id == alert_id_for(session, line, "v0001")
        assert len(a.detail["window"]) == H and len(a.detail["expected"]) == TOP_G
        assert a.score > a.threshold == TOP_G
    first = min((a for a in alerts if a.entity == "blk_-201"), key=lambda a: a.detail["line"])
    assert first.detail["key"] == "E26" and first.detail["window"] == ["<pad>"] * H
    assert set(first.detail["expected"]) == {"E5", "E22"}
    assert {(a.detail["key"], a.severity) for a in alerts if a.detail["reason"] == "unknown_key"} == {
        ("E30", "critical"), ("E6", "critical")}
    (short,) = [a for a in alerts if a.detail["reason"] == "short_session"]
    assert (short.entity, short.detail["keys"], short.threshold) == ("blk_205", 3, H + 1)

    # at-least-once: everything consumed was committed on SIGTERM
    committed = committed_offsets(settings, group, settings.topics.logkeys, settings.partitions)
    assert sum(max(offset, 0) for offset in committed.values()) == n_rows


def test_hdfs_log_replay_refuses_table_options_and_loop(tmp_path: Path) -> None:
    from stream.config import Settings

    settings = Settings(bootstrap="127.0.0.1:1")
    raw = FIXTURES / "hdfs_tiny.log"
    for extra in (["--loop"], ["--entity-col", "x"]):
        proc = _cli(settings, "replay", str(raw), "--format", "hdfs-log", "--templates", str(TEMPLATES), *extra)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("fabwatch: ")
