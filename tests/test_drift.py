"""Feature drift (PSI against a training reference kept in the manifest), without a broker: the figure rises
on shifted readings and stays low on readings from the training distribution; the store's drift window."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fabwatch.export.registry import Manifest
from fabwatch.models.sidecar.store import ReadingStore
from fabwatch.models.training import drift

NAMES = ["level", "spread", "steady"]


def _training(rng: np.random.Generator, rows: int = 20_000) -> np.ndarray:
    """Three features: Gaussian, exponential (skewed), and one that sits on a few values (ties at the edges)."""
    return np.column_stack([rng.normal(10.0, 2.0, rows), rng.exponential(3.0, rows),
                            rng.choice([0.0, 1.0, 5.0], rows, p=[0.6, 0.3, 0.1])]).astype(np.float32)


def test_psi_stays_low_on_the_training_distribution_and_rises_on_a_shifted_feature():
    rng = np.random.default_rng(0)
    ref = drift.reference(_training(rng), NAMES)
    same = drift.feature_psi(ref, _training(rng, 5_000), NAMES)
    assert set(same) == set(NAMES) and max(same.values()) < 0.02  # noise: about (bins - 1) / rows

    shifted = _training(rng, 5_000)
    shifted[:, 0] += 2.0                         # the level moves by one standard deviation
    psi = drift.feature_psi(ref, shifted, NAMES)
    assert psi["level"] > 0.25                   # "major shift"
    assert psi["spread"] < 0.02 and psi["steady"] < 0.02  # the others did not move

    spread = _training(rng, 5_000)
    spread[:, 1] *= 1.5
    spread[:, 2] = 5.0                           # stuck on one value
    psi = drift.feature_psi(ref, spread, NAMES)
    assert psi["spread"] > 0.1 and psi["steady"] > 0.25 and psi["level"] < 0.02


def test_reference_keeps_deciles_and_skips_what_is_not_finite():
    rng = np.random.default_rng(1)
    x = _training(rng, 10_000)
    x[::10, 0] = np.nan
    x[:, 1] = np.nan
    ref = drift.reference(x, NAMES)
    assert set(ref) == {"level", "steady"}                  # no finite value: no entry, no figure
    assert len(ref["level"].edges) == drift.BINS - 1 and np.allclose(ref["level"].shares, 0.1, atol=0.002)
    assert len(ref["steady"].shares) == len(ref["steady"].edges) + 1 and sum(ref["steady"].shares) == pytest.approx(1)
    assert drift.psi(ref["level"], np.full(5, np.nan)) is None
    assert drift.psi(ref["level"], x[:, 0]) == pytest.approx(0.0, abs=1e-6)  # NaNs left out on both sides


def test_manifest_carries_the_reference_and_older_manifests_load_without_one():
    ref = drift.reference(_training(np.random.default_rng(2), 2_000), NAMES)
    manifest = Manifest(version="v0001", created="", task="forecast", feature_names=NAMES, drift_reference=ref)
    assert Manifest.model_validate_json(manifest.model_dump_json()).drift_reference == ref
    older = json.loads(manifest.model_dump_json())
    del older["drift_reference"]
    assert Manifest.model_validate(older).drift_reference == {}


def test_store_recent_is_the_window_that_ends_at_the_newest_reading(tmp_path):
    store = ReadingStore(tmp_path / "store", ["a"])
    assert store.recent(3_600_000).num_rows == 0
    hour = 3_600_000
    t0 = 1_790_000_000_000 - (1_790_000_000_000 % (24 * hour))  # midnight UTC
    ts = t0 + np.arange(0, 60 * hour, hour // 2, dtype=np.int64)  # every half hour over three days
    store.write(["x"] * len(ts), ts, np.arange(len(ts), dtype=np.float32)[:, None], np.full(len(ts), -1, np.int8))
    recent = store.recent(24 * hour)
    assert recent.column("ts").to_pylist() == [t for t in ts.tolist() if t > ts[-1] - 24 * hour]
    assert recent.num_rows == 48
