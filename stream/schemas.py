"""Wire messages (JSON) and the reading decoder that turns raw bytes into a feature vector or a reason.

Every rejection carries a machine-readable reason code (``RejectReason``) that ends up on the DLQ.
"""

from __future__ import annotations

import hashlib
import math
import re
from datetime import datetime, timezone
from enum import StrEnum
from typing import Annotated, Any, Literal, Sequence

import numpy as np
from pydantic import (BaseModel, ConfigDict, Field, StrictFloat, ValidationError, WithJsonSchema,
                      field_validator, model_validator)
from pydantic_core import PydanticCustomError


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


Number = StrictFloat  # ints are accepted; "1.5" (a string) is a schema error, not a number


def parse_timestamp_ms(value: Any) -> int:
    """Epoch milliseconds (number) or ISO-8601 (string; naive means UTC) -> epoch ms."""
    if isinstance(value, bool):
        raise PydanticCustomError("bad_timestamp", "timestamp must be epoch ms or ISO-8601, got a boolean")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise PydanticCustomError("bad_timestamp", "timestamp must be a finite, non-negative epoch ms")
        return int(value)
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            raise PydanticCustomError("bad_timestamp", "timestamp string is not ISO-8601: {value}", {"value": value[:64]})
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        return int(dt.timestamp() * 1000)
    raise PydanticCustomError("bad_timestamp", "timestamp must be epoch ms or ISO-8601")


MAX_TS_MS = 1 << 45  # the window store's limit (year 3084)
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
        ms = parse_timestamp_ms(v)
        if ms >= MAX_TS_MS or ms < 0:  # an offset can take 1970-01-01 below zero
            raise PydanticCustomError("bad_timestamp", "timestamp out of range")
        return ms

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


_ERROR_REASONS = {
    "json_invalid": RejectReason.bad_json,
    "finite_number": RejectReason.non_finite,
    "bad_timestamp": RejectReason.bad_timestamp,
}


def _reason_of(err: ValidationError) -> tuple[RejectReason, str]:
    first = err.errors(include_url=False)[0]
    reason = _ERROR_REASONS.get(first["type"], RejectReason.schema)
    where = ".".join(str(p) for p in first.get("loc", ())) or "message"
    return reason, f"{where}: {first['msg']}"


class ReadingDecoder:
    """Decode raw Kafka values into (reading, float32 vector) in the serving model's feature order."""

    def __init__(self, feature_names: Sequence[str], max_bytes: int = 1_000_000):
        self.feature_names = list(feature_names)
        self.index = {name: i for i, name in enumerate(self.feature_names)}
        self.max_bytes = max_bytes

    def decode(self, raw: bytes | None) -> tuple[Reading, np.ndarray]:
        if raw is None:
            raise Rejected(RejectReason.bad_json, "empty message (null value)")
        if len(raw) > self.max_bytes:
            raise Rejected(RejectReason.too_large, f"{len(raw)} bytes exceeds the {self.max_bytes}-byte limit")
        try:
            reading = Reading.model_validate_json(raw)
        except ValidationError as err:
            raise Rejected(*_reason_of(err)) from None
        return reading, self.vector(reading)

    def vector(self, reading: Reading) -> np.ndarray:
        width = len(self.feature_names)
        if reading.values is not None:
            if len(reading.values) != width:
                raise Rejected(RejectReason.wrong_width, f"{len(reading.values)} values, the model expects {width}")
            return np.asarray(reading.values, dtype=np.float32)
        assert reading.features is not None
        unknown = [k for k in reading.features if k not in self.index]
        if unknown:
            raise Rejected(RejectReason.unknown_feature, f"unknown feature(s) {sorted(unknown)[:5]}")
        missing = [k for k in self.feature_names if k not in reading.features]
        if missing:
            raise Rejected(RejectReason.missing_feature, f"missing feature(s) {missing[:5]}")
        return np.asarray([reading.features[k] for k in self.feature_names], dtype=np.float32)


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
    if raw is None:
        raise Rejected(RejectReason.bad_json, "empty message (null value)")
    if len(raw) > max_bytes:
        raise Rejected(RejectReason.too_large, f"{len(raw)} bytes exceeds the {max_bytes}-byte limit")
    try:
        return LogKey.model_validate_json(raw)
    except ValidationError as err:
        raise Rejected(*_reason_of(err)) from None


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


def alert_id_for(entity: str, window_end_ts: int, model_version: str, state: str = "open") -> str:
    """Same entity, window end, model version and state -> same id, so replays and retries dedupe."""
    key = f"{entity}\x1f{window_end_ts}\x1f{model_version}\x1f{state}".encode()
    return hashlib.sha256(key).hexdigest()[:32]


class DeadLetter(BaseModel):
    """A message the processor could not use, on ``fabwatch.dlq``."""

    value_b64: str = Field(description="the original message bytes, base64")
    key: str | None = None
    source: SourceOffset
    reason: RejectReason
    detail: str
    ts: int = Field(description="epoch ms when it was dead-lettered")


class ModelEvent(BaseModel):
    """A registry change on ``fabwatch.models``; processors hot-reload on it."""

    version: str
    action: Literal["promoted", "rolled_back"]
    sha256: str
    ts: int


MESSAGE_MODELS: dict[str, type[BaseModel]] = {
    "reading": Reading, "log_key": LogKey, "alert": Alert, "dead_letter": DeadLetter, "model_event": ModelEvent,
}
