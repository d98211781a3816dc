"""Alert policy: turns window scores into open / closed alerts, deterministically.

Hysteresis: an alert opens when the score reaches ``thresholds.alert`` for ``min_consecutive``
windows in a row and closes when it drops below ``thresholds.close``; with ``thresholds_by`` in the
manifest (``train --threshold-by``), an entity it knows uses its own figures, every other the pooled
ones. After a close, a key stays quiet for ``cooldown_ms`` of event time. Every decision depends only on
the scored windows and their timestamps (event time, never the wall clock), so a replay, a restart or the
offline evaluator reach the same decisions and the same ``alert_id``s.

Only keys away from the quiet state carry a ``KeyState``. The policy notes which keys changed what they
carry (``take_changes``); the processor writes those to its compacted state topic
(``fabwatch.stream.kafka.state``) and ``restore``s a partition's keys from it on assignment, so a restart
resumes an open alert instead of opening a new one, however many keys are open.

Expiry: a key whose windows stop for longer than the key TTL (event time, to the minute) loses its
state. An open alert expires without a ``closed`` alert (no window said it recovered): if the key comes
back still high, a new alert opens with a new id. The rule is per key, so the processor and the offline
evaluator decide alike; the processor also prunes states silent for the TTL against the newest window
of their partition, so keys that never come back do not stay on the state topic (``prune_expired``: each
leaves a tombstone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fabwatch.export.registry import Manifest
from fabwatch.export.runtime import ModelOutput
from fabwatch.stream.schemas import Alert, FeatureContribution, SourceOffset, alert_id_for

MINUTE_MS = 60_000      # resolution of a key's last-seen time: expiry does not need finer, and it stores small


@dataclass
class PolicyConfig:
    min_consecutive: int = 1
    cooldown_ms: int = 0
    top_k: int = 3


@dataclass(frozen=True)
class Figures:
    """The thresholds one entity alerts at (``Thresholds`` without its description)."""

    alert: float
    close: float
    critical: float | None


@dataclass
class KeyState:
    """A key that is not quiet: an open alert, a run of high windows, or a cooldown."""

    partition: int
    open: bool = False
    run: int = 0            # consecutive windows at or above the alert threshold
    closed_at: int = -1     # window_end_ts of the last close, for the cooldown
    last_min: int = 0       # window_end_ts // MINUTE_MS of the key's last window, for the expiry

    def quiet(self, now_ts: int, cooldown_ms: int) -> bool:
        return not self.open and self.run == 0 and (self.closed_at < 0 or now_ts - self.closed_at >= cooldown_ms)

    def packed_fields(self) -> tuple[bool, int, int, int]:
        """What the state topic stores of this key: when it changes, the key is written again."""
        return self.open, self.run, self.closed_at, self.last_min


@dataclass
class PolicyCounters:
    """What the policy let go of; the processor exports them as metrics."""

    expired_open: int = 0       # open alerts dropped after the key TTL of silence (they get no ``closed``)
    expired_pending: int = 0    # runs and cooldowns dropped after the key TTL of silence


@dataclass
class ScoredWindows:
    """The windows of one micro-batch with what the alert needs about each (columnar)."""

    entities: Sequence[str]
    window_start_ts: np.ndarray     # int64 [m]
    window_end_ts: np.ndarray       # int64 [m]
    windows: np.ndarray             # float32 [m, W, F] raw (unscaled)
    partition: np.ndarray           # int32 [m]; -1 without Kafka
    offset: np.ndarray              # int64 [m]
    ingest_ms: np.ndarray           # float64 [m]: epoch ms the closing reading entered Kafka (nan offline)
    topic: str | None = None


class AlertPolicy:
    """Thresholds come from the serving manifest (``set_manifest`` on hot reload keeps key states)."""

    def __init__(self, manifest: Manifest, config: PolicyConfig | None = None, ttl_s: float | None = None):
        """``ttl_s``: a key silent (in event time) for longer loses its state; None keeps states forever."""
        self.config = config or PolicyConfig()
        self.states: dict[str, KeyState] = {}
        self.ttl_ms = None if ttl_s is None else int(ttl_s * 1000)
        self.counters = PolicyCounters()
        self._clock_min: dict[int, int] = {}  # partition -> minute of its newest window, for pruning
        # entity -> partition of the keys whose stored fields changed (or that went quiet) since ``take_changes``
        self._changed: dict[str, int] = {}
        self.set_manifest(manifest)

    def set_manifest(self, manifest: Manifest) -> None:
        if manifest.thresholds is None:
            raise ValueError(f"model {manifest.version} has no thresholds in its manifest: cannot alert")
        self.manifest = manifest
        self.pooled = Figures(manifest.thresholds.alert, manifest.thresholds.close, manifest.thresholds.critical)
        by = manifest.thresholds_by
        known = (by.keys if by.by == "entity" else by.groups) if by is not None else {}
        self.by_entity = {e: Figures(t.alert, t.close, t.critical) for e in known
                          if (t := by.for_entity(e)) is not None}
        self.members = list(manifest.members)
        self.spike_member = next((i for i, m in enumerate(self.members) if "spike" in m.lower()), None)
        self.delay_task = manifest.task == "regress" or manifest.extra.get("target") == "delay"
        if manifest.scaler is not None:
            self._mean = np.asarray(manifest.scaler.mean, dtype=np.float32)
            self._std = np.maximum(np.asarray(manifest.scaler.std, dtype=np.float32), 1e-6)
        else:
            self._mean = self._std = None

    # ---- decisions --------------------------------------------------------------------------
    def evaluate(self, batch: ScoredWindows, out: ModelOutput, now_ms: float | None = None) -> list[Alert]:
        """Alerts for one micro-batch, in window order. Quiet keys below the threshold cost no Python."""
        cfg, states = self.config, self.states
        score = out.score
        end_min = batch.window_end_ts // MINUTE_MS
        for p in np.unique(batch.partition).tolist():
            newest = int(end_min[batch.partition == p].max())
            self._clock_min[p] = max(newest, self._clock_min.get(p, newest))
        high = np.flatnonzero(score >= self._alert_thresholds(batch.entities))
        if not states and not len(high):
            return []
        hot = set(states).union(batch.entities[i] for i in high.tolist())
        candidates = np.fromiter((e in hot for e in batch.entities), dtype=bool, count=len(score))
        alerts: list[Alert] = []
        for i in np.flatnonzero(candidates).tolist():
            entity, end_ts, s = batch.entities[i], int(batch.window_end_ts[i]), float(score[i])
            st = states.get(entity)
            before = st.packed_fields() if st is not None else None
            if st is not None and self._expired(st, int(end_min[i])):
                self._expire(entity)
                st = None
            st = st or KeyState(partition=int(batch.partition[i]))
            st.partition, st.last_min = int(batch.partition[i]), int(end_min[i])
            figures = self.figures(entity)
            if st.open:
                if s < figures.close:
                    st.open, st.run, st.closed_at = False, 0, end_ts
                    alerts.append(self._alert(batch, out, i, "closed", now_ms))
            elif s >= figures.alert:
                cooling = st.closed_at >= 0 and end_ts - st.closed_at < cfg.cooldown_ms
                st.run = 0 if cooling else st.run + 1
                if st.run >= cfg.min_consecutive:
                    st.open = True
                    alerts.append(self._alert(batch, out, i, "open", now_ms))
            else:
                st.run = 0
            if st.quiet(end_ts, cfg.cooldown_ms):
                states.pop(entity, None)
                after = None
            else:
                states[entity] = st
                after = st.packed_fields()
            if after != before:
                self._changed[entity] = st.partition
        return alerts

    def figures(self, entity: str) -> Figures:
        """The thresholds ``entity`` alerts at: its own, or the pooled ones."""
        return self.by_entity.get(entity, self.pooled)

    def _alert_thresholds(self, entities: Sequence[str]) -> float | np.ndarray:
        """The alert threshold of each window (one float when no entity has its own)."""
        if not self.by_entity:
            return self.pooled.alert
        return np.fromiter((self.figures(e).alert for e in entities), dtype=np.float64, count=len(entities))

    def _expired(self, st: KeyState, now_min: int) -> bool:
        return self.ttl_ms is not None and (now_min - st.last_min) * MINUTE_MS > self.ttl_ms

    def _expire(self, entity: str) -> None:
        st = self.states.pop(entity)
        self._changed[entity] = st.partition
        if st.open:
            self.counters.expired_open += 1
        else:
            self.counters.expired_pending += 1

    def _kind(self, out: ModelOutput, i: int) -> str:
        if self.delay_task:
            return "delay"
        if self.spike_member is not None and out.member_scores.shape[1] == len(self.members):
            contrib = out.member_scores[i] * out.weights[i]
            if int(np.argmax(contrib)) == self.spike_member:
                return "spike"
        return "anomaly"

    def _severity(self, s: float, state: str, critical: float | None) -> str:
        if state == "closed":
            return "info"
        return "critical" if critical is not None and s >= critical else "warning"

    def top_features(self, window: np.ndarray, feature_error: np.ndarray | None) -> list[FeatureContribution]:
        """Forecast models: per-feature error; otherwise the largest standardised deviations of the last step."""
        names = self.manifest.feature_names
        if feature_error is not None:
            contrib = np.abs(np.asarray(feature_error, dtype=np.float64))
        else:
            mean = self._mean if self._mean is not None else window[:-1].mean(axis=0)
            std = self._std if self._std is not None else np.maximum(window[:-1].std(axis=0), 1e-6)
            contrib = np.abs((window[-1] - mean) / std).astype(np.float64)
        top = np.argsort(-contrib, kind="stable")[: self.config.top_k]
        return [FeatureContribution(name=names[j], contribution=round(float(contrib[j]), 6)) for j in top]

    def _alert(self, batch: ScoredWindows, out: ModelOutput, i: int, state: str, now_ms: float | None) -> Alert:
        entity, end_ts, s = batch.entities[i], int(batch.window_end_ts[i]), float(out.score[i])
        members = self.members if len(self.members) == out.member_scores.shape[1] else \
            [f"m{j}" for j in range(out.member_scores.shape[1])]
        ingest = float(batch.ingest_ms[i])
        fe = out.feature_error[i] if out.feature_error is not None else None
        figures = self.figures(entity)
        return Alert(
            alert_id=alert_id_for(entity, end_ts, self.manifest.version, state),
            entity=entity, kind=self._kind(out, i), score=round(s, 6),
            threshold=figures.alert if state == "open" else figures.close,
            severity=self._severity(s, state, figures.critical), window_start_ts=int(batch.window_start_ts[i]),
            window_end_ts=end_ts,
            model_version=self.manifest.version,
            model_scores={m: round(float(v), 6) for m, v in zip(members, out.member_scores[i])},
            weights={m: round(float(v), 6) for m, v in zip(members, out.weights[i])},
            top_features=self.top_features(batch.windows[i], fe),
            source=(SourceOffset(topic=batch.topic, partition=int(batch.partition[i]), offset=int(batch.offset[i]))
                    if batch.topic is not None and batch.partition[i] >= 0 else None),
            ingest_to_alert_ms=(round(now_ms - ingest, 3) if now_ms is not None and np.isfinite(ingest) else None),
            state=state,
        )

    # ---- state that travels through the state topic ------------------------------------------
    def take_changes(self) -> list[tuple[str, int, KeyState | None]]:
        """(entity, partition, state or None when it went quiet or expired) of every key whose stored fields
        changed since the last call, and forgets them: the caller writes them with the batch that made them."""
        changes = [(e, p, self.states.get(e)) for e, p in self._changed.items()]
        self._changed = {}
        return changes

    def prune_expired(self) -> int:
        """Expire the states silent for the TTL against the newest window of their partition (they would expire
        on their key's next window anyway); returns how many, each now a change (a tombstone to write)."""
        if self.ttl_ms is None:
            return 0
        gone = [e for e, s in self.states.items() if self._expired(s, self._clock_min.get(s.partition, s.last_min))]
        for entity in gone:
            self._expire(entity)
        return len(gone)

    def restore(self, partition: int, states: dict[str, KeyState]) -> None:
        """Resume the non-quiet keys of ``partition`` as the state topic last stored them."""
        for entity, st in states.items():
            st.partition = partition
            self.states[entity] = st
        if states:
            newest = max(st.last_min for st in states.values())
            self._clock_min[partition] = max(newest, self._clock_min.get(partition, newest))

    def drop_partitions(self, partitions: Sequence[int]) -> None:
        """Forget the keys of ``partitions`` (revoked, or rewound after an abort), changes not yet taken included."""
        wanted = set(partitions)
        for entity in [e for e, s in self.states.items() if s.partition in wanted]:
            del self.states[entity]
        self._changed = {e: p for e, p in self._changed.items() if p not in wanted}
        for p in wanted:
            self._clock_min.pop(p, None)
