"""The stream processor: Kafka in, ``ScoringEngine`` in the middle, alerts / scores / dead letters out.

Delivery
    at-least-once (default): outputs of a batch are produced and flushed (delivery confirmed) before
    the batch's offsets are committed. exactly-once (``exactly_once=True``): each batch is one
    transaction holding its outputs and its offsets (``send_offsets_to_transaction`` with the
    consumer's group metadata, so a fenced zombie cannot commit); a failed transaction is aborted and
    the assignment rewound to the committed offsets; a call that fails retriably (the broker down or
    restarting) is made again within the transaction timeout, so a short outage only pauses the loop.
    A producer that cannot finish (a call failing fatally, timing out to the end, or not returning at
    all: librdkafka can wedge after a broker restart) is replaced by a new one with the same
    ``transactional.id``, whose ``init_transactions`` fences the old one and aborts its transaction,
    and the assignment is rewound the same way (``TransactionalProducer``, ``fabwatch.stream.kafka.transactions``;
    ``fabwatch_producer_recreated_total``). A consumer that then cannot read the committed offsets (its group
    coordinator lost for good, the same restart) is replaced too (``_replace_consumer``,
    ``fabwatch_consumer_recreated_total``).
    Dead letters never hold a batch back: one that cannot be produced even without its payload is
    counted (``fabwatch_dlq_lost``) and logged, and its offset is committed with the rest.

State across restarts and rebalances
    Windows are rebuilt on assignment by re-reading, per partition, the readings before the committed
    offset until each key has ``window - 1`` of them, and with ``grace_ms`` enough older ones that no reading
    put in order could be missing (``RebuildCoverage``; no alerts for these), ``rebuild_chunk`` messages at a
    time, within ``rebuild_max_messages`` and ``rebuild_timeout_s`` (the log says which keys stayed short).
    Assignment is cooperative-sticky: a rebalance hands each member only the partitions that move, so a
    scale step rebuilds those alone. An explicit ``instance_id`` also makes the member static
    (``group.instance.id``): restarted within ``session.timeout.ms`` it gets its partitions back with no
    rebalance at all (and, stopped, it holds them that long). The alert policy's
    non-quiet keys (open alerts, runs, cooldowns) live in the compacted policy state topic
    (``fabwatch.stream.kafka.state``), co-partitioned with the sensors: each batch writes the keys it changed
    with its outputs (exactly-once: in its transaction; at-least-once: flushed before its offsets are
    committed), and on assignment each partition's keys are read back whole, within ``state_restore_timeout_s``.
    Together with the data-defined stride, a restarted or rebalanced processor makes the same decisions, with
    the same alert ids, as an uninterrupted one, however many keys are open. At-least-once writes the state
    only once the batch's outputs are delivered, which leaves one window: a crash after the state is written
    but before the offsets are committed restarts with the state of that batch (ahead) and re-reads its
    readings. A key whose alert the batch opened or closed is mostly judged alike (the repeat is not emitted,
    or emitted under the same id), but its windows from before that change are judged against the later
    state: a low one may close the alert the state holds open and the next high one re-open it, and a run of
    high windows is counted twice and may open a few windows early; such alerts carry ids an uninterrupted
    run does not give. Exactly-once has no such window (state, outputs and offsets commit together).

Hot reload
    A watcher thread (``fabwatch.stream.watcher``) follows the registry's ``current`` pointer (a ModelEvent
    on the models topic only makes it look at once) from the version loaded at start-up on; it builds the new session
    beside the serving one, retries a failed load with backoff, and the loop swaps it in between batches.

Maintenance silences
    The silence topic is read to its end before the first poll and followed at every turn of the loop;
    ``SilenceGate`` (``fabwatch.stream.silences``) holds back the alerts of silenced entities after the
    policy decided them, so scoring and alert state go on as without silences.

Liveness
    ``/healthz`` answers 503, naming the loop, when the consume loop or the watcher has not turned for
    ``liveness_timeout_s`` or the watcher's thread has died; ``/ready`` says whether partitions are held.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, Producer, TopicPartition

from fabwatch.export.registry import Registry
from fabwatch.export.runtime import ScoringModel
from fabwatch.stream.kafka.config import Settings
from fabwatch.stream.decode import BatchDecoder, DecodedColumns
from fabwatch.stream.engine import EngineResult, ScoringEngine
from fabwatch.stream.kafka.history import read_back
from fabwatch.stream.kafka.lifecycle import StopOnSignal, has_data
from fabwatch.stream.metrics import DEFAULT_METRICS_HOST, Liveness, MetricsServer, ProcessorMetrics
from fabwatch.stream.policy import PolicyConfig
from fabwatch.stream.kafka.outputs import DeadLetters, DeliveryTracker
from fabwatch.stream.kafka.retry import retry_transient
from fabwatch.stream.kafka.state import ChangeLog
from fabwatch.stream.schemas import RejectReason
from fabwatch.stream.silences import SilencedAlerts, SilenceFeed, SilenceGate
from fabwatch.stream.kafka.topics import ensure_topics
from fabwatch.stream.kafka.transactions import ProducerBroken, TransactionalProducer
from fabwatch.stream.watcher import ModelEventFeed, ModelWatcher
from fabwatch.stream.windows import CONFLICT, DEFAULT_GRACE_MS, DUPLICATE, LATE, REORDERED, RebuildCoverage

log = logging.getLogger("fabwatch.processor")

# librdkafka's max.poll.interval.ms default: a consumer that goes this long between polls has left its group
DEFAULT_MAX_POLL_INTERVAL_MS = 300_000
CONSUME_LOOP = "consume loop"  # its name in Liveness and in /healthz's answer


@dataclass
class ProcessorConfig:
    registry: Path
    group_id: str = "fabwatch-processor"
    instance_id: str | None = None  # given: a static group member (group.instance.id); default: the host name
    exactly_once: bool = False
    emit_scores: bool = False
    stride: int = 1
    grace_ms: int = DEFAULT_GRACE_MS  # a reading this much older than its key's newest is put in order, not late
    max_batch: int = 512
    max_wait_ms: int = 20
    max_keys: int = 100_000
    key_ttl_s: float | None = 6 * 3600.0
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    metrics_port: int | None = None
    metrics_host: str = DEFAULT_METRICS_HOST
    # no turn of the consume loop or the model watcher for this long fails /healthz; None: twice
    # max.poll.interval.ms (a loop that slow has already lost its partitions), at least 60 s
    liveness_timeout_s: float | None = None
    reload_interval_s: float = 2.0
    reload_retry_max_s: float = 300.0
    rebuild_chunk: int = 20_000
    rebuild_max_messages: int = 2_000_000
    rebuild_timeout_s: float = 30.0  # per partition
    state_restore_timeout_s: float = 60.0  # reading the assigned partitions of the policy state topic
    transaction_timeout_ms: int = 30_000
    providers: Sequence[str] | None = None
    silenced_alerts: SilencedAlerts = "drop"  # or "mark": published with silence_id set


def _broker_ms(msgs: Sequence[Message]) -> np.ndarray:
    """int64 [n]: the messages' broker timestamps (<= 0 where the broker gave none)."""
    return np.fromiter((m.timestamp()[1] for m in msgs), dtype=np.int64, count=len(msgs))


class Processor(StopOnSignal):
    def __init__(self, settings: Settings, config: ProcessorConfig):
        self.settings, self.config = settings, config
        self.topics = settings.topics
        self.registry = Registry(config.registry)
        model = ScoringModel.from_registry(self.registry, providers=config.providers)
        self.engine = ScoringEngine(model, config.policy, config.stride, config.max_keys, config.key_ttl_s,
                                    config.max_batch, grace_ms=config.grace_ms)
        self.decoder = BatchDecoder(model.feature_names, settings.max_message_bytes, settings.event_time_bounds())
        self.metrics = ProcessorMetrics()
        self.metrics.set_model(model.version, model.provider)
        max_poll_s = float(settings.kafka_options.get("max.poll.interval.ms", DEFAULT_MAX_POLL_INTERVAL_MS)) / 1000
        self.liveness = Liveness(config.liveness_timeout_s or max(60.0, 2 * max_poll_s))
        self.metrics.readiness.set_function(lambda: float(self.ready()))
        self._stop = threading.Event()
        self._pending: ScoringModel | None = None
        self._pending_lock = threading.Lock()
        self._assigned: set[int] = set()
        self._next_offset: dict[int, int] = {}
        self._assigned_once = False
        self._delivery = DeliveryTracker()
        self._failed = False
        self._last_housekeeping = 0.0
        self._cap_evictions_seen = 0
        self.http: MetricsServer | None = None
        self.silences = SilenceGate(mode=config.silenced_alerts)
        self._silence_feed: SilenceFeed | None = None

        base = settings.client_config()
        instance = config.instance_id or socket.gethostname()
        # cooperative-sticky: a rebalance moves only the partitions that change owner, the rest keep their
        # windows; static membership only for an explicit id (two live members sharing one fence each other)
        membership = {} if config.instance_id is None else {"group.instance.id": config.instance_id}
        self._consumer_conf = {**base, "group.id": config.group_id, "enable.auto.commit": False,
                               "auto.offset.reset": "earliest", "isolation.level": "read_committed",
                               "partition.assignment.strategy": "cooperative-sticky", **membership,
                               "client.id": f"fabwatch-{instance}"}
        self.consumer = Consumer(self._consumer_conf)
        producer_conf = {**base, "linger.ms": 2, "acks": "all", "enable.idempotence": True,
                         "client.id": f"fabwatch-{instance}"}
        self.txn: TransactionalProducer | None = None  # exactly-once: owns the producer, which it may replace
        if config.exactly_once:
            producer_conf.update({"transactional.id": f"{config.group_id}-{instance}",
                                  "transaction.timeout.ms": config.transaction_timeout_ms})
            self.txn = TransactionalProducer(producer_conf, config.transaction_timeout_ms / 1000, self._stop,
                                             self._producer_replaced)
        else:
            self._producer = Producer(producer_conf)
        self.dead_letters = DeadLetters(self.producer, self.topics.dlq,
                                        lambda reason: self.metrics.dlq_lost.labels(reason=reason.value).inc())
        self.rebuilder = Consumer({**base, "group.id": f"{config.group_id}-rebuild", "enable.auto.commit": False,
                                   "isolation.level": "read_committed", "enable.partition.eof": True})
        self.changelog = ChangeLog(settings, config.group_id)

    @property
    def producer(self) -> Producer:
        """The producer of the outputs; in exactly-once mode the transactional one of the moment."""
        return self.txn.producer if self.txn is not None else self._producer

    # ---- lifecycle --------------------------------------------------------------------------
    def ready(self) -> bool:
        return self._assigned_once and not self._stop.is_set()

    def run(self) -> None:
        cfg = self.config
        ensure_topics(self.settings, [self.topics.sensors, self.topics.alerts, self.topics.dlq, self.topics.scores,
                                      self.topics.models, self.topics.silences, self.topics.policy_state])
        self.changelog.check_copartitioned(self.topics.sensors)
        silence_feed = self._silence_feed = SilenceFeed(self.settings, self.silences.silences, cfg.group_id)
        silence_feed.catch_up()
        log.info("%d maintenance silences known", len(self.silences.silences))
        self.liveness.beat(CONSUME_LOOP)
        if cfg.metrics_port is not None:
            self.http = MetricsServer(self.metrics, self.ready, cfg.metrics_port, cfg.metrics_host,
                                      self.liveness.failure)
        if self.txn is not None:
            self.txn.init()
        ModelWatcher(self.registry, self.engine.version, self._load, self.metrics, self.liveness, self._stop,
                     open_events=lambda: ModelEventFeed(self.settings, cfg.group_id),
                     interval_s=cfg.reload_interval_s, retry_min_s=cfg.reload_interval_s,
                     retry_max_s=cfg.reload_retry_max_s).start()
        self._subscribe()
        log.info("serving %s (%s) on %s, group %s, %s", self.engine.version, self.engine.model.provider,
                 self.topics.sensors, cfg.group_id, "exactly-once" if cfg.exactly_once else "at-least-once")
        try:
            while not self._stop.is_set():
                self.liveness.beat(CONSUME_LOOP)
                self._swap_if_pending()
                silence_feed.poll()
                self.metrics.silences.set(len(self.silences.silences))
                msgs = self.consumer.consume(cfg.max_batch, cfg.max_wait_ms / 1000)
                if msgs:
                    self._handle(msgs)
                self._housekeeping()
        except BaseException:
            self._failed = True  # nothing more is committed: a restart redoes the unfinished batch
            self._close()
            raise
        if not self.config.exactly_once:
            self._delivery.flush_or_raise(self.producer)
            self._commit(sync=True)
        self._close()
        log.info("stopped cleanly")

    def _subscribe(self) -> None:
        self.consumer.subscribe([self.topics.sensors], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_lost)

    def _close(self) -> None:
        self._stop.set()
        try:
            self.consumer.close()  # leaves the group (on_revoke runs)
        finally:
            self.rebuilder.close()
            self.changelog.close()
            if self._silence_feed is not None:
                self._silence_feed.close()
            self.producer.flush(10)
            if self.http is not None:
                self.http.close()

    # ---- the batch --------------------------------------------------------------------------
    def _handle(self, msgs: list[Message]) -> None:
        good: list[Message] = []
        for m in msgs:
            if has_data(m, log) and m.partition() in self._assigned:
                good.append(m)
        if not good:
            return
        n = len(good)
        self.metrics.consumed.inc(n)
        partitions = np.fromiter((m.partition() for m in good), dtype=np.int32, count=n)
        offsets = np.fromiter((m.offset() for m in good), dtype=np.int64, count=n)
        cols = self.decoder.decode([m.value() for m in good], _broker_ms(good))
        ingest = np.fromiter((good[i].timestamp()[1] for i in cols.index.tolist()), dtype=np.float64,
                             count=len(cols.index))
        result = self.engine.process(cols.keys, cols.ts, cols.values, partitions=partitions[cols.index],
                                     offsets=offsets[cols.index], ingest_ms=ingest, topic=self.topics.sensors,
                                     clock_ms=lambda: time.time() * 1000.0)
        result.alerts, silenced = self.silences.apply(result.alerts, [result.scores])
        for a in silenced:
            self.metrics.silenced.labels(state=a.state).inc()
        for p in np.unique(partitions).tolist():
            self._next_offset[p] = int(offsets[partitions == p].max()) + 1
        if self.config.exactly_once:
            self._deliver_transactional(good, cols, result)
        else:
            self._produce_outputs(good, cols, result)
            self._delivery.flush_or_raise(self.producer)
            if self._produce_state():  # after the outputs are delivered: a crash between loses no alert
                self._delivery.flush_or_raise(self.producer)
            self._commit(sync=False)
        self._observe(result)

    def _produce_outputs(self, msgs: list[Message], cols: DecodedColumns, result: EngineResult) -> None:
        topics, produce = self.topics, self.producer.produce
        now_ms = int(time.time() * 1000)
        dead: list[tuple[int, RejectReason, str]] = [(i, r.reason, r.detail) for i, r in cols.rejected]
        late = cols.index[result.status == LATE]
        dead += [(int(i), RejectReason.late, f"older than the key's newest reading by more than the grace "
                  f"({self.config.grace_ms} ms), or than every reading its window buffer holds")
                 for i in late.tolist()]
        conflicts = cols.index[result.status == CONFLICT]
        dead += [(int(i), RejectReason.conflicting_duplicate, "the key already has a reading at this timestamp, "
                  "with other values: the first one is kept") for i in conflicts.tolist()]
        on_delivery = self._delivery.on_delivery
        for i, reason, detail in dead:
            self.dead_letters.send(msgs[i], reason, detail, now_ms)
            self.metrics.dlq.labels(reason=reason.value).inc()
        for alert in result.alerts:
            produce(topics.alerts, alert.model_dump_json().encode(), alert.entity.encode(),
                    on_delivery=on_delivery)
        if self.config.emit_scores and len(result.scores.index):
            sc = result.scores
            for i, end_ts, score in zip(sc.index.tolist(), sc.window_end_ts.tolist(), sc.score.tolist()):
                entity = cols.keys[i]
                produce(topics.scores, orjson.dumps({"entity": entity, "window_end_ts": end_ts, "score": score,
                                                     "model_version": sc.model_version}), entity.encode(),
                        on_delivery=on_delivery)
        self.producer.poll(0)

    def _produce_state(self) -> bool:
        """Write the alert policy keys that changed since the last batch to the state topic; False if none did."""
        changes = self.engine.policy.take_changes()
        self.changelog.produce(self.producer, changes, self._delivery.on_delivery)
        return bool(changes)

    def _offsets(self, partitions: Sequence[int] | None = None) -> list[TopicPartition]:
        """Positions to commit."""
        wanted = self._assigned if partitions is None else set(partitions)
        out = [TopicPartition(self.topics.sensors, p, off) for p, off in sorted(self._next_offset.items())
               if p in wanted]
        self.metrics.observe_policy(self.engine.policy.counters)
        return out

    def _commit(self, sync: bool, partitions: Sequence[int] | None = None) -> None:
        offsets = self._offsets(partitions)
        if not offsets:
            return
        try:
            self.consumer.commit(offsets=offsets, asynchronous=not sync)
        except KafkaException as exc:  # e.g. a rebalance under way: the batch is redone, same alert ids
            log.warning("offset commit failed: %s", exc)

    def _deliver_transactional(self, msgs: list[Message], cols: DecodedColumns, result: EngineResult) -> None:
        txn = self.txn
        assert txn is not None
        try:
            txn.begin()
            self._produce_outputs(msgs, cols, result)
            self._produce_state()
            offsets, group = self._offsets(), self.consumer.consumer_group_metadata()
            txn.call(lambda p, t: p.send_offsets_to_transaction(offsets, group, t), "sending offsets")
            txn.call(lambda p, t: p.commit_transaction(t), "committing the transaction")
        except KafkaException as exc:
            err = exc.args[0]
            if not err.txn_requires_abort():
                raise
            log.warning("transaction aborted (%s): rewinding to the committed offsets", err)
            try:
                txn.abort()
            except ProducerBroken:  # the new producer aborted it
                pass
            self._rewind()
        except ProducerBroken:  # the new producer aborted the batch's transaction (logged where it was replaced)
            self._rewind()

    def _producer_replaced(self, producer: Producer) -> None:
        """The transactional producer was replaced (``TransactionalProducer``): outputs go to the new one."""
        self.metrics.producer_recreated.inc()
        self.dead_letters.producer = producer

    def _rewind(self) -> None:
        """After an aborted transaction: forget in-memory state and resume from the committed offsets.

        The next offsets of the aborted batch are forgotten too: a partition with no committed offset
        would otherwise keep its aborted position, and a later transaction commit past unprocessed messages."""
        parts = sorted(self._assigned)
        self.engine.drop_partitions(parts)
        self.silences.drop_partitions(parts)
        for p in parts:
            self._next_offset.pop(p, None)
        try:
            committed, _ = self._restore([TopicPartition(self.topics.sensors, q) for q in parts])
        except KafkaException as exc:
            self._replace_consumer(f"reading the committed offsets failed: {exc.args[0]}")
            return
        for tp in committed:
            self.consumer.seek(TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING))

    def _replace_consumer(self, reason: str) -> None:
        """Exactly-once, after an aborted transaction: a consumer that cannot read the committed offsets has lost its
        group coordinator for good (librdkafka 2.16 can keep a coordinator that went away cached after a broker
        restart, confluentinc/librdkafka#5511), so it can neither rewind nor rejoin its group. A new consumer joins
        in its place and gets the partitions, rebuilt from the committed offsets, through ``_on_assign``; the old
        one is closed off the loop (its close may wait on that coordinator), its rebalance callbacks ignored."""
        log.error("consumer replaced: %s; a new one rejoins the group and resumes from the committed offsets", reason)
        self.metrics.consumer_recreated.inc()
        old = self.consumer
        self._forget(sorted(self._assigned))
        self.consumer = Consumer(self._consumer_conf)
        self._subscribe()
        threading.Thread(target=old.close, name="retire consumer", daemon=True).start()

    def _observe(self, result: EngineResult) -> None:
        m = self.metrics
        m.scored.inc(len(result.scores.index))
        m.duplicates.inc(int(np.count_nonzero(result.status == DUPLICATE)))
        m.reordered.inc(int(np.count_nonzero(result.status == REORDERED)))
        for size, seconds in zip(result.batch_sizes, result.inference_s):
            m.batch_size.observe(size)
            m.inference.observe(seconds)
        for a in result.alerts:
            m.alerts.labels(kind=a.kind, state=a.state, severity=a.severity).inc()
            if a.ingest_to_alert_ms is not None:
                m.ingest_to_alert.observe(a.ingest_to_alert_ms / 1000.0)

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now - self._last_housekeeping < 5.0:
            return
        self._last_housekeeping = now
        counters = self.engine.windows.counters
        ttl_before = counters.evicted_ttl
        self.engine.windows.evict_idle(now)
        self.metrics.evicted.labels(why="ttl").inc(counters.evicted_ttl - ttl_before)
        self.metrics.evicted.labels(why="cap").inc(counters.evicted_cap - self._cap_evictions_seen)
        self._cap_evictions_seen = counters.evicted_cap
        self.metrics.live_keys.set(len(self.engine.windows))
        self.engine.policy.prune_expired()  # their tombstones go out with the next batch
        for tp in self.consumer.position([TopicPartition(self.topics.sensors, q) for q in sorted(self._assigned)]):
            try:
                _, high = self.consumer.get_watermark_offsets(tp, timeout=1, cached=False)
            except KafkaException:
                continue
            pos = tp.offset if tp.offset >= 0 else self._next_offset.get(tp.partition, 0)
            self.metrics.lag.labels(partition=str(tp.partition)).set(max(0, high - pos))

    # ---- rebalances -------------------------------------------------------------------------
    # Cooperative: each callback gets only the partitions that move (the client then incrementally
    # assigns / unassigns them); the ones kept keep their windows and alert state untouched.
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if consumer is not self.consumer:  # a replaced consumer (``_replace_consumer``)
            return
        self._assigned_once = True
        if not partitions:  # a cooperative round that moved nothing to this member
            return
        t0 = time.monotonic()
        added = sorted(tp.partition for tp in partitions)
        restored = self._restore(partitions)[1]
        self._assigned |= set(added)
        log.info("assigned partitions %s, now holding %s (windows rebuilt for %d keys, alert state restored for %d "
                 "in %.2fs)", added, sorted(self._assigned), len(self.engine.windows.keys_in(added)), restored,
                 time.monotonic() - t0)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = [tp.partition for tp in partitions]
        if not revoked or consumer is not self.consumer:
            return
        if not self.config.exactly_once and not self._failed:  # batches are flushed; commit synchronously
            self._commit(sync=True, partitions=revoked)
        self._forget(revoked)
        log.info("revoked partitions %s, keeping %s", sorted(revoked), sorted(self._assigned))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if consumer is not self.consumer:
            return
        lost = [tp.partition for tp in partitions]
        self._forget(lost)
        log.warning("lost partitions %s: state dropped, the new owner rebuilds it", sorted(lost))

    def _forget(self, partitions: Sequence[int]) -> None:
        self.engine.drop_partitions(partitions)
        self.silences.drop_partitions(partitions)
        self._assigned -= set(partitions)
        for p in partitions:
            self._next_offset.pop(p, None)
            self.metrics.lag.remove(str(p))  # the new owner reports it; a frozen copy here would add to the sum

    def _restore(self, partitions: list[TopicPartition]) -> tuple[list[TopicPartition], int]:
        """Load committed offsets, rebuild each key's window from the readings before them, and restore the alert
        state of the partitions from the state topic. Returns the committed offsets and how many keys were restored.

        The state is read after the committed offsets: a committed-offsets fetch waits for a transaction that
        holds offsets of these partitions (a previous owner's) to end, and its state writes end with it."""
        if not partitions:
            return [], 0
        wanted = [TopicPartition(tp.topic, tp.partition) for tp in partitions]
        committed = retry_transient(lambda: self.consumer.committed(wanted, timeout=30), "reading committed offsets")
        for tp in committed:
            if tp.offset >= 0:
                self._next_offset[tp.partition] = tp.offset
                self._rebuild(tp.partition, tp.offset)
        restored = self.changelog.restore([tp.partition for tp in wanted], self.config.state_restore_timeout_s)
        for p, states in restored.items():
            self.engine.policy.restore(p, states)
        n = sum(len(states) for states in restored.values())
        self.metrics.policy_state_restored.inc(n)
        return committed, n

    def _rebuild(self, partition: int, end: int) -> None:
        """Re-read backwards (``read_back``) until every key seen has the ``window - 1`` readings before ``end``
        that fix its window (``RebuildCoverage``: with a grace, also those that out-of-order readings may have been
        put between); then fill the windows oldest chunk first, one bounded ``append`` per chunk."""
        cfg = self.config
        need = self.engine.windows.window - 1
        coverage = RebuildCoverage(need, self.engine.windows.grace_ms)
        decoded: list[DecodedColumns] = []  # newest first

        def enough(msgs: list[Message]) -> bool:
            cols = self.decoder.decode([m.value() for m in msgs], _broker_ms(msgs))
            decoded.append(cols)
            return not coverage.add(cols.keys, cols.ts) and not coverage.short

        history = read_back(self.rebuilder, self.topics.sensors, partition, end, cfg.rebuild_chunk,
                            cfg.rebuild_max_messages, cfg.rebuild_timeout_s, enough)
        for cols in reversed(decoded):
            self.engine.warm(cols.keys, cols.ts, cols.values, partitions=np.full(len(cols.keys), partition, np.int32))
        short = coverage.short
        if history.limit is not None and short:
            log.warning("partition %d: rebuild stopped at %s, re-read offsets [%d, %d); %d keys hold fewer than %d "
                        "readings (beyond the grace) and score only once live readings fill them: %s%s", partition,
                        history.limit, history.start, end, len(short), need, ", ".join(short[:10]),
                        ", ..." if len(short) > 10 else "")

    # ---- hot reload -------------------------------------------------------------------------
    def _swap_if_pending(self) -> None:
        with self._pending_lock:
            model, self._pending = self._pending, None
        if model is None or model.version == self.engine.version:
            return
        old = self.engine.version
        self.engine.swap_model(model)
        self.metrics.set_model(model.version, model.provider)
        self.metrics.reloads.labels(result="ok").inc()
        log.info("hot reload: %s -> %s (%s)", old, model.version, model.provider)

    def _load(self, version: str, sha256: str | None) -> None:
        """Build ``version`` beside the serving model for the loop to swap in; raises when it cannot serve."""
        vdir, manifest = self.registry.resolve(version, sha256)
        model = ScoringModel(vdir, manifest, self.config.providers)
        self.engine.check_compatible(model)
        with self._pending_lock:
            self._pending = model
