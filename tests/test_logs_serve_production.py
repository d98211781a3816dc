"""`fabwatch logs serve` in production: open sessions rebuilt after a SIGKILL and restart (the alerts are
exactly those of offline scoring with the model version's sequence and count models, i.e. the verdicts of
`logs evaluate --detector combined`), Prometheus metrics, /ready, /healthz, and hot reload of the registry's
`current` log model, its count model included."""

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
import orjson
import pytest
from confluent_kafka import Producer
from typer.testing import CliRunner

from fabwatch.stream.schemas import Alert, alert_id_for
from stream_helpers import (REPO, committed_offsets, STARTED, log_has, produce, read_all, serve_env, stop,
                            wait_for)
from test_deeplog_stream import H, NORMAL, SESSIONS, TOP_G, tiny_model  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
LOST_STEP = ["E5 E22 E11 E9", "E22 E5 E11 E9"]  # in a normal order, E26 lost: only the count model sees it
PATTERNS = list(SESSIONS.values()) + LOST_STEP  # normal orders, bad orders, unknown keys, a short session, lost steps
N_SESSIONS = 440
OPEN_AT_ONCE = 40  # sessions interleaved at any moment: a kill always cuts some in the middle


def _train(registry: Path, data: Path, *args: str) -> dict:
    """`logs train` on the normal event orders: h = 3, g = 2, and an exact count model (min support 1)."""
    from fabwatch.stream.cli.main import app

    data.write_text("\n".join(NORMAL) + "\n")
    result = CliRunner().invoke(app, ["logs", "train", "--data", str(data), "--registry", str(registry), "--h", str(H),
                                      "--top-g", str(TOP_G), "--epochs", "300", "--min-support", "1.0", "--json",
                                      *args])
    assert result.exit_code == 0, result.output
    trained = json.loads(result.stdout)
    assert "count(E5) == count(E26)" in trained["count_model"]["invariants"]
    return trained


@pytest.fixture(scope="module")
def counted_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny DeepLog of ``tiny_model`` with the count invariants of its training sessions beside it."""
    root = tmp_path_factory.mktemp("counted")
    _train(root / "reg", root / "train")
    return root / "reg"


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


def _expected(registry: Path, sessions: dict[str, list[tuple[str, int]]]) -> tuple[set[str], set[str], set[str]]:
    """Offline scoring with what `logs evaluate --detector combined` runs: the alert ids of every bad window, short
    session and session breaking a count invariant; the sessions the combined verdict flags; those the count
    model alerts on."""
    from fabwatch.stream.logs.invariants import CountModel
    from fabwatch.stream.logs.score import LogKeyScorer, build_windows, combine_verdicts, score_sessions

    scorer = LogKeyScorer.from_registry(registry)
    counts = CountModel.from_registry(registry, scorer.version)
    names = list(sessions)
    keys = [[k for k, _ in sessions[s]] for s in names]
    w = build_windows([scorer.vocab.encode(k) for k in keys], scorer.h)
    bad = np.flatnonzero(~scorer.check(w.windows, w.next_keys))
    ids = {alert_id_for(names[w.session[i]], sessions[names[w.session[i]]][w.position[i]][1], scorer.version)
           for i in bad.tolist()}
    ids |= {alert_id_for(s, sessions[s][-1][1], scorer.version, "short_session") for s in names
            if len(sessions[s]) < scorer.h + 1}
    # at close, a session long enough for the length rule gets the count model's verdict (an unknown key is the
    # sequence model's alert already)
    count_verdicts = counts.check(keys)
    counted = {s for s, why in zip(names, count_verdicts.reason) if why in ("invariant", "unseen_count")
               and len(sessions[s]) >= scorer.h + 1}
    ids |= {alert_id_for(s, sessions[s][-1][1], scorer.version, str(why))
            for s, why in zip(names, count_verdicts.reason) if s in counted}
    flagged, _ = combine_verdicts(score_sessions(scorer, keys), count_verdicts, "combined")
    return ids, {s for s, f in zip(names, flagged) if f}, counted


def _evaluate_agrees(registry: Path, sessions: dict[str, list[tuple[str, int]]], alerted: set[str],
                     tmp_path: Path) -> None:
    """`logs evaluate --detector combined` on the sessions, labelled 1 exactly where serve alerted: no FP, no FN."""
    from fabwatch.stream.cli.main import app

    labelled = tmp_path / "served.csv"
    labelled.write_text("Sequence,label\n" + "".join(f"{' '.join(k for k, _ in keys)},{int(s in alerted)}\n"
                                                     for s, keys in sessions.items()))
    result = CliRunner().invoke(app, ["logs", "evaluate", "--registry", str(registry), "--labeled", str(labelled),
                                      "--detector", "combined", "--uncached-limit", "0", "--json"])
    assert result.exit_code == 0, result.output
    verdict = json.loads(result.stdout)
    assert (verdict["detector"], verdict["FP"], verdict["FN"], verdict["TP"]) == ("combined", 0, 0, len(alerted))


def _produce_at(settings, records: list[dict], timestamp_ms: int, partition: int = -1) -> None:
    """Produce keyed by session, every message stamped ``timestamp_ms``: one live stream produced in two parts
    (the rebuild reads broker time to tell which sessions may still be open). ``partition``: -1 by key."""
    p = Producer(settings.client_config(**{"linger.ms": 5, "enable.idempotence": True}))
    for r in records:
        p.produce(settings.topics.logkeys, orjson.dumps(r), r["session"].encode(), partition=partition,
                  timestamp=timestamp_ms)
    assert p.flush(30) == 0


def _committed(settings, group: str) -> int:
    return sum(max(o, 0) for o in committed_offsets(settings, group, settings.topics.logkeys).values())


@pytest.mark.chaos
@pytest.mark.timeout(600)
def test_sigkill_and_restart_alert_exactly_the_combined_verdicts(topics, counted_model: Path, tmp_path: Path) -> None:
    """The stream comes in two parts. The first is served to its end and the server SIGKILLed before any session
    closes (a long idle timeout), so the sessions cut by the part's end straddle a kill, lost steps among them:
    their count verdicts need the keys from before the kill (rebuilt) and after it. The second part is served
    with random SIGKILLs and restarts mid-stream."""
    sessions = _interleaved(seed=18)
    expected, flagged, counted = _expected(counted_model, sessions)
    assert len(flagged) > len(sessions) // 3 and len(expected) > len(flagged)  # the model separates the patterns
    assert {s for s in sessions if " ".join(k for k, _ in sessions[s]) in LOST_STEP} == counted
    now = int(time.time() * 1000)
    records = sorted(({"session": s, "ts": now + line, "key": k, "line": line}
                      for s, keys in sessions.items() for k, line in keys), key=lambda r: r["line"])
    cut = len(records) // 2  # lines 1..cut in the first part
    straddling = {s for s, keys in sessions.items() if keys[0][1] <= cut < keys[-1][1]}
    assert straddling & counted and straddling & (flagged - counted)

    group = f"logs-{uuid.uuid4().hex[:8]}"
    args = ("--group", group, "--max-batch", "2", "--max-wait-ms", "5", "--rebuild-chunk", "256")
    log = tmp_path / "serve.log"
    _produce_at(topics, records[:cut], now)
    proc = _start_logs(topics, counted_model, *args, "--idle-timeout-s", "600", log_path=log)
    wait_for(lambda: _committed(topics, group) == cut, 120, what="the first part committed")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    first = [Alert.model_validate_json(v) for v in read_all(topics, topics.topics.alerts, idle_s=1.0)]
    assert {a.detail["reason"] for a in first} <= {"unexpected_key", "unknown_key"}  # no session closed yet
    _produce_at(topics, records[cut:], now)
    total = len(records)

    args += ("--idle-timeout-s", "4")
    rng = random.Random(18)
    cut_mid_stream, done = 0, cut
    while cut_mid_stream < 3 and done < total:
        proc = _start_logs(topics, counted_model, *args, log_path=log)
        before = done
        wait_for(lambda: _committed(topics, group) > before, 120, what="progress after a (re)start")
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        done = _committed(topics, group)
        cut_mid_stream += done < total
    proc = _start_logs(topics, counted_model, *args, log_path=log)
    try:
        wait_for(lambda: _committed(topics, group) == total, 180, what="every log key committed")
        # by id, not by count: at-least-once repeats would make up a count before the last sessions close
        wait_for(lambda: expected <= {Alert.model_validate_json(v).alert_id
                                      for v in read_all(topics, topics.topics.alerts, idle_s=1.0)},
                 90, every_s=2.0, what="every expected alert")
        raw = read_all(topics, topics.topics.alerts, idle_s=6.0)  # and whatever else came
    finally:
        assert stop(proc) == 0, log.read_text()[-3000:]
    output = log.read_text(errors="replace")
    assert cut_mid_stream >= 1, "every kill came after the stream was done: nothing was rebuilt mid-stream"
    assert "open sessions rebuilt" in output

    alerts = [Alert.model_validate_json(v) for v in raw]
    got = Counter(a.alert_id for a in alerts)
    print(f"\nlogs serve sigkill: {cut_mid_stream + 1} kills, {len(expected)} alerts expected, "
          f"{len(expected - set(got))} lost, {len(set(got) - expected)} unexpected, "
          f"{sum(n - 1 for n in got.values())} duplicated (same id)")
    assert set(got) == expected  # none lost, none made up by a session cut at a restart; duplicates keep ids
    assert {a.entity for a in alerts} == flagged
    invariant = {a.entity for a in alerts if a.detail["reason"] == "invariant"}
    assert invariant == counted and invariant & straddling
    _evaluate_agrees(counted_model, sessions, {a.entity for a in alerts}, tmp_path)


@pytest.mark.chaos
def test_a_restart_counts_every_key_of_the_sessions_it_rebuilds(topics, counted_model: Path, tmp_path: Path) -> None:
    """h + 1 keys rebuild a session's windows, not its counts: a normal session of 5 keys rebuilt from its last 4
    (the re-read chunk here) would break count(E5) == count(E26) when it closes after the restart."""
    now = int(time.time() * 1000)

    def session(name: str, events: str, first_line: int) -> list[dict]:
        return [{"session": name, "ts": now + line, "key": k, "line": line}
                for line, k in enumerate(events.split(), start=first_line)]

    group = f"logs-{uuid.uuid4().hex[:8]}"
    args = ("--group", group, "--rebuild-chunk", "4")
    log = tmp_path / "serve.log"
    _produce_at(topics, session("blk_ok", NORMAL[0], 1), now, partition=0)
    proc = _start_logs(topics, counted_model, *args, "--idle-timeout-s", "600", log_path=log)
    wait_for(lambda: _committed(topics, group) == 5, 120, what="blk_ok committed")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    proc = _start_logs(topics, counted_model, *args, "--idle-timeout-s", "1", log_path=log)
    try:
        wait_for(lambda: log_has(log, "(1 open sessions rebuilt"), 120, what="blk_ok rebuilt")
        _produce_at(topics, session("blk_lost", LOST_STEP[0], 6), now, partition=0)  # closes after blk_ok
        raw = read_all(topics, topics.topics.alerts, expect=1, idle_s=3.0, timeout_s=60)
    finally:
        assert stop(proc) == 0, log.read_text()[-3000:]
    alerts = [Alert.model_validate_json(v) for v in raw]
    assert [(a.entity, a.detail["reason"], a.detail["counts"]) for a in alerts] == [
        ("blk_lost", "invariant", {"E5": 1, "E22": 1, "E11": 1, "E9": 1})]


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


def test_hot_reload_brings_in_the_new_versions_count_model(topics, tiny_model: Path, tmp_path: Path) -> None:  # noqa: F811
    """Serving v0001 (no count model), a session that loses a step raises nothing; once v0002 (with one) is
    promoted, the same session raises an `invariant` alert scored by v0002."""
    from fabwatch.export.registry import Registry

    registry = tmp_path / "registry"
    shutil.copytree(tiny_model, registry)
    assert _train(registry, tmp_path / "train", "--no-promote")["version"] == "v0002"
    assert Registry(registry).current_version() == "v0001"

    port = _free_port()
    log = tmp_path / "serve.log"
    proc = _start_logs(topics, registry, "--group", f"logs-{uuid.uuid4().hex[:8]}", "--metrics-port", str(port),
                       "--metrics-host", "127.0.0.1", "--idle-timeout-s", "1", "--max-wait-ms", "20", log_path=log)
    now = int(time.time() * 1000)

    def lost_step(name: str, line: int) -> list[dict]:
        return [{"session": name, "ts": now + line + i, "key": k, "line": line + i}
                for i, k in enumerate(LOST_STEP[0].split())]

    def metrics() -> str:
        return _get(port, "/metrics")[1]

    try:
        wait_for(lambda: _get(port, "/ready")[0] == 200, 90, what="/ready once partitions are assigned")
        produce(topics, topics.topics.logkeys, lost_step("blk_before", 1), key_field="session")
        wait_for(lambda: 'fabwatch_log_sessions_closed_total{why="idle"} 1.0' in metrics(), 60,
                 what="blk_before closed under v0001")

        Registry(registry).promote("v0002")
        wait_for(lambda: 'version="v0002"' in metrics(), 60, what="the hot reload")
        produce(topics, topics.topics.logkeys, lost_step("blk_after", 10), key_field="session")
        wait_for(lambda: 'fabwatch_log_sessions_closed_total{why="idle"} 2.0' in metrics(), 60,
                 what="blk_after closed under v0002")
        raw = read_all(topics, topics.topics.alerts, expect=1, idle_s=3.0, timeout_s=60)
        text = metrics()
    finally:
        assert stop(proc) == 0, log.read_text()[-3000:]
    alerts = [Alert.model_validate_json(v) for v in raw]
    assert [(a.entity, a.model_version, a.detail["reason"], a.detail["relation"], a.alert_id) for a in alerts] == [
        ("blk_after", "v0002", "invariant", "count(E5) == count(E26) broken: count(E5)=1, count(E26)=0",
         alert_id_for("blk_after", 13, "v0002", "invariant"))]
    assert 'fabwatch_log_alerts_total{reason="invariant",severity="warning"} 1.0' in text
