"""Feature drift: how far recent readings have moved from a model's training data, one figure per feature.

Population stability index over decile bins. At training time ``reference`` keeps, per feature, the
training rows' decile edges and the share of rows in each bin (about twenty numbers a feature, in the
manifest's ``drift_reference``), so a drift check needs none of the old rows. ``psi`` bins recent readings
on the same edges and compares shares::

    PSI = sum over bins of (recent share - training share) * ln(recent share / training share)

Range 0 (same shares) upwards, unbounded. The usual reading: under 0.1 no shift, 0.1-0.25 moderate, above
0.25 major. It sees a change of a feature's own distribution (level, spread, stuck values), not of the
relations between features, nor a change inside one bin. Noise alone scores about (bins - 1) / rows for a
sample from the training distribution, hence ``MIN_ROWS``. A feature constant in training has one edge and
two bins: any move off that value counts in full.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fabwatch.export.registry import FeatureBins

BINS = 10  # deciles of the training rows
MIN_SHARE = 1e-4  # an empty bin's share: ln(0) otherwise; a bin empty on one side adds about 1e-3 * ln(1e3) per 0.1 % of rows
MIN_ROWS = 1000  # fewer recent rows than this are no check: noise alone scores ~(BINS - 1) / rows, 0.009 here


def _shares(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Share of ``values`` in each bin; a value equal to an edge falls in the bin above it."""
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return counts / max(len(values), 1)


def reference(x: np.ndarray, feature_names: Sequence[str]) -> dict[str, FeatureBins]:
    """Decile edges and shares of each feature of the training rows ``x`` (float [N, F], raw units as the
    readings arrive, not scaled). Non-finite values are left out; a feature with none finite has no entry."""
    out = {}
    for j, name in enumerate(feature_names):
        col = x[:, j].astype(np.float64)
        col = col[np.isfinite(col)]
        if not len(col):
            continue
        edges = np.unique(np.quantile(col, np.linspace(0, 1, BINS + 1)[1:-1]))
        out[name] = FeatureBins(edges=edges.tolist(), shares=_shares(edges, col).tolist())
    return out


def psi(bins: FeatureBins, values: np.ndarray) -> float | None:
    """PSI of recent ``values`` of one feature against its training ``bins``; None when none is finite."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    expected = np.maximum(np.asarray(bins.shares), MIN_SHARE)
    actual = np.maximum(_shares(np.asarray(bins.edges), values), MIN_SHARE)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def feature_psi(ref: dict[str, FeatureBins], x: np.ndarray, feature_names: Sequence[str]) -> dict[str, float]:
    """PSI of every feature of ``x`` (float [N, F]) that the reference covers and that has finite values."""
    found = {name: psi(ref[name], x[:, j]) for j, name in enumerate(feature_names) if name in ref}
    return {name: value for name, value in found.items() if value is not None}
