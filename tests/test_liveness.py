"""Liveness and the model watcher, without Kafka: ``/healthz`` over real HTTP fails when a loop stalls or
the watcher's thread dies; the watcher picks up a promotion made during start-up, retries a failed load,
and survives an unexpected error; metrics servers bind where asked."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import pytest

from fabwatch.export.registry import Registry
from fabwatch.models.sidecar.trainer import TrainerMetrics, serve_metrics
from fabwatch.stream.metrics import Liveness, MetricsServer, ProcessorMetrics
from fabwatch.stream.watcher import WATCHER, ModelWatcher
from onnx_fixtures import add_version, make_registry


def wait_for(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def healthz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def server_of() -> Iterator[Callable[[Liveness], MetricsServer]]:
    servers: list[MetricsServer] = []

    def start(liveness: Liveness) -> MetricsServer:
        servers.append(MetricsServer(ProcessorMetrics(), lambda: True, 0, "127.0.0.1", liveness.failure))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def test_healthz_fails_when_the_consume_loop_stalls(server_of) -> None:
    liveness = Liveness(timeout_s=0.5)
    server = server_of(liveness)
    liveness.beat("consume loop")
    assert healthz(server.port) == (200, "ok\n")
    wait_for(lambda: healthz(server.port)[0] == 503, 10, what="/healthz to fail")
    code, reason = healthz(server.port)
    assert code == 503 and reason.startswith("consume loop stalled: no iteration for")
    liveness.beat("consume loop")  # it turns again: alive again
    assert healthz(server.port) == (200, "ok\n")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_healthz_fails_when_the_watcher_thread_dies(server_of, tmp_path: Path) -> None:
    registry = make_registry(tmp_path / "reg")
    liveness, stop = Liveness(timeout_s=600), threading.Event()

    def fatal(version: str, sha256: str | None) -> None:
        raise SystemExit("an exception no watcher catches")

    watcher = ModelWatcher(registry, "v0001", fatal, ProcessorMetrics(), liveness, stop, interval_s=0.05)
    server = server_of(liveness)
    thread = watcher.start()
    assert healthz(server.port)[0] == 200
    add_version(registry.root)  # the watcher tries it and dies
    thread.join(10)
    assert not thread.is_alive()
    assert healthz(server.port) == (503, f"{WATCHER} thread died\n")


def test_a_watcher_stopped_on_purpose_is_not_a_death(server_of, tmp_path: Path) -> None:
    registry = make_registry(tmp_path / "reg")
    liveness, stop = Liveness(timeout_s=600), threading.Event()
    server = server_of(liveness)
    thread = ModelWatcher(registry, "v0001", lambda v, s: None, ProcessorMetrics(), liveness, stop,
                          interval_s=0.05).start()
    stop.set()
    thread.join(10)
    assert healthz(server.port) == (200, "ok\n")


def failed_loads(watcher: ModelWatcher) -> float:
    return watcher.metrics.registry.get_sample_value("fabwatch_model_reloads_total", {"result": "failed"}) or 0.0


def _watcher(registry: Registry, serving: str, **kwargs) -> tuple[ModelWatcher, list[str], threading.Event]:
    """A watcher whose ``load`` verifies the version as the processor's does; ``loaded`` lists successes."""
    loaded: list[str] = []

    def load(version: str, sha256: str | None) -> None:
        registry.resolve(version, sha256)
        loaded.append(version)

    stop = threading.Event()
    watcher = ModelWatcher(registry, serving, load, ProcessorMetrics(), Liveness(600), stop, interval_s=0.05,
                           **kwargs)
    return watcher, loaded, stop


def test_a_promotion_made_during_start_up_is_loaded(tmp_path: Path) -> None:
    registry = make_registry(tmp_path / "reg")
    serving = registry.current_version()  # what the processor loaded
    promoted = add_version(registry.root)  # promoted before the watcher thread runs
    watcher, loaded, stop = _watcher(registry, serving)
    watcher.start()
    try:
        wait_for(lambda: loaded == [promoted], 10, what=f"{promoted} loaded")
    finally:
        stop.set()


def test_a_failed_load_is_retried_until_it_loads(tmp_path: Path) -> None:
    registry = make_registry(tmp_path / "reg")
    model = registry.root / add_version(registry.root) / "model.onnx"
    good = model.read_bytes()
    model.write_bytes(b"half copied")
    watcher, loaded, stop = _watcher(registry, "v0001", retry_min_s=0.05, retry_max_s=0.2)
    watcher.start()
    try:
        wait_for(lambda: failed_loads(watcher) >= 2, 10, what="two failed attempts")  # backoff, then again
        model.write_bytes(good)  # the copy completes
        wait_for(lambda: loaded == [model.parent.name], 10, what="the retried version loaded")
    finally:
        stop.set()


def test_a_failing_version_waits_its_backoff_but_a_new_current_does_not(tmp_path: Path) -> None:
    registry = make_registry(tmp_path / "reg")
    bad = add_version(registry.root)
    (registry.root / bad / "model.onnx").write_bytes(b"tampered")
    watcher, loaded, stop = _watcher(registry, "v0001", retry_min_s=3600, retry_max_s=3600)
    watcher.start()
    try:
        wait_for(lambda: failed_loads(watcher) == 1, 10, what="the first attempt")
        time.sleep(0.5)  # ten turns: none retries within the backoff
        assert failed_loads(watcher) == 1 and loaded == []
        fixed = add_version(registry.root)  # an operator promotes another version
        wait_for(lambda: loaded == [fixed], 10, what=f"{fixed} loaded without waiting for the backoff")
    finally:
        stop.set()


def test_the_watcher_survives_an_unexpected_error(tmp_path: Path, monkeypatch, caplog) -> None:
    registry = make_registry(tmp_path / "reg")
    read_current = Registry.current_version
    failures = iter([OSError("Stale file handle")])

    def flaky(self: Registry) -> str | None:
        for exc in failures:
            raise exc
        return read_current(self)

    monkeypatch.setattr(Registry, "current_version", flaky)
    watcher, loaded, stop = _watcher(registry, "v0001")
    thread = watcher.start()
    try:
        promoted = add_version(registry.root)
        wait_for(lambda: loaded == [promoted], 10, what=f"{promoted} loaded after the error")
        assert thread.is_alive() and "Stale file handle" in caplog.text
    finally:
        stop.set()



def test_the_trainers_metrics_bind_where_asked() -> None:
    host, port = serve_metrics(TrainerMetrics(), 0, "127.0.0.1")
    assert host == "127.0.0.1"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert b"fabwatch_trainer_store_rows" in resp.read()


class Announcements:
    """A stand-in for the models topic (``ModelEventFeed``): hands out the versions ``say`` queued."""

    def __init__(self) -> None:
        self.queued: list[tuple[str, str | None]] = []

    def say(self, version: str, sha256: str | None) -> None:
        self.queued.append((version, sha256))

    def poll(self, timeout_s: float) -> list[tuple[str, str | None]]:
        time.sleep(timeout_s)
        out, self.queued = self.queued, []
        return out

    def close(self) -> None:
        pass


def test_a_model_event_for_a_version_current_does_not_name_is_ignored(tmp_path: Path, caplog) -> None:
    registry = make_registry(tmp_path / "reg")
    serving = registry.current_version()
    rejected = add_version(registry.root, promote=False)  # registered, never promoted (the gate said no)
    feed = Announcements()
    watcher, loaded, stop = _watcher(registry, serving, open_events=lambda: feed)
    caplog.set_level("WARNING", logger="fabwatch.watcher")
    watcher.start()
    try:
        feed.say(rejected, registry.manifest(rejected).files["model.onnx"])
        wait_for(lambda: "ignored" in caplog.text, 10, what="the event ignored")
        time.sleep(0.3)
        assert loaded == []  # the announcement alone put nothing into service
        promoted = add_version(registry.root)  # a promotion in the registry does
        feed.say(promoted, registry.manifest(promoted).files["model.onnx"])
        wait_for(lambda: loaded == [promoted], 10, what=f"{promoted} loaded")
    finally:
        stop.set()
