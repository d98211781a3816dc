"""The Kafka-free scoring engine: readings in arrival order -> windows -> micro-batched model -> alerts.

The stream processor feeds it polled batches; offline evaluation (``fabwatch evaluate``) feeds it a
file. Both go through exactly this code, so both emit the same alerts with the same ``alert_id``s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from fabwatch.export.runtime import ScoringModel
from fabwatch.stream.policy import AlertPolicy, PolicyConfig, ScoredWindows
from fabwatch.stream.schemas import Alert
from fabwatch.stream.windows import DEFAULT_GRACE_MS, WindowStore


@dataclass
class ScoreColumns:
    """Every scored window of a batch (for ``--emit-scores`` and offline predictions)."""

    index: np.ndarray        # int64 [m]: the reading that closed the window, index into the batch
    score: np.ndarray        # float32 [m]
    window_end_ts: np.ndarray
    model_version: str
    entity: list[str]        # [m]


@dataclass
class EngineResult:
    alerts: list[Alert]
    status: np.ndarray                        # int8 per reading: windows.OK / DUPLICATE / LATE / CONFLICT / REORDERED
    scores: ScoreColumns
    inference_s: list[float] = field(default_factory=list)   # one per model call
    batch_sizes: list[int] = field(default_factory=list)


DEFAULT_KEY_TTL_S = 6 * 3600.0


class ScoringEngine:
    """Windows + model + policy. ``swap_model`` between batches for hot reload (key state is kept).

    ``ttl_s`` is the key TTL: the processor evicts windows idle that long (wall clock, ``evict_idle``) and the
    policy drops the state of keys silent that long (event time); the same default offline and online keeps
    their alerts alike. ``grace_ms`` is how far out of order a reading may arrive and still be put in order
    in its window (``WindowStore``); it too must be the same offline and online.
    """

    def __init__(self, model: ScoringModel, policy: PolicyConfig | None = None, stride: int = 1,
                 max_keys: int = 100_000, ttl_s: float | None = DEFAULT_KEY_TTL_S, max_batch: int = 256,
                 grace_ms: int = DEFAULT_GRACE_MS):
        self.model = model
        self.max_batch = max_batch
        self.windows = WindowStore(model.manifest.window, len(model.feature_names), stride, max_keys, ttl_s,
                                   grace_ms=grace_ms)
        self.policy = AlertPolicy(model.manifest, policy, ttl_s)

    @property
    def version(self) -> str:
        return self.model.version

    def check_compatible(self, model: ScoringModel) -> None:
        """A hot swap keeps the windows, so the new model must read the same features and window."""
        old, new = self.model.manifest, model.manifest
        if new.feature_names != old.feature_names or new.window != old.window:
            raise ValueError(f"model {new.version} reads features {new.feature_names} x {new.window} steps, "
                             f"the serving {old.version} reads {old.feature_names} x {old.window}: restart to switch")
        if new.thresholds is None:
            raise ValueError(f"model {new.version} has no thresholds in its manifest")

    def swap_model(self, model: ScoringModel) -> None:
        self.check_compatible(model)
        self.model = model
        self.policy.set_manifest(model.manifest)

    def warm(self, keys: Sequence[str], ts: np.ndarray, values: np.ndarray,
             partitions: np.ndarray | None = None) -> np.ndarray:
        """Fill windows without scoring (state rebuild); returns the per-reading status."""
        return self.windows.append(keys, ts, values, score=False, partitions=partitions).status

    def process(self, keys: Sequence[str], ts: np.ndarray, values: np.ndarray, *,
                partitions: np.ndarray | None = None, offsets: np.ndarray | None = None,
                ingest_ms: np.ndarray | None = None, topic: str | None = None,
                clock_ms: Callable[[], float] | None = None) -> EngineResult:
        """Append a batch, score every ready window in chunks of ``max_batch``, apply the policy.

        ``clock_ms`` (epoch ms) stamps ``ingest_to_alert_ms``; offline runs leave it out.
        """
        res = self.windows.append(keys, ts, values, partitions=partitions)
        idx = res.ready
        part = partitions[idx] if partitions is not None else np.full(len(idx), -1, np.int32)
        offs = offsets[idx] if offsets is not None else np.full(len(idx), -1, np.int64)
        ingest = ingest_ms[idx] if ingest_ms is not None else np.full(len(idx), np.nan)
        ts = np.asarray(ts, dtype=np.int64)
        end_ts = ts[idx]
        entities = [keys[i] for i in idx.tolist()]
        alerts: list[Alert] = []
        scores = np.zeros(len(idx), dtype=np.float32)
        timings: list[float] = []
        sizes: list[int] = []
        for lo in range(0, len(idx), self.max_batch):
            hi = min(lo + self.max_batch, len(idx))
            t0 = time.perf_counter()
            out = self.model.predict(res.windows[lo:hi])
            timings.append(time.perf_counter() - t0)
            sizes.append(hi - lo)
            scores[lo:hi] = out.score
            chunk = ScoredWindows(entities[lo:hi], res.window_start_ts[lo:hi], end_ts[lo:hi], res.windows[lo:hi],
                                  part[lo:hi], offs[lo:hi], ingest[lo:hi], topic)
            alerts.extend(self.policy.evaluate(chunk, out, clock_ms() if clock_ms else None))
        return EngineResult(alerts, res.status, ScoreColumns(idx, scores, end_ts, self.version, entities), timings, sizes)

    def drop_partitions(self, partitions: Sequence[int]) -> None:
        """Forget the keys of revoked partitions (windows and alert state)."""
        self.windows.drop(self.windows.keys_in(partitions))
        self.policy.drop_partitions(partitions)


def run_offline(engine: ScoringEngine, keys: Sequence[str], ts: np.ndarray, values: np.ndarray,
                chunk: int = 10_000) -> tuple[list[Alert], list[ScoreColumns], np.ndarray]:
    """Score a whole recording in arrival order (offline evaluation): alerts, per-chunk scores, statuses."""
    alerts: list[Alert] = []
    scores: list[ScoreColumns] = []
    status: list[np.ndarray] = []
    for lo in range(0, len(keys), chunk):
        res = engine.process(keys[lo:lo + chunk], ts[lo:lo + chunk], values[lo:lo + chunk])
        res.scores.index = res.scores.index + lo
        alerts.extend(res.alerts)
        scores.append(res.scores)
        status.append(res.status)
    return alerts, scores, np.concatenate(status) if status else np.zeros(0, np.int8)
