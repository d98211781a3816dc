"""The batch decoder's fast path agrees with the pydantic ``ReadingDecoder`` (no broker)."""

from __future__ import annotations

import numpy as np
import pytest

from fabwatch.stream.decode import BatchDecoder
from fabwatch.stream.schemas import ReadingDecoder, Rejected, RejectReason

NAMES = ["a", "b", "c"]
MESSAGES = [
    b'{"entity": "e1", "ts": 1700000000000, "values": [1, 2.5, -3]}',
    b'{"entity": "e1", "ts": 1700000000000.7, "values": [1, 2, 3], "label": 1}',
    b'{"entity": "e1", "ts": "2024-01-01T00:00:00Z", "values": [1, 2, 3]}',
    b'{"entity": "e2", "ts": 5, "features": {"c": 3, "a": 1, "b": 2}, "extra": "ignored"}',
    b'{"entity": "e2", "ts": 5, "values": [1, 2, 3], "label": null}',
    b'{"entity": "e2", "ts": 5, "values": [true, 2, 3]}',
    b'{"entity": "e2", "ts": 5, "values": ["1", 2, 3]}',
    b'{"entity": "e2", "ts": -5, "values": [1, 2, 3]}',
    b'{"entity": "", "ts": 5, "values": [1, 2, 3]}',
    b'{"entity": "e2", "ts": 5, "values": [1, 2, 3], "label": 2}',
    b'{"entity": "e2", "ts": 5, "values": [1, 2, Infinity]}',
    b'{"entity": "e2", "ts": 5, "values": [1, 2, 1e39]}',
    b'[1, 2, 3]',
    b"",
    None,
]


@pytest.mark.parametrize("raw", MESSAGES)
def test_fast_path_matches_the_schema(raw: bytes | None) -> None:
    cols = BatchDecoder(NAMES).decode([raw])
    try:
        with np.errstate(over="ignore"):
            reading, vector = ReadingDecoder(NAMES).decode(raw)
        if not np.isfinite(vector).all():
            raise Rejected(RejectReason.non_finite, "overflows float32")
    except Rejected as exc:
        assert len(cols.index) == 0 and cols.rejected[0][1].reason == exc.reason
        return
    assert cols.keys == [reading.entity] and cols.ts.tolist() == [reading.ts]
    np.testing.assert_array_equal(cols.values[0], vector)
    assert cols.labels.tolist() == [-1 if reading.label is None else reading.label]


def test_batch_keeps_order_and_indices() -> None:
    cols = BatchDecoder(NAMES).decode(MESSAGES)
    assert cols.index.tolist() == [0, 1, 2, 3, 4]
    assert [i for i, _ in cols.rejected] == list(range(5, len(MESSAGES)))
    assert cols.values.shape == (5, 3) and cols.values.dtype == np.float32
