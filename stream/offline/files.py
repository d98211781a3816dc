"""Historical files (CSV, Parquet, JSONL) -> readings: one reader and one column mapping shared by
`fabwatch replay` and offline evaluation, so both see the same rows in the same order."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fabwatch.export.errors import UsageError
from fabwatch.stream.schemas import RejectReason, parse_timestamp_ms

ENTITY_CANDIDATES = ("entity", "entity_id", "device", "vehicle", "tool", "key", "id")
TS_CANDIDATES = ("ts", "timestamp", "time", "datetime", "event_time")
LABEL_CANDIDATES = ("label", "is_anomaly", "anomaly")
NON_FEATURE = frozenset({"event", "event_type", "delay_minutes"})
FORMATS = ("csv", "parquet", "jsonl")


def detect_format(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    fmt = {"pq": "parquet", "json": "jsonl", "ndjson": "jsonl"}.get(suffix, suffix)
    if fmt not in FORMATS:
        raise UsageError(f"cannot tell the format of {path.name}: use .csv, .parquet or .jsonl (or --format)")
    return fmt


def read_table(path: Path | str, fmt: str | None = None) -> pa.Table:
    """Read a whole file; an unreadable or empty file is a one-line UsageError."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"data file {path} does not exist")
    fmt = fmt or detect_format(path)
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        elif fmt == "csv":
            import pyarrow.csv as pacsv

            table = pacsv.read_csv(path)
        elif fmt == "jsonl":
            import pyarrow.json as pajson

            table = pajson.read_json(path)
        else:
            raise UsageError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    except (pa.ArrowInvalid, OSError) as exc:
        raise UsageError(f"cannot read {path.name} as {fmt}: {str(exc).splitlines()[0][:200]}") from None
    if table.num_rows == 0:
        raise UsageError(f"{path.name} has no rows")
    return table


def _pick(columns: Sequence[str], explicit: str | None, candidates: Sequence[str], what: str, flag: str) -> str:
    if explicit:
        if explicit not in columns:
            raise UsageError(f"{what} column {explicit!r} not in the file (columns: {', '.join(columns)})")
        return explicit
    found = [c for c in columns if c.lower() in candidates]
    if len(found) == 1:
        return found[0]
    if not found:
        raise UsageError(f"no {what} column found (looked for {', '.join(candidates)}): name it with {flag}")
    raise UsageError(f"ambiguous {what} column: {', '.join(found)} all qualify; choose one with {flag}")


def _mostly_numeric(col: pa.ChunkedArray) -> bool:
    """Numeric columns, and text columns whose values mostly parse as numbers (a few bad cells are
    bad rows to report, not a reason to drop the feature)."""
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        return True
    if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
        return False
    sample = [v for v in col.slice(0, 1000).to_pylist() if v not in (None, "")]
    return bool(sample) and sum(map(_is_number, sample)) > 0.5 * len(sample)


@dataclass(frozen=True)
class ColumnMap:
    entity: str
    ts: str
    features: list[str]
    label: str | None

    @classmethod
    def resolve(cls, table: pa.Table, entity: str | None = None, ts: str | None = None,
                features: Sequence[str] | None = None, label: str | None = None) -> "ColumnMap":
        """Explicit names win; otherwise infer, and refuse to guess between equally good columns."""
        cols = table.column_names
        entity_col = _pick(cols, entity, ENTITY_CANDIDATES, "entity", "--entity-col")
        ts_col = _pick(cols, ts, TS_CANDIDATES, "timestamp", "--ts-col")
        label_col = label if label else next((c for c in cols if c.lower() in LABEL_CANDIDATES), None)
        if label and label not in cols:
            raise UsageError(f"label column {label!r} not in the file")
        if features:
            missing = [f for f in features if f not in cols]
            if missing:
                raise UsageError(f"feature column(s) {', '.join(missing)} not in the file")
            feature_cols = list(features)
        else:
            skip = {entity_col, ts_col, label_col} | NON_FEATURE
            feature_cols = [f.name for f in table.schema if f.name not in skip and _mostly_numeric(table.column(f.name))]
            if not feature_cols:
                raise UsageError("no numeric feature columns found: name them with --features")
        return cls(entity=entity_col, ts=ts_col, features=feature_cols, label=label_col)


@dataclass
class Records:
    """Rows as arrays, in replay order (by timestamp, stable), with the rows that cannot be readings."""

    row: np.ndarray             # [N] index of the row in the file
    entity: list[str]
    ts: np.ndarray              # [N] int64 epoch ms
    values: np.ndarray          # [N, F] float64
    label: np.ndarray | None    # [N] int8, -1 where absent
    feature_names: list[str]
    rejected: list[tuple[int, RejectReason, str]]  # (file row, reason, detail)


def _timestamps_ms(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(epoch ms int64, ok mask); ISO strings are parsed like the Reading schema parses them."""
    if pa.types.is_timestamp(col.type):
        arr = pc.cast(pc.cast(col, pa.timestamp("ms", col.type.tz)), pa.int64()).to_numpy(zero_copy_only=False)
        ok = ~np.asarray(col.is_null())
        return np.where(ok, arr, 0).astype(np.int64), ok
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        raw = col.cast(pa.float64()).to_numpy(zero_copy_only=False)
        ok = np.isfinite(raw) & (raw >= 0)
        return np.where(ok, raw, 0).astype(np.int64), ok
    out, ok = np.zeros(len(col), np.int64), np.zeros(len(col), bool)
    for i, v in enumerate(col.cast(pa.string()).to_pylist()):
        try:
            out[i], ok[i] = parse_timestamp_ms(float(v) if _is_number(v) else v), True
        except Exception:  # any unparseable cell rejects its row as bad_timestamp
            pass
    return out, ok


def _is_number(text: str | None) -> bool:
    try:
        float(text)  # type: ignore[arg-type]
        return True
    except (TypeError, ValueError):
        return False


def to_records(table: pa.Table, cmap: ColumnMap) -> Records:
    n = table.num_rows
    rejected: list[tuple[int, RejectReason, str]] = []
    entity_col = table.column(cmap.entity).cast(pa.string()).to_pylist()
    ts, ts_ok = _timestamps_ms(table.column(cmap.ts))
    values = np.empty((n, len(cmap.features)), np.float64)
    numeric_ok = np.ones(n, bool)
    for j, name in enumerate(cmap.features):
        col = table.column(name)
        if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
            values[:, j] = col.cast(pa.float64()).to_numpy(zero_copy_only=False)
        else:  # strings in a feature column: per-row conversion, bad cells reject their row
            for i, v in enumerate(col.cast(pa.string()).to_pylist()):
                if v is None or v == "":
                    values[i, j] = np.nan  # missing: rejected below as non_finite
                elif _is_number(v):
                    values[i, j] = float(v)
                else:
                    values[i, j] = np.nan
                    numeric_ok[i] = False
    finite = np.isfinite(values).all(axis=1)
    label = None
    if cmap.label:
        lab = table.column(cmap.label).cast(pa.float64()).to_numpy(zero_copy_only=False)
        label = np.where(np.isin(lab, (0.0, 1.0)), np.nan_to_num(lab), -1).astype(np.int8)
    entity_missing = np.fromiter((not e for e in entity_col), bool, count=n)
    good = ~(entity_missing | ~ts_ok | ~numeric_ok | ~finite)
    for i in np.flatnonzero(~good):
        if entity_missing[i]:
            rejected.append((int(i), RejectReason.schema, "missing entity"))
        elif not ts_ok[i]:
            rejected.append((int(i), RejectReason.bad_timestamp, f"unparseable timestamp in column {cmap.ts!r}"))
        elif not numeric_ok[i]:
            rejected.append((int(i), RejectReason.schema, "non-numeric feature value"))
        elif not finite[i]:
            bad = [cmap.features[j] for j in np.flatnonzero(~np.isfinite(values[i]))]
            rejected.append((int(i), RejectReason.non_finite, f"missing or non-finite {', '.join(bad[:3])}"))
    rows = np.flatnonzero(good)
    rows = rows[np.argsort(ts[rows], kind="stable")]
    return Records(row=rows, entity=[entity_col[i] for i in rows], ts=ts[rows], values=values[rows],
                   label=None if label is None else label[rows], feature_names=list(cmap.features),
                   rejected=rejected)
