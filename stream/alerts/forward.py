"""``fabwatch alerts forward``: deliver every alert on ``fabwatch.alerts`` to a webhook or to Alertmanager.

Its own wing (``stream/alerts/``) because it is neither Kafka plumbing (``stream/kafka/``) nor scoring: it is
the first consumer *of* the processor's output, and the place later alert tools (tail, silences) belong.

Delivery contract, at least once:

- one alert at a time, in partition order (the alert topic is keyed by entity, so in order per entity); its
  offset is committed (synchronously) only after the receiver answered 2xx, or after it was dead-lettered;
- 5xx, 408, 429 and network errors are retried without end, with capped exponential backoff (a Retry-After
  header is honoured up to the cap): a receiver that stays down blocks the stream, it never skips an alert.
  ``fabwatch_forward_blocked`` is 1 meanwhile and ``fabwatch_forward_retries_total{status}`` counts;
- any other 4xx is permanent (the receiver will never take it): the alert goes to the DLQ with reason
  ``delivery_refused`` and the forwarder moves on; so does a message on the alert topic that is no Alert;
- SIGTERM ends a wait between retries at once; the alert in hand is not committed, so a restart (or a SIGKILL
  and a restart) delivers it again: a receiver may see an alert twice, never miss one. ``alert_id`` names the
  duplicate.

Formats: ``webhook`` POSTs the alert JSON exactly as published (``deploy/schemas/alert.schema.json``);
``alertmanager`` POSTs Alertmanager's API v2 ``[{labels, annotations, startsAt, endsAt, generatorURL}]`` to
``/api/v2/alerts``, see ``alertmanager_alert``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Literal

import orjson
import requests
from confluent_kafka import Consumer, KafkaException, Message, Producer
from prometheus_client import CollectorRegistry, Counter, Gauge
from urllib3.util.retry import Retry

from fabwatch.stream.kafka.config import Settings
from fabwatch.stream.kafka.lifecycle import StopOnSignal, has_data
from fabwatch.stream.kafka.outputs import DeadLetters
from fabwatch.stream.kafka.topics import ensure_topics
from fabwatch.stream.schemas import Alert, Rejected, RejectReason, decode_alert

log = logging.getLogger("fabwatch.forward")

Format = Literal["webhook", "alertmanager"]
ALERTMANAGER_PATH = "/api/v2/alerts"
ALERTNAME = "FabwatchAlert"
RETRYABLE_4XX = frozenset({408, 429})  # timeout and rate limit: the same request can succeed later


@dataclass
class ForwardConfig:
    url: str
    format: Format
    group_id: str = "fabwatch-alerts-forward"
    timeout_s: float = 10.0         # one HTTP request, connect and read
    backoff_s: float = 0.5          # exponential backoff factor: waits 0, 2x, 4x, 8x ... this between retries
    backoff_max_s: float = 30.0     # the cap of a wait, Retry-After included
    open_ttl_s: float = 86_400.0    # Alertmanager: an open alert's endsAt lies this far ahead (see alertmanager_alert)
    generator_url: str | None = None  # Alertmanager: the back-link of every alert (a dashboard)
    max_message_bytes: int = 1_000_000


@dataclass
class Refused:
    """The receiver's permanent no (4xx other than 408/429): its status and the start of its answer."""

    status: int
    answer: str


class ForwardMetrics:
    """One registry per forwarder, so tests can run several in one process."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.delivered = Counter("fabwatch_forward_delivered", "alerts the receiver accepted (2xx)", ["state"],
                                 registry=r)
        self.retries = Counter("fabwatch_forward_retries", "deliveries retried, by HTTP status or 'error' "
                               "(no answer)", ["status"], registry=r)
        self.failures = Counter("fabwatch_forward_failures", "alerts the receiver refused for good (4xx): "
                                "dead-lettered", ["status"], registry=r)
        self.dead_letters = Counter("fabwatch_forward_dead_letters", "alert-topic messages dead-lettered",
                                    ["reason"], registry=r)
        self.blocked = Gauge("fabwatch_forward_blocked", "1 while an alert is being retried: the stream waits",
                             registry=r)


def rfc3339(ms: float) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def alert_labels(alert: Alert) -> dict[str, str]:
    """What Alertmanager identifies, groups, routes and silences by."""
    return {"alertname": ALERTNAME, "entity": alert.entity, "kind": alert.kind, "severity": alert.severity,
            "model_version": alert.model_version}


def alertmanager_alert(alert: Alert, labels: dict[str, str], starts_ms: int, now_ms: float, open_ttl_s: float,
                       generator_url: str | None) -> dict:
    """One API v2 ``postableAlert``. Alertmanager resolves an alert by its labels, so a close must carry the
    labels and start of its open (``labels``, ``starts_ms``), not its own (a close's severity is ``info``).

    An open alert gets ``endsAt`` ``open_ttl_s`` ahead: without one Alertmanager resolves it after its
    ``resolve_timeout`` (5 min) unless re-sent, and the forwarder sends each alert once. A close sets ``endsAt``
    to its window end, which resolves it."""
    ends_ms = alert.window_end_ts if alert.state == "closed" else max(now_ms, starts_ms) + open_ttl_s * 1000
    top = ", ".join(f"{f.name} {f.contribution:.3g}" for f in alert.top_features)
    body = {"labels": labels,
            "annotations": {"summary": f"{alert.kind} on {alert.entity} ({alert.state}): score {alert.score:.4g}, "
                                       f"threshold {alert.threshold:.4g}",
                            "alert_id": alert.alert_id, "top_features": top,
                            "window": f"{rfc3339(alert.window_start_ts)} .. {rfc3339(alert.window_end_ts)}"},
            "startsAt": rfc3339(starts_ms), "endsAt": rfc3339(max(ends_ms, starts_ms))}
    if generator_url:
        body["generatorURL"] = generator_url
    return body


class Forwarder(StopOnSignal):
    """The consume -> POST -> commit loop."""

    def __init__(self, settings: Settings, config: ForwardConfig, metrics: ForwardMetrics | None = None):
        self.settings, self.config = settings, config
        self.metrics = metrics or ForwardMetrics()
        self._stop = threading.Event()
        self.url = config.url
        if config.format == "alertmanager" and not self.url.rstrip("/").endswith(ALERTMANAGER_PATH):
            self.url = self.url.rstrip("/") + ALERTMANAGER_PATH
        # urllib3's Retry is the retry policy (history, capped exponential backoff, Retry-After parsing); this
        # loop drives it instead of the HTTP adapter so that a wait ends on SIGTERM and every retry is counted
        self.retry_policy = Retry(total=None, connect=None, read=None, redirect=None, status=None, other=None,
                                  allowed_methods=None, backoff_factor=config.backoff_s,
                                  backoff_max=config.backoff_max_s, respect_retry_after_header=True)
        self.http = requests.Session()
        self._open: dict[str, tuple[dict[str, str], int]] = {}  # entity -> labels and start of its open alert
        base = settings.client_config()
        self.consumer = Consumer({
            **base, "group.id": config.group_id, "auto.offset.reset": "earliest",
            "enable.auto.commit": False,  # an offset is committed only after its alert was delivered
            # a receiver that is down holds the loop in one delivery: stay in the group meanwhile (the longest
            # librdkafka allows, 24 h) instead of being evicted every 5 min and redelivering the batch
            "max.poll.interval.ms": 86_400_000,
            "client.id": "fabwatch-alerts-forward"})
        self.producer = Producer({**base, "acks": "all", "enable.idempotence": True,
                                  "client.id": "fabwatch-alerts-forward"})
        # a dead letter lost even without its payload is logged by DeadLetters; its offset is committed anyway
        self.dead_letters = DeadLetters(self.producer, settings.topics.dlq, lambda _reason: None)

    def run(self) -> None:
        topics = self.settings.topics
        ensure_topics(self.settings, [topics.alerts, topics.dlq])
        self.consumer.subscribe([topics.alerts])
        log.info("forwarding %s (group %s) to %s as %s", topics.alerts, self.config.group_id, self.url,
                 self.config.format)
        try:
            while not self._stop.is_set():
                m = self.consumer.poll(0.5)
                if m is not None and has_data(m, log):
                    self._handle(m)
        finally:
            self.consumer.close()
            self.producer.flush(10)
            self.http.close()
        log.info("stopped cleanly")

    def _handle(self, m: Message) -> None:
        """Deliver or dead-letter ``m``, then commit it; on a stop mid-retry leave it uncommitted."""
        now_ms = int(time.time() * 1000)
        try:
            alert = decode_alert(m.value(), self.config.max_message_bytes)
        except Rejected as exc:
            self._dead_letter(m, exc.reason, exc.detail, now_ms)
            return
        outcome = self._deliver(self._body(m, alert, now_ms))
        if outcome == "stopped":
            return
        if isinstance(outcome, Refused):
            self.metrics.failures.labels(status=str(outcome.status)).inc()
            log.error("%s refused alert %s (%d): %s; dead-lettered", self.url, alert.alert_id, outcome.status,
                      outcome.answer)
            self._dead_letter(m, RejectReason.delivery_refused,
                              f"POST {self.url} -> {outcome.status}: {outcome.answer}", now_ms)
            return
        self.metrics.delivered.labels(state=alert.state).inc()
        self._remember(alert)
        self._commit(m)

    def _body(self, m: Message, alert: Alert, now_ms: int) -> bytes:
        if self.config.format == "webhook":
            return m.value() or b""
        labels, starts_ms = alert_labels(alert), alert.window_end_ts
        if alert.state == "closed":
            labels, starts_ms = self._open.get(alert.entity, (labels, starts_ms))
        return orjson.dumps([alertmanager_alert(alert, labels, starts_ms, now_ms, self.config.open_ttl_s,
                                                self.config.generator_url)])

    def _remember(self, alert: Alert) -> None:
        """Keep an open's labels and start until its close (in memory: a restart between them sends the close
        with its own labels; the open then ends at its ``open_ttl_s``)."""
        if alert.state == "open":
            self._open[alert.entity] = (alert_labels(alert), alert.window_end_ts)
        else:
            self._open.pop(alert.entity, None)

    def _deliver(self, body: bytes) -> Literal["delivered", "stopped"] | Refused:
        """POST ``body`` until the receiver takes it, refuses it for good, or a stop ends the retries."""
        policy = self.retry_policy
        try:
            while True:
                try:
                    resp = self.http.post(self.url, data=body, timeout=self.config.timeout_s,
                                          headers={"Content-Type": "application/json"})
                except requests.RequestException as exc:
                    status, why, resp = "error", f"{type(exc).__name__}: {exc}", None
                    policy = policy.increment(method="POST", url=self.url, error=exc)
                else:
                    if 200 <= resp.status_code < 300:
                        return "delivered"
                    if 400 <= resp.status_code < 500 and resp.status_code not in RETRYABLE_4XX:
                        return Refused(resp.status_code, resp.text[:500])
                    status, why = str(resp.status_code), resp.text[:200]
                    policy = policy.increment(method="POST", url=self.url, response=resp.raw)
                after = policy.get_retry_after(resp.raw) if resp is not None else None
                wait_s = min(after, self.config.backoff_max_s) if after is not None else policy.get_backoff_time()
                self.metrics.retries.labels(status=status).inc()
                self.metrics.blocked.set(1)
                log.warning("POST %s failed (%s %s): retry %d in %.1f s", self.url, status, why,
                            len(policy.history), wait_s)
                if self._stop.wait(wait_s):
                    return "stopped"
        finally:
            self.metrics.blocked.set(0)

    def _dead_letter(self, m: Message, reason: RejectReason, detail: str, now_ms: int) -> None:
        self.dead_letters.send(m, reason, detail, now_ms)
        self.metrics.dead_letters.labels(reason=reason.value).inc()
        self.producer.flush(30)
        self._commit(m)

    def _commit(self, m: Message) -> None:
        try:
            self.consumer.commit(message=m, asynchronous=False)
        except KafkaException as exc:  # e.g. the group rebalanced: the alert is delivered again, same alert_id
            log.warning("offset commit failed: %s", exc)
