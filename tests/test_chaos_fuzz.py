"""Fault injection, part 1: every decoder fuzzed with Hypothesis. Each generated message is accepted
or rejected with a reason code; none may raise anything else (a raise is a crash loop on Kafka).

Messages are JSON documents built around each wire shape (right keys with wrong, huge, nested, unicode
or non-finite values, missing or extra keys), arbitrary bytes, and padded ones up to the size limit.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fabwatch.stream.decode import BatchDecoder
from fabwatch.stream.schemas import ReadingDecoder, Rejected, RejectReason, decode_logkey, decode_model_event

pytestmark = pytest.mark.chaos

MESSAGES = 10_000  # per decoder
MAX_BYTES = 64_000  # the decoders' limit here: padded messages reach it and pass it
FEATURES = ["f00", "f01", "f02", "f03"]
NOW_MS = 1_795_000_000_000
BATCH = 2  # messages per batch of the batch decoder


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

huge_ints = st.one_of(st.integers(-(2 ** 70), 2 ** 70), st.integers(-(10 ** 400), 10 ** 400),
                      st.sampled_from([10 ** 309, 2 ** 63, 2 ** 64, -(2 ** 63) - 1, 1 << 45, NOW_MS * 1000]))
numbers = st.one_of(huge_ints, st.floats(allow_nan=True, allow_infinity=True), st.booleans())
LONG = ["\u202e" * 300, "\ud7ff\U0010ffff" * 150, "\x00" * 300, "é" * 257]  # long, bidi, astral, NUL, 257 chars
scalars = st.one_of(st.none(), numbers, st.text(max_size=40), st.sampled_from(LONG))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=6)),
                           max_leaves=8)
timestamps = st.one_of(st.integers(0, 2 ** 46), huge_ints, st.floats(allow_nan=True, allow_infinity=True),
                       st.datetimes().map(lambda d: d.isoformat()),
                       st.sampled_from(["2100-01-01T00:00:00Z", "9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59",
                                        "2026-13-01", "1" + "0" * 309, ""]),
                       json_values)
texts = st.one_of(st.text(min_size=1, max_size=20), st.text(max_size=300), json_values)


def _shape(fields: dict[str, st.SearchStrategy]) -> st.SearchStrategy[dict]:
    """Documents with some of ``fields`` (each maybe replaced by any JSON value) and maybe extra keys."""
    optional = {k: st.one_of(v, json_values) for k, v in fields.items()}
    return st.builds(lambda doc, extra: {**extra, **doc}, st.fixed_dictionaries({}, optional=optional),
                     st.dictionaries(st.text(max_size=8), json_values, max_size=3))


def _encode(doc: object) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()


def _padded(doc: st.SearchStrategy[dict]) -> st.SearchStrategy[bytes]:
    """A document with one key padded to a size around the limit (below it, at it, just over it)."""
    def pad(d: dict, size: int, key: str) -> bytes:
        body = _encode(d)
        filler = max(0, size - len(body) - len(key) - 8)
        return body[:-1] + (b", " if len(body) > 2 else b"") + f'"{key}": "'.encode() + b"x" * filler + b'"}'
    return st.builds(pad, doc, st.integers(MAX_BYTES - 64, MAX_BYTES + 64) | st.integers(0, MAX_BYTES),
                     st.sampled_from(["entity", "session", "key", "version", "pad"]))


def messages(fields: dict[str, st.SearchStrategy]) -> st.SearchStrategy[bytes | None]:
    doc = _shape(fields)
    return st.one_of(doc.map(_encode), doc.map(_encode), _padded(doc), st.binary(max_size=200), st.none(),
                     json_values.map(_encode), doc.map(_encode).flatmap(lambda b: st.integers(0, len(b)).map(lambda i: b[:i])))


values = st.one_of(st.lists(numbers, min_size=4, max_size=4), st.lists(numbers, max_size=8), json_values)
features = st.one_of(st.fixed_dictionaries({f: numbers for f in FEATURES}),
                     st.dictionaries(st.sampled_from(FEATURES + ["zz", ""]), numbers, max_size=6))
READING = {"entity": texts, "ts": timestamps, "values": values, "features": features,
           "label": st.one_of(st.sampled_from([0, 1]), json_values)}
LOG_KEY = {"session": texts, "ts": timestamps, "key": texts, "line": st.one_of(st.integers(-5, 2 ** 50), huge_ints)}
MODEL_EVENT = {"version": st.one_of(st.sampled_from(["v0002", "../x", "/etc", "v0002/../../x", ".", ""]), texts),
               "action": st.one_of(st.sampled_from(["promoted", "rolled_back"]), texts),
               "sha256": st.one_of(st.text("0123456789abcdef", min_size=64, max_size=64), texts),
               "ts": timestamps}


def _rejected_properly(exc: Rejected) -> None:
    assert isinstance(exc.reason, RejectReason) and exc.detail


@fuzz(MESSAGES // BATCH)
@given(st.lists(st.tuples(messages(READING), st.integers(-1, 2 ** 45)), min_size=BATCH, max_size=BATCH))
def test_the_processor_batch_decoder_accepts_or_rejects_every_reading(batch) -> None:
    decoder = BatchDecoder(FEATURES, MAX_BYTES, settings_bounds())
    cols = decoder.decode([raw for raw, _ in batch], np.asarray([b for _, b in batch], np.int64), now_ms=NOW_MS)
    assert sorted(cols.index.tolist() + [i for i, _ in cols.rejected]) == list(range(len(batch)))
    for _, exc in cols.rejected:
        _rejected_properly(exc)
    assert np.isfinite(cols.values).all() and (cols.ts >= 0).all() and cols.values.shape == (len(cols.index), 4)


@fuzz(MESSAGES)
@given(messages(READING), st.integers(-1, 2 ** 45))
def test_the_store_reading_decoder_accepts_or_rejects_every_reading(raw, broker_ms) -> None:
    decoder = ReadingDecoder(FEATURES, MAX_BYTES, settings_bounds())
    try:
        reading, vector = decoder.decode(raw, broker_ms=broker_ms, now_ms=NOW_MS)
    except Rejected as exc:
        _rejected_properly(exc)
        return
    assert vector.shape == (4,) and np.isfinite(vector).all() and 0 <= reading.ts <= NOW_MS + 600_000


@fuzz(MESSAGES)
@given(messages(LOG_KEY))
def test_the_log_key_decoder_accepts_or_rejects_every_message(raw) -> None:
    try:
        key = decode_logkey(raw, MAX_BYTES)
    except Rejected as exc:
        _rejected_properly(exc)
        return
    assert key.session and key.key and key.line >= 1


@fuzz(MESSAGES)
@given(messages(MODEL_EVENT))
def test_the_model_event_decoder_accepts_or_rejects_every_event(raw) -> None:
    try:
        event = decode_model_event(raw)
    except Rejected as exc:
        _rejected_properly(exc)
        return
    assert "/" not in event.version and not event.version.startswith(".") and len(event.sha256) == 64


def settings_bounds():
    from fabwatch.stream.kafka.config import Settings

    return Settings(bootstrap="unused:9092").event_time_bounds()
