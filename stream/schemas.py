"""Wire messages (JSON) and the reading decoder that turns raw bytes into a feature vector or a reason.

Every rejection carries a machine-readable reason code (``RejectReason``) that ends up on the DLQ.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from datetime import datetime, timezone
from enum import StrEnum
from typing import Annotated, Any, Literal, Sequence, TypeVar

import numpy as np
from pydantic import (BaseModel, ConfigDict, Field, StrictFloat, ValidationError, WithJsonSchema,
                      field_validator, model_validator)
from pydantic_core import PydanticCustomError

from fabwatch.export.registry import VERSION_PATTERN


class RejectReason(StrEnum):
    bad_json = "bad_json"
    schema = "schema"
    bad_timestamp = "bad_timestamp"
    non_finite = "non_finite"
    wrong_width = "wrong_width"
    unknown_feature = "unknown_feature"
    missing_feature = "missing_feature"
    too_large = "too_large"
    late = "late"
    conflicting_duplicate = "conflicting_duplicate"  # same entity and ts as an accepted reading, other values
    clock_skew = "clock_skew"
    internal = "internal"
    delivery_refused = "delivery_refused"  # `alerts forward`: the receiver answered 4xx (not 408/429) to an alert


MAX_TS_MS = 1 << 45  # the window store's limit (year 3084); bounds timestamps before any float conversion


Number = StrictFloat  # ints are accepted; "1.5" (a string) is a schema error, not a number


def parse_timestamp_ms(value: Any) -> int:
    """Epoch milliseconds (number) or ISO-8601 (string; naive means UTC) -> epoch ms in [0, MAX_TS_MS).

    Integers are compared before any float conversion: ``1e309`` written as an integer overflows one."""
    if isinstance(value, bool):
        raise PydanticCustomError("bad_timestamp", "timestamp must be epoch ms or ISO-8601, got a boolean")
    if isinstance(value, int):
        ms = value
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise PydanticCustomError("bad_timestamp", "timestamp must be a finite epoch ms")
        ms = int(value)
    elif isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value)
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=timezone.utc)
            ms = int(dt.timestamp() * 1000)
        except (ValueError, OverflowError):  # not ISO-8601, or a date that leaves the UTC range
            raise PydanticCustomError("bad_timestamp", "timestamp string is not ISO-8601: {value}", {"value": value[:64]})
    else:
        raise PydanticCustomError("bad_timestamp", "timestamp must be epoch ms or ISO-8601")
    if not 0 <= ms < MAX_TS_MS:
        raise PydanticCustomError("bad_timestamp", "timestamp must be epoch ms in [0, 2^45) (1970 to 3084)")
    return ms


FLOAT32_MAX = float(np.finfo(np.float32).max)  # windows are float32: a larger value is non_finite
# The ISO-8601 profile of a reading's ``ts``, as a JSON Schema (ECMA-262) pattern: a calendar date from 1970 to
# 3083, optionally a time (``T`` or a space; seconds and their fraction optional) and ``Z`` or ``+HH:MM`` (none
# means UTC). ``fromisoformat`` alone takes more (week dates, the basic format, where "19700101" reads as a date
# and not as an epoch), so the decoder checks this pattern too and the published schema is exact.
ISO_TS_PATTERN = (r"^(19[7-9][0-9]|2[0-9]{3}|30[0-7][0-9]|308[0-3])-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
                  r"([T ]([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]+)?)?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])?)?$")
_ISO_TS = re.compile(ISO_TS_PATTERN)
_READING_TS_SCHEMA = {
    "description": "epoch milliseconds (a fraction is dropped) or ISO-8601 text (no offset means UTC), "
                   f"from 1970 up to {MAX_TS_MS} ms (year 3084)",
    "anyOf": [{"type": "number", "minimum": 0, "exclusiveMaximum": MAX_TS_MS},
              {"type": "string", "pattern": ISO_TS_PATTERN}],
}
_ONE_SHAPE_SCHEMA = {"oneOf": [{"required": ["values"], "properties": {"values": {"type": "array"}}},
                               {"required": ["features"], "properties": {"features": {"type": "object"}}}]}
FeatureValue = Annotated[Number, Field(allow_inf_nan=False,
                                       json_schema_extra={"minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX})]


class Reading(BaseModel):
    """One sensor reading. Exactly one of ``values`` (in the model's feature order) or ``features`` (by name).

    Its JSON Schema (``fabwatch schemas``) says what the decoder accepts; what only a model can judge (width,
    feature names) and invalid calendar days (Feb 30) are the decoder's alone (``tests/test_schemas.py``).
    """

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, json_schema_extra=_ONE_SHAPE_SCHEMA)

    entity: Annotated[str, Field(min_length=1, max_length=256)]
    ts: Annotated[int, WithJsonSchema(_READING_TS_SCHEMA)]
    values: list[FeatureValue] | None = None
    features: dict[str, FeatureValue] | None = None
    label: Annotated[Literal[0, 1] | None, WithJsonSchema({"enum": [0, 1, False, True, None]})] = Field(
        default=None, description="0/1 (or false/true), for evaluation only")

    @field_validator("ts", mode="before")
    @classmethod
    def _ts(cls, v: Any) -> int:
        if isinstance(v, str) and not _ISO_TS.fullmatch(v):
            raise PydanticCustomError("bad_timestamp", "timestamp string is not ISO-8601 (YYYY-MM-DD[THH:MM[:SS[.f]]]"
                                      "[Z|+HH:MM], 1970-3083): {value}", {"value": v[:64]})
        return parse_timestamp_ms(v)  # bounded to [0, MAX_TS_MS): an offset can take 1970-01-01 below zero

    @model_validator(mode="after")
    def _one_shape(self) -> "Reading":
        if (self.values is None) == (self.features is None):
            raise PydanticCustomError("schema", "a reading needs exactly one of 'values' or 'features'")
        return self


class Rejected(Exception):
    """A message that cannot be scored, with its reason code and a human-readable detail."""

    def __init__(self, reason: RejectReason, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    @classmethod
    def internal(cls, exc: Exception) -> "Rejected":
        """An exception no validator foresaw: the message is dead-lettered instead of crash-looping the
        consumer on it; the exception type in the detail says what to fix."""
        return cls(RejectReason.internal, f"{type(exc).__name__}: {str(exc)[:200]}")


class EventTimeBounds(BaseModel):
    """How far a reading's event time may lie from when it was produced. Outside, it is dead-lettered as
    ``clock_skew``: one reading dated 2100 (or in microseconds) would otherwise make every later reading of
    its entity ``late`` and fill the store with future days.

    The reference is the earlier of the message's broker timestamp and the wall clock: a producer can set
    any broker timestamp, and the wall clock alone would judge a re-read (a rebuild) differently from
    the first read. ``None`` switches a side off; the past side is off by default because replaying
    recorded history (``fabwatch replay``) produces old event times now."""

    future_ms: int | None = Field(default=600_000, ge=0)
    past_ms: int | None = Field(default=None, ge=0)

    def outside(self, ts: np.ndarray, broker_ms: np.ndarray | None, now_ms: int | None = None) -> np.ndarray:
        """bool [n]: which event times ``ts`` (int64 [n]) lie outside the bounds; ``broker_ms`` <= 0 is unknown."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        ref = np.full(len(ts), now_ms, np.int64)
        if broker_ms is not None:
            ref = np.where((broker_ms > 0) & (broker_ms < now_ms), broker_ms, ref)
        out = np.zeros(len(ts), bool)
        if self.future_ms is not None:
            out |= ts > ref + self.future_ms
        if self.past_ms is not None:
            out |= ts < ref - self.past_ms
        return out

    def check(self, ts: int, broker_ms: int | None, now_ms: int | None = None) -> None:
        """``Rejected(clock_skew)`` when one event time lies outside the bounds."""
        broker = None if broker_ms is None else np.asarray([broker_ms], np.int64)
        if self.outside(np.asarray([ts], np.int64), broker, now_ms)[0]:
            raise Rejected(RejectReason.clock_skew, self.detail(ts, broker_ms))

    def detail(self, ts: int, broker_ms: int | None) -> str:
        return (f"event time {ts} is more than {self.future_ms} ms after or {self.past_ms} ms before its "
                f"broker timestamp {broker_ms} / the wall clock")


_ERROR_REASONS = {
    "json_invalid": RejectReason.bad_json,
    "finite_number": RejectReason.non_finite,
    "bad_timestamp": RejectReason.bad_timestamp,
}


_M = TypeVar("_M", bound=BaseModel)


def _reason_of(err: ValidationError) -> tuple[RejectReason, str]:
    first = err.errors(include_url=False)[0]
    reason = _ERROR_REASONS.get(first["type"], RejectReason.schema)
    where = ".".join(str(p) for p in first.get("loc", ())) or "message"
    return reason, f"{where}: {first['msg']}"


def _validate_json(model: type[_M], raw: bytes | None, max_bytes: int) -> _M:
    """Raw Kafka value -> ``model``, or ``Rejected`` with a reason; it never raises anything else."""
    if raw is None:
        raise Rejected(RejectReason.bad_json, "empty message (null value)")
    if len(raw) > max_bytes:
        raise Rejected(RejectReason.too_large, f"{len(raw)} bytes exceeds the {max_bytes}-byte limit")
    try:
        return model.model_validate_json(raw)
    except ValidationError as err:
        raise Rejected(*_reason_of(err)) from None
    except Exception as exc:
        raise Rejected.internal(exc) from exc


class ReadingDecoder:
    """Decode raw Kafka values into (reading, float32 vector) in the serving model's feature order."""

    def __init__(self, feature_names: Sequence[str], max_bytes: int = 1_000_000,
                 bounds: EventTimeBounds | None = None):
        """``bounds``: event-time bounds checked by ``decode`` (None: unchecked, for recorded files)."""
        self.feature_names = list(feature_names)
        self.index = {name: i for i, name in enumerate(self.feature_names)}
        self.max_bytes = max_bytes
        self.bounds = bounds

    def decode(self, raw: bytes | None, broker_ms: int | None = None,
               now_ms: int | None = None) -> tuple[Reading, np.ndarray]:
        """(reading, vector), or ``Rejected`` with a reason; it never raises anything else."""
        reading = _validate_json(Reading, raw, self.max_bytes)
        if self.bounds is not None:
            self.bounds.check(reading.ts, broker_ms, now_ms)
        try:
            return reading, self.vector(reading)
        except Rejected:
            raise
        except Exception as exc:
            raise Rejected.internal(exc) from exc

    def vector(self, reading: Reading) -> np.ndarray:
        """float32 [F] in the model's order; finite doubles beyond float32's range are ``non_finite``."""
        with np.errstate(over="ignore"):  # overflow to inf is caught just below
            vec = np.asarray(self._ordered(reading), dtype=np.float32)
        if not np.isfinite(vec).all():
            raise Rejected(RejectReason.non_finite, "a value overflows float32")
        return vec

    def _ordered(self, reading: Reading) -> list[float]:
        width = len(self.feature_names)
        if reading.values is not None:
            if len(reading.values) != width:
                raise Rejected(RejectReason.wrong_width, f"{len(reading.values)} values, the model expects {width}")
            return reading.values
        assert reading.features is not None
        unknown = [k for k in reading.features if k not in self.index]
        if unknown:
            raise Rejected(RejectReason.unknown_feature, f"unknown feature(s) {sorted(unknown)[:5]}")
        missing = [k for k in self.feature_names if k not in reading.features]
        if missing:
            raise Rejected(RejectReason.missing_feature, f"missing feature(s) {missing[:5]}")
        return [reading.features[k] for k in self.feature_names]


class LogKey(BaseModel):
    """One log line's event for one session on ``fabwatch.logkeys`` (key = session). ``line`` is the
    line's position in its source log: it orders a session's keys (lines of one second share ``ts``)."""

    model_config = ConfigDict(extra="ignore")

    session: Annotated[str, Field(min_length=1, max_length=256, description="session id (HDFS: the block id)")]
    ts: int = Field(description="epoch milliseconds of the line (ISO-8601 accepted on input)")
    key: Annotated[str, Field(min_length=1, max_length=256, description="log key (event id of the line's template)")]
    line: int = Field(ge=1, lt=1 << 44, description="line number in the source log, from 1")

    @field_validator("ts", mode="before")
    @classmethod
    def _ts(cls, v: Any) -> int:
        return parse_timestamp_ms(v)


def decode_logkey(raw: bytes | None, max_bytes: int = 1_000_000) -> LogKey:
    """Raw Kafka value -> ``LogKey``, or ``Rejected`` with the same reason codes as readings."""
    return _validate_json(LogKey, raw, max_bytes)


# ---- outgoing messages --------------------------------------------------------------------------

class SourceOffset(BaseModel):
    topic: str
    partition: int
    offset: int


class FeatureContribution(BaseModel):
    name: str
    contribution: float


class Alert(BaseModel):
    """An alert on ``fabwatch.alerts`` (key = entity). ``alert_id`` is deterministic, see ``alert_id_for``."""

    alert_id: str
    entity: str
    kind: Literal["anomaly", "delay", "spike", "log"]
    score: float
    threshold: float
    severity: Literal["info", "warning", "critical"]
    window_start_ts: int
    window_end_ts: int
    model_version: str
    model_scores: dict[str, float] = Field(default_factory=dict)
    weights: dict[str, float] = Field(default_factory=dict)
    top_features: list[FeatureContribution] = Field(default_factory=list)
    source: SourceOffset | None = None
    ingest_to_alert_ms: float | None = None
    state: Literal["open", "closed"] = "open"
    detail: dict[str, Any] = Field(default_factory=dict, description="kind-specific extras (log alerts: expected keys)")
    silence_id: str | None = Field(default=None, description="the maintenance silence this alert fell in, when the "
                                   "processor publishes silenced alerts marked (`serve --silenced-alerts mark`)")


def alert_id_for(entity: str, window_end_ts: int, model_version: str, state: str = "open") -> str:
    """Same entity, window end, model version and state -> same id, so replays and retries dedupe."""
    key = f"{entity}\x1f{window_end_ts}\x1f{model_version}\x1f{state}".encode()
    return hashlib.sha256(key).hexdigest()[:32]


class DeadLetter(BaseModel):
    """A message the processor could not use, on ``fabwatch.dlq``."""

    value_b64: str = Field(description="the original message bytes, base64 (only the first ones when truncated)")
    value_bytes: int = Field(description="length of the original message in bytes")
    value_sha256: str = Field(description="sha256 (hex) of the whole original message")
    truncated: bool = Field(default=False, description="the message was over the dead-letter size limit")
    key: str | None = None
    source: SourceOffset
    reason: RejectReason
    detail: str
    ts: int = Field(description="epoch ms when it was dead-lettered")


class ModelEvent(BaseModel):
    """A registry change on ``fabwatch.models``; processors hot-reload on it. ``version`` names a folder
    inside the registry and ``sha256`` is its model.onnx's: an event can point at a version, not at a path."""

    version: str = Field(pattern=VERSION_PATTERN, max_length=32)
    action: Literal["promoted", "rolled_back"]
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    ts: int


SILENCE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class Silence(BaseModel):
    """A maintenance silence on ``fabwatch.silences`` (compacted, key = ``id``; a null value removes it).

    An open alert of a matching entity whose window end (event time) lies in ``[starts, until)`` is not
    published; ``fabwatch.stream.silences`` decides, for the processor and ``evaluate --silences`` alike."""

    model_config = ConfigDict(extra="ignore")

    id: str = Field(pattern=SILENCE_ID_PATTERN, description="the topic key; adding the same id again replaces it")
    entity: Annotated[str | None, Field(min_length=1, max_length=256, description="silence this entity")] = None
    match: Annotated[str | None, Field(min_length=1, max_length=256, description="or every entity this glob "
                                       "matches (fnmatch, case-sensitive: *, ?, [seq])")] = None
    starts: int = Field(description="epoch ms (event time) from which alerts are silenced (ISO-8601 accepted)")
    until: int = Field(description="epoch ms (event time) from which alerts flow again (ISO-8601 accepted)")
    reason: Annotated[str, Field(min_length=1, max_length=1000)]
    created_by: str = ""
    created_at: int = Field(description="epoch ms when it was added")

    @field_validator("starts", "until", "created_at", mode="before")
    @classmethod
    def _ts(cls, v: Any) -> int:
        return parse_timestamp_ms(v)

    @model_validator(mode="after")
    def _target_and_span(self) -> "Silence":
        if (self.entity is None) == (self.match is None):
            raise PydanticCustomError("schema", "a silence needs exactly one of 'entity' or 'match'")
        if self.until <= self.starts:
            raise PydanticCustomError("schema", "a silence's 'until' must lie after its 'starts'")
        return self


def decode_silence(raw: bytes | None, max_bytes: int = 64_000) -> Silence:
    """Raw Kafka value -> ``Silence``, or ``Rejected`` with a reason (the processor logs and skips it)."""
    return _validate_json(Silence, raw, max_bytes)


def decode_alert(raw: bytes | None, max_bytes: int = 1_000_000) -> Alert:
    """Raw Kafka value -> ``Alert``, or ``Rejected`` with a reason (``alerts forward`` dead-letters it)."""
    return _validate_json(Alert, raw, max_bytes)


def decode_model_event(raw: bytes | None, max_bytes: int = 64_000) -> ModelEvent:
    """Raw Kafka value -> ``ModelEvent``, or ``Rejected`` with a reason (the watcher logs and skips it)."""
    return _validate_json(ModelEvent, raw, max_bytes)


MESSAGE_MODELS: dict[str, type[BaseModel]] = {
    "reading": Reading, "log_key": LogKey, "alert": Alert, "dead_letter": DeadLetter, "model_event": ModelEvent,
    "silence": Silence,
}
