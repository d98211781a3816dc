"""Batch decoding of raw reading bytes into columns, with a fast path behind the ``Reading`` schema.

The fast path (orjson + a few type checks) accepts only messages that ``Reading`` would certainly
accept in the common ``{"entity", "ts" (number), "values"}`` shape; anything else goes through
``ReadingDecoder`` (pydantic), which decides and names the reason. Both paths give the same result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from typing import Sequence

import numpy as np
import orjson

from stream.schemas import ReadingDecoder, Rejected, RejectReason

_NUMBER = {int, float}
_FAST_KEYS = {"entity", "ts", "values", "label"}
MAX_TS_MS = 1 << 45  # the window store's limit (year 3084)


@dataclass
class DecodedColumns:
    """The good messages of a batch as columns; ``index`` points back into the input list."""

    index: np.ndarray                 # int64 [n]
    keys: list[str]
    ts: np.ndarray                    # int64 [n]
    values: np.ndarray                # float32 [n, F]
    labels: np.ndarray                # int8 [n], -1 when absent
    rejected: list[tuple[int, Rejected]] = field(default_factory=list)


class BatchDecoder:
    def __init__(self, feature_names: Sequence[str], max_bytes: int = 1_000_000):
        self.slow = ReadingDecoder(feature_names, max_bytes)
        self.width = len(self.slow.feature_names)
        self.max_bytes = max_bytes

    def _fast(self, raw: bytes) -> tuple[str, int, list, int] | None:
        """(entity, ts, values, label) when the message has the common shape, else None. The element
        types of ``values`` are checked for the whole batch at once in ``decode``."""
        try:
            d = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        if type(d) is not dict or not d.keys() <= _FAST_KEYS:
            return None
        entity, ts, values, label = d.get("entity"), d.get("ts"), d.get("values"), d.get("label", -1)
        if type(entity) is not str or not 0 < len(entity) <= 256:
            return None
        if type(ts) is int:
            if ts < 0:
                return None
        elif type(ts) is float and 0 <= ts < float("inf"):
            ts = int(ts)
        else:
            return None
        if type(values) is not list or len(values) != self.width:
            return None
        if label is None:
            label = -1
        elif label not in (-1, 0, 1) or type(label) is not int:
            return None
        return entity, ts, values, label

    def _slow(self, raw: bytes | None) -> tuple[str, int, list, int]:
        reading, vector = self.slow.decode(raw)
        return reading.entity, reading.ts, vector.tolist(), -1 if reading.label is None else reading.label

    def decode(self, raws: Sequence[bytes | None]) -> DecodedColumns:
        index: list[int] = []
        keys: list[str] = []
        ts: list[int] = []
        rows: list[list] = []
        labels: list[int] = []
        rejected: list[tuple[int, Rejected]] = []
        for i, raw in enumerate(raws):
            fast = self._fast(raw) if raw is not None and len(raw) <= self.max_bytes else None
            if fast is None:
                try:
                    fast = self._slow(raw)
                except Rejected as exc:
                    rejected.append((i, exc))
                    continue
            index.append(i)
            keys.append(fast[0])
            ts.append(fast[1])
            rows.append(fast[2])
            labels.append(fast[3])
        dropped: set[int] = set()
        if not set(map(type, chain.from_iterable(rows))) <= _NUMBER:  # rare: let the schema judge those rows
            for j, row in enumerate(rows):
                if not set(map(type, row)) <= _NUMBER:
                    try:
                        keys[j], ts[j], rows[j], labels[j] = self._slow(raws[index[j]])
                    except Rejected as exc:
                        rejected.append((index[j], exc))
                        rows[j] = [0.0] * self.width
                        dropped.add(j)
        with np.errstate(over="ignore"):  # overflow to inf is caught just below
            values = np.array(rows, dtype=np.float32).reshape(len(rows), self.width)
        ts_arr = np.asarray(ts, dtype=np.int64) if ts and max(ts) < MAX_TS_MS else np.asarray(
            [t if t < MAX_TS_MS else -1 for t in ts], dtype=np.int64)
        finite = np.isfinite(values).all(axis=1)
        good = finite & (ts_arr >= 0)
        good[list(dropped)] = False
        if not good.all():  # finite doubles beyond float32's range, or timestamps beyond year 3084
            for j in np.flatnonzero(~good).tolist():
                if j in dropped:
                    continue
                rejected.append((index[j], Rejected(RejectReason.non_finite, "a value overflows float32")
                                 if not finite[j] else Rejected(RejectReason.bad_timestamp, "timestamp out of range")))
            keep = np.flatnonzero(good)
            index, keys, labels = [index[j] for j in keep], [keys[j] for j in keep], [labels[j] for j in keep]
            ts_arr, values = ts_arr[keep], values[keep]
            rejected.sort(key=lambda r: r[0])
        return DecodedColumns(np.asarray(index, dtype=np.int64), keys, ts_arr, values,
                              np.asarray(labels, dtype=np.int8), rejected)
