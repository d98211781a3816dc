"""Batch decoding of raw reading bytes into columns, with a fast path behind the ``Reading`` schema.

The fast path (orjson + a few type checks) accepts only messages that ``Reading`` would certainly
accept in the common ``{"entity", "ts" (epoch ms), "values"}`` shape; anything else goes through
``ReadingDecoder`` (pydantic), which decides and names the reason. Both paths give the same result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from typing import Sequence

import numpy as np
import orjson

from fabwatch.stream.schemas import MAX_TS_MS, EventTimeBounds, ReadingDecoder, Rejected, RejectReason

_NUMBER = {int, float}
_FAST_KEYS = {"entity", "ts", "values"}


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
    def __init__(self, feature_names: Sequence[str], max_bytes: int = 1_000_000,
                 bounds: EventTimeBounds | None = None):
        """``bounds``: event-time bounds against each message's broker timestamp (None: unchecked)."""
        self.slow = ReadingDecoder(feature_names, max_bytes)  # bounds are checked for the whole batch below
        self.width = len(self.slow.feature_names)
        self.max_bytes = max_bytes
        self.bounds = bounds

    def _slow(self, raw: bytes | None) -> tuple[str, int, list, int]:
        reading, vector = self.slow.decode(raw)
        return reading.entity, reading.ts, vector.tolist(), -1 if reading.label is None else reading.label

    def decode(self, raws: Sequence[bytes | None], broker_ms: np.ndarray | None = None,
               now_ms: int | None = None) -> DecodedColumns:
        """Columns of the good messages and the reason for each bad one, in input order; it never raises
        for a message. ``broker_ms`` (int64 [len(raws)]) are the messages' broker timestamps.

        Fast path, inlined because it runs once per message: ``{"entity": str, "ts": int >= 0,
        "values": [F items]}`` and nothing else. The element types of ``values`` are checked for the
        whole batch at once below. Every other shape (ISO or float timestamps, labels, features by
        name, anything odd) takes the schema path.
        """
        loads, width, max_bytes, fast_keys = orjson.loads, self.width, self.max_bytes, _FAST_KEYS
        index: list[int] = []
        keys: list[str] = []
        ts: list[int] = []
        rows: list[list] = []
        labels: dict[int, int] = {}  # position -> label, only for readings that carry one
        rejected: list[tuple[int, Rejected]] = []
        for i, raw in enumerate(raws):
            try:
                if raw is not None and len(raw) <= max_bytes:
                    d = loads(raw)
                    if (d.keys() <= fast_keys and type(e := d["entity"]) is str
                            and 0 < len(e) <= 256 and type(t := d["ts"]) is int and t >= 0
                            and type(v := d["values"]) is list and len(v) == width):
                        index.append(i)
                        keys.append(e)
                        ts.append(t)
                        rows.append(v)
                        continue
            except (orjson.JSONDecodeError, AttributeError, KeyError):  # not a dict, a key missing
                pass
            try:
                entity, t_ms, row, label = self._slow(raw)
            except Rejected as exc:
                rejected.append((i, exc))
                continue
            if label >= 0:
                labels[len(index)] = label
            index.append(i)
            keys.append(entity)
            ts.append(t_ms)
            rows.append(row)
        dropped: set[int] = set()
        if not set(map(type, chain.from_iterable(rows))) <= _NUMBER:  # rare: let the schema judge those rows
            for j, row in enumerate(rows):
                if not set(map(type, row)) <= _NUMBER:
                    try:
                        keys[j], ts[j], rows[j], label = self._slow(raws[index[j]])
                    except Rejected as exc:
                        rejected.append((index[j], exc))
                        rows[j] = [0.0] * width
                        dropped.add(j)
        with np.errstate(over="ignore"):  # overflow to inf is caught just below
            values = np.array(rows, dtype=np.float32).reshape(len(rows), width)
        label_arr = np.full(len(rows), -1, dtype=np.int8)
        if labels:
            label_arr[list(labels)] = list(labels.values())
        ts_arr = np.asarray(ts, dtype=np.int64) if ts and max(ts) < MAX_TS_MS else np.asarray(
            [t if t < MAX_TS_MS else -1 for t in ts], dtype=np.int64)
        finite = np.isfinite(values).all(axis=1)
        in_range = ts_arr >= 0
        skewed = np.zeros(len(rows), bool) if self.bounds is None else self.bounds.outside(
            ts_arr, None if broker_ms is None else np.asarray(broker_ms, np.int64)[index], now_ms)
        good = finite & in_range & ~skewed
        good[list(dropped)] = False
        if not good.all():  # doubles beyond float32's range, timestamps beyond year 3084 or the skew bounds
            for j in np.flatnonzero(~good).tolist():
                if j in dropped:
                    continue
                if not finite[j]:
                    exc = Rejected(RejectReason.non_finite, "a value overflows float32")
                elif not in_range[j]:
                    exc = Rejected(RejectReason.bad_timestamp, "timestamp out of range")
                else:
                    assert self.bounds is not None
                    exc = Rejected(RejectReason.clock_skew, self.bounds.detail(int(ts_arr[j]), None if broker_ms is None
                                                                              else int(broker_ms[index[j]])))
                rejected.append((index[j], exc))
            keep = np.flatnonzero(good)
            index, keys = [index[j] for j in keep], [keys[j] for j in keep]
            ts_arr, values, label_arr = ts_arr[keep], values[keep], label_arr[keep]
            rejected.sort(key=lambda r: r[0])
        return DecodedColumns(np.asarray(index, dtype=np.int64), keys, ts_arr, values, label_arr, rejected)
