"""``fabwatch alerts forward`` on the real broker against a real local HTTP server that fails on demand:
every alert delivered at least once and in order per entity, nothing committed before delivery, a restart
after SIGTERM or SIGKILL delivers the rest, Alertmanager's format, and permanent refusals dead-lettered."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import orjson
import pytest

from fabwatch.stream.kafka.config import Settings
from fabwatch.stream.kafka.topics import ensure_topics
from fabwatch.stream.schemas import Alert, alert_id_for
from stream_helpers import REPO, STARTED, committed_offsets, produce, read_all, serve_env, stop, wait_for

PARTITIONS = 3


class Receiver:
    """A webhook / Alertmanager stand-in: answers ``failing`` (a status) while it is set, else ``refuse`` for
    bodies containing one of its strings, else 200; records every request and the bodies it accepted."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.failing: int | None = None
        self.refuse: dict[str, int] = {}
        self.requests = 0
        self.accepted: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = receiver._answer(self.path, body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _answer(self, path: str, body: bytes) -> int:
        with self.lock:
            self.requests += 1
            if self.requests <= self.fail_first:
                return 503
            if self.failing is not None:
                return self.failing
            for text, status in self.refuse.items():
                if text.encode() in body:
                    return status
            self.accepted.append((path, body))
            return 200

    def accepted_alerts(self) -> list[dict]:
        with self.lock:
            return [json.loads(body) for _, body in self.accepted]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


def alerts_for(entities: list[str], per_entity: int, model_version: str = "v0001") -> list[Alert]:
    """Alternating open / closed alerts per entity, window ends 1 s apart."""
    out = []
    for i in range(per_entity):
        for entity in entities:
            state = "open" if i % 2 == 0 else "closed"
            end_ts = 1_700_000_000_000 + i * 1000
            out.append(Alert(alert_id=alert_id_for(entity, end_ts, model_version, state), entity=entity,
                             kind="anomaly", score=2.0 if state == "open" else 0.1, threshold=1.0,
                             severity="warning" if state == "open" else "info", window_start_ts=end_ts - 99_000,
                             window_end_ts=end_ts, model_version=model_version, state=state))
    return out


def produce_alerts(settings: Settings, alerts: list[Alert | bytes]) -> None:
    ensure_topics(settings, [settings.topics.alerts, settings.topics.dlq], partitions=PARTITIONS)
    produce(settings, settings.topics.alerts,
            [a if isinstance(a, bytes) else a.model_dump(mode="json") for a in alerts],
            keys=[b"junk" if isinstance(a, bytes) else a.entity.encode() for a in alerts])


def start_forward(settings: Settings, *args: str, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fabwatch.stream.cli.main", "alerts", "forward", "--backoff-s", "0.05",
           "--backoff-max-s", "0.3", "--group", "fwd-test", *args]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=serve_env(settings), stdout=log, stderr=subprocess.STDOUT)
    STARTED.append(proc)
    return proc


def committed_total(settings: Settings) -> int:
    return sum(max(o, 0) for o in committed_offsets(settings, "fwd-test", settings.topics.alerts, PARTITIONS).values())


def by_entity(alerts: list[dict]) -> dict[str, list[str]]:
    """Alert ids per entity in arrival order, a redelivery right after its first delivery folded into one."""
    out: dict[str, list[str]] = {}
    for a in alerts:
        ids = out.setdefault(a["entity"], [])
        if not ids or ids[-1] != a["alert_id"]:
            ids.append(a["alert_id"])
    return out


@pytest.mark.integration
def test_webhook_delivers_every_alert_in_order_through_503s(settings: Settings, tmp_path: Path) -> None:
    r = Receiver(fail_first=5)
    sent = alerts_for(["OHT-1", "OHT-2", "STK-3", "STK-4"], per_entity=6)
    produce_alerts(settings, sent)
    port = free_port()
    proc = start_forward(settings, "--webhook", r.url, "--metrics-port", str(port), log_path=tmp_path / "fwd.log")
    try:
        wait_for(lambda: {a["alert_id"] for a in r.accepted_alerts()} >= {a.alert_id for a in sent}, 120,
                 what="every alert delivered")
        wait_for(lambda: committed_total(settings) == len(sent), 60, what="every offset committed")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        assert stop(proc) == 0
        r.server.shutdown()
    got = r.accepted_alerts()
    assert r.requests >= 5 + len(sent)
    bodies = {json.loads(body)["alert_id"]: body for _, body in r.accepted}
    assert bodies[sent[0].alert_id] == orjson.dumps(sent[0].model_dump(mode="json"))  # the bytes as published
    expected = by_entity([a.model_dump() for a in sent])
    assert by_entity(got) == expected  # none lost, in order per entity
    assert "retry" in (tmp_path / "fwd.log").read_text()
    assert 'fabwatch_forward_retries_total{status="503"} 5.0' in metrics
    assert f'fabwatch_forward_delivered_total{{state="open"}} {len(sent) // 2}.0' in metrics
    assert "fabwatch_forward_blocked 0.0" in metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_restart_after_sigterm_and_sigkill_delivers_what_was_not_committed(settings: Settings, tmp_path: Path,
                                                                           receiver: Receiver) -> None:
    sent = alerts_for(["OHT-1", "OHT-2", "STK-3"], per_entity=8)
    produce_alerts(settings, sent)
    log_path = tmp_path / "fwd.log"
    proc = start_forward(settings, "--webhook", receiver.url, log_path=log_path)
    wait_for(lambda: len(receiver.accepted) >= 6, 90, what="the first deliveries")
    receiver.failing = 503  # the receiver goes down: the forwarder retries and must not commit past it
    delivered = len(receiver.accepted)
    seen = receiver.requests
    wait_for(lambda: receiver.requests >= seen + 5, 60, what="retries")
    assert len(receiver.accepted) == delivered
    assert committed_total(settings) == delivered  # committed after delivery, never before
    assert stop(proc, timeout_s=20) == 0  # SIGTERM ends a retry wait cleanly
    assert committed_total(settings) == delivered

    proc = start_forward(settings, "--webhook", receiver.url, log_path=log_path)
    seen = receiver.requests
    wait_for(lambda: receiver.requests >= seen + 3, 90, what="retries after the restart")
    stop(proc, signal.SIGKILL)
    assert committed_total(settings) == delivered

    receiver.failing = None  # back up
    proc = start_forward(settings, "--webhook", receiver.url, log_path=log_path)
    try:
        wait_for(lambda: committed_total(settings) == len(sent), 120, what="the rest delivered and committed")
    finally:
        assert stop(proc) == 0
    assert by_entity(receiver.accepted_alerts()) == by_entity([a.model_dump() for a in sent])


@pytest.mark.integration
def test_alertmanager_format_and_permanent_refusals_dead_lettered(settings: Settings, tmp_path: Path,
                                                                  receiver: Receiver) -> None:
    opened, closed = alerts_for(["OHT-7"], per_entity=2, model_version="v0003")
    refused = alerts_for(["BAD-1"], per_entity=1)[0]
    after = alerts_for(["OHT-8"], per_entity=1)[0]
    receiver.refuse = {'"entity":"BAD-1"': 400}
    produce_alerts(settings, [opened, b"not json", refused, closed, after])
    port = free_port()
    proc = start_forward(settings, "--alertmanager", receiver.url + "/", "--generator-url", "http://grafana/d/fab",
                         "--metrics-port", str(port), log_path=tmp_path / "fwd.log")
    try:
        wait_for(lambda: len(receiver.accepted) >= 3, 90, what="three alerts accepted")
        wait_for(lambda: committed_total(settings) == 5, 60, what="every offset committed")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        assert stop(proc) == 0
    assert {path for path, _ in receiver.accepted} == {"/api/v2/alerts"}
    posted = {a[0]["annotations"]["alert_id"]: a[0] for a in receiver.accepted_alerts()}
    assert all(len(a) == 1 for a in receiver.accepted_alerts())
    am_open, am_close = posted[opened.alert_id], posted[closed.alert_id]
    assert am_open["labels"] == {"alertname": "FabwatchAlert", "entity": "OHT-7", "kind": "anomaly",
                                 "severity": "warning", "model_version": "v0003"}
    assert am_close["labels"] == am_open["labels"]  # resolves the open one, though the close says severity info
    assert am_close["startsAt"] == am_open["startsAt"] == "2023-11-14T22:13:20.000Z"
    assert datetime.fromisoformat(am_close["endsAt"]).timestamp() * 1000 == closed.window_end_ts
    assert datetime.fromisoformat(am_open["endsAt"]) > datetime.fromisoformat(am_close["endsAt"])
    assert am_open["generatorURL"] == "http://grafana/d/fab"
    assert after.alert_id in posted and refused.alert_id not in posted  # refused, then moved on
    letters = [json.loads(v) for v in read_all(settings, settings.topics.dlq, expect=2)]
    assert sorted(d["reason"] for d in letters) == ["bad_json", "delivery_refused"]
    refusal = next(d for d in letters if d["reason"] == "delivery_refused")
    assert "400" in refusal["detail"] and refusal["key"] == "BAD-1"
    assert 'fabwatch_forward_failures_total{status="400"} 1.0' in metrics


def test_one_receiver_required() -> None:
    for args in ([], ["--webhook", "http://a", "--alertmanager", "http://b"]):
        proc = subprocess.run([sys.executable, "-m", "fabwatch.stream.cli.main", "alerts", "forward", *args],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "one of --webhook URL or --alertmanager URL" in proc.stderr
