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

from fabwatch.stream.logs.parse import parse_file
from fabwatch.stream.schemas import Alert, alert_id_for
from stream_helpers import REPO, committed_offsets, log_has, produce, read_all, serve_env, stop, wait_for

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
    from fabwatch.stream.cli.main import app

    root = tmp_path_factory.mktemp("deeplog-stream")
    (root / "train").write_text("\n".join(NORMAL) + "\n")
    result = CliRunner().invoke(app, ["logs", "train", "--data", str(root / "train"), "--registry", str(root / "reg"),
                                      "--h", str(H), "--top-g", str(TOP_G), "--epochs", "300", "--no-invariants",
                                      "--json"])  # the sequence model alone: its alerts are compared with offline
    assert result.exit_code == 0, result.output
    return root / "reg"


def _offline(raw: Path, registry: Path) -> tuple[set[str], set[tuple[str, int]]]:
    """Offline evaluation of the parsed log: flagged sessions and the (session, line) of every bad window."""
    from fabwatch.stream.logs.score import LogKeyScorer, build_windows, score_sessions

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
    return subprocess.run([sys.executable, "-m", "fabwatch.stream.cli.main", *args], cwd=REPO, env=serve_env(settings),
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
    produce(settings, settings.topics.logkeys, [b"not a log key"], keys=[b"blk_101"])  # -> the DLQ, not an alert
    future = {"session": "blk_101", "ts": 4_102_444_800_000, "key": "E30", "line": 10_000}  # 2100: DLQ, clock_skew
    produce(settings, settings.topics.logkeys, [future], key_field="session")

    group = f"logs-{uuid.uuid4().hex[:8]}"
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        serve = subprocess.Popen([sys.executable, "-m", "fabwatch.stream.cli.main", "logs", "serve", "--registry", str(tiny_model),
                                  "--idle-timeout-s", "2", "--group", group, "--max-wait-ms", "20"],
                                 cwd=REPO, env=serve_env(settings), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: log_has(log_path, "serving logkeys model"), timeout_s=60, what="logs serve to start")
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

    dead = [json.loads(d) for d in read_all(settings, settings.topics.dlq, expect=2, timeout_s=10)]
    assert sorted((d["reason"], d["key"]) for d in dead) == [("bad_json", "blk_101"), ("clock_skew", "blk_101")]

    # at-least-once: everything consumed was committed on SIGTERM
    committed = committed_offsets(settings, group, settings.topics.logkeys, settings.partitions)
    assert sum(max(offset, 0) for offset in committed.values()) == n_rows + 2


def test_hdfs_log_replay_refuses_table_options_and_loop(tmp_path: Path) -> None:
    from fabwatch.stream.kafka.config import Settings

    settings = Settings(bootstrap="127.0.0.1:1")
    raw = FIXTURES / "hdfs_tiny.log"
    for extra in (["--loop"], ["--entity-col", "x"]):
        proc = _cli(settings, "replay", str(raw), "--format", "hdfs-log", "--templates", str(TEMPLATES), *extra)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("fabwatch: ")


class _Chain:
    """A stand-in ONNX session: the next key is the window's last key + 1 (after PAD: the first key)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def get_inputs(self) -> list:
        from types import SimpleNamespace

        return [SimpleNamespace(name="keys")]

    def run(self, _outputs: None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        last = feeds["keys"][:, -1]
        nxt = np.minimum(np.where(last == 0, 2, last + 1), self.vocab_size - 1)
        probs = np.full((len(last), self.vocab_size), 0.01, np.float32)
        probs[np.arange(len(last)), nxt] = 1.0
        return [probs / probs.sum(axis=1, keepdims=True)]


def _sessions(max_sessions: int = 100):
    from types import SimpleNamespace

    from fabwatch.stream.logs.score import LogKeyScorer
    from fabwatch.stream.logs.serve import LogSessions

    manifest = SimpleNamespace(extra={"vocabulary": ["a", "b", "c", "d", "e"], "h": 2, "top_g": 1}, version="v9")
    return LogSessions(LogKeyScorer(_Chain(7), manifest), max_sessions=max_sessions)


def _keys(*items: tuple[str, str, int]) -> list:
    from fabwatch.stream.schemas import LogKey

    return [LogKey(session=s, ts=1_000 * line, key=k, line=line) for s, k, line in items]


def test_sessions_across_polls_match_offline_scoring() -> None:
    """Polls split sessions anywhere, redeliveries are not scored twice; the verdicts are offline's."""
    from fabwatch.stream.logs.score import score_sessions

    live = _sessions()
    polls = [_keys(("s1", "a", 1), ("s2", "a", 2), ("s1", "b", 3), ("s3", "a", 4)),
             _keys(("s2", "c", 5), ("s1", "b", 3), ("s1", "c", 6), ("s3", "z", 7), ("s1", "d", 8))]
    alerts = [a for poll in polls for a in live.process(poll, [None] * len(poll), now=0.0)]
    assert [(a.entity, a.detail["key"], a.detail["reason"], a.severity) for a in alerts] == [
        ("s2", "c", "unexpected_key", "warning"), ("s3", "z", "unknown_key", "critical")]
    assert (alerts[0].detail["window"], alerts[0].detail["expected"], alerts[0].score) == (["<pad>", "a"], ["b"], 2.0)
    assert live.close_idle(5.0, now=1.0) == []  # nothing idle yet
    short = live.close_idle(5.0, now=10.0)
    assert sorted((a.entity, a.detail["reason"], a.detail["keys"]) for a in short) == [
        ("s2", "short_session", 2), ("s3", "short_session", 2)]
    assert not live.sessions and len(live.windows) == 0

    offline = score_sessions(live.scorer, [["a", "b", "c", "d"], ["a", "c"], ["a", "z"]])
    assert offline.anomalous.tolist() == [False, True, True]


def test_sessions_beyond_the_cap_close_early() -> None:
    live = _sessions(max_sessions=2)
    live.process(_keys(("s1", "a", 1), ("s2", "a", 2)), [None] * 2, now=0.0)
    alerts = live.process(_keys(("s2", "b", 3), ("s3", "a", 4)), [None] * 2, now=1.0)
    assert [(a.entity, a.detail["reason"]) for a in alerts] == [("s1", "short_session")]
    assert list(live.sessions) == ["s2", "s3"] and "s1" not in live.windows


def test_log_messages_are_log_keys_keyed_by_session() -> None:
    from fabwatch.stream.offline.replay import log_messages
    from fabwatch.stream.schemas import LogKey

    messages = log_messages(FIXTURES / "hdfs_tiny.log", TEMPLATES)
    keys = [LogKey.model_validate_json(v) for v in messages.values]
    assert keys[0] == LogKey(session="blk_-1608999687919862906", ts=1_226_262_918_000, key="E5", line=1)
    assert [k.session.encode() for k in keys] == messages.keys and messages.ts.tolist() == [k.ts for k in keys]
    assert [(k.session, k.line) for k in keys if k.key == "E30"] == [  # one line, two sessions
        ("blk_7503483334202473044", 7), ("blk_-3544583377289625738", 7)]
    assert messages.rows_in_file == 8 and messages.shifted is None


def test_warmed_sessions_score_the_rest_as_an_uninterrupted_run() -> None:
    """A restart rebuilds open sessions from the keys before the committed offset (``warm``, no alerts): the
    keys after it then get the alerts, with the ids, that one uninterrupted run gives them."""
    stream = _keys(("s1", "a", 1), ("s2", "a", 2), ("s1", "b", 3), ("s2", "b", 4), ("s1", "d", 5), ("s2", "c", 6),
                   ("s3", "a", 7), ("s1", "e", 8), ("s3", "c", 9))
    cut = 4
    uninterrupted = _sessions()
    uninterrupted.process(stream[:cut], [None] * cut, now=0.0)
    after = uninterrupted.process(stream[cut:], [None] * (len(stream) - cut), now=1.0)
    assert [(a.entity, a.detail["key"]) for a in after] == [("s1", "d"), ("s3", "c")]

    restarted = _sessions()
    restarted.warm(stream[:cut], [None] * cut, now=0.0)
    assert restarted.scored == 0 and restarted.sessions["s1"].keys == 2
    rebuilt = restarted.process(stream[cut:], [None] * (len(stream) - cut), now=1.0)
    assert [a.alert_id for a in rebuilt] == [a.alert_id for a in after]

    cold = _sessions()  # what logs serve did before: sessions cut by the restart start afresh
    cold_ids = {a.alert_id for a in cold.process(stream[cut:], [None] * (len(stream) - cut), now=1.0)}
    assert cold_ids != {a.alert_id for a in after}


def test_time_spent_rebuilding_is_not_idle_time() -> None:
    """An assignment rebuilds partition after partition while nothing is consumed: sessions rebuilt first must
    not close as idle for the time the later partitions took."""
    live = _sessions()
    live.warm(_keys(("s1", "a", 1), ("s1", "b", 2)), [None] * 2, now=0.0)
    live.restart_idle_clocks(now=10.0)
    assert live.close_idle(5.0, now=12.0) == []
    assert [a.entity for a in live.close_idle(5.0, now=16.0)] == ["s1"]


def test_a_hot_swap_re_encodes_the_held_keys_into_the_new_vocabulary() -> None:
    from types import SimpleNamespace

    from fabwatch.export.errors import UsageError
    from fabwatch.stream.logs.score import LogKeyScorer

    live = _sessions()
    live.process(_keys(("s1", "a", 1), ("s1", "b", 2)), [None] * 2, now=0.0)
    other = SimpleNamespace(extra={"vocabulary": ["e", "b", "x", "a"], "h": 2, "top_g": 1}, version="v10")
    live.swap(LogKeyScorer(_Chain(6), other))
    (alert,) = live.process(_keys(("s1", "zzz", 3)), [None], now=1.0)
    assert (alert.model_version, alert.detail["reason"], alert.detail["window"]) == ("v10", "unknown_key", ["a", "b"])

    longer = SimpleNamespace(extra={"vocabulary": ["a", "b"], "h": 3, "top_g": 1}, version="v11")
    with pytest.raises(UsageError, match="h=3"):
        live.swap(LogKeyScorer(_Chain(4), longer))
