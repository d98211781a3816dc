"""`fabwatch logs serve` in production: open sessions rebuilt after a SIGKILL and restart (the alerts are
exactly those of offline scoring, i.e. `logs evaluate`'s verdicts), Prometheus metrics, /ready, /healthz, and
hot reload of the registry's `current` log model."""

from __future__ import annotations

import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fabwatch.stream.schemas import Alert, alert_id_for
from stream_helpers import (REPO, committed_offsets, STARTED, log_has, produce, read_all, serve_env, stop,
                            wait_for)
from test_deeplog_stream import H, SESSIONS, tiny_model  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PATTERNS = list(SESSIONS.values())  # normal orders, bad orders, unknown keys, a short session
N_SESSIONS = 900
OPEN_AT_ONCE = 40  # sessions interleaved at any moment: a kill always cuts some in the middle


def _start_logs(settings, registry: Path, *args: str, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fabwatch.stream.cli.main", "logs", "serve", "--registry", str(registry), *args]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=serve_env(settings), stdout=log, stderr=subprocess.STDOUT)
    STARTED.append(proc)
    return proc


def _interleaved(seed: int) -> dict[str, list[tuple[str, int]]]:
    """Session -> its (key, line), the sessions interleaved key by key, ``OPEN_AT_ONCE`` at a time."""
    rng = random.Random(seed)
    todo = [(f"blk_{i}", PATTERNS[i % len(PATTERNS)].split()) for i in range(N_SESSIONS)]
    rng.shuffle(todo)
    sessions: dict[str, list[tuple[str, int]]] = {}
    active: list[tuple[str, list[str]]] = []
    line = 0
    while todo or active:
        while todo and len(active) < OPEN_AT_ONCE:
            active.append(todo.pop())
        name, events = active[rng.randrange(len(active))]
        line += 1
        sessions.setdefault(name, []).append((events.pop(0), line))
        active = [a for a in active if a[1]]
    return sessions


def _expected(registry: Path, sessions: dict[str, list[tuple[str, int]]]) -> tuple[set[str], set[str]]:
    """Offline scoring (what `logs evaluate` runs): the alert ids of every bad window and short session, and the
    sessions flagged."""
    from fabwatch.stream.logs.score import LogKeyScorer, build_windows, score_sessions

    scorer = LogKeyScorer.from_registry(registry)
    names = list(sessions)
    keys = [[k for k, _ in sessions[s]] for s in names]
    w = build_windows([scorer.vocab.encode(k) for k in keys], scorer.h)
    bad = np.flatnonzero(~scorer.check(w.windows, w.next_keys))
    ids = {alert_id_for(names[w.session[i]], sessions[names[w.session[i]]][w.position[i]][1], scorer.version)
           for i in bad.tolist()}
    ids |= {alert_id_for(s, sessions[s][-1][1], scorer.version, "short_session") for s in names
            if len(sessions[s]) < scorer.h + 1}
    verdicts = score_sessions(scorer, keys)
    return ids, {s for s, flagged in zip(names, verdicts.anomalous) if flagged}


def _committed(settings, group: str) -> int:
    return sum(max(o, 0) for o in committed_offsets(settings, group, settings.topics.logkeys).values())


@pytest.mark.chaos
@pytest.mark.timeout(600)
def test_sigkill_and_restart_alert_exactly_the_offline_verdicts(topics, tiny_model: Path, tmp_path: Path) -> None:  # noqa: F811
    sessions = _interleaved(seed=18)
    expected, flagged = _expected(tiny_model, sessions)
    assert len(flagged) > N_SESSIONS // 3 and len(expected) > len(flagged)  # the model separates the patterns
    now = int(time.time() * 1000)
    records = sorted(({"session": s, "ts": now + line, "key": k, "line": line}
                      for s, keys in sessions.items() for k, line in keys), key=lambda r: r["line"])
    total = produce(topics, topics.topics.logkeys, records, key_field="session")

    group = f"logs-{uuid.uuid4().hex[:8]}"
    args = ("--group", group, "--max-batch", "2", "--max-wait-ms", "5", "--idle-timeout-s", "3",
            "--rebuild-chunk", "64")
    log = tmp_path / "serve.log"
    rng = random.Random(18)
    cut_mid_stream, done = 0, 0
    while cut_mid_stream < 3 and done < total:
        proc = _start_logs(topics, tiny_model, *args, log_path=log)
        before = done
        wait_for(lambda: _committed(topics, group) > before, 120, what="progress after a (re)start")
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        done = _committed(topics, group)
        cut_mid_stream += done < total
    proc = _start_logs(topics, tiny_model, *args, log_path=log)
    try:
        wait_for(lambda: _committed(topics, group) == total, 180, what="every log key committed")
        raw = read_all(topics, topics.topics.alerts, expect=len(expected), idle_s=5.0, timeout_s=90)
    finally:
        assert stop(proc) == 0, log.read_text()[-3000:]
    output = log.read_text(errors="replace")
    assert cut_mid_stream >= 1, "every kill came after the stream was done: nothing was rebuilt"
    assert "open sessions rebuilt" in output

    alerts = [Alert.model_validate_json(v) for v in raw]
    got = Counter(a.alert_id for a in alerts)
    print(f"\nlogs serve sigkill: {cut_mid_stream} kills mid-stream, {len(expected)} alerts expected, "
          f"{len(expected - set(got))} lost, {len(set(got) - expected)} unexpected, "
          f"{sum(n - 1 for n in got.values())} duplicated (same id)")
    assert set(got) == expected  # none lost, none made up by a session cut at a restart; duplicates keep ids
    assert {a.entity for a in alerts} == flagged


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def test_metrics_probes_and_hot_reload_of_the_log_model(topics, tiny_model: Path, tmp_path: Path) -> None:  # noqa: F811
    from fabwatch.export.registry import Registry
    from fabwatch.stream.cli.main import app
    from test_deeplog_stream import NORMAL

    registry = tmp_path / "registry"
    shutil.copytree(tiny_model, registry)
    (tmp_path / "train").write_text("\n".join(NORMAL) + "\n")
    trained = CliRunner().invoke(app, ["logs", "train", "--data", str(tmp_path / "train"), "--registry", str(registry),
                                       "--h", str(H), "--top-g", "1", "--epochs", "100", "--no-promote", "--json"])
    assert trained.exit_code == 0, trained.output
    assert json.loads(trained.stdout)["version"] == "v0002" and Registry(registry).current_version() == "v0001"

    port = _free_port()
    log = tmp_path / "serve.log"
    proc = _start_logs(topics, registry, "--group", f"logs-{uuid.uuid4().hex[:8]}", "--metrics-port", str(port),
                       "--metrics-host", "127.0.0.1", "--idle-timeout-s", "1", "--max-wait-ms", "20", log_path=log)
    now = int(time.time() * 1000)

    def short_session(name: str, line: int) -> list[dict]:
        return [{"session": name, "ts": now + line + i, "key": k, "line": line + i} for i, k in enumerate(["E5", "E22"])]

    try:
        wait_for(lambda: _get(port, "/ready")[0] == 200, 90, what="/ready once partitions are assigned")
        assert _get(port, "/healthz") == (200, "ok\n")
        assert _get(port, "/nothing")[0] == 404
        status, text = _get(port, "/metrics")
        assert status == 200 and 'version="v0001"' in text and "fabwatch_ready 1.0" in text

        produce(topics, topics.topics.logkeys, short_session("blk_old", 1), key_field="session")
        first = read_all(topics, topics.topics.alerts, expect=1, timeout_s=60)
        assert [Alert.model_validate_json(v).model_version for v in first] == ["v0001"]

        Registry(registry).promote("v0002")
        wait_for(lambda: 'version="v0002"' in _get(port, "/metrics")[1], 60, what="the hot reload")
        assert log_has(log, "hot reload: v0001 -> v0002")
        produce(topics, topics.topics.logkeys, short_session("blk_new", 10), key_field="session")
        alerts = [Alert.model_validate_json(v) for v in read_all(topics, topics.topics.alerts, expect=2, timeout_s=60)]
        assert sorted((a.entity, a.model_version, a.detail["reason"]) for a in alerts) == [
            ("blk_new", "v0002", "short_session"), ("blk_old", "v0001", "short_session")]
        text = _get(port, "/metrics")[1]
        assert 'version="v0001"' not in text and 'fabwatch_model_reloads_total{result="ok"} 1.0' in text
        assert "fabwatch_logkeys_consumed_total 4.0" in text
        assert 'fabwatch_log_alerts_total{reason="short_session",severity="warning"} 2.0' in text
        assert 'fabwatch_log_sessions_closed_total{why="idle"} 2.0' in text
        assert _get(port, "/healthz") == (200, "ok\n")
    finally:
        assert stop(proc) == 0, log.read_text()[-3000:]
