"""Tabular sensor data -> validated arrays -> per-entity windows, time split and scaler.

No TensorFlow here: the stream side reuses the loading, validation and scaling. Every problem with the input
is a :class:`UsageError` with a one-line reason (the CLI exits with code 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fabwatch.export.errors import UsageError
from fabwatch.export.registry import Scaler, sha256_file

Task = Literal["classify", "regress", "forecast"]
ENTITY_COL = "entity"
TS_COL = "ts"
META_COLS = frozenset({ENTITY_COL, TS_COL, "label", "event"})


@dataclass
class Table:
    """Validated readings sorted by entity then time."""

    feature_names: list[str]
    x: np.ndarray               # [N, F] float32, gaps filled
    y: np.ndarray | None        # [N] float32 target (label or delay minutes; forecast: label for evaluation)
    entity: np.ndarray          # [N] int codes
    entity_names: list[str]
    fingerprint: str            # sha256 of the source file


@dataclass
class Windows:
    """Scaled windows ``[N, window, F]`` with the target of each window's last step."""

    x: np.ndarray
    y: np.ndarray | None


@dataclass
class Split:
    train: Windows
    val: Windows
    scaler: Scaler
    feature_names: list[str]


def read_table(path: Path) -> pa.Table:
    if not path.exists():
        raise UsageError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            return pq.read_table(path)
        if suffix == ".csv":
            import pyarrow.csv as pacsv

            return pacsv.read_csv(path)
    except pa.ArrowInvalid as exc:
        raise UsageError(f"cannot read {path.name}: {str(exc).splitlines()[0]}") from exc
    raise UsageError(f"unsupported data file {path.name}: use .parquet or .csv")


def _numeric(table: pa.Table, name: str) -> np.ndarray:
    """A column as float64 (nulls -> NaN); a non-numeric value is a usage error naming it and its row."""
    col = table.column(name)
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type):
        return col.cast(pa.float64()).to_numpy(zero_copy_only=False)
    text = col.cast(pa.string())
    try:
        return pc.if_else(pc.equal(text, ""), None, text).cast(pa.float64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid:  # find the first offender for the message
        for row, value in enumerate(text.to_pylist()):
            try:
                float(value or "nan")
            except ValueError:
                raise UsageError(f"column {name!r} has a non-numeric value {value!r} at row {row + 1}") from None
        raise


def infer_features(table: pa.Table, label_col: str | None) -> list[str]:
    """Every column but entity, ts, label, event and the label column (a text column is an error, named)."""
    skip = META_COLS | ({label_col} if label_col else set())
    names = [name for name in table.column_names if name not in skip]
    if not names:
        raise UsageError("no feature columns found: name them with --features")
    return names


def _fill_gaps(x: np.ndarray, entity: np.ndarray) -> np.ndarray:
    """Forward-fill NaN within each entity (the last good reading); leading gaps get the column mean."""
    n = len(x)
    entity_start = np.r_[0, np.flatnonzero(np.diff(entity)) + 1]
    seg_start = np.repeat(entity_start, np.diff(np.r_[entity_start, n]))[:, None]
    last_good = np.where(np.isnan(x), -1, np.arange(n)[:, None])
    last_good = np.maximum.accumulate(last_good, axis=0)
    last_good = np.where(last_good >= seg_start, last_good, -1)
    filled = np.where(last_good >= 0, x[np.maximum(last_good, 0), np.arange(x.shape[1])], np.nan)
    return np.where(np.isnan(filled), np.nanmean(x, axis=0), filled)


def _timestamps(table: pa.Table) -> np.ndarray:
    """Epoch ms from an integer, float or timestamp ``ts`` column; row order when there is none."""
    if TS_COL not in table.column_names:
        return np.arange(table.num_rows)
    col = table.column(TS_COL)
    if pa.types.is_timestamp(col.type):
        return col.cast(pa.timestamp("ms")).cast(pa.int64()).to_numpy(zero_copy_only=False)
    return _numeric(table, TS_COL)


def load(path: Path | str, features: Sequence[str] | None = None, label_col: str | None = "label",
         task: Task = "classify", nan_tolerance: float = 0.01, window: int = 100) -> Table:
    """Read and validate a CSV/Parquet file of readings."""
    path = Path(path)
    table = read_table(path)
    needed = list(features or []) + ([label_col] if label_col and task != "forecast" else [])
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise UsageError(f"{path.name} lacks column(s) {', '.join(missing)} (has {', '.join(table.column_names)})")
    feature_names = list(features) if features else infer_features(table, label_col)

    if ENTITY_COL in table.column_names:
        ent_arr = table.column(ENTITY_COL).cast(pa.string()).combine_chunks().dictionary_encode()
        entity_names = [str(v) for v in ent_arr.dictionary.to_pylist()]
        entity = ent_arr.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    else:
        entity_names, entity = ["all"], np.zeros(table.num_rows, np.int64)
    order = np.lexsort((_timestamps(table), entity))

    try:
        x = np.column_stack([_numeric(table, c) for c in feature_names])[order]
    except UsageError as exc:
        raise UsageError(f"{exc}{'' if features else ' (or name the feature columns with --features)'}") from None
    bad = ~np.isfinite(x)
    frac = bad.mean(axis=0)
    if (frac > nan_tolerance).any():
        worst = int(np.argmax(frac))
        raise UsageError(f"column {feature_names[worst]!r} is {frac[worst]:.1%} missing or non-finite "
                         f"(tolerance {nan_tolerance:.1%}: raise --nan-tolerance or clean the data)")
    entity = entity[order]
    if bad.any():
        x = _fill_gaps(np.where(bad, np.nan, x), entity)

    y = None
    # forecast is unsupervised: a label column, when present, only scores the validation split
    if label_col and (task != "forecast" or label_col in table.column_names):
        y = _numeric(table, label_col)[order]
        if not np.isfinite(y).all():
            raise UsageError(f"label column {label_col!r} has missing or non-finite values")
        if task != "regress" and not np.isin(y, (0.0, 1.0)).all():
            others = np.unique(y[~np.isin(y, (0.0, 1.0))])[:3]
            raise UsageError(f"label column {label_col!r} must hold 0/1 for --task {task}, found {others.tolist()}")
        if task == "regress" and (y < 0).any():
            raise UsageError(f"label column {label_col!r} must hold delay minutes >= 0 for --task regress")
        y = y.astype(np.float32)

    counts = np.bincount(entity)
    if counts.max(initial=0) < window:
        raise UsageError(f"{path.name} has at most {counts.max(initial=0)} rows per entity, fewer than one window "
                         f"of {window}")
    return Table(feature_names=feature_names, x=x.astype(np.float32), y=y, entity=entity,
                 entity_names=entity_names, fingerprint=sha256_file(path))


def fit_scaler(x: np.ndarray) -> Scaler:
    """Mean/std per feature; a constant feature gets std 1 so it stays finite when it starts to move."""
    std = x.std(axis=0, dtype=np.float64)
    return Scaler(mean=x.mean(axis=0, dtype=np.float64).tolist(), std=np.where(std > 1e-6, std, 1.0).tolist())


def apply_scaler(x: np.ndarray, scaler: Scaler) -> np.ndarray:
    return ((x - np.asarray(scaler.mean, np.float32)) / np.asarray(scaler.std, np.float32)).astype(np.float32)


def windows(x: np.ndarray, y: np.ndarray | None, window: int, stride: int = 1,
            event_stride: int | None = None) -> Windows:
    """Every ``stride``-th window of one contiguous segment (stride tricks, one copy), labelled by its last step.

    ``event_stride``: also every ``event_stride``-th window that ends on an event (y > 0), so a sparse stride
    still sees short events.
    """
    if len(x) < window:
        return Windows(np.empty((0, window, x.shape[1]), np.float32), None if y is None else np.empty(0, np.float32))
    view = np.lib.stride_tricks.sliding_window_view(x, window, axis=0)  # [n, F, window], no copy
    ends = np.arange(window - 1, len(x))
    keep = (ends - window + 1) % stride == 0
    if event_stride and y is not None:
        keep |= (y[ends] > 0) & ((ends - window + 1) % event_stride == 0)
    return Windows(np.ascontiguousarray(view[keep].transpose(0, 2, 1)), None if y is None else y[ends[keep]])


def _concat(parts: list[Windows]) -> Windows:
    ys = [p.y for p in parts if p.y is not None]
    return Windows(np.concatenate([p.x for p in parts]), np.concatenate(ys) if ys else None)


def split(table: Table, window: int = 100, val_fraction: float = 0.2, stride: int = 1,
          val_stride: int | None = None, event_stride: int | None = None) -> Split:
    """Per-entity time split: the first ``1 - val_fraction`` of each entity's rows train, the rest validate.

    Windows never straddle the boundary (no leakage); the scaler sees training rows only. ``event_stride`` keeps
    event windows in the training split more densely than ``stride`` (validation stays unbiased).
    """
    n = len(table.x)
    starts = np.r_[0, np.flatnonzero(np.diff(table.entity)) + 1]
    bounds = list(zip(starts, np.r_[starts[1:], n]))
    cuts = [(s, s + int(round((e - s) * (1 - val_fraction))), e) for s, e in bounds]
    train_rows = np.concatenate([np.arange(s, c) for s, c, _ in cuts])
    scaler = fit_scaler(table.x[train_rows])
    xs = apply_scaler(table.x, scaler)
    y = table.y
    train = [windows(xs[s:c], None if y is None else y[s:c], window, stride, event_stride) for s, c, _ in cuts]
    val = [windows(xs[c:e], None if y is None else y[c:e], window, val_stride or stride) for _, c, e in cuts]
    tr, va = _concat(train), _concat(val)
    if len(tr.x) == 0 or len(va.x) == 0:
        need = int(window / min(val_fraction, 1 - val_fraction))
        raise UsageError(f"too few rows for a train/validation split with {window}-step windows and validation "
                         f"fraction {val_fraction}: an entity needs more than {need} rows")
    return Split(train=tr, val=va, scaler=scaler, feature_names=table.feature_names)
