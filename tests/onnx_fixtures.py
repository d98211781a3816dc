"""Test fixtures on top of ``fabwatch.stream.bench.tiny_models``: a promoted registry and synthetic readings.

Reused by the replay / evaluate tests: ``make_registry(tmp_path)`` gives a promoted version of the
spike model (``kind="noop"`` for the no-op one); ``readings(...)`` interleaved sensor readings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from fabwatch.export.registry import Registry
from fabwatch.stream.bench.tiny_models import add_version, build_model, feature_names

__all__ = ["add_version", "build_model", "feature_names", "make_registry", "readings"]


def make_registry(root: Path | str, n_features: int = 4, **kwargs) -> Registry:
    """A registry with one promoted version of the spike model (or ``kind="noop"``)."""
    add_version(root, n_features, **kwargs)
    return Registry(root)


def readings(entities: Sequence[str], steps: int, n_features: int = 4, *, seed: int = 0, t0: int = 1_700_000_000_000,
             step_ms: int = 1000, mean: float = 10.0, std: float = 2.0,
             spikes: dict[str, Sequence[int]] | None = None, spike_sigma: float = 12.0) -> list[dict]:
    """Interleaved readings (time-major), Gaussian noise around ``mean``; ``spikes[entity]`` lists the
    steps where feature 0 jumps by ``spike_sigma`` standard deviations."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((steps, len(entities), n_features)).clip(-3.5, 3.5)
    values = mean + std * noise
    for e, at in (spikes or {}).items():
        j = list(entities).index(e)
        for step in at:
            values[step, j, 0] = mean + spike_sigma * std
    return [{"entity": e, "ts": t0 + s * step_ms, "values": [round(float(v), 4) for v in values[s, j]]}
            for s in range(steps) for j, e in enumerate(entities)]
