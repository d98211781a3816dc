"""Prometheus metrics of the serving loops (sensor processor, log server) and a tiny HTTP server:
``/metrics``, ``/ready``, ``/healthz``."""

from __future__ import annotations

import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from fabwatch.stream.policy import PolicyCounters

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.8, 1.0, 2.5, 5.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
# every interface: Kubernetes probes and Prometheus reach a pod's port from outside it (deploy/); pass
# --metrics-host 127.0.0.1 to keep the metrics to the host
DEFAULT_METRICS_HOST = "0.0.0.0"

log = logging.getLogger("fabwatch.metrics")


class ServingMetrics:
    """What every model-serving loop reports (the model watcher and the HTTP server need no more). One
    registry per instance, so tests can run several in one process."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.reloads = Counter("fabwatch_model_reloads", "model hot reloads", ["result"], registry=r)
        self.model = Gauge("fabwatch_model_info", "serving model version (value 1)", ["version", "provider"], registry=r)
        # Prometheus cannot scrape /ready, and the rules compare a load with the trainer's last promotion
        self.readiness = Gauge("fabwatch_ready", "1 while /ready answers 200", registry=r)
        self.model_loaded = Gauge("fabwatch_model_loaded_timestamp_seconds", "when the serving model was loaded "
                                  "(start or hot reload)", registry=r)

    def set_model(self, version: str, provider: str) -> None:
        self.model.clear()
        self.model.labels(version=version, provider=provider).set(1)
        self.model_loaded.set_to_current_time()


class ProcessorMetrics(ServingMetrics):
    """The sensor processor's."""

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.lag = Gauge("fabwatch_consumer_lag", "messages behind the high watermark", ["partition"], registry=r)
        self.consumed = Counter("fabwatch_readings_consumed", "readings polled from the sensor topic", registry=r)
        self.scored = Counter("fabwatch_windows_scored", "windows scored by the model", registry=r)
        self.alerts = Counter("fabwatch_alerts", "alerts produced", ["kind", "state", "severity"], registry=r)
        self.silenced = Counter("fabwatch_alerts_silenced", "alerts a maintenance silence held back (or marked, "
                                "with --silenced-alerts mark)", ["state"], registry=r)
        for state in ("open", "closed"):  # at 0 from the start, so increase() sees the first one
            self.silenced.labels(state=state)
        self.silences = Gauge("fabwatch_silences", "maintenance silences known (from the silence topic), any "
                              "time span", registry=r)
        self.dlq = Counter("fabwatch_dlq", "messages dead-lettered", ["reason"], registry=r)
        self.dlq_lost = Counter("fabwatch_dlq_lost", "dead letters not produced even without their payload: "
                                "the message is skipped, only the log names it", ["reason"], registry=r)
        self.producer_recreated = Counter("fabwatch_producer_recreated", "exactly-once: transactional producers "
                                          "replaced (a call failed for good or never returned); each batch in "
                                          "hand was redone from the committed offsets", registry=r)
        self.consumer_recreated = Counter("fabwatch_consumer_recreated", "exactly-once: consumers replaced after "
                                          "an aborted transaction (the committed offsets could not be read)",
                                          registry=r)
        self.reordered = Counter("fabwatch_reordered", "readings out of order within --grace-ms, put in order in "
                                 "their window", registry=r)
        self.duplicates = Counter("fabwatch_duplicates", "identical re-sends dropped (same entity, timestamp and values)", registry=r)
        self.evicted = Counter("fabwatch_keys_evicted", "keys evicted from the window store", ["why"], registry=r)
        self.batch_size = Histogram("fabwatch_batch_size", "windows per model call", buckets=_BATCH_BUCKETS, registry=r)
        self.inference = Histogram("fabwatch_inference_seconds", "model call latency", buckets=_LATENCY_BUCKETS,
                                   registry=r)
        self.ingest_to_alert = Histogram("fabwatch_ingest_to_alert_seconds", "reading produced -> alert produced",
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.live_keys = Gauge("fabwatch_live_keys", "keys with a window in memory", registry=r)
        self.policy_expired = Counter("fabwatch_policy_expired", "alert states dropped after the key TTL of silence "
                                      "(open: an open alert that gets no close)", ["state"], registry=r)
        self.policy_state_restored = Counter("fabwatch_policy_state_restored", "non-quiet alert policy keys (open "
                                             "alerts, runs, cooldowns) read back from the state topic on assignment",
                                             registry=r)
        self._policy_expired_seen: dict[str, int] = {}

    def observe_policy(self, counters: PolicyCounters) -> None:
        """Bring in the alert policy's own counters (the policy runs offline too); called at each commit."""
        for state, total in (("open", counters.expired_open), ("pending", counters.expired_pending)):
            self.policy_expired.labels(state=state).inc(total - self._policy_expired_seen.get(state, 0))
            self._policy_expired_seen[state] = total


class LogServeMetrics(ServingMetrics):
    """``fabwatch logs serve``'s."""

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.consumed = Counter("fabwatch_logkeys_consumed", "log keys polled from the log-key topic", registry=r)
        self.scored = Counter("fabwatch_log_windows_scored", "windows (h keys -> next key) checked", registry=r)
        self.alerts = Counter("fabwatch_log_alerts", "log alerts produced", ["reason", "severity"], registry=r)
        self.dlq = Counter("fabwatch_log_dlq", "log-key messages dead-lettered", ["reason"], registry=r)
        self.dlq_lost = Counter("fabwatch_log_dlq_lost", "dead letters not produced even without their payload",
                                ["reason"], registry=r)
        self.sessions_open = Gauge("fabwatch_log_sessions_open", "sessions held in memory", registry=r)
        self.sessions_closed = Counter("fabwatch_log_sessions_closed", "sessions closed", ["why"], registry=r)
        self.sessions_rebuilt = Counter("fabwatch_log_sessions_rebuilt", "open sessions rebuilt from the "
                                        "partitions' history on assignment", registry=r)


class Liveness:
    """Heartbeats of the loops a process lives by. A loop that has not beaten for ``timeout_s``, or whose
    thread has ended, makes ``failure`` name it: ``/healthz`` answers 503, and the orchestrator restarts
    a process that would otherwise sit there answering 200 while doing nothing."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._beats: dict[str, float] = {}
        self._threads: dict[str, threading.Thread] = {}

    def beat(self, loop: str) -> None:
        self._beats[loop] = time.monotonic()

    def track(self, loop: str, thread: threading.Thread) -> None:
        """Also fail when ``thread``, which runs ``loop``, has ended (call ``forget`` before a planned end)."""
        self._threads[loop] = thread

    def forget(self, loop: str) -> None:
        self._beats.pop(loop, None)
        self._threads.pop(loop, None)

    def failure(self) -> str | None:
        """Why the process is not alive, or None."""
        now = time.monotonic()
        for loop, thread in list(self._threads.items()):
            if not thread.is_alive():
                return f"{loop} thread died"
        for loop, last in list(self._beats.items()):
            if now - last > self.timeout_s:
                return f"{loop} stalled: no iteration for {now - last:.0f}s (limit {self.timeout_s:.0f}s)"
        return None


class MetricsServer:
    """Serves the metrics registry, a readiness probe and a liveness probe on a daemon thread.
    ``health`` returns why the process is not alive (``/healthz`` answers 503 with it), or None."""

    def __init__(self, metrics: ServingMetrics, ready: Callable[[], bool], port: int, host: str = DEFAULT_METRICS_HOST,
                 health: Callable[[], str | None] = lambda: None):
        registry = metrics.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?")[0]
                if path == "/metrics":
                    self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif path == "/ready":
                    ok = ready()
                    self._send(200 if ok else 503, b"ready\n" if ok else b"not ready\n", "text/plain")
                elif path == "/healthz":
                    failure = health()
                    self._send(200 if failure is None else 503, f"{failure or 'ok'}\n".encode(), "text/plain")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics-http", daemon=True)
        self.thread.start()
        log.info("metrics on port %d of %s (/metrics, /ready, /healthz)", self.port, host)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
