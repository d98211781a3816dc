"""Helpers for the processor's integration tests: produce readings, run ``fabwatch serve`` as a
subprocess (so it can be SIGKILLed / SIGTERMed), and read output topics back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from fabwatch.stream.kafka.config import Settings
from fabwatch.stream.kafka.retry import retry_transient
from fabwatch.stream.schemas import Alert

REPO = Path(__file__).resolve().parents[1]
FIRST_FETCH_S = 10.0
PARTITIONS = 3  # of each topic that the ``topics`` fixture creates
STARTED: list[subprocess.Popen] = []  # every ``fabwatch serve`` a test started


def produce(settings: Settings, topic: str, records: Iterable[dict | bytes], key_field: str = "entity",
            keys: Sequence[bytes | None] | None = None) -> int:
    """Produce JSON records (or raw bytes) keyed by their entity; returns how many."""
    p = Producer(settings.client_config(**{"linger.ms": 5, "enable.idempotence": True}))
    n = 0
    for i, r in enumerate(records):
        if isinstance(r, bytes):
            value, key = r, keys[i] if keys is not None else None
        else:
            value, key = orjson.dumps(r), str(r.get(key_field, "")).encode()
        p.produce(topic, value, key)
        n += 1
        if n % 10_000 == 0:
            p.poll(0)
    assert p.flush(30) == 0
    return n


def read_all(settings: Settings, topic: str, *, committed_only: bool = True, idle_s: float = 3.0,
             expect: int | None = None, timeout_s: float = 60.0) -> list[bytes]:
    """Every message of ``topic`` from the beginning, until ``expect`` arrived or it stays idle ``idle_s``.

    Idle only counts once every partition was read up to the high watermark it had when the read began:
    a fresh consumer's first fetch can take longer than ``idle_s`` on a loaded machine, and stopping
    early there would miss messages that are already on the broker. Records at the end of a partition that
    ``read_committed`` never returns (aborted data, transaction markers) hold that off for at most
    ``FIRST_FETCH_S``."""
    c = Consumer(settings.client_config(**{
        "group.id": f"reader-{time.monotonic_ns()}", "auto.offset.reset": "earliest", "enable.auto.commit": False,
        "isolation.level": "read_committed" if committed_only else "read_uncommitted"}))
    md = c.list_topics(topic, timeout=10).topics[topic]
    partitions = sorted(md.partitions)
    highs = {p: retry_transient(lambda: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1],
                                f"high watermark of {topic}[{p}]") for p in partitions}
    behind = {p for p in partitions if highs[p] > 0}
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    out: list[bytes] = []
    start = time.monotonic()
    deadline, last = start + timeout_s, start
    try:
        while time.monotonic() < deadline:
            if expect is not None and len(out) >= expect:
                # linger briefly: anything beyond ``expect`` would be a duplicate
                idle_s, expect = 1.0, None
                last = time.monotonic()
            msgs = c.consume(1000, 0.25)
            got = [m for m in msgs if m.error() is None]
            out += [m.value() for m in got]
            for m in got:
                if m.offset() + 1 >= highs[m.partition()]:
                    behind.discard(m.partition())
            if got:
                last = time.monotonic()
            elif expect is None and time.monotonic() - last > (max(idle_s, FIRST_FETCH_S) if behind else idle_s):
                break
    finally:
        c.close()
    return out


def serve_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    for name, value in settings.topics.model_dump().items():
        env[f"FABWATCH_TOPIC_{name.upper()}"] = value
    env["FABWATCH_BOOTSTRAP"] = settings.resolve_bootstrap()
    env["FABWATCH_HOME"] = str(settings.home)
    env["FABWATCH_MAX_MESSAGE_BYTES"] = str(settings.max_message_bytes)
    env.setdefault("OMP_NUM_THREADS", "1")
    # a SIGKILLed member leaves the group after the session timeout: keep it short so restarts are quick
    env["FABWATCH_KAFKA_OPTIONS"] = json.dumps({"session.timeout.ms": "6000", "heartbeat.interval.ms": "500",
                                                **settings.kafka_options})
    return env


def start_serve(settings: Settings, registry: Path, *args: str, log_path: Path) -> subprocess.Popen:
    """``fabwatch serve`` in a subprocess with the test's topic names; its log goes to ``log_path``."""
    cmd = [sys.executable, "-m", "fabwatch.stream.cli.main", "serve", "--registry", str(registry), *args]
    log = open(log_path, "ab")
    try:
        proc = subprocess.Popen(cmd, cwd=REPO, env=serve_env(settings), stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()
    STARTED.append(proc)
    return proc


def kill_leftovers() -> None:
    """SIGKILL every processor a test started and did not stop (a failed assertion skips its ``stop``): a live
    leftover stays in the shared consumer group and slows every later test's rebalance."""
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def wait_for(predicate: Callable[[], bool], timeout_s: float = 60.0, every_s: float = 0.2, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def log_has(log_path: Path, text: str) -> bool:
    return log_path.exists() and text in log_path.read_text(errors="replace")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    return proc.wait(timeout_s)


def committed_offsets(settings: Settings, group: str, topic: str, partitions: int = PARTITIONS,
                      config: dict[str, str] | None = None) -> dict[int, int]:
    """The group's committed offset per partition (negative: none), riding out a coordinator that moves
    or is still loading (busy machine, broker restarts)."""
    c = Consumer(settings.client_config(**{"group.id": group, "enable.auto.commit": False, **(config or {})}))
    try:
        got = retry_transient(lambda: c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10),
                              f"the committed offsets of {group}")
    finally:
        c.close()
    return {tp.partition: tp.offset for tp in got}


def replay_and_serve(settings: Settings, data: Path, registry: Path, group: str, expected: int,
                     log_path: Path, timeout_s: float = 120.0) -> set[str]:
    """``fabwatch replay`` a file into the sensor topic, run ``fabwatch serve`` until ``expected`` alerts are out
    (or the timeout), stop it cleanly, and return the alert ids it published."""
    return set(replay_and_serve_alerts(settings, data, registry, group, expected, log_path, timeout_s))


def replay_and_serve_alerts(settings: Settings, data: Path, registry: Path, group: str, expected: int,
                            log_path: Path, timeout_s: float = 120.0) -> dict[str, Alert]:
    """As ``replay_and_serve``, returning the published alerts by id."""
    from fabwatch.stream.kafka.topics import ensure_topics

    ensure_topics(settings, [settings.topics.sensors, settings.topics.alerts, settings.topics.dlq], partitions=3)
    replay = subprocess.run([sys.executable, "-m", "fabwatch.stream.cli.main", "replay", str(data), "--topic",
                             settings.topics.sensors, "--max-speed", "--json"], capture_output=True, text=True,
                            env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": settings.resolve_bootstrap()}, timeout=120)
    assert replay.returncode == 0, replay.stderr
    proc = start_serve(settings, registry, "--group", group, log_path=log_path)
    try:
        wait_for(lambda: len(read_all(settings, settings.topics.alerts, idle_s=1.0)) >= expected,
                 timeout_s=timeout_s, what="the processor's alerts")
    finally:
        assert stop(proc) == 0, log_path.read_text()[-2000:]
    alerts = [Alert.model_validate(orjson.loads(v)) for v in read_all(settings, settings.topics.alerts)]
    return {a.alert_id: a for a in alerts}
