"""Alert policy: turns window scores into open / closed alerts, deterministically.

Hysteresis: an alert opens when the score reaches ``thresholds.alert`` for ``min_consecutive``
windows in a row and closes when it drops below ``thresholds.close``. After a close, a key stays
quiet for ``cooldown_ms`` of event time. Every decision depends only on the scored windows and their
timestamps (event time, never the wall clock), so a replay, a restart or the offline evaluator reach
the same decisions and the same ``alert_id``s.

Only keys away from the quiet state carry a ``KeyState``; it is small enough to travel with the
committed offsets (``export_state`` / ``import_state``) so a restart resumes an open alert instead
of opening a new one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fabwatch.export.registry import Manifest
from fabwatch.export.runtime import ModelOutput
from fabwatch.stream.schemas import Alert, FeatureContribution, SourceOffset, alert_id_for


@dataclass
class PolicyConfig:
    min_consecutive: int = 1
    cooldown_ms: int = 0
    top_k: int = 3


@dataclass
class KeyState:
    """A key that is not quiet: an open alert, a run of high windows, or a cooldown."""

    partition: int
    open: bool = False
    run: int = 0            # consecutive windows at or above the alert threshold
    closed_at: int = -1     # window_end_ts of the last close, for the cooldown

    def quiet(self, now_ts: int, cooldown_ms: int) -> bool:
        return not self.open and self.run == 0 and (self.closed_at < 0 or now_ts - self.closed_at >= cooldown_ms)


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

    def __init__(self, manifest: Manifest, config: PolicyConfig | None = None):
        self.config = config or PolicyConfig()
        self.states: dict[str, KeyState] = {}
        self.set_manifest(manifest)

    def set_manifest(self, manifest: Manifest) -> None:
        if manifest.thresholds is None:
            raise ValueError(f"model {manifest.version} has no thresholds in its manifest: cannot alert")
        self.manifest = manifest
        self.alert_thr = float(manifest.thresholds.alert)
        self.close_thr = float(manifest.thresholds.close)
        self.critical_thr = manifest.thresholds.critical
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
        high = np.flatnonzero(score >= self.alert_thr)
        if not states and not len(high):
            return []
        hot = set(states).union(batch.entities[i] for i in high.tolist())
        candidates = np.fromiter((e in hot for e in batch.entities), dtype=bool, count=len(score))
        alerts: list[Alert] = []
        for i in np.flatnonzero(candidates).tolist():
            entity, end_ts, s = batch.entities[i], int(batch.window_end_ts[i]), float(score[i])
            st = states.get(entity) or KeyState(partition=int(batch.partition[i]))
            st.partition = int(batch.partition[i])
            if st.open:
                if s < self.close_thr:
                    st.open, st.run, st.closed_at = False, 0, end_ts
                    alerts.append(self._alert(batch, out, i, "closed", now_ms))
            elif s >= self.alert_thr:
                cooling = st.closed_at >= 0 and end_ts - st.closed_at < cfg.cooldown_ms
                st.run = 0 if cooling else st.run + 1
                if st.run >= cfg.min_consecutive:
                    st.open = True
                    alerts.append(self._alert(batch, out, i, "open", now_ms))
            else:
                st.run = 0
            if st.quiet(end_ts, cfg.cooldown_ms):
                states.pop(entity, None)
            else:
                states[entity] = st
        return alerts

    def _kind(self, out: ModelOutput, i: int) -> str:
        if self.delay_task:
            return "delay"
        if self.spike_member is not None and out.member_scores.shape[1] == len(self.members):
            contrib = out.member_scores[i] * out.weights[i]
            if int(np.argmax(contrib)) == self.spike_member:
                return "spike"
        return "anomaly"

    def _severity(self, s: float, state: str) -> str:
        if state == "closed":
            return "info"
        return "critical" if self.critical_thr is not None and s >= self.critical_thr else "warning"

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
        return Alert(
            alert_id=alert_id_for(entity, end_ts, self.manifest.version, state),
            entity=entity, kind=self._kind(out, i), score=round(s, 6),
            threshold=self.alert_thr if state == "open" else self.close_thr,
            severity=self._severity(s, state), window_start_ts=int(batch.window_start_ts[i]), window_end_ts=end_ts,
            model_version=self.manifest.version,
            model_scores={m: round(float(v), 6) for m, v in zip(members, out.member_scores[i])},
            weights={m: round(float(v), 6) for m, v in zip(members, out.weights[i])},
            top_features=self.top_features(batch.windows[i], fe),
            source=(SourceOffset(topic=batch.topic, partition=int(batch.partition[i]), offset=int(batch.offset[i]))
                    if batch.topic is not None and batch.partition[i] >= 0 else None),
            ingest_to_alert_ms=(round(now_ms - ingest, 3) if now_ms is not None and np.isfinite(ingest) else None),
            state=state,
        )

    # ---- state that travels with committed offsets ------------------------------------------
    def export_state(self, partition: int) -> str:
        """Compact JSON of the non-quiet keys last seen on ``partition``."""
        rows = {e: [int(s.open), s.run, s.closed_at] for e, s in self.states.items() if s.partition == partition}
        return json.dumps(rows, separators=(",", ":")) if rows else ""

    def import_state(self, partition: int, text: str | None) -> None:
        if not text:
            return
        for entity, (is_open, run, closed_at) in json.loads(text).items():
            self.states[entity] = KeyState(partition=partition, open=bool(is_open), run=int(run),
                                           closed_at=int(closed_at))

    def drop_partitions(self, partitions: Sequence[int]) -> None:
        wanted = set(partitions)
        for entity in [e for e, s in self.states.items() if s.partition in wanted]:
            del self.states[entity]
