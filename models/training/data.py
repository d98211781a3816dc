"""Tabular sensor data -> validated arrays -> per-entity windows, time split and scaler.

Files are read and their columns mapped by ``fabwatch.stream.offline.files``, as for `evaluate` and `replay`
(same timestamp units, same single-entity name). No TensorFlow here: the stream side reuses the loading,
validation and scaling. Every problem with the input is a :class:`UsageError` with a one-line reason (the CLI
exits with code 2).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fabwatch.export.errors import UsageError
from fabwatch.export.registry import Scaler, sha256_file
from fabwatch.stream.offline.files import ColumnMap, read_table, timestamps_ms

Task = Literal["classify", "regress", "forecast"]


@dataclass
class Table:
    """Validated readings sorted by entity then time."""

    feature_names: list[str]
    x: np.ndarray               # [N, F] float32, gaps filled
    y: np.ndarray | None        # [N] float32 target (label or delay minutes; forecast: label for evaluation)
    entity: np.ndarray          # [N] int codes
    entity_names: list[str]
    fingerprint: str            # sha256 of the source file
    groups: dict[str, str] | None = None  # entity -> its group (``group_col`` of ``load``)

    def entity_bounds(self) -> list[tuple[int, int]]:
        """(start, end) rows of each entity's contiguous, time-ordered run."""
        return entity_bounds(self.entity)


def entity_bounds(entity: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) rows of each entity's run in rows sorted by entity (codes or names)."""
    starts = np.r_[0, np.flatnonzero(entity[1:] != entity[:-1]) + 1, len(entity)]
    return list(zip(starts[:-1].tolist(), starts[1:].tolist()))


def time_cuts(bounds: list[tuple[int, int]], fraction: float) -> list[tuple[int, int, int]]:
    """(start, cut, end) of each entity: rows from ``cut`` on are its newest ``fraction`` (the validation
    split here, the gate slice the sidecar trainer holds out of training)."""
    return [(s, s + int(round((e - s) * (1 - fraction))), e) for s, e in bounds]


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
    val_entity: np.ndarray      # [len(val.x)] name of each validation window's entity (per-key thresholds)


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


def load(path: Path | str, features: Sequence[str] | None = None, label_col: str | None = "label",
         task: Task = "classify", nan_tolerance: float = 0.01, window: int = 100, *, ts_col: str | None = None,
         entity_col: str | None = None, entity: str | None = None, group_col: str | None = None) -> Table:
    """Read and validate a CSV/Parquet/JSONL file of readings, columns mapped as `evaluate` and `replay` map them.

    Stricter than replay: a bad timestamp, entity or feature cell is an error here, not a skipped row; missing
    feature values up to ``nan_tolerance`` are forward-filled. ``group_col`` (never a feature) names each
    entity's group, one per entity.
    """
    path = Path(path)
    table = read_table(path)
    # forecast is unsupervised: a label column, when present, only scores the validation split
    wanted = label_col if label_col and (task != "forecast" or label_col in table.column_names) else None
    cmap = ColumnMap.resolve(table, entity_col=entity_col, ts_col=ts_col, features=features, label_col=wanted,
                             entity=entity)
    if group_col is not None and not features and group_col in cmap.features:
        cmap = replace(cmap, features=[f for f in cmap.features if f != group_col])
    ts, ts_ok = timestamps_ms(table.column(cmap.ts))
    if not ts_ok.all():
        row = int(np.argmin(ts_ok))
        raise UsageError(f"column {cmap.ts!r} has {table.column(cmap.ts)[row].as_py()!r} at row {row + 1}: not an "
                         f"ISO-8601 time or epoch seconds/milliseconds (name the timestamp column with --ts-col)")
    names = cmap.entities(table)
    if names.null_count:
        row = int(np.argmax(names.is_null().to_numpy(zero_copy_only=False)))
        raise UsageError(f"column {cmap.entity!r} has no entity at row {row + 1}")
    ent_arr = names.dictionary_encode()
    entity_names = [str(v) for v in ent_arr.dictionary.to_pylist()]
    codes = ent_arr.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    order = np.lexsort((ts, codes))

    try:
        x = np.column_stack([_numeric(table, c) for c in cmap.features])[order]
    except UsageError as exc:
        raise UsageError(f"{exc}{'' if features else ' (or name the feature columns with --features)'}") from None
    bad = ~np.isfinite(x)
    frac = bad.mean(axis=0)
    if (frac > nan_tolerance).any():
        worst = int(np.argmax(frac))
        raise UsageError(f"column {cmap.features[worst]!r} is {frac[worst]:.1%} missing or non-finite "
                         f"(tolerance {nan_tolerance:.1%}: raise --nan-tolerance or clean the data)")
    codes = codes[order]
    if bad.any():
        x = _fill_gaps(np.where(bad, np.nan, x), codes)

    y = None
    if wanted:
        y = _numeric(table, wanted)[order]
        if not np.isfinite(y).all():
            raise UsageError(f"label column {wanted!r} has missing or non-finite values")
        if task != "regress" and not np.isin(y, (0.0, 1.0)).all():
            others = np.unique(y[~np.isin(y, (0.0, 1.0))])[:3]
            raise UsageError(f"label column {wanted!r} must hold 0/1 for --task {task}, found {others.tolist()}")
        if task == "regress" and (y < 0).any():
            raise UsageError(f"label column {wanted!r} must hold delay minutes >= 0 for --task regress")
        y = y.astype(np.float32)

    counts = np.bincount(codes)
    if counts.max(initial=0) < window:
        raise UsageError(f"{path.name} has at most {counts.max(initial=0)} rows per entity, fewer than one window "
                         f"of {window} (training needs {min_rows(window)})")
    return Table(feature_names=cmap.features, x=x.astype(np.float32), y=y, entity=codes,
                 entity_names=entity_names, fingerprint=sha256_file(path),
                 groups=None if group_col is None else _groups(table, group_col, names))


def _groups(table: pa.Table, column: str, entities: pa.Array) -> dict[str, str]:
    """Entity -> the one value ``column`` holds on all its rows."""
    if column not in table.column_names:
        raise UsageError(f"--threshold-by group:{column}: no column {column!r} in the file")
    pairs = pa.table({"entity": entities, "group": table.column(column).cast(pa.string())})
    if pairs.column("group").null_count:
        row = int(np.argmax(pairs.column("group").is_null().to_numpy(zero_copy_only=False)))
        raise UsageError(f"column {column!r} has no group at row {row + 1}")
    distinct = pairs.group_by("entity").aggregate([("group", "count_distinct"), ("group", "min")])
    several = [e for e, n in zip(distinct.column("entity").to_pylist(),
                                 distinct.column("group_count_distinct").to_pylist()) if n > 1]
    if several:
        raise UsageError(f"column {column!r} must hold one group per entity; {several[0]!r} has several")
    return dict(zip(distinct.column("entity").to_pylist(), distinct.column("group_min").to_pylist()))


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


MIN_WINDOWS_OF_ROWS = 3  # the shortest history train accepts: 3 windows of rows (300 at window 100)


def min_rows(window: int) -> int:
    """Rows of one entity that training needs at this window length."""
    return MIN_WINDOWS_OF_ROWS * window


def _check_rows(bounds: list[tuple[int, int]], window: int) -> None:
    longest = max(e - s for s, e in bounds)
    if longest < min_rows(window):
        raise UsageError(f"too few rows: training with {window}-step windows needs at least {min_rows(window)} rows "
                         f"of one entity ({MIN_WINDOWS_OF_ROWS} windows); the longest entity has {longest} "
                         f"(try a shorter --window)")


def split(table: Table, window: int = 100, val_fraction: float = 0.2, stride: int = 1,
          val_stride: int | None = None, event_stride: int | None = None, train_on_all: bool = False) -> Split:
    """Per-entity time split: the first ``1 - val_fraction`` of each entity's rows train, the rest validate.

    A validation window is one whose last step (its target and label) lies in the validation rows; its
    context may reach back into training rows, so a short history still yields one validation window per
    validation row. The scaler sees training rows only. ``event_stride`` keeps event windows in the training
    split more densely than ``stride`` (validation stays unbiased).

    ``train_on_all``: the final model after cross-validation trains on every row (scaler too); its validation
    windows, then also training windows, only stop the stages early (figures and thresholds are out-of-fold).
    """
    bounds = table.entity_bounds()
    _check_rows(bounds, window)
    cuts = [(s, c, e) for s, c, e in time_cuts(bounds, val_fraction) if c - s >= window]  # too short to train on: left out
    train_rows = np.concatenate([np.arange(s, e if train_on_all else c) for s, c, e in cuts])
    scaler = fit_scaler(table.x[train_rows])
    xs = apply_scaler(table.x, scaler)
    y = table.y
    train = [windows(xs[s:e if train_on_all else c], None if y is None else y[s:e if train_on_all else c], window,
                     stride, event_stride) for s, c, e in cuts]
    val = [windows(xs[c - window + 1:e], None if y is None else y[c - window + 1:e], window, val_stride or stride)
           for _, c, e in cuts]
    tr, va = _concat(train), _concat(val)
    if len(va.x) == 0:
        raise UsageError(f"no validation rows with validation fraction {val_fraction}: raise --val-fraction")
    val_entity = np.repeat(np.asarray(table.entity_names, dtype=object)[[table.entity[s] for s, _, _ in cuts]],
                           [len(v.x) for v in val])
    return Split(train=tr, val=va, scaler=scaler, feature_names=table.feature_names, val_entity=val_entity)


@dataclass
class Fold:
    """One cross-validation fold: its split and, per entity, the table rows it trains and validates on."""

    split: Split
    train_rows: list[tuple[int, int]]   # [start, end) per entity that takes part in the fold
    val_rows: list[tuple[int, int]]


def cv_folds(table: Table, window: int, k: int, stride: int = 1, event_stride: int | None = None) -> list[Fold]:
    """``k`` blocked time-series folds per entity (scikit-learn's ``TimeSeriesSplit``, gap one window).

    Each entity's rows are cut into ``k + 1`` blocks in time order; fold ``i`` trains on the blocks before
    block ``i + 1`` (less the last ``window`` rows: the gap) and validates on block ``i + 1``. Validation rows
    never precede training rows, and a validation window's context lies in the gap, so no window of a fold's
    validation shares a row with one of its training windows. The scaler of a fold sees its training rows only.
    An entity too short for ``k`` folds with a window of training rows sits out the folds it cannot fill.
    """
    from sklearn.model_selection import TimeSeriesSplit

    bounds = table.entity_bounds()
    _check_rows(bounds, window)
    per_fold: list[list[tuple[int, int, int, int]]] = [[] for _ in range(k)]  # (train start, end, val start, end)
    for s, e in bounds:
        try:
            cuts = list(TimeSeriesSplit(n_splits=k, gap=window).split(np.arange(e - s)))
        except ValueError:  # fewer rows than k + 1 blocks and the gap
            continue
        for i, (tr, va) in enumerate(cuts):
            if len(tr) >= window and len(va):
                per_fold[i].append((s, s + len(tr), s + int(va[0]), s + int(va[-1]) + 1))
    y = table.y
    folds = []
    for i, cuts in enumerate(per_fold):
        if not cuts:
            raise UsageError(f"too few rows for --cv {k}: fold {i + 1} has no entity with {window} training rows "
                             f"and validation rows after a {window}-row gap (lower --cv or --window)")
        scaler = fit_scaler(np.concatenate([table.x[a:b] for a, b, _, _ in cuts]))
        xs = apply_scaler(table.x, scaler)
        train = [windows(xs[a:b], None if y is None else y[a:b], window, stride, event_stride) for a, b, _, _ in cuts]
        val = [windows(xs[c - window + 1:d], None if y is None else y[c - window + 1:d], window)
               for _, _, c, d in cuts]
        val_entity = np.repeat(np.asarray(table.entity_names, dtype=object)[[table.entity[c] for _, _, c, _ in cuts]],
                               [len(v.x) for v in val])
        folds.append(Fold(Split(_concat(train), _concat(val), scaler, table.feature_names, val_entity),
                          [(a, b) for a, b, _, _ in cuts], [(c, d) for _, _, c, d in cuts]))
    return folds
