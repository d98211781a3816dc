"""Statistical monitor: the unsupervised ensemble's detector, fitted with numpy, computed inside the ONNX graph.

Made for short normal histories (hundreds of rows) of 8 to 52 correlated features, where a neural forecaster
has too little to learn from and in-sample limits lie (limits from 500 Tennessee Eastman samples give 29 %
false alarms on the next normal day). Per step of the window, on features standardised again by the monitor
(``z``):

- ``g_j = |z_j(t) - z_j(t-1)| / delta_j``: step size against its training mean (variability, sticking valves);
- ``SPE = ||z - P Pᵀ z||²``: the residual off the principal subspace that keeps 90 % of training variance
  (broken correlations). Hotelling's T² is left out: its windowed means drift far past any limit that a
  day of data can set.

Over the last ``k`` steps of the window, one statistic per scale:

- ``M_k = max_j |mean_k z_j| / sM_kj``, k in {5, 20, W}: a mean shift of any feature;
- ``D_k = max_j (log(mean_k g_j + 0.05) - mD_kj) / sD_kj``, k in {20, W-1}: more variability than normal;
- ``S_k = max_j (mD_kj - log(mean_k g_j + 0.05)) / sD_kj``, same k: less (a stuck valve or sensor);
- ``Q_k = mean_k SPE``, k in {1, 5, 20}.

Each statistic ``s`` becomes ``r_s = (s - med_s) / ((hi_s - med_s) * m_s)`` and the score is ``max_s r_s``:
1 is the alarm limit. ``med_s`` and ``hi_s`` (the 99.9 % quantile) come from out-of-fold training windows
(5 contiguous blocks: each block scored by a basis fitted on the other four), and the margin ``m_s >= 1``
from a nested split-half: the whole fit on one half of each entity's rows, scored on the other half, both
ways. Out-of-fold scoring alone corrects in-sample optimism but not drift that a short history never saw;
the margin measures that drift on the training data itself, and switches off (via large ``m_s``) what the
history cannot calibrate.

Range: >= 0 typically below 1 on normal data; unbounded above. Fails on: faults that leave every feature's
level, step size and correlation structure unchanged (TEP faults 3, 9, 15); histories shorter than about two
windows per half (margins then rest on few windows).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from fabwatch.models.common import serializable
from fabwatch.models.tf import keras, tf

NAME = "monitor"
EPS_LOG = 0.05          # keeps log(mean step) finite on sample-and-hold features whose steps are often all zero
FOLDS = 5
VARIANCE = 0.90         # share of training variance the principal subspace keeps
LIMIT_QUANTILE = 0.999  # of out-of-fold (limits) and held-out (margins) statistics


def scales(window: int) -> dict[str, list[int]]:
    """The averaging lengths of each statistic family at this window length."""
    return {"mean": sorted({k for k in (5, 20) if k < window} | {window}),
            "diff": sorted({k for k in (20,) if k < window - 1} | {max(window - 1, 1)}),
            "spe": [k for k in (1, 5, 20) if k <= window]}


@dataclass
class Basis:
    """What one fit learns from normal rows: standardisation, mean step size and the principal subspace."""

    mu: np.ndarray      # [F]
    sd: np.ndarray      # [F]
    delta: np.ndarray   # [F]
    p: np.ndarray       # [F, a]


@dataclass
class MonitorParams:
    """Everything the graph needs (also the layer's config, so the Keras file holds no code)."""

    window: int
    mu: list[float]
    sd: list[float]
    delta: list[float]
    p: list[list[float]]
    mean_scale: list[list[float]] = field(default_factory=list)   # sM per mean statistic, [F] each
    diff_center: list[list[float]] = field(default_factory=list)  # mD per diff statistic
    diff_scale: list[list[float]] = field(default_factory=list)   # sD per diff statistic
    med: list[float] = field(default_factory=list)                # per statistic, in ``names`` order
    hi: list[float] = field(default_factory=list)
    margin: list[float] = field(default_factory=list)
    names: list[str] = field(default_factory=list)


def fit_basis(segments: Sequence[np.ndarray], variance: float = VARIANCE) -> Basis:
    rows = np.concatenate(segments)
    mu, sd = rows.mean(axis=0), rows.std(axis=0)
    sd = np.where(sd > 1e-6, sd, 1.0)
    steps = [np.abs(np.diff((s - mu) / sd, axis=0)) for s in segments if len(s) > 1]
    delta = np.concatenate(steps).mean(axis=0) if steps else np.ones_like(mu)
    delta = np.where(delta > 1e-6, delta, 1.0)
    _, sv, vt = np.linalg.svd((rows - mu) / sd, full_matrices=False)
    share = np.cumsum(sv ** 2) / max(float(np.sum(sv ** 2)), 1e-12)
    a = int(np.searchsorted(share, variance) + 1)
    return Basis(mu, sd, delta, vt[:a].T)


def per_step(basis: Basis, segment: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """z [n,F], step ratios g [n,F] (row 0 zero: no predecessor) and SPE [n] of one segment."""
    z = (segment - basis.mu) / basis.sd
    g = np.zeros_like(z)
    g[1:] = np.abs(np.diff(z, axis=0)) / basis.delta
    resid = z - (z @ basis.p) @ basis.p.T
    return z, g, np.sum(resid ** 2, axis=1)


def _trailing_mean(a: np.ndarray, k: int) -> np.ndarray:
    """Mean of the last ``k`` rows ending at each row (rows before the first full span: NaN)."""
    c = np.cumsum(np.concatenate([np.zeros((1, *a.shape[1:])), a]), axis=0)
    out = np.full(a.shape, np.nan)
    out[k - 1:] = (c[k:] - c[:-k]) / k
    return out


def raw_statistics(z: np.ndarray, g: np.ndarray, spe: np.ndarray, window: int) -> dict[str, np.ndarray]:
    """Unnormalised statistics of every window ending in this sequence: [n-W+1, F] (mean, diff) or [n-W+1]."""
    first = window - 1
    out: dict[str, np.ndarray] = {}
    sc = scales(window)
    for k in sc["mean"]:
        out[f"M{k}"] = _trailing_mean(z, k)[first:]
    for k in sc["diff"]:
        out[f"D{k}"] = np.log(_trailing_mean(g, k)[first:] + EPS_LOG)
    for k in sc["spe"]:
        out[f"Q{k}"] = _trailing_mean(spe[:, None], k)[first:, 0]
    return out


def _concat_stats(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _reduce(raw: dict[str, np.ndarray], params: MonitorParams) -> np.ndarray:
    """Raw statistics -> one value per statistic and window [N, S], before med/hi/margin. ``S_k`` is ``D_k``'s
    normalised shift in the other direction, computed once for both."""
    diffs = [n for n in params.names if n[0] == "D"]
    shift = {n[1:]: (raw[n] - np.asarray(params.diff_center[i])) / np.asarray(params.diff_scale[i])
             for i, n in enumerate(diffs)}
    cols, mi = [], 0
    for name in params.names:
        if name[0] == "M":
            v = np.max(np.abs(raw[name]) / np.asarray(params.mean_scale[mi]), axis=1)
            mi += 1
        elif name[0] in "DS":
            v = np.max(shift[name[1:]] if name[0] == "D" else -shift[name[1:]], axis=1)
        else:
            v = raw[name]
        cols.append(v)
    return np.stack(cols, axis=1)


def ratios(params: MonitorParams, raw: dict[str, np.ndarray]) -> np.ndarray:
    """r_s for every window: [N, S]; the score is their max."""
    med, hi, margin = (np.asarray(v) for v in (params.med, params.hi, params.margin))
    return (_reduce(raw, params) - med) / (np.maximum(hi - med, 1e-9) * margin)


def _oof_statistics(segments: list[np.ndarray], window: int, folds: int) -> dict[str, np.ndarray]:
    """Statistics of every window, each row's per-step quantities from a basis fitted without its block."""
    bounds = np.cumsum([0] + [len(s) for s in segments])
    rows = np.concatenate(segments)
    blocks = np.array_split(np.arange(len(rows)), folds)
    steps = [np.zeros_like(rows), np.zeros_like(rows), np.zeros(len(rows))]
    for block in blocks:
        keep = np.ones(len(rows), bool)
        keep[block] = False
        rest = [rows[s:e][keep[s:e]] for s, e in zip(bounds[:-1], bounds[1:])]
        basis = fit_basis([r for r in rest if len(r)])
        for s, e in zip(bounds[:-1], bounds[1:]):
            inside = block[(block >= s) & (block < e)]
            if len(inside):
                z, g, spe = per_step(basis, rows[s:e])
                for out, val in zip(steps, (z, g, spe)):
                    out[inside] = val[inside - s]
    parts = [raw_statistics(*(a[s:e] for a in steps), window)
             for s, e in zip(bounds[:-1], bounds[1:]) if e - s >= window]
    return _concat_stats(parts)


def _fit_limits(segments: list[np.ndarray], window: int, folds: int) -> MonitorParams:
    """Basis on all rows; normalisation and med/hi from out-of-fold windows; margins 1."""
    basis = fit_basis(segments)
    params = MonitorParams(window=window, mu=basis.mu.tolist(), sd=basis.sd.tolist(), delta=basis.delta.tolist(),
                           p=basis.p.tolist())
    raw = _oof_statistics(segments, window, folds)
    params.names = list(raw) + [f"S{k}" for k in scales(window)["diff"]]
    for name, v in raw.items():
        if name[0] == "M":
            params.mean_scale.append(np.maximum(np.sqrt(np.mean(v ** 2, axis=0)), 1e-9).tolist())
        elif name[0] == "D":
            params.diff_center.append(v.mean(axis=0).tolist())
            params.diff_scale.append(np.maximum(v.std(axis=0), 1e-9).tolist())
    reduced = _reduce(raw, params)
    params.med = np.median(reduced, axis=0).tolist()
    params.hi = np.quantile(reduced, LIMIT_QUANTILE, axis=0).tolist()
    params.margin = [1.0] * len(params.names)
    return params


def statistics_of(params: MonitorParams, segments: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Raw statistics of every complete window of ``segments`` under the fitted basis."""
    basis = Basis(*(np.asarray(v) for v in (params.mu, params.sd, params.delta, params.p)))
    return _concat_stats([raw_statistics(*per_step(basis, s), params.window)
                          for s in segments if len(s) >= params.window])


def fit(segments: list[np.ndarray], window: int, folds: int = FOLDS) -> MonitorParams:
    """The monitor from normal rows (one array [n, F] per entity, in time order, already scaled).

    Needs at least one entity with ``2 * window`` rows: each half of it must hold a window.
    """
    if not any(len(s) >= 2 * window for s in segments):
        raise ValueError(f"the monitor needs an entity with at least {2 * window} rows")
    params = _fit_limits(segments, window, folds)
    margins = np.ones(len(params.names))
    halves = [[s[:len(s) // 2] for s in segments], [s[len(s) // 2:] for s in segments]]
    for fit_on, score_on in (halves, halves[::-1]):
        fit_on = [s for s in fit_on if len(s) >= window]
        score_on = [s for s in score_on if len(s) >= window]
        if not fit_on or not score_on:
            continue
        half = _fit_limits(fit_on, window, folds)
        held_out = ratios(half, statistics_of(half, score_on))
        margins = np.maximum(margins, np.quantile(held_out, LIMIT_QUANTILE, axis=0))
    params.margin = margins.tolist()
    return params


def normal_stretches(x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """The contiguous label-0 stretches of one entity's rows (the monitor's normal history in a labelled file)."""
    edges = np.flatnonzero(np.diff(np.r_[0, (y <= 0).astype(np.int8), 0]))
    return [x[s:e] for s, e in zip(edges[::2], edges[1::2])]


def fault_factor(params: MonitorParams, entities: list[tuple[np.ndarray, np.ndarray]], budget: float) -> float:
    """How far labelled faults let the limits rise: the factor ``c >= 1`` on every margin that gives up at most
    ``budget`` of the fault windows (label of the last step > 0) that the unsupervised limits detect.

    Why: the split-half margin sees only the drift inside the normal history; the next normal run drifts further
    (on the Tennessee Eastman data, limits that hold on the training run alarm on 5 % of the next one). Labelled
    faults say what headroom costs: limits rise while the lost detections stay within the false-alarm budget.
    Without detected fault windows there is no evidence, and the factor stays 1. ``entities``: (rows, labels)
    per entity, in time order."""
    scores = []
    for x, y in entities:
        if len(x) >= params.window:
            r = ratios(params, statistics_of(params, [x])).max(axis=1)
            scores.append(r[y[params.window - 1:] > 0])
    fault = np.concatenate(scores) if scores else np.empty(0)
    detected = np.sort(fault[fault >= 1.0])
    allowed = int(budget * len(fault))
    return float(detected[allowed]) if allowed < len(detected) else 1.0


def fit_supervised(entities: list[tuple[np.ndarray, np.ndarray]], window: int, budget: float,
                   folds: int = FOLDS) -> tuple[MonitorParams, float]:
    """The monitor from the label-0 stretches of labelled entities, its margins times :func:`fault_factor`."""
    params = fit([s for x, y in entities for s in normal_stretches(x, y)], window, folds)
    factor = fault_factor(params, entities, budget)
    params.margin = (np.asarray(params.margin) * factor).tolist()
    return params, factor


def score_windows(params: MonitorParams, windows: np.ndarray) -> np.ndarray:
    """numpy reference of the graph: the score of each scaled window [B, W, F] -> [B]."""
    return np.array([ratios(params, statistics_of(params, [w]))[0].max() for w in windows])


@serializable
class StatMonitor(keras.layers.Layer):
    """The monitor in the graph: scaled windows [B, W, F] -> score [B] (1 = limit). No trainable weights."""

    def __init__(self, params: dict, **kwargs):
        super().__init__(trainable=False, **kwargs)
        self.params = params

    def call(self, x: tf.Tensor) -> tf.Tensor:
        p = MonitorParams(**self.params)
        const = lambda v: tf.constant(np.asarray(v, np.float32))  # noqa: E731
        z = (x - const(p.mu)) / const(p.sd)
        g = tf.abs(z[:, 1:, :] - z[:, :-1, :]) / const(p.delta)
        basis = const(p.p)
        resid = z - tf.matmul(tf.matmul(z, basis), tf.transpose(basis))
        spe = tf.reduce_sum(tf.square(resid), axis=-1)
        diffs = [n for n in p.names if n[0] == "D"]
        shift = {n[1:]: (tf.math.log(tf.reduce_mean(g[:, -int(n[1:]):, :], axis=1) + EPS_LOG)
                         - const(p.diff_center[i])) / const(p.diff_scale[i]) for i, n in enumerate(diffs)}
        values, mi = [], 0
        for name in p.names:
            k = int(name[1:])
            if name[0] == "M":
                v = tf.reduce_max(tf.abs(tf.reduce_mean(z[:, -k:, :], axis=1)) / const(p.mean_scale[mi]), axis=-1)
                mi += 1
            elif name[0] in "DS":  # S_k: the same shift as D_k, downwards
                v = tf.reduce_max(shift[name[1:]] if name[0] == "D" else -shift[name[1:]], axis=-1)
            else:
                v = tf.reduce_mean(spe[:, -k:], axis=1)
            values.append(v)
        med, hi, margin = (np.asarray(v, np.float32) for v in (p.med, p.hi, p.margin))
        r = (tf.stack(values, axis=-1) - med) / const(np.maximum(hi - med, 1e-9) * margin)
        return tf.reduce_max(r, axis=-1)

    def get_config(self) -> dict:
        return {**super().get_config(), "params": self.params}


def layer(params: MonitorParams) -> StatMonitor:
    return StatMonitor(asdict(params), name=NAME)
