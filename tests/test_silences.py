"""Maintenance silences: the rule (which alerts are held back), its offline use (`evaluate --silences`) and,
on a real broker, a running processor that follows `fabwatch silence add|remove`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from fabwatch.export.errors import UsageError
from fabwatch.stream.engine import ScoreColumns
from fabwatch.stream.offline.evaluate import evaluate_file
from fabwatch.stream.schemas import Alert, SourceOffset, Silence, alert_id_for
from fabwatch.stream.silences import SilenceGate, SilenceSet, load_silences, parse_time_ms
from onnx_fixtures import readings
from stream_helpers import REPO, log_has, produce, read_all, serve_env, start_serve, stop, wait_for
from test_evaluate import T0, _write_csv

H = 3_600_000


def silence(sid: str = "s1", *, entity: str | None = "A", match: str | None = None, starts: int = 10 * H,
            until: int = 20 * H) -> Silence:
    return Silence(id=sid, entity=entity, match=match, starts=starts, until=until, reason="pump swap", created_at=0)


def alert(entity: str, end_ts: int, state: str = "open", partition: int = 0) -> Alert:
    return Alert(alert_id=alert_id_for(entity, end_ts, "v1", state), entity=entity, kind="anomaly", score=1.0,
                 threshold=0.5, severity="warning" if state == "open" else "info", window_start_ts=end_ts - 1000,
                 window_end_ts=end_ts, model_version="v1", state=state,  # type: ignore[arg-type]
                 source=SourceOffset(topic="t", partition=partition, offset=0))


def ids(alerts: list[Alert]) -> list[tuple[str, int, str]]:
    return [(a.entity, a.window_end_ts // H, a.state) for a in alerts]


# ---- the rule -------------------------------------------------------------------------------------

def test_an_open_in_the_silence_is_held_back_with_its_close_and_others_flow() -> None:
    gate = SilenceGate(SilenceSet([silence(starts=10 * H, until=20 * H)]))
    published, silenced = gate.apply([
        alert("A", 5 * H), alert("A", 12 * H, "closed"),  # opened before: its close resolves it, even inside
        alert("A", 14 * H), alert("B", 14 * H),          # inside: A held back, B not named
        alert("A", 25 * H, "closed"),                     # the close of a silenced open, after the silence: held
        alert("A", 20 * H + 1),                           # `until` is exclusive: flows again
    ])
    assert ids(published) == [("A", 5, "open"), ("A", 12, "closed"), ("B", 14, "open"), ("A", 20, "open")]
    assert ids(silenced) == [("A", 14, "open"), ("A", 25, "closed")]
    assert {a.silence_id for a in silenced} == {"s1"} and all(a.silence_id is None for a in published)


def scored(entity: str, *hours: int) -> ScoreColumns:
    """The windows a batch scored for ``entity``, ending at those hours."""
    ends = np.asarray([h * H for h in hours], np.int64)
    return ScoreColumns(np.arange(len(ends)), np.zeros(len(ends), np.float32), ends, "v1", [entity] * len(ends))


def test_an_alert_still_open_when_its_silence_lapses_is_published_then_with_its_close() -> None:
    gate = SilenceGate(SilenceSet([silence(starts=10 * H, until=20 * H)]))
    published, silenced = gate.apply([alert("A", 14 * H)], [scored("A", 14, 16, 19)])
    assert published == [] and ids(silenced) == [("A", 14, "open")]
    # the fault outlasts the maintenance: at A's first window past `until` its open goes out, as made
    published, silenced = gate.apply([alert("A", 25 * H, "closed")], [scored("A", 20, 21, 25)])
    assert ids(published) == [("A", 14, "open"), ("A", 25, "closed")] and silenced == []
    assert published[0].silence_id is None and published[0].alert_id == alert("A", 14 * H).alert_id

    # closed inside the silence: the pair stays held back, however many windows come after
    gate = SilenceGate(SilenceSet([silence(starts=10 * H, until=20 * H)]))
    published, silenced = gate.apply([alert("A", 12 * H), alert("A", 18 * H, "closed")], [scored("A", 12, 18, 21, 30)])
    assert published == [] and ids(silenced) == [("A", 12, "open"), ("A", 18, "closed")]

    # a silence removed early releases at the entity's next window
    silences = SilenceSet([silence(starts=10 * H, until=20 * H)])
    gate = SilenceGate(silences)
    gate.apply([alert("A", 11 * H)], [scored("A", 11)])
    silences.remove("s1")
    published, _ = gate.apply([], [scored("B", 12), scored("A", 13)])
    assert ids(published) == [("A", 11, "open")]


def test_globs_match_case_sensitively_and_the_first_silence_by_id_names_it() -> None:
    gate = SilenceGate(SilenceSet([silence("z-all", entity=None, match="OHT-*"),
                                   silence("a-one", entity="OHT-7")]))
    published, silenced = gate.apply([alert("OHT-7", 15 * H), alert("OHT-8", 15 * H), alert("oht-9", 15 * H)])
    assert [(a.entity, a.silence_id) for a in silenced] == [("OHT-7", "a-one"), ("OHT-8", "z-all")]
    assert ids(published) == [("oht-9", 15, "open")]


def test_mark_publishes_silenced_alerts_with_their_silence_id() -> None:
    gate = SilenceGate(SilenceSet([silence()]), mode="mark")
    published, silenced = gate.apply([alert("A", 15 * H), alert("A", 16 * H, "closed")])
    assert published == silenced and [a.silence_id for a in published] == ["s1", "s1"]


def test_a_removed_silence_no_longer_holds_opens_back_and_a_revoked_partition_forgets_its_opens() -> None:
    silences = SilenceSet([silence()])
    gate = SilenceGate(silences)
    gate.apply([alert("A", 11 * H, partition=2)])
    gate.drop_partitions([2])  # its new owner publishes that close
    silences.remove("s1")
    published, silenced = gate.apply([alert("A", 12 * H, "closed", partition=2), alert("A", 13 * H)])
    assert ids(published) == [("A", 12, "closed"), ("A", 13, "open")] and silenced == []


def test_a_silence_names_one_target_and_ends_after_it_starts() -> None:
    with pytest.raises(ValueError, match="exactly one of 'entity' or 'match'"):
        silence(entity="A", match="A*")
    with pytest.raises(ValueError, match="after its 'starts'"):
        silence(starts=20 * H, until=20 * H)


def test_time_arguments_and_silence_files(tmp_path: Path) -> None:
    assert parse_time_ms("2h", 1000) == 1000 + 2 * H and parse_time_ms("1700000000000", 0) == 1_700_000_000_000
    assert parse_time_ms("2023-11-14T22:13:20Z", 0) == 1_700_000_000_000
    with pytest.raises(UsageError, match="duration"):
        parse_time_ms("soon", 0)
    one, two = silence("s1"), silence("s2", entity=None, match="B*")
    (tmp_path / "a.json").write_text(json.dumps([one.model_dump(), two.model_dump()]))
    (tmp_path / "b.jsonl").write_text(one.model_dump_json() + "\n\n" + two.model_dump_json() + "\n")
    assert load_silences(tmp_path / "a.json") == load_silences(tmp_path / "b.jsonl") == [one, two]
    (tmp_path / "bad.jsonl").write_text(one.model_dump_json() + "\n" + json.dumps({"id": "x", "reason": "r"}) + "\n")
    with pytest.raises(UsageError, match=r"bad.jsonl: silence 2: "):
        load_silences(tmp_path / "bad.jsonl")


def test_the_commands_refuse_bad_input_in_one_line_before_any_broker(tmp_path: Path) -> None:
    for args, why in ((["--until", "2h"], "give one of --entity E or --match PATTERN"),
                      (["--entity", "A", "--match", "A*", "--until", "2h"], "give one of --entity E or --match PATTERN"),
                      (["--entity", "A", "--until", "soon"], "expected a duration"),
                      (["--entity", "A", "--starts", "3h", "--until", "2h"], "after its 'starts'")):
        proc = subprocess.run([sys.executable, "-m", "fabwatch.stream.cli.main", "silence", "add", "--reason", "pm",
                               "--bootstrap", "127.0.0.1:9", *args], capture_output=True, text=True, cwd=REPO,
                              timeout=60)
        assert proc.returncode == 2 and why in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr

    registry = tmp_path / "registry"
    registry.mkdir()
    proc = subprocess.run([sys.executable, "-m", "fabwatch.stream.cli.main", "serve", "--registry", str(registry),
                           "--silenced-alerts", "hide", "--bootstrap", "127.0.0.1:9"], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 2 and "--silenced-alerts takes drop or mark" in proc.stderr


# ---- offline ------------------------------------------------------------------------------------

def test_evaluate_with_silences_drops_their_alerts(registry: Path, tmp_path: Path) -> None:
    data = _write_csv(tmp_path / "rec.csv", ["E00", "E01", "E02", "E03"], 300)  # spikes: E00 150, 260; E03 220
    maintenance = Silence(id="pm", entity="E00", starts=T0 + 100_000, until=T0 + 200_000, reason="pm", created_at=0)
    (tmp_path / "silences.jsonl").write_text(maintenance.model_dump_json() + "\n")
    ev = evaluate_file(registry, data, silences=load_silences(tmp_path / "silences.jsonl"))
    opened = sorted((a.entity, (a.window_end_ts - T0) // 1000) for a in ev.alerts if a.state == "open")
    assert opened == [("E00", 260), ("E03", 220)]  # without the silence, E00 150 too (test_evaluate)
    assert ev.metrics["alerts_silenced"] == 2 and ev.metrics["eventwise"]["events_detected"] == 2

    proc = subprocess.run([sys.executable, "-m", "fabwatch.stream.cli.main", "evaluate", "--registry", str(registry),
                           "--data", str(data), "--silences", str(tmp_path / "silences.jsonl"), "--json"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["alerts_opened"] == 2 and report["alerts_silenced"] == 2
    (tmp_path / "bad.json").write_text('[{"id": "pm", "entity": "E00"}]')
    proc = subprocess.run([sys.executable, "-m", "fabwatch.stream.cli.main", "evaluate", "--registry", str(registry),
                           "--data", str(data), "--silences", str(tmp_path / "bad.json")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "bad.json" in proc.stderr


# ---- a running processor on a real broker ---------------------------------------------------------

def fabwatch(settings, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "fabwatch.stream.cli.main", *args], capture_output=True, text=True,
                          cwd=REPO, env=serve_env(settings), timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def metric(port: str, name: str) -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, flags=re.M)
    return float(m.group(1)) if m else None


@pytest.mark.integration
def test_a_silence_holds_an_entitys_alerts_back_then_they_flow_again(topics, registry, tmp_path) -> None:
    settings = topics
    log = tmp_path / "serve.log"
    proc = start_serve(settings, registry, "--metrics-port", "0", "--metrics-host", "127.0.0.1", log_path=log)
    try:
        wait_for(lambda: log_has(log, "metrics on port"), 60, what="metrics server")
        port = re.search(r"metrics on port (\d+)", log.read_text()).group(1)
        # 1. a silence of A over steps [100, 200): A's spike at 150 is held back, at 260 (after it) not
        fabwatch(settings, "silence", "add", "--entity", "A", "--starts", str(T0 + 100_000),
                 "--until", str(T0 + 200_000), "--reason", "pump swap", "--id", "pump")
        wait_for(lambda: metric(port, "fabwatch_silences") == 1.0, 60, what="the processor to see the silence")
        produce(settings, settings.topics.sensors, readings(["A", "B"], 300, spikes={"A": [150, 260], "B": [150]},
                                                            t0=T0))
        first = [json.loads(v) for v in read_all(settings, settings.topics.alerts, expect=4, timeout_s=120)]
        assert sorted((a["entity"], (a["window_end_ts"] - T0) // 1000, a["state"]) for a in first) == [
            ("A", 260, "open"), ("A", 261, "closed"), ("B", 150, "open"), ("B", 151, "closed")]

        # 2. a glob silence with no end in sight holds C1 back; removed, C1's next spike flows
        listed = json.loads(fabwatch(settings, "silence", "list", "--all", "--json"))
        assert [(s["id"], s["entity"], s["status"]) for s in listed] == [("pump", "A", "expired")]
        (tmp_path / "listed.json").write_text(json.dumps(listed))  # what `evaluate --silences` takes
        assert [s.id for s in load_silences(tmp_path / "listed.json")] == ["pump"]
        fabwatch(settings, "silence", "add", "--match", "C*", "--starts", str(T0 + 1_000_000), "--until", "1d",
                 "--reason", "line stop", "--id", "line")
        wait_for(lambda: metric(port, "fabwatch_silences") == 2.0, 60, what="the processor to see the second")
        later = readings(["C1"], 450, spikes={"C1": [150, 400]}, t0=T0 + 1_000_000, seed=5)
        produce(settings, settings.topics.sensors, later[:300])
        wait_for(lambda: metric(port, 'fabwatch_alerts_silenced_total{state="open"}') == 2.0, 120,
                 what="C1's spike to be silenced")
        fabwatch(settings, "silence", "remove", "line")
        wait_for(lambda: metric(port, "fabwatch_silences") == 1.0, 60, what="the processor to see the removal")
        produce(settings, settings.topics.sensors, later[300:])
        got = [json.loads(v) for v in read_all(settings, settings.topics.alerts, expect=6, timeout_s=120)]
    finally:
        assert stop(proc) == 0, log.read_text()[-2000:]
    c1 = sorted(((a["window_end_ts"] - T0 - 1_000_000) // 1000, a["state"]) for a in got if a["entity"] == "C1")
    assert c1 == [(400, "open"), (401, "closed")] and len(got) == 6
    assert all(a.get("silence_id") is None for a in got)
