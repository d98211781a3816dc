"""Historical files (CSV, Parquet, JSONL) -> readings: one reader and one column mapping shared by
`fabwatch train`, `fabwatch evaluate` and `fabwatch replay`, so all three see the same columns, entities and
timestamps (and a live replay gives the alert ids of an offline evaluation).

A file without an entity column holds one entity, named ``--entity`` or :data:`SINGLE_ENTITY`."""

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
TS_CANDIDATES = ("ts", "timestamp", "time", "datetime", "date", "event_time")
LABEL_CANDIDATES = ("label", "is_anomaly", "anomaly")
NON_FEATURE = frozenset({"event", "event_type", "delay_minutes"})
FORMATS = ("csv", "parquet", "jsonl")
# the entity of a file without an entity column, the same in every command so alert ids agree
# (the --entity help in fabwatch.stream.cli.options names it too)
SINGLE_ENTITY = "all"
# numbers all in this range are epoch seconds (1973-03-03 .. 2286-11-20); as milliseconds they would be
# 1970's first four months, which no recording holds, so anything else (small test counters too) is ms
EPOCH_SECONDS = (1e8, 1e10)


def detect_format(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    fmt = {"pq": "parquet", "json": "jsonl", "ndjson": "jsonl"}.get(suffix, suffix)
    if fmt not in FORMATS:
        raise UsageError(f"cannot tell the format of {path.name}: use .csv, .parquet or .jsonl")
    return fmt


def csv_delimiter(path: Path) -> str:
    """Comma, semicolon (European exports), tab or pipe: whichever the header line splits on most."""
    with open(path, newline="", errors="replace") as f:
        header = f.readline()
    return max(",;\t|", key=header.count)


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

            table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=csv_delimiter(path)))
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


def _pick(columns: Sequence[str], explicit: str | None, candidates: Sequence[str], what: str,
          flag: str) -> str | None:
    """The explicit column, else the one column named like a candidate (any case), else None."""
    if explicit:
        if explicit not in columns:
            raise UsageError(f"{what} column {explicit!r} not in the file (columns: {', '.join(columns)})")
        return explicit
    found = [c for c in columns if c.lower() in candidates]
    if len(found) > 1:
        raise UsageError(f"ambiguous {what} column: {', '.join(found)} all qualify; choose one with {flag}")
    return found[0] if found else None


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
    """Which columns of a file hold the entity, timestamp, features and label."""

    entity: str | None              # None: the file is one entity, ``single_entity``
    ts: str
    features: list[str]
    label: str | None
    single_entity: str = SINGLE_ENTITY

    @classmethod
    def resolve(cls, table: pa.Table, *, entity_col: str | None = None, ts_col: str | None = None,
                features: Sequence[str] | None = None, label_col: str | None = None,
                entity: str | None = None) -> "ColumnMap":
        """Explicit names win; otherwise infer by name, and refuse to guess between equally good columns.

        ``entity`` names the one entity of a file without an entity column (no column is looked for then).
        Inferred features are the numeric columns not named like an entity, timestamp or label column.
        """
        cols = table.column_names
        if entity and entity_col:
            raise UsageError("--entity names the one entity of a file without an entity column: "
                             "drop it or --entity-col")
        entity_col = None if entity else _pick(cols, entity_col, ENTITY_CANDIDATES, "entity", "--entity-col")
        ts_col = _pick(cols, ts_col, TS_CANDIDATES, "timestamp", "--ts-col")
        if ts_col is None:
            raise UsageError(f"no timestamp column found (looked for {', '.join(TS_CANDIDATES)}): "
                             "name it with --ts-col")
        label_col = _pick(cols, label_col, LABEL_CANDIDATES, "label", "--label-col")
        if features:
            missing = [f for f in features if f not in cols]
            if missing:
                raise UsageError(f"feature column(s) {', '.join(missing)} not in the file (columns: {', '.join(cols)})")
            feature_cols = list(features)
        else:
            named = {c for c in cols if c.lower() in (*ENTITY_CANDIDATES, *TS_CANDIDATES, *LABEL_CANDIDATES)}
            skip = {entity_col, ts_col, label_col} | named | NON_FEATURE
            feature_cols = [c for c in cols if c not in skip and _mostly_numeric(table.column(c))]
            if not feature_cols:
                raise UsageError("no numeric feature columns found: name them with --features")
        return cls(entity=entity_col, ts=ts_col, features=feature_cols, label=label_col,
                   single_entity=entity or SINGLE_ENTITY)

    def entities(self, table: pa.Table) -> pa.Array:
        """Each row's entity as strings (null where the cell is empty): the single entity's name without a column."""
        if self.entity is None:
            return pa.repeat(pa.scalar(self.single_entity), table.num_rows)
        text = table.column(self.entity).cast(pa.string()).combine_chunks()
        return pc.if_else(pc.equal(text, ""), None, text)


@dataclass
class Records:
    """Rows as arrays, in replay order (``arrival_order``), with the rows that cannot be readings."""

    row: np.ndarray             # [N] index of the row in the file
    entity: list[str]
    ts: np.ndarray              # [N] int64 epoch ms
    values: np.ndarray          # [N, F] float64
    label: np.ndarray | None    # [N] int8, -1 where absent
    feature_names: list[str]
    rejected: list[tuple[int, RejectReason, str]]  # (file row, reason, detail)


def timestamps_ms(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(epoch ms int64, ok mask) of a timestamp column.

    Timestamp and date columns as stored; ISO-8601 text as the Reading schema parses it (naive means UTC);
    numbers (or numeric text) are epoch seconds when every one lies in :data:`EPOCH_SECONDS`, else epoch
    milliseconds: one unit per column, decided once, so a recording never mixes them.
    """
    if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
        tz = col.type.tz if pa.types.is_timestamp(col.type) else None
        arr = col.cast(pa.timestamp("ms", tz), safe=False).cast(pa.int64()).to_numpy(zero_copy_only=False)
        ok = ~np.asarray(col.is_null())
        return np.where(ok, arr, 0).astype(np.int64), ok
    iso, iso_ok = np.zeros(len(col), np.int64), np.zeros(len(col), bool)
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        raw = col.cast(pa.float64()).to_numpy(zero_copy_only=False)
    else:
        text = col.cast(pa.string()).to_pylist()
        raw = np.array([float(v) if _is_number(v) else np.nan for v in text], np.float64)
        for i in np.flatnonzero(np.isnan(raw)):
            try:
                iso[i], iso_ok[i] = parse_timestamp_ms(text[i]), True
            except Exception:  # any unparseable cell rejects its row as bad_timestamp
                pass
    num_ok = np.isfinite(raw) & (raw >= 0)
    lo, hi = EPOCH_SECONDS
    seconds = bool(num_ok.any()) and bool(np.all((raw[num_ok] >= lo) & (raw[num_ok] <= hi)))
    ms = np.where(num_ok, np.rint(raw * 1000) if seconds else raw, 0).astype(np.int64)
    return np.where(iso_ok, iso, ms), num_ok | iso_ok


def _is_number(text: str | None) -> bool:
    try:
        float(text)  # type: ignore[arg-type]
        return True
    except (TypeError, ValueError):
        return False


def arrival_order(entity: Sequence[str], ts: np.ndarray) -> np.ndarray:
    """The order in which a live stream brings a file's rows: by time across entities, but each entity's rows
    in file order. A row older than an earlier row of its entity stays after it, as the out-of-order reading
    the processor would meet (put in order within ``--grace-ms``, else late), so `replay` sends and `evaluate`
    scores the same sequence; a file sorted by time, or grouped by entity, comes out sorted by time.

    The sort key is each row's newest timestamp of its entity so far (its arrival time, at the earliest)."""
    ts = np.asarray(ts, dtype=np.int64)
    codes = np.unique(np.asarray(entity, dtype=object), return_inverse=True)[1] if len(ts) else np.zeros(0, np.int64)
    by_entity = np.argsort(codes, kind="stable")
    backwards = (np.diff(codes[by_entity]) == 0) & (np.diff(ts[by_entity]) < 0)
    if not backwards.any():  # in order within every entity: the newest so far is the row's own timestamp
        return np.argsort(ts, kind="stable")
    newest: dict[int, int] = {}
    arrival = np.empty(len(ts), np.int64)
    for i, (code, t) in enumerate(zip(codes.tolist(), ts.tolist())):
        arrival[i] = newest[code] = max(t, newest.get(code, t))
    return np.argsort(arrival, kind="stable")


def to_records(table: pa.Table, cmap: ColumnMap) -> Records:
    n = table.num_rows
    rejected: list[tuple[int, RejectReason, str]] = []
    entity_col = cmap.entities(table).to_pylist()
    ts, ts_ok = timestamps_ms(table.column(cmap.ts))
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
            rejected.append((int(i), RejectReason.schema, f"missing entity in column {cmap.entity!r}"))
        elif not ts_ok[i]:
            rejected.append((int(i), RejectReason.bad_timestamp, f"unparseable timestamp in column {cmap.ts!r}"))
        elif not numeric_ok[i]:
            rejected.append((int(i), RejectReason.schema, "non-numeric feature value"))
        elif not finite[i]:
            bad = [cmap.features[j] for j in np.flatnonzero(~np.isfinite(values[i]))]
            rejected.append((int(i), RejectReason.non_finite, f"missing or non-finite {', '.join(bad[:3])}"))
    rows = np.flatnonzero(good)
    rows = rows[arrival_order([entity_col[i] for i in rows], ts[rows])]
    return Records(row=rows, entity=[entity_col[i] for i in rows], ts=ts[rows], values=values[rows],
                   label=None if label is None else label[rows], feature_names=list(cmap.features),
                   rejected=rejected)
