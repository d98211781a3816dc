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
  room for new sessions) with fewer than h + 1 keys, DeepLog's length rule (``LogSessions._on_close``, the
  one place where session-close rules go); ``score`` is its length,
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
commits and exits 0.

Open sessions across restarts and rebalances: on assignment each partition is re-read backwards from its
committed offset (``fabwatch.stream.kafka.history``, as the sensor processor rebuilds its windows), and the
keys are replayed into ``LogSessions`` oldest first without scoring (``warm``). The re-read stops once every
session that may still be open (a key within ``idle_timeout_s``, broker time, of the newest message before
the committed offset) either has h + 1 keys read (its windows and its length verdict are then exact) or has
``idle_timeout_s`` of silence read before its oldest key (its start); else at the partition's start, the
``rebuild_max_messages`` cap or ``rebuild_timeout_s``. Keys at and past the committed offset are then scored
exactly as in an uninterrupted run: each window holds the session's h previous keys, so key alerts carry
the same ids, and none is lost (a poll is committed only once its alerts are flushed).

Idle closing stays wall-clock (``idle_timeout_s`` of processing time without a key: a live stream's sessions
end when their keys stop, which no later message can tell); the time an assignment spends rebuilding does
not count (every session's idle clock starts again once the rebuild is done). What a restart cannot know is which of the
sessions seen before the committed offset an uninterrupted run had already closed by then, so every one of
them is rebuilt open and its idle clock starts at the rebuild. The choice errs towards duplicates, never
losses: a short session whose ``short_session`` alert was already out gets it again when it closes (same
id), and a session that resumes after an idle close continues its windows, as ``logs evaluate`` (which
knows no idle timeout) scores it. Sessions whose start lies before a capped re-read keep their last h keys
(windows exact) and count only the keys re-read (at least h + 1, so the length rule is decided right); only
``window_start_ts`` is then later than the session's true first key. With a count model, h + 1 keys are not
enough: its check at close needs every key of the session counted, so the re-read goes on until each session
that may still be open has its start read (or a limit). The log names partitions whose re-read stopped at a
limit with sessions still short of h + 1 keys, or with a count model whose start was not read (those could be
scored as short, as starting afresh, or, by the count model, on partial counts).

Hot reload: a ``ModelWatcher`` (``fabwatch.stream.watcher``) follows the registry's ``current`` pointer, a
ModelEvent only making it look at once; the new version is built beside the serving one and swapped in
between polls. It must have the same h (the windows' length); the key ids held are re-encoded into its
vocabulary (a key the old model did not know stays unknown in windows formed before the swap). Alerts carry
the version that scored them (it is part of their ids).

Metrics and probes (``metrics_port``): ``fabwatch_logkeys_consumed``, ``fabwatch_log_windows_scored``,
``fabwatch_log_alerts{reason,severity}``, ``fabwatch_log_dlq{reason}``, ``fabwatch_log_sessions_open``,
``fabwatch_log_sessions_closed{why}``, ``fabwatch_log_sessions_rebuilt`` and the serving metrics shared with
the processor (``fabwatch_model_info``, ``fabwatch_model_reloads``, ``fabwatch_ready``); ``/ready`` once
partitions were assigned, ``/healthz`` 503 when the consume loop or the model watcher stalls
(``fabwatch.stream.metrics.Liveness``).
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
from fabwatch.export.registry import Registry
from fabwatch.stream.kafka.config import Settings
from fabwatch.stream.kafka.history import read_back
from fabwatch.stream.kafka.lifecycle import StopOnSignal, has_data
from fabwatch.stream.logs.invariants import CountModel, close_check
from fabwatch.stream.kafka.outputs import DeadLetters, DeliveryTracker
from fabwatch.stream.kafka.retry import retry_transient
from fabwatch.stream.kafka.topics import ensure_topics
from fabwatch.stream.logs.score import PAD, UNK, LogKeyScorer, next_key_ranks
from fabwatch.stream.metrics import DEFAULT_METRICS_HOST, Liveness, LogServeMetrics, MetricsServer
from fabwatch.stream.schemas import Alert, LogKey, Rejected, SourceOffset, alert_id_for, decode_logkey
from fabwatch.stream.watcher import ModelEventFeed, ModelWatcher
from fabwatch.stream.windows import OK, WindowStore

log = logging.getLogger("fabwatch.logserve")

CONSUME_LOOP = "consume loop"  # its name in Liveness and in /healthz's answer
DEFAULT_MAX_POLL_INTERVAL_MS = 300_000  # librdkafka's max.poll.interval.ms default


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
    metrics_port: int | None = None
    metrics_host: str = DEFAULT_METRICS_HOST
    liveness_timeout_s: float | None = None  # None: twice max.poll.interval.ms, at least 60 s (as the processor)
    reload_interval_s: float = 2.0
    reload_retry_max_s: float = 300.0
    rebuild_chunk: int = 20_000
    rebuild_max_messages: int = 2_000_000
    rebuild_timeout_s: float = 30.0  # per partition


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
        self.scored = 0  # windows checked
        self.closed: dict[str, int] = {"idle": 0, "room": 0}  # sessions closed, by why

    def process(self, msgs: Sequence[LogKey], sources: Sequence[SourceOffset | None], now: float | None = None,
                ingest_ms: np.ndarray | None = None, clock_ms: float | None = None) -> list[Alert]:
        """Append a batch of keys (arrival order), score every window it closes; alerts for the misses."""
        return self._append(msgs, sources, now, score=True, ingest_ms=ingest_ms, clock_ms=clock_ms)

    def warm(self, msgs: Sequence[LogKey], sources: Sequence[SourceOffset | None], now: float | None = None) -> None:
        """Append keys already scored before the committed offset (a rebuild): sessions and windows as an
        uninterrupted run holds them, no alerts."""
        self._append(msgs, sources, now, score=False)

    def _append(self, msgs: Sequence[LogKey], sources: Sequence[SourceOffset | None], now: float | None, score: bool,
                ingest_ms: np.ndarray | None = None, clock_ms: float | None = None) -> list[Alert]:
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
                                  ids[:, None].astype(np.float32), score=score, now=now, partitions=partitions)
        for i in np.flatnonzero(res.status == OK).tolist():
            m, session = msgs[i], self.sessions[names[i]]
            if not session.keys:
                session.first_ts = m.ts
            session.keys += 1
            session.key_counts[m.key] += 1
            session.last_ts, session.last_line, session.source, session.seen = m.ts, m.line, sources[i], now
            self.sessions.move_to_end(names[i])
        if len(res.ready):
            self.scored += len(res.ready)
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

    def close(self, names: Sequence[str], why: str) -> list[Alert]:
        """Close sessions (``why``: idle or room): the session-close rules apply, their windows are released."""
        alerts = []
        for name in names:
            alerts += self._on_close(name, self.sessions.pop(name))
        self.windows.drop(names)
        self.closed[why] += len(names)
        return alerts

    def _on_close(self, name: str, session: _Session) -> list[Alert]:
        """The alerts of a session that ends: DeepLog's length rule, else the count invariants."""
        if session.keys < self.h + 1:
            return [Alert(
                alert_id=alert_id_for(name, session.last_line, self.scorer.version, "short_session"),
                entity=name, kind="log", score=float(session.keys), threshold=float(self.h + 1),
                severity="warning", window_start_ts=session.first_ts, window_end_ts=session.last_ts,
                model_version=self.scorer.version, source=session.source,
                detail={"reason": "short_session", "keys": session.keys, "min_keys": self.h + 1,
                        "line": session.last_line})]
        broken = close_check(self.count_model, session.key_counts)
        if broken is None:
            return []
        reason, relation = broken
        return [Alert(
            alert_id=alert_id_for(name, session.last_line, self.scorer.version, reason),
            entity=name, kind="log", score=float(session.keys), threshold=float(self.h + 1),
            severity="warning", window_start_ts=session.first_ts, window_end_ts=session.last_ts,
            model_version=self.scorer.version, source=session.source,
            detail={"reason": reason, "relation": relation, "counts": dict(session.key_counts),
                    "line": session.last_line})]

    def close_idle(self, idle_s: float, now: float | None = None) -> list[Alert]:
        """Close the sessions without a key for ``idle_s`` seconds (oldest first: the dict's order)."""
        now = time.monotonic() if now is None else now
        idle = []
        for name, session in self.sessions.items():
            if session.seen > now - idle_s:
                break
            idle.append(name)
        return self.close(idle, "idle")

    def restart_idle_clocks(self, now: float | None = None) -> None:
        """Time the consume loop spent elsewhere (rebuilding sessions on an assignment, partition after
        partition) is no silence of the sessions: none could receive a key meanwhile, so none is idle for it."""
        now = time.monotonic() if now is None else now
        for session in self.sessions.values():
            session.seen = now

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
        return self.close(victims, "room")

    def drop_partitions(self, partitions: Sequence[int]) -> None:
        """Forget the sessions of revoked partitions, without alerts (their next owner rebuilds them)."""
        names = self.windows.keys_in(partitions)
        for name in names:
            self.sessions.pop(name, None)
        self.windows.drop(names)

    def check_compatible(self, scorer: LogKeyScorer) -> None:
        """Raise unless ``scorer`` can take over the sessions held (same window length)."""
        if scorer.h != self.h:
            raise UsageError(f"{scorer.version} has h={scorer.h}, the serving model h={self.h}: the open sessions' "
                             f"windows do not fit it (restart logs serve to change h)")

    def swap(self, scorer: LogKeyScorer, count_model: CountModel | None = None) -> None:
        """Serve ``scorer`` (and its version's count model) from now on; the key ids held are re-encoded into
        its vocabulary (the sessions' key counts are by key name and carry over)."""
        self.check_compatible(scorer)
        old = self.scorer.vocab
        table = np.concatenate([[PAD, UNK], scorer.vocab.encode(old.keys)]).astype(np.float32)
        self.windows.remap(table)
        self.scorer = scorer
        self.count_model = count_model


class LogServer(StopOnSignal):
    """The consumer loop around ``LogSessions``."""

    def __init__(self, settings: Settings, config: LogServeConfig):
        self.settings, self.config, self.topics = settings, config, settings.topics
        if config.max_sessions < config.max_batch:
            raise UsageError("--max-sessions must be at least --max-batch (a poll's sessions must all fit)")
        self.registry = Registry(config.registry)
        scorer = LogKeyScorer.from_registry(config.registry, top_g=config.top_g)
        # as for readings: a key dated 2100 (or in microseconds) would stamp its session's alerts with it
        self.event_time_bounds = settings.event_time_bounds()
        self.sessions = LogSessions(scorer, config.max_sessions, CountModel.from_registry(config.registry, scorer.version))
        self.metrics = LogServeMetrics()
        self.metrics.set_model(scorer.version, _provider(scorer))
        self.metrics.readiness.set_function(lambda: float(self.ready()))
        max_poll_s = float(settings.kafka_options.get("max.poll.interval.ms", DEFAULT_MAX_POLL_INTERVAL_MS)) / 1000
        self.liveness = Liveness(config.liveness_timeout_s or max(60.0, 2 * max_poll_s))
        self.http: MetricsServer | None = None
        self._stop = threading.Event()
        self._pending: tuple[LogKeyScorer, CountModel | None] | None = None
        self._pending_lock = threading.Lock()
        self._next_offset: dict[int, int] = {}
        self._assigned_once = False
        self._delivery = DeliveryTracker()
        self._failed = False
        self._seen = {"scored": 0, "idle": 0, "room": 0}  # LogSessions' counters already in the metrics
        base = settings.client_config()
        self.consumer = Consumer({**base, "group.id": config.group_id, "enable.auto.commit": False,
                                  "auto.offset.reset": "earliest", "client.id": f"fabwatch-logs-{config.instance_id}"})
        self.producer = Producer({**base, "linger.ms": 2, "acks": "all", "enable.idempotence": True,
                                  "client.id": f"fabwatch-logs-{config.instance_id}"})
        self.rebuilder = Consumer({**base, "group.id": f"{config.group_id}-rebuild", "enable.auto.commit": False,
                                   "enable.partition.eof": True})
        self.dead_letters = DeadLetters(self.producer, self.topics.dlq,
                                        lambda reason: self.metrics.dlq_lost.labels(reason=reason.value).inc())

    def ready(self) -> bool:
        return self._assigned_once and not self._stop.is_set()

    def run(self) -> None:
        cfg, topics = self.config, self.topics
        ensure_topics(self.settings, [topics.logkeys, topics.alerts, topics.dlq, topics.models])
        self.liveness.beat(CONSUME_LOOP)
        if cfg.metrics_port is not None:
            self.http = MetricsServer(self.metrics, self.ready, cfg.metrics_port, cfg.metrics_host,
                                      self.liveness.failure)
        scorer = self.sessions.scorer
        ModelWatcher(self.registry, scorer.version, self._load, self.metrics, self.liveness, self._stop,
                     open_events=lambda: ModelEventFeed(self.settings, cfg.group_id),
                     interval_s=cfg.reload_interval_s, retry_min_s=cfg.reload_interval_s,
                     retry_max_s=cfg.reload_retry_max_s).start()
        self.consumer.subscribe([topics.logkeys], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_lost)
        log.info("serving logkeys model %s (h=%d, top-g=%d) on %s, group %s, sessions close after %.1fs idle",
                 scorer.version, scorer.h, scorer.top_g, topics.logkeys, cfg.group_id, cfg.idle_timeout_s)
        try:
            while not self._stop.is_set():
                self.liveness.beat(CONSUME_LOOP)
                self._swap_if_pending()
                msgs = self.consumer.consume(cfg.max_batch, cfg.max_wait_ms / 1000)
                alerts = self._handle(msgs) if msgs else []
                alerts += self.sessions.close_idle(cfg.idle_timeout_s)
                if alerts or msgs:
                    self._produce(alerts)
                    self._delivery.flush_or_raise(self.producer)
                    self._commit(sync=False)
                self._observe()
            self._commit(sync=True)
        except BaseException:
            self._failed = True  # nothing more is committed: a restart redoes the unfinished poll
            raise
        finally:
            self._stop.set()
            self.consumer.close()  # leaves the group (on_revoke commits unless failed)
            self.rebuilder.close()
            self.producer.flush(10)
            if self.http is not None:
                self.http.close()
        log.info("stopped cleanly: %d sessions open", len(self.sessions.sessions))

    def _decode(self, m: Message) -> LogKey:
        """The message's log key; raises ``Rejected`` (bad message, clock skew) as live and rebuild both must."""
        key = decode_logkey(m.value(), self.settings.max_message_bytes)
        self.event_time_bounds.check(key.ts, m.timestamp()[1])
        return key

    def _handle(self, msgs: list[Message]) -> list[Alert]:
        good: list[LogKey] = []
        sources: list[SourceOffset] = []
        ingest: list[float] = []
        for m in msgs:
            if not has_data(m, log):
                continue
            self._next_offset[m.partition()] = m.offset() + 1
            try:
                key = self._decode(m)
            except Rejected as exc:
                self.dead_letters.send(m, exc.reason, exc.detail, int(time.time() * 1000))
                self.metrics.dlq.labels(reason=exc.reason.value).inc()
                continue
            good.append(key)
            sources.append(SourceOffset(topic=m.topic(), partition=m.partition(), offset=m.offset()))
            ingest.append(m.timestamp()[1])
        self.metrics.consumed.inc(len(good))
        if not good:
            return []
        return self.sessions.process(good, sources, ingest_ms=np.asarray(ingest, np.float64),
                                     clock_ms=time.time() * 1000.0)

    def _produce(self, alerts: list[Alert]) -> None:
        for alert in alerts:
            self.producer.produce(self.topics.alerts, alert.model_dump_json().encode(), alert.entity.encode(),
                                  on_delivery=self._delivery.on_delivery)
            self.metrics.alerts.labels(reason=alert.detail["reason"], severity=alert.severity).inc()
        self.producer.poll(0)

    def _observe(self) -> None:
        s, m = self.sessions, self.metrics
        m.sessions_open.set(len(s.sessions))
        m.scored.inc(s.scored - self._seen["scored"])
        self._seen["scored"] = s.scored
        for why, total in s.closed.items():
            m.sessions_closed.labels(why=why).inc(total - self._seen[why])
            self._seen[why] = total

    def _commit(self, sync: bool, partitions: Sequence[int] | None = None) -> None:
        offsets = [TopicPartition(self.topics.logkeys, p, off) for p, off in sorted(self._next_offset.items())
                   if partitions is None or p in partitions]
        if not offsets:
            return
        try:
            self.consumer.commit(offsets=offsets, asynchronous=not sync)
        except KafkaException as exc:  # e.g. a rebalance under way: the poll is redone, same alert ids
            log.warning("offset commit failed: %s", exc)

    # ---- rebalances -------------------------------------------------------------------------
    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned_once = True
        if not partitions:
            return
        t0, before = time.monotonic(), len(self.sessions.sessions)
        wanted = [TopicPartition(tp.topic, tp.partition) for tp in partitions]
        committed = retry_transient(lambda: self.consumer.committed(wanted, timeout=30), "reading committed offsets")
        for tp in committed:
            if tp.offset > 0:
                self._next_offset[tp.partition] = tp.offset
                self._rebuild(tp.partition, tp.offset)
        self.sessions.restart_idle_clocks()
        rebuilt = len(self.sessions.sessions) - before
        self.metrics.sessions_rebuilt.inc(rebuilt)
        log.info("assigned partitions %s (%d open sessions rebuilt in %.2fs)",
                 sorted(tp.partition for tp in partitions), rebuilt, time.monotonic() - t0)

    def _rebuild(self, partition: int, end: int) -> None:
        """Re-read the partition before ``end`` until the sessions that may still be open are complete (see the
        module docstring), then replay the keys, oldest first, into open sessions."""
        cfg, need, idle_ms = self.config, self.sessions.h + 1, self.config.idle_timeout_s * 1000
        # the count model checks a session's counts of every key when it closes: only its whole history will do
        whole = self.sessions.count_model is not None
        chunks: list[tuple[list[LogKey], list[SourceOffset]]] = []  # newest first
        counts: dict[str, int] = {}
        earliest: dict[str, int] = {}  # broker ms of the session's oldest key read so far
        latest: dict[str, int] = {}    # broker ms of its newest key
        span = {"newest": -1, "oldest": -1}  # broker ms of the newest message before end, of the oldest read

        def enough(msgs: list[Message]) -> bool:
            keys, sources = [], []
            for m in msgs:
                try:
                    key = self._decode(m)
                except Rejected:
                    continue  # dead-lettered when it was first consumed
                keys.append(key)
                sources.append(SourceOffset(topic=m.topic(), partition=m.partition(), offset=m.offset()))
                broker_ms = m.timestamp()[1]
                counts[key.session] = counts.get(key.session, 0) + 1
                earliest[key.session] = min(earliest.get(key.session, broker_ms), broker_ms)
                latest[key.session] = max(latest.get(key.session, broker_ms), broker_ms)
                span["newest"] = max(span["newest"], broker_ms)
                span["oldest"] = broker_ms if span["oldest"] < 0 else min(span["oldest"], broker_ms)
            chunks.append((keys, sources))
            # a session with no key in the last idle_timeout_s before end was closed by a caught-up run; one
            # with h + 1 keys read has its windows and its length verdict (without a count model); one whose
            # oldest key read comes idle_timeout_s after everything older than the read has its start
            return all((counts[s] >= need and not whole) or span["oldest"] < earliest[s] - idle_ms
                       for s in counts if latest[s] >= span["newest"] - idle_ms)

        history = read_back(self.rebuilder, self.topics.logkeys, partition, end, cfg.rebuild_chunk,
                            cfg.rebuild_max_messages, cfg.rebuild_timeout_s, enough)
        for keys, sources in reversed(chunks):
            for lo in range(0, len(keys), cfg.max_batch):  # a poll's worth at a time: the store's bound
                self.sessions.warm(keys[lo:lo + cfg.max_batch], sources[lo:lo + cfg.max_batch])
        short = sorted(s for s, c in counts.items() if (c < need or whole) and latest[s] >= span["newest"] - idle_ms
                       and not span["oldest"] < earliest[s] - idle_ms)
        if history.limit is not None and short:
            log.warning("partition %d: session rebuild stopped at %s, re-read offsets [%d, %d); %d sessions hold "
                        "%s, their start may lie before: %s%s", partition, history.limit, history.start, end,
                        len(short), "keys not all counted" if whole else f"fewer than {need} keys",
                        ", ".join(short[:10]), ", ..." if len(short) > 10 else "")

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
        log.info("partitions %s left: their sessions are dropped (the next owner rebuilds them)", sorted(partitions))

    # ---- hot reload -------------------------------------------------------------------------
    def _swap_if_pending(self) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, None
        if pending is None or pending[0].version == self.sessions.scorer.version:
            return
        scorer, count_model = pending
        old = self.sessions.scorer.version
        self.sessions.swap(scorer, count_model)
        self.metrics.set_model(scorer.version, _provider(scorer))
        self.metrics.reloads.labels(result="ok").inc()
        log.info("hot reload: %s -> %s", old, scorer.version)

    def _load(self, version: str, sha256: str | None) -> None:
        """Build ``version`` beside the serving model for the loop to swap in; raises when it cannot serve."""
        scorer = LogKeyScorer.from_registry(self.config.registry, version, top_g=self.config.top_g, sha256=sha256)
        self.sessions.check_compatible(scorer)
        count_model = CountModel.from_registry(self.config.registry, version)
        with self._pending_lock:
            self._pending = scorer, count_model


def _provider(scorer: LogKeyScorer) -> str:
    providers = getattr(scorer.session, "get_providers", lambda: ["unknown"])()
    return providers[0] if providers else "unknown"
