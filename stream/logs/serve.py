"""``fabwatch logs serve``: DeepLog on the live log-key stream (``fabwatch.logkeys`` -> ``fabwatch.alerts``).

State per session: its last h keys live in the processor's ``WindowStore`` (window ``h + 1``, one
feature: the key's model id as float32, exact for any vocabulary), ordered by the message's ``line``
(lines of one second share ``ts``, so the line is what orders a session). A new session first
receives h PAD entries without scoring, which reproduces the leading padding of ``build_windows``:
every key, the first included, closes one window ``(h previous keys -> key)``, exactly the windows
offline evaluation checks. Windows of all sessions in a poll are checked in one batch
(``LogKeyScorer.check``, cached per distinct window). A redelivered line is a duplicate in the store
and is not scored twice.

Alerts (kind ``log``, key = session):
- ``unexpected_key`` / ``unknown_key``: the key is outside the model's top-g for its window (an
  unknown key always is). ``score`` is the key's 1-based rank among the known keys (unknown: one
  past the last), ``threshold`` is g, ``detail`` names the key, the top-g expected and the window.
  The id hashes (session, line, model version): lines, not timestamps, are unique in a session.
- ``short_session``: when a session closes (idle for ``idle_timeout_s``, or closed early to make
  room for new sessions) with fewer than h + 1 keys, DeepLog's length rule; ``score`` is its length,
  ``threshold`` h + 1. Its id hashes (session, last line, model version, "short_session").
- ``invariant`` / ``unseen_count``: when a session of h + 1 keys or more closes and the model version
  has a count model (``invariants.json``), a count relation that held in training is broken, or a key
  occurs a number of times never seen in training (``fabwatch.stream.logs.invariants.close_check``);
  ``detail`` names the relation and the observed counts. Same id scheme, with the reason.
``window_start_ts`` is the session's first key, ``window_end_ts`` the alerted key (or the last one).
A key whose event time lies outside ``Settings.event_time_bounds`` goes to the DLQ as ``clock_skew``,
as a reading would.

Keys are made where lines are parsed (``fabwatch replay --format hdfs-log --registry``, ``logs parse
--registry``) with the Drain templates stored in the model's version, so they mean here what they
meant in training; a key the model never saw (``unmatched`` included) is ``unknown_key``.

Delivery: at-least-once. A poll's alerts (and the alerts of sessions that closed meanwhile) are
produced and flushed before the poll's offsets are committed; SIGTERM finishes the poll in hand,
commits and exits 0. Open sessions are not carried across a restart or a rebalance (their partitions'
sessions are dropped, without alerts): a session cut by one is scored afresh from its next key.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition

from fabwatch.export.errors import UsageError
from fabwatch.stream.kafka.config import Settings
from fabwatch.stream.kafka.lifecycle import StopOnSignal, has_data
from fabwatch.stream.logs.invariants import CountModel, close_check
from fabwatch.stream.logs.score import UNK, LogKeyScorer, next_key_ranks
from fabwatch.stream.kafka.outputs import DeadLetters, DeliveryTracker
from fabwatch.stream.schemas import Alert, LogKey, Rejected, SourceOffset, alert_id_for, decode_logkey
from fabwatch.stream.kafka.topics import ensure_topics
from fabwatch.stream.windows import OK, WindowStore

log = logging.getLogger("fabwatch.logserve")


@dataclass
class LogServeConfig:
    registry: Path
    group_id: str = "fabwatch-logs"
    instance_id: str = field(default_factory=socket.gethostname)
    idle_timeout_s: float = 300.0
    max_batch: int = 2048
    max_wait_ms: int = 50
    max_sessions: int = 1_000_000
    top_g: int | None = None


@dataclass
class _Session:
    """What the length rule, the idle timeout and the alerts need beyond the window itself."""

    seen: float  # monotonic time of its last key
    first_ts: int = 0
    last_ts: int = 0
    last_line: int = 0
    keys: int = 0
    source: SourceOffset | None = None
    key_counts: Counter[str] = field(default_factory=Counter)  # for the count model at close


class LogSessions:
    """Kafka-free: open sessions, their windows, the scoring rule -> alerts (unit-testable, replayable)."""

    def __init__(self, scorer: LogKeyScorer, max_sessions: int = 1_000_000, count_model: CountModel | None = None):
        self.scorer = scorer
        self.count_model = count_model
        self.h = scorer.h
        self.max_sessions = max_sessions
        self.windows = WindowStore(self.h + 1, 1, stride=1, max_keys=max_sessions, ttl_s=None)
        self.sessions: OrderedDict[str, _Session] = OrderedDict()  # least recently active first
        self._pads = np.arange(self.h, dtype=np.int64)  # store order: pads 0..h-1, then h + line

    def process(self, msgs: Sequence[LogKey], sources: Sequence[SourceOffset | None], now: float | None = None,
                ingest_ms: np.ndarray | None = None, clock_ms: float | None = None) -> list[Alert]:
        """Append a batch of keys (arrival order), score every window it closes; alerts for the misses."""
        now = time.monotonic() if now is None else now
        names = [m.session for m in msgs]
        batch = dict.fromkeys(names)
        new = [s for s in batch if s not in self.sessions]
        alerts = self._make_room(len(new), batch)
        if new:
            self.windows.append([s for s in new for _ in range(self.h)], np.tile(self._pads, len(new)),
                                np.zeros((len(new) * self.h, 1), np.float32), score=False, now=now)
            self.sessions.update((s, _Session(seen=now)) for s in new)
        ids = self.scorer.vocab.encode([m.key for m in msgs])
        partitions = np.fromiter((-1 if src is None else src.partition for src in sources), np.int32, len(msgs))
        res = self.windows.append(names, self.h + np.fromiter((m.line for m in msgs), np.int64, len(msgs)),
                                  ids[:, None].astype(np.float32), now=now, partitions=partitions)
        for i in np.flatnonzero(res.status == OK).tolist():
            m, session = msgs[i], self.sessions[names[i]]
            if not session.keys:
                session.first_ts = m.ts
            session.keys += 1
            session.key_counts[m.key] += 1
            session.last_ts, session.last_line, session.source, session.seen = m.ts, m.line, sources[i], now
            self.sessions.move_to_end(names[i])
        if len(res.ready):
            context = res.windows[:, :self.h, 0].astype(np.int32)
            nxt = res.windows[:, self.h, 0].astype(np.int32)
            bad = np.flatnonzero(~self.scorer.check(context, nxt))
            if len(bad):
                alerts += self._key_alerts([msgs[i] for i in res.ready[bad].tolist()],
                                           [sources[i] for i in res.ready[bad].tolist()], context[bad], nxt[bad],
                                           None if ingest_ms is None or clock_ms is None
                                           else clock_ms - ingest_ms[res.ready[bad]])
        return alerts

    def _key_alerts(self, msgs: list[LogKey], sources: list[SourceOffset | None], context: np.ndarray,
                    nxt: np.ndarray, latency_ms: np.ndarray | None) -> list[Alert]:
        vocab, g = self.scorer.vocab, self.scorer.top_g
        expected = self.scorer.expected(context)
        ranks = np.minimum(next_key_ranks(self.scorer.probabilities(context), nxt), len(vocab.keys))
        out = []
        for j, m in enumerate(msgs):
            unknown = bool(nxt[j] == UNK)
            out.append(Alert(
                alert_id=alert_id_for(m.session, m.line, self.scorer.version), entity=m.session, kind="log",
                score=float(ranks[j] + 1), threshold=float(g), severity="critical" if unknown else "warning",
                window_start_ts=self.sessions[m.session].first_ts, window_end_ts=m.ts,
                model_version=self.scorer.version, source=sources[j],
                ingest_to_alert_ms=None if latency_ms is None else float(latency_ms[j]),
                detail={"reason": "unknown_key" if unknown else "unexpected_key", "key": m.key, "line": m.line,
                        "expected": [vocab.token(int(k)) for k in expected[j]],
                        "window": [vocab.token(int(k)) for k in context[j]]}))
        return out

    def close(self, names: Sequence[str]) -> list[Alert]:
        """Close sessions: the length rule applies, their windows are released."""
        alerts = []
        for name in names:
            session = self.sessions.pop(name)
            if session.keys < self.h + 1:
                alerts.append(Alert(
                    alert_id=alert_id_for(name, session.last_line, self.scorer.version, "short_session"),
                    entity=name, kind="log", score=float(session.keys), threshold=float(self.h + 1),
                    severity="warning", window_start_ts=session.first_ts, window_end_ts=session.last_ts,
                    model_version=self.scorer.version, source=session.source,
                    detail={"reason": "short_session", "keys": session.keys, "min_keys": self.h + 1,
                            "line": session.last_line}))
            elif (broken := close_check(self.count_model, session.key_counts)) is not None:
                reason, detail = broken
                alerts.append(Alert(
                    alert_id=alert_id_for(name, session.last_line, self.scorer.version, reason),
                    entity=name, kind="log", score=float(session.keys), threshold=float(self.h + 1),
                    severity="warning", window_start_ts=session.first_ts, window_end_ts=session.last_ts,
                    model_version=self.scorer.version, source=session.source,
                    detail={"reason": reason, "relation": detail, "counts": dict(session.key_counts),
                            "line": session.last_line}))
        self.windows.drop(names)
        return alerts

    def close_idle(self, idle_s: float, now: float | None = None) -> list[Alert]:
        """Close the sessions without a key for ``idle_s`` seconds (oldest first: the dict's order)."""
        now = time.monotonic() if now is None else now
        idle = []
        for name, session in self.sessions.items():
            if session.seen > now - idle_s:
                break
            idle.append(name)
        return self.close(idle)

    def _make_room(self, incoming: int, batch: dict[str, None]) -> list[Alert]:
        """Close the least recently active sessions outside the batch early, so that the store never
        evicts behind our back (``max_sessions >= `` the batch's sessions leaves enough of them)."""
        excess = len(self.sessions) + incoming - self.max_sessions
        victims: list[str] = []
        for name in self.sessions:
            if len(victims) >= excess:
                break
            if name not in batch:
                victims.append(name)
        return self.close(victims)

    def drop_partitions(self, partitions: Sequence[int]) -> None:
        """Forget the sessions of revoked partitions, without alerts (their owner changes)."""
        names = self.windows.keys_in(partitions)
        for name in names:
            self.sessions.pop(name, None)
        self.windows.drop(names)


class LogServer(StopOnSignal):
    """The consumer loop around ``LogSessions``."""

    def __init__(self, settings: Settings, config: LogServeConfig):
        self.settings, self.config, self.topics = settings, config, settings.topics
        if config.max_sessions < config.max_batch:
            raise UsageError("--max-sessions must be at least --max-batch (a poll's sessions must all fit)")
        scorer = LogKeyScorer.from_registry(config.registry, top_g=config.top_g)
        # as for readings: a key dated 2100 (or in microseconds) would stamp its session's alerts with it
        self.event_time_bounds = settings.event_time_bounds()
        self.sessions = LogSessions(scorer, config.max_sessions, CountModel.from_registry(config.registry, scorer.version))
        self._stop = threading.Event()
        self._next_offset: dict[int, int] = {}
        self._delivery = DeliveryTracker()
        self._failed = False
        self.counts = {"consumed": 0, "dead_letters": 0, "dead_letters_lost": 0, "alerts": 0}
        base = settings.client_config()
        self.consumer = Consumer({**base, "group.id": config.group_id, "enable.auto.commit": False,
                                  "auto.offset.reset": "earliest", "client.id": f"fabwatch-logs-{config.instance_id}"})
        self.producer = Producer({**base, "linger.ms": 2, "acks": "all", "enable.idempotence": True,
                                  "client.id": f"fabwatch-logs-{config.instance_id}"})
        self.dead_letters = DeadLetters(self.producer, self.topics.dlq, lambda _reason: self._count("dead_letters_lost"))

    def run(self) -> None:
        cfg, topics = self.config, self.topics
        ensure_topics(self.settings, [topics.logkeys, topics.alerts, topics.dlq])
        self.consumer.subscribe([topics.logkeys], on_revoke=self._on_revoke, on_lost=self._on_lost)
        scorer = self.sessions.scorer
        log.info("serving logkeys model %s (h=%d, top-g=%d) on %s, group %s, sessions close after %.1fs idle",
                 scorer.version, scorer.h, scorer.top_g, topics.logkeys, cfg.group_id, cfg.idle_timeout_s)
        try:
            while not self._stop.is_set():
                msgs = self.consumer.consume(cfg.max_batch, cfg.max_wait_ms / 1000)
                alerts = self._handle(msgs) if msgs else []
                alerts += self.sessions.close_idle(cfg.idle_timeout_s)
                if alerts or msgs:
                    self._produce(alerts)
                    self._delivery.flush_or_raise(self.producer)
                    self._commit(sync=False)
            self._commit(sync=True)
        except BaseException:
            self._failed = True  # nothing more is committed: a restart redoes the unfinished poll
            raise
        finally:
            self.consumer.close()  # leaves the group (on_revoke commits unless failed)
            self.producer.flush(10)
        log.info("stopped cleanly: %s, %d sessions open", self.counts, len(self.sessions.sessions))

    def _handle(self, msgs: list[Message]) -> list[Alert]:
        good: list[LogKey] = []
        sources: list[SourceOffset] = []
        ingest: list[float] = []
        for m in msgs:
            if not has_data(m, log):
                continue
            self._next_offset[m.partition()] = m.offset() + 1
            source = SourceOffset(topic=m.topic(), partition=m.partition(), offset=m.offset())
            try:
                key = decode_logkey(m.value(), self.settings.max_message_bytes)
                self.event_time_bounds.check(key.ts, m.timestamp()[1])
            except Rejected as exc:
                self.dead_letters.send(m, exc.reason, exc.detail, int(time.time() * 1000))
                self._count("dead_letters")
                continue
            good.append(key)
            sources.append(source)
            ingest.append(m.timestamp()[1])
        self.counts["consumed"] += len(good)
        if not good:
            return []
        return self.sessions.process(good, sources, ingest_ms=np.asarray(ingest, np.float64),
                                     clock_ms=time.time() * 1000.0)

    def _count(self, what: str) -> None:
        self.counts[what] += 1

    def _produce(self, alerts: list[Alert]) -> None:
        for alert in alerts:
            self.producer.produce(self.topics.alerts, alert.model_dump_json().encode(), alert.entity.encode(),
                                  on_delivery=self._delivery.on_delivery)
        self.counts["alerts"] += len(alerts)
        self.producer.poll(0)

    def _commit(self, sync: bool, partitions: Sequence[int] | None = None) -> None:
        offsets = [TopicPartition(self.topics.logkeys, p, off) for p, off in sorted(self._next_offset.items())
                   if partitions is None or p in partitions]
        if not offsets:
            return
        try:
            self.consumer.commit(offsets=offsets, asynchronous=not sync)
        except KafkaException as exc:  # e.g. a rebalance under way: the poll is redone, same alert ids
            log.warning("offset commit failed: %s", exc)

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = [tp.partition for tp in partitions]
        if not self._failed:  # every poll is flushed before the next one: commit what was done
            self._commit(sync=True, partitions=revoked)
        self._forget(revoked)

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._forget([tp.partition for tp in partitions])

    def _forget(self, partitions: list[int]) -> None:
        self.sessions.drop_partitions(partitions)
        for p in partitions:
            self._next_offset.pop(p, None)
        log.info("partitions %s left: their sessions are dropped", sorted(partitions))
