"""The model watcher: a thread that follows the registry's ``current`` pointer and has the version it names
loaded beside the serving model (the processor's and the log server's loops swap it in between batches).

- ``current`` alone chooses what serves. A ModelEvent on the models topic is a hint to re-read it at once
  (instead of at the next turn), and the sha256 it announces is checked when it names the version
  ``current`` names; an event naming any other version is logged and ignored, so no message can put a
  version the registry did not promote (one the trainer's gate rejected, say) into service.

- It starts from the version the processor loaded, not from ``current`` as the thread first reads it: a
  promotion made while the processor was starting is loaded on the first turn.
- A failed load (files that fail verification, a session that does not build, an incompatible model) is
  logged and counted on every attempt and retried: ``retry_min_s`` later, the wait doubling up to
  ``retry_max_s``, and at once when the wanted version changes (``current`` moves, or an event names
  another version). Verification cannot tell a tampered version from one whose files are still being
  copied, so neither is given up for good; the backoff holds a tampered one to one attempt (one hash of
  its files, one error line) per ``retry_max_s``.
- An unexpected exception (the registry's volume gone, say) is logged and the watcher carries on at its
  next turn. Each turn beats ``Liveness`` as ``model watcher``: a watcher that died or hangs fails
  ``/healthz``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from confluent_kafka import OFFSET_END, Consumer, KafkaException, TopicPartition

from fabwatch.export.registry import Registry
from fabwatch.stream.kafka.config import Settings
from fabwatch.stream.kafka.lifecycle import has_data
from fabwatch.stream.metrics import Liveness, ServingMetrics
from fabwatch.stream.schemas import Rejected, decode_model_event

log = logging.getLogger("fabwatch.watcher")

WATCHER = "model watcher"  # its name in Liveness and in /healthz's answer

Wanted = tuple[str, str | None]  # (version, the model.onnx sha256 an event announced)


class ModelEventFeed:
    """The ModelEvents produced from now on: the consumer starts at the end, ``current`` says the past."""

    def __init__(self, settings: Settings, group_id: str):
        self.topic = settings.topics.models
        self.consumer = Consumer({**settings.client_config(), "group.id": f"{group_id}-models",
                                  "enable.auto.commit": False})
        try:
            md = self.consumer.list_topics(self.topic, timeout=10).topics.get(self.topic)
            parts = sorted(md.partitions) if md is not None and md.partitions else [0]
            self.consumer.assign([TopicPartition(self.topic, p, OFFSET_END) for p in parts])
        except KafkaException as exc:
            log.warning("not following %s (%s): the registry pointer alone triggers reloads", self.topic, exc)

    def poll(self, timeout_s: float) -> list[Wanted]:
        """Wait up to ``timeout_s``; the versions announced meanwhile, oldest first."""
        announced: list[Wanted] = []
        for m in self.consumer.consume(100, timeout_s):
            if not has_data(m, log):  # a consumer error is logged there; the pointer still triggers reloads
                continue
            try:
                event = decode_model_event(m.value())
            except Rejected as exc:
                log.warning("ignoring a model event (%s)", exc)
                continue
            announced.append((event.version, event.sha256))
        return announced

    def close(self) -> None:
        self.consumer.close()


class ModelWatcher:
    """Follows ``current`` and model events from ``serving`` on; ``load(version, sha256)`` builds a version
    beside the serving one and raises when it cannot serve."""

    def __init__(self, registry: Registry, serving: str, load: Callable[[str, str | None], None],
                 metrics: ServingMetrics, liveness: Liveness, stop: threading.Event, *,
                 open_events: Callable[[], ModelEventFeed] | None = None, interval_s: float = 2.0,
                 retry_min_s: float = 2.0, retry_max_s: float = 300.0):
        self.registry, self.load, self.metrics, self.liveness, self.stop = registry, load, metrics, liveness, stop
        self.open_events = open_events
        self.interval_s, self.retry_min_s, self.retry_max_s = interval_s, retry_min_s, retry_max_s
        self.serving = serving  # the version last loaded: the processor's, then each successful load
        self._pointer: str | None = serving  # ``current`` as last seen; a promotion at start-up differs
        self._wanted: Wanted | None = None
        self._failures = 0
        self._retry_at = 0.0

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="model-watcher", daemon=True)
        self.liveness.beat(WATCHER)
        self.liveness.track(WATCHER, thread)
        thread.start()
        return thread

    def run(self) -> None:
        events = self.open_events() if self.open_events is not None else None
        try:
            while not self.stop.is_set():
                self.liveness.beat(WATCHER)
                try:
                    self.turn(events)
                except Exception:
                    log.exception("model watcher: unexpected error, next turn in %.0fs", self.interval_s)
                    self.stop.wait(self.interval_s)
        finally:
            if events is not None:
                events.close()
        self.liveness.forget(WATCHER)  # a planned end, not a death

    def turn(self, events: ModelEventFeed | None) -> None:
        """Re-read ``current``, wait up to ``interval_s`` for events (any event: re-read it at once), then load
        the wanted version if due."""
        self._follow(self.registry.current_version(), [])
        if events is None:
            self.stop.wait(self.interval_s)
        else:
            announced = events.poll(self.interval_s)
            if announced:
                self._follow(self.registry.current_version(), announced)
        if self._wanted is None or self._wanted[0] == self.serving or time.monotonic() < self._retry_at:
            return
        version, sha256 = self._wanted
        try:
            self.load(version, sha256)
        except Exception as exc:  # any failure keeps the serving model; say why and when it is tried again
            self._failures += 1
            wait_s = min(self.retry_max_s, self.retry_min_s * 2 ** (self._failures - 1))
            self._retry_at = time.monotonic() + wait_s
            self.metrics.reloads.labels(result="failed").inc()
            log.error("hot reload of %s failed (attempt %d), still serving %s, next attempt in %.0fs: %s",
                      version, self._failures, self.serving, wait_s, exc)
            return
        self.serving = version

    def _follow(self, pointer: str | None, announced: list[Wanted]) -> None:
        """Want what ``current`` names, with the sha256 of an event that announced that very version."""
        for version, _ in announced:
            if version != pointer:
                log.warning("model event names %s but current is %s: ignored (only the registry's current "
                            "serves)", version, pointer)
        if pointer is None:
            return
        sha256 = next((sha for version, sha in reversed(announced) if version == pointer), None)
        if pointer != self._pointer or sha256 is not None:
            self._pointer = pointer
            self._want((pointer, sha256))

    def _want(self, wanted: Wanted) -> None:
        """A new target is tried at once; the same one again keeps its backoff."""
        if wanted != self._wanted:
            self._wanted, self._failures, self._retry_at = wanted, 0, 0.0
