"""Maintenance silences: which alerts are not published, decided in one place for the processor and for
``evaluate --silences``.

The rule (``SilenceGate.apply``), per entity, in window order:

- An **open** alert is silenced when a silence names its entity (``entity``, or the glob ``match``) and its
  window end, an event time, lies in ``[starts, until)``. Event time, not the wall clock, so a replay and
  the offline evaluator decide as the live processor did (given the same silences).
- A **close** is silenced when, and only when, its open was: the pair stays together. The close of an
  alert opened before the silence is published even during it, so receivers do not keep it open.
- An alert opened during a silence and **still open when it lapses** (its entity scores a window that no
  silence covers: ``until`` passed, or the silence was removed) is published then, as the policy made it
  (its own id, window and score), and its close after it: a fault that outlasts the maintenance is
  announced, as Alertmanager does when a silence expires over a firing alert.
- The alert policy is not touched: scoring and its hysteresis go on, only publication is held back.

Silenced alerts are dropped (``drop``, the default) or published with ``silence_id`` set (``mark``), and
counted either way. Which open was silenced lives in memory (``SilenceGate.muted``): after a restart or a
rebalance the close of a silenced open is published on its own, and an open that outlasts its silence is
not announced.

On the wire the silences are a compacted topic keyed by silence id (``SilenceFeed`` follows it); offline,
a JSON or JSONL file of the same ``Silence`` messages (``load_silences``).
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Iterable, Iterator, Literal, Sequence

import numpy as np

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from pydantic import ValidationError
from pydantic_core import PydanticCustomError

from fabwatch.export.errors import UsageError
from fabwatch.stream.engine import ScoreColumns
from fabwatch.stream.kafka.config import Settings
from fabwatch.stream.kafka.retry import retry_transient
from fabwatch.stream.schemas import Alert, Rejected, Silence, decode_silence, parse_timestamp_ms

log = logging.getLogger("fabwatch.silences")

SilencedAlerts = Literal["drop", "mark"]
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


class SilenceSet:
    """The silences known, by id; ``covering`` answers in a fixed order (by id) so the choice is deterministic."""

    def __init__(self, silences: Iterable[Silence] = ()):
        self._by_id: dict[str, Silence] = {}
        self._ordered: list[Silence] = []
        for s in silences:
            self.put(s)

    def put(self, silence: Silence) -> None:
        self._by_id[silence.id] = silence
        self._ordered = sorted(self._by_id.values(), key=lambda s: s.id)

    def remove(self, silence_id: str) -> None:
        if self._by_id.pop(silence_id, None) is not None:
            self._ordered = sorted(self._by_id.values(), key=lambda s: s.id)

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Silence]:
        return iter(self._ordered)

    def get(self, silence_id: str) -> Silence | None:
        return self._by_id.get(silence_id)

    def covering(self, entity: str, ts: int) -> Silence | None:
        """The first silence (by id) naming ``entity`` and holding the event time ``ts``, or None."""
        for s in self._ordered:
            if s.starts <= ts < s.until and (entity == s.entity if s.match is None else fnmatchcase(entity, s.match)):
                return s
        return None


class SilenceGate:
    """Applies the silences to the alerts of each batch, in order (see the module docstring)."""

    def __init__(self, silences: SilenceSet | None = None, mode: SilencedAlerts = "drop"):
        self.silences = silences if silences is not None else SilenceSet()
        self.mode = mode
        self.muted: dict[str, _Held] = {}  # entity -> its silenced open, while that alert is open

    def apply(self, alerts: Sequence[Alert], scored: Sequence[ScoreColumns] = ()) -> tuple[list[Alert], list[Alert]]:
        """(the alerts to publish, the ones silenced); in ``mark`` mode the silenced ones are published too,
        with ``silence_id`` set. ``scored``: every window the alerts came from, which is how an alert still
        open when its silence lapses is found (and published then)."""
        ends = _WindowEnds(scored)
        publish: list[Alert] = []
        silenced: list[Alert] = []
        for a in alerts:
            self._release_before(a.entity, a.window_end_ts, ends, publish)
            if a.state == "open":
                s = self.silences.covering(a.entity, a.window_end_ts)
                if s is None:
                    self.muted.pop(a.entity, None)  # a stale entry (its key expired without a close)
                    publish.append(a)
                    continue
                silence_id = s.id
                self.muted[a.entity] = _Held(a, silence_id, a.source.partition if a.source is not None else -1)
            else:
                held = self.muted.pop(a.entity, None)
                if held is None:
                    publish.append(a)
                    continue
                silence_id = held.silence_id
            a = a.model_copy(update={"silence_id": silence_id})
            silenced.append(a)
            if self.mode == "mark":
                publish.append(a)
        for entity in list(self.muted):
            self._release_before(entity, None, ends, publish)
        return publish, silenced

    def _release_before(self, entity: str, before_ts: int | None, ends: "_WindowEnds", publish: list[Alert]) -> None:
        """Publish ``entity``'s held open, unmarked and with its own id, when a window it scored after that
        open (and before ``before_ts``) is no longer covered by a silence: the fault outlasted the maintenance."""
        held = self.muted.get(entity)
        if held is None:
            return
        for ts in ends.of(entity):
            if before_ts is not None and ts >= before_ts:
                return
            if ts > held.open.window_end_ts and self.silences.covering(entity, int(ts)) is None:
                del self.muted[entity]
                publish.append(held.open)
                return

    def drop_partitions(self, partitions: Sequence[int]) -> None:
        """Forget the silenced opens of partitions this processor no longer holds (their new owner publishes
        those closes)."""
        gone = set(partitions)
        for entity in [e for e, held in self.muted.items() if held.partition in gone]:
            del self.muted[entity]


@dataclass
class _Held:
    open: Alert       # as the policy made it (no silence_id)
    silence_id: str
    partition: int


class _WindowEnds:
    """A batch's window end times by entity, sorted; grouped only when a held open asks."""

    def __init__(self, scored: Sequence[ScoreColumns]):
        self._scored = scored
        self._by_entity: dict[str, np.ndarray] | None = None

    def of(self, entity: str) -> np.ndarray:
        if self._by_entity is None:
            keys = np.asarray([k for cols in self._scored for k in cols.entity], dtype=object)
            ends = np.concatenate([cols.window_end_ts for cols in self._scored] or [_NO_ENDS]).astype(np.int64)
            uniq, code = np.unique(keys, return_inverse=True)
            order = np.lexsort((ends, code))
            starts = np.searchsorted(code[order], np.arange(1, len(uniq)))
            self._by_entity = dict(zip(uniq.tolist(), np.split(ends[order], starts)))
        return self._by_entity.get(entity, _NO_ENDS)


_NO_ENDS = np.empty(0, np.int64)


# ---- files and the command line -------------------------------------------------------------------

def load_silences(path: Path) -> list[Silence]:
    """A JSON array (or one object) or JSONL of ``Silence`` messages; a bad one is a ``UsageError`` naming it."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read silences file {path}: {exc.strerror}") from None
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            items = json.loads(text)
        elif not stripped:
            items = []
        else:
            try:
                items = [json.loads(text)]
            except json.JSONDecodeError:
                items = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path.name}: not JSON or JSONL: {exc}") from None
    out = []
    for i, item in enumerate(items):
        try:
            out.append(Silence.model_validate(item))
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "silence"
            raise UsageError(f"{path.name}: silence {i + 1}: {where}: {first['msg']}") from None
    return out


def parse_time_ms(text: str, now_ms: int) -> int:
    """``--until`` / ``--starts``: a duration from now (``90s``, ``30m``, ``2h``, ``1d``), epoch ms or ISO-8601."""
    m = _DURATION.fullmatch(text)
    if m:
        return now_ms + int(float(m.group(1)) * _UNIT_MS[m.group(2)])
    text = text.strip()
    try:
        return parse_timestamp_ms(int(text) if text.isdigit() else text)
    except PydanticCustomError:
        raise UsageError(f"expected a duration (30m, 2h, 1d), epoch ms or ISO-8601 time, not {text!r}") from None


def status(silence: Silence, now_ms: int) -> str:
    """``pending``, ``active`` or ``expired`` by the wall clock (what the live stream sees now)."""
    return "pending" if now_ms < silence.starts else "active" if now_ms < silence.until else "expired"


# ---- Kafka ----------------------------------------------------------------------------------------

class SilenceFeed:
    """Follows the compacted silence topic into a ``SilenceSet``: ``catch_up`` reads it to its end (at start),
    ``poll`` takes what came since without waiting. A message that is no silence is logged and skipped."""

    def __init__(self, settings: Settings, silences: SilenceSet, group_id: str):
        self.topic = settings.topics.silences
        self.silences = silences
        # assigned, never subscribed: every reader needs every silence; offsets are never committed
        self.consumer = Consumer({**settings.client_config(), "group.id": f"{group_id}-silences",
                                  "enable.auto.commit": False, "enable.partition.eof": True})
        self.partitions = retry_transient(self._partitions, f"the partitions of {self.topic}")
        self.consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in self.partitions])

    def _partitions(self) -> list[int]:
        """The topic's partitions; a topic created a moment ago may still answer with a transient error."""
        md = self.consumer.list_topics(self.topic, timeout=10).topics.get(self.topic)
        if md is None:
            raise KafkaException(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))
        if md.error is not None:
            raise KafkaException(md.error)
        return sorted(md.partitions)

    def catch_up(self, timeout_s: float = 30.0) -> None:
        """Read every partition up to the end it had when called; raises ``TimeoutError`` past ``timeout_s``."""
        ends = {p: retry_transient(lambda: self.consumer.get_watermark_offsets(TopicPartition(self.topic, p),
                                                                               timeout=10)[1],
                                   f"the end of {self.topic}[{p}]")  # a topic just created may have no leader yet
                for p in self.partitions}
        behind = {p for p, high in ends.items() if high > 0}
        deadline = time.monotonic() + timeout_s
        while behind:
            if time.monotonic() > deadline:
                raise TimeoutError(f"silence topic {self.topic} not read to its end in {timeout_s:.0f} s")
            for m in self.consumer.consume(500, 0.5):
                self._apply(m)
                err = m.error()
                # compaction leaves gaps in the offsets: the end-of-partition event says it too
                if (err is None and m.offset() + 1 >= ends[m.partition()]) or (
                        err is not None and err.code() == KafkaError._PARTITION_EOF):
                    behind.discard(m.partition())

    def poll(self) -> None:
        for m in self.consumer.consume(100, 0):
            self._apply(m)

    def _apply(self, m: Message) -> None:
        if m.error() is not None:
            return  # partition EOF (asked for), or a transient error librdkafka retries
        if m.value() is None:  # a tombstone: the silence was removed
            self.silences.remove((m.key() or b"").decode(errors="replace"))
            return
        try:
            self.silences.put(decode_silence(m.value()))
        except Rejected as exc:
            log.warning("ignoring a message on %s at offset %d (%s)", self.topic, m.offset(), exc)

    def close(self) -> None:
        self.consumer.close()


def read_silences(settings: Settings) -> SilenceSet:
    """Every silence on the topic now."""
    silences = SilenceSet()
    feed = SilenceFeed(settings, silences, f"fabwatch-silence-cli-{time.monotonic_ns()}")
    try:
        feed.catch_up()
    finally:
        feed.close()
    return silences


def publish(settings: Settings, silence_id: str, silence: Silence | None) -> None:
    """Write ``silence`` under ``silence_id``, or its tombstone (None); waits for the broker's acknowledgement."""
    failures: list[str] = []

    def delivered(err, _msg) -> None:
        if err is not None:
            failures.append(str(err))

    producer = Producer(settings.client_config(**{"acks": "all", "enable.idempotence": True}))
    value = silence.model_dump_json().encode() if silence is not None else None
    try:
        producer.produce(settings.topics.silences, value, silence_id.encode(), on_delivery=delivered)
    except KafkaException as exc:
        raise RuntimeError(f"cannot write to {settings.topics.silences}: {exc}") from exc
    if producer.flush(30) or failures:
        raise RuntimeError(f"silence {silence_id} not written to {settings.topics.silences}: "
                           f"{failures[0] if failures else 'no acknowledgement within 30 s'}")
