"""``fabwatch bench tep``: fault detection on the Tennessee Eastman process, by the protocol of the data set's
README, with PCA baselines computed in the same run.

Unsupervised: fabwatch trains on ``d00.dat`` alone (500 normal samples) through the public training path,
with its threshold from the manifest (training data only). Every sample whose window is complete is scored
with the exported ONNX graph through :class:`ScoringModel`, the serving path's scorer; a sample alarms when
its score reaches the manifest's alert threshold (pointwise: no hysteresis, so the figures are the
detector's, not the alert policy's). Samples before a run's first full window are left out of every count.

Supervised: trains on ``d00.dat`` (label 0) and the 21 ``dNN.dat`` runs (label 1), each run its own entity,
with ``monitor``: the classifier ensemble runs, but the statistical monitor decides, fitted on ``d00`` and its
limits raised as far as the labelled fault runs allow (the classifier alone learns the one normal run, not normal
operation). Scores the ``_te`` runs the same way.

Figures per method: false-alarm rate on ``d00_te`` and on samples 1..160 of the fault runs, detection rate
per fault (share of samples 161..960 flagged), its mean over the 18 detectable faults and over all 21, and the
detection delay (samples from 161 to the first alarm, times 3 minutes).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FEATURES = [f"xmeas_{i}" for i in range(1, 42)] + [f"xmv_{i}" for i in range(1, 12)]
FAULTS = list(range(1, 22))
UNDETECTABLE = (3, 9, 15)  # practically invisible in these variables: the convention leaves them out of the mean
FAULT_START = 160           # samples 1..160 of a test run are normal, 161..960 faulty
SAMPLE_MIN = 3.0
PCA_VARIANCE = 0.90
PCA_QUANTILE = 0.99


def load_run(data_dir: Path, name: str) -> np.ndarray:
    """One run as [samples, 52]; ``d00.dat`` is stored transposed."""
    x = np.loadtxt(data_dir / f"{name}.dat.gz")
    return x.T if x.shape[0] == len(FEATURES) and x.shape[1] != len(FEATURES) else x


def test_runs(data_dir: Path) -> dict[str, np.ndarray]:
    return {"d00_te": load_run(data_dir, "d00_te"), **{f"d{k:02d}_te": load_run(data_dir, f"d{k:02d}_te") for k in FAULTS}}


def write_runs(path: Path, runs: dict[str, tuple[np.ndarray, np.ndarray | None]]) -> Path:
    """Runs as one Parquet file, each run its own entity, one sample every 3 minutes."""
    parts = []
    for name, (x, label) in runs.items():
        cols: dict[str, Any] = {"entity": [name] * len(x),
                                "ts": (np.arange(len(x), dtype=np.int64) * int(SAMPLE_MIN * 60_000))}
        cols |= {f: x[:, j] for j, f in enumerate(FEATURES)}
        if label is not None:
            cols["label"] = label.astype(np.int8)
        parts.append(pa.table(cols))
    pq.write_table(pa.concat_tables(parts), path)
    return path


def figures(alarms: dict[str, np.ndarray], first_scored: int) -> dict[str, Any]:
    """The protocol's table from per-sample alarms of each test run (index 0 = sample 1).

    ``first_scored``: index of the first sample with a complete window; earlier ones count nowhere.
    """
    normal = alarms["d00_te"][first_scored:]
    early = np.concatenate([alarms[f"d{k:02d}_te"][first_scored:FAULT_START] for k in FAULTS])
    fdr, delay = {}, {}
    for k in FAULTS:
        faulty = alarms[f"d{k:02d}_te"][max(FAULT_START, first_scored):]
        fdr[k] = float(faulty.mean())
        hits = np.flatnonzero(faulty)
        delay[k] = float(hits[0] * SAMPLE_MIN) if len(hits) else None
    detectable = [k for k in FAULTS if k not in UNDETECTABLE]
    return {"far_d00_te": float(normal.mean()), "far_fault_runs_1_160": float(early.mean()) if len(early) else None,
            "mean_fdr_18": float(np.mean([fdr[k] for k in detectable])), "mean_fdr_21": float(np.mean(list(fdr.values()))),
            "fdr": {f"{k:02d}": round(v, 4) for k, v in fdr.items()},
            "delay_min": {f"{k:02d}": v for k, v in delay.items()}}


def pca_baseline(train: np.ndarray, runs: dict[str, np.ndarray], lags: int = 0,
                 components: float | int = PCA_VARIANCE, quantile: float = PCA_QUANTILE,
                 factor: float = 1.0) -> dict[str, np.ndarray]:
    """(Dynamic) PCA with Hotelling T² and SPE, alarm when either passes ``factor`` times its ``quantile`` on the
    training statistics (the classical recipe; the data set's README shows what such limits do on new normal
    data). ``lags``: DPCA stacks each sample with its ``lags`` predecessors. ``components``: a count, or the
    share of variance to keep. Returns per-sample alarms (the first ``lags`` samples never alarm)."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    def stack(x: np.ndarray) -> np.ndarray:
        return np.hstack([x[lags - j:len(x) - j] for j in range(lags + 1)])

    scaler = StandardScaler().fit(stack(train))
    pca = PCA(n_components=components, svd_solver="full").fit(scaler.transform(stack(train)))

    def stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z = scaler.transform(stack(x))
        t = pca.transform(z)
        t2 = np.sum(t ** 2 / pca.explained_variance_, axis=1)
        spe = np.sum((z - pca.inverse_transform(t)) ** 2, axis=1)
        return t2, spe

    t2_train, spe_train = stats(train)
    t2_lim, spe_lim = factor * np.quantile(t2_train, quantile), factor * np.quantile(spe_train, quantile)
    out = {}
    for name, x in runs.items():
        t2, spe = stats(x)
        out[name] = np.r_[np.zeros(lags, bool), (t2 > t2_lim) | (spe > spe_lim)]
    return out


def fabwatch_alarms(registry: Path, runs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int, float]:
    """Per-sample alarms of the registry's current model at its manifest threshold, through the serving scorer;
    also the index of the first scored sample and the scoring rate (windows/s)."""
    from fabwatch.export.runtime import ScoringModel
    from fabwatch.models.training import data

    model = ScoringModel.from_registry(registry, providers=["CPUExecutionProvider"])
    window, alert = model.manifest.window, model.manifest.thresholds.alert
    out, n, started = {}, 0, time.perf_counter()
    for name, x in runs.items():
        windows = data.windows(x.astype(np.float32), None, window).x  # every window, as training makes them
        score = np.concatenate([model.predict(windows[i:i + 512]).score for i in range(0, len(windows), 512)])
        out[name] = np.r_[np.zeros(window - 1, bool), score >= alert]
        n += len(windows)
    return out, window - 1, n / (time.perf_counter() - started)


def _train(path: Path, registry: Path, **config: Any) -> dict[str, Any]:
    from fabwatch.models.training.train import TrainConfig, train

    result = train(TrainConfig(data=path, registry=registry, features=FEATURES, **config))
    m = result.manifest
    return {"version": result.version, "seconds": round(result.seconds, 1), "threshold": m.thresholds.model_dump(),
            "calibration": m.metrics.get("calibration")}


def run(data_dir: Path, windows: list[int], supervised: bool = True, size: str = "small",
        progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The whole benchmark: baselines, then fabwatch unsupervised (and supervised) at each window length."""
    train_x = load_run(data_dir, "d00")
    runs = test_runs(data_dir)
    progress("PCA and DPCA baselines")
    result: dict[str, Any] = {
        "protocol": "fit on d00.dat only; thresholds from training data; FDR on samples 161..960",
        "baselines": {"pca_t2_spe_q99": figures(pca_baseline(train_x, runs), 0),
                      # the README's DPCA recipe: 80 components, limits 1.5 x the 99.9 % training quantiles
                      "dpca_lag3_80pc_1.5xq999": figures(
                          pca_baseline(train_x, runs, lags=3, components=80, quantile=0.999, factor=1.5), 3)},
        "unsupervised": {}, "supervised": {}}
    with tempfile.TemporaryDirectory(prefix="fabwatch-tep-") as tmp:
        work = Path(tmp)
        normal = write_runs(work / "d00.parquet", {"d00": (train_x, None)})
        labelled = None
        if supervised:
            fault_runs = {f"d{k:02d}": (load_run(data_dir, f"d{k:02d}"), None) for k in FAULTS}
            labelled = write_runs(work / "labelled.parquet", {
                "d00": (train_x, np.zeros(len(train_x))),
                **{n: (x, np.ones(len(x))) for n, (x, _) in fault_runs.items()}})
        for window in windows:
            progress(f"unsupervised, window {window}")
            registry = work / f"unsup-{window}"
            info = _train(normal, registry, task="forecast", label_col=None, window=window, size=size)
            alarms, first, rate = fabwatch_alarms(registry, runs)
            result["unsupervised"][str(window)] = {**figures(alarms, first), "train": info,
                                                   "scoring_windows_per_s": round(rate)}
            if labelled is not None:
                progress(f"supervised, window {window}")
                registry = work / f"sup-{window}"
                info = _train(labelled, registry, task="classify", window=window, size=size, target_far=0.01,
                              monitor=True)
                alarms, first, rate = fabwatch_alarms(registry, runs)
                result["supervised"][str(window)] = {**figures(alarms, first), "train": info,
                                                     "scoring_windows_per_s": round(rate)}
    return result
