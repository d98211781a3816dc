"""DeepLog's parameter-value check, kept small: per log key, the range of each value a line carries.

DeepLog (Du et al., CCS 2017, section 3.2) models, per log key, the vector of values its lines carry
(the time since the previous line first, then the template's numeric parameters) and flags a line
whose values fall outside what normal runs showed. Here each value has its own learned range rather
than an LSTM over the vector: a line is anomalous when one value is outside its key's range, and the
alert names the value, the range and the key, so an operator can read it.

Values per line (raw HDFS lines with their header time; sessions are blocks, as for the keys):
``gap_s``, the seconds since the previous line of the same session (absent on a session's first
line), and ``p1``, ``p2``, ... the standalone integers in the line's content (``Received block ..
of size 67108864``: ``p1`` = 67108864; block ids, addresses and ports are not standalone), used
for a key only when every training line of that key carries the same number of them.

Range per (key, value): on ``log1p(value)`` (gaps and sizes are heavy-tailed), the median m and the
median absolute deviation s of the training lines, with a floor on s (``MIN_SCALE``) so that a value
constant in training still tolerates rounding; a value is in range when ``|log1p(v) - m| / s <= t``.
t is chosen on sessions held out of the fit: the ``quantile`` of the held-out lines' scores for that
key and value, never below ``MIN_THRESHOLD``; stored as the range ``[lo, hi]`` in the value's own unit.

Serving side, plain JSON (pydantic), numpy only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from pydantic import BaseModel, Field

from fabwatch.export.errors import UsageError, read_json_model
from fabwatch.stream.logs.parse import DrainState, hdfs_lines, make_matcher

NUMBER = re.compile(r"(?<![\w.:/-])\d+(?![\w.:/-])")   # a standalone integer: not part of an id, address or path
MIN_SCALE = 0.05       # log1p units: about 5 %; a value constant in training does not flag its own rounding
MIN_THRESHOLD = 4.0    # robust z: a held-out set without spread does not shrink the range to nothing


@dataclass(frozen=True)
class ParamEvent:
    """One line of one session: its key and its values (``gap_s`` is None on a session's first line)."""

    line_id: int
    session: str
    key: str
    gap_s: float | None
    params: tuple[int, ...]


def read_events(path: Path, templates: Path | None = None, drain: DrainState | None = None) -> list[ParamEvent]:
    """Raw HDFS lines -> events with their values, in line order; keys as ``logs parse`` gives them."""
    matcher = make_matcher(path, templates, drain)
    events: list[ParamEvent] = []
    last_ts: dict[str, int] = {}
    try:
        with open(path, errors="replace") as f:
            for line_id, content, blocks, ts in hdfs_lines(f):
                key = matcher.event_id(content)
                params = tuple(int(n) for n in NUMBER.findall(content))
                for block in blocks:
                    prev = last_ts.get(block)
                    events.append(ParamEvent(line_id, block, key, None if prev is None else (ts - prev) / 1000.0,
                                             params))
                    last_ts[block] = ts
    except FileNotFoundError:
        raise UsageError(f"log file {path} not found") from None
    return events


class ValueRange(BaseModel):
    key: str
    value: str = Field(description="gap_s, or p1, p2, ... (the key's numeric parameters in order)")
    lo: float
    hi: float
    lines: int = Field(description="training lines the range was fitted on")


class ParamModel(BaseModel):
    """Per key and value, the range normal lines stay in. Plain JSON."""

    format: Literal["fabwatch-params/1"] = "fabwatch-params/1"
    ranges: list[ValueRange]
    quantile: float
    holdout_sessions: int

    @classmethod
    def read(cls, path: Path) -> "ParamModel":
        return read_json_model(cls, path, "parameter model")

    def write(self, path: Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=1))

    def check(self, events: Sequence[ParamEvent]) -> list[dict[str, object]]:
        """The out-of-range values, one finding per line (its first value out of range)."""
        ranges: dict[str, list[ValueRange]] = {}
        for r in self.ranges:
            ranges.setdefault(r.key, []).append(r)
        findings = []
        for e in events:
            for r in ranges.get(e.key, []):
                v = _value(e, r.value)
                if v is not None and not r.lo <= v <= r.hi:
                    findings.append({"line_id": e.line_id, "session": e.session, "key": e.key, "value": r.value,
                                     "observed": v, "lo": r.lo, "hi": r.hi,
                                     "detail": f"{r.value}={v:g} outside [{r.lo:g}, {r.hi:g}] for key {e.key}"})
                    break
        return findings


def _value(event: ParamEvent, name: str) -> float | None:
    if name == "gap_s":
        return event.gap_s
    i = int(name[1:]) - 1
    return float(event.params[i]) if i < len(event.params) else None


def _values_by_key(events: Sequence[ParamEvent]) -> dict[tuple[str, str], list[float]]:
    """(key, value name) -> values; numeric parameters only for keys whose lines all carry as many."""
    widths: dict[str, set[int]] = {}
    for e in events:
        widths.setdefault(e.key, set()).add(len(e.params))
    out: dict[tuple[str, str], list[float]] = {}
    for e in events:
        if e.gap_s is not None:
            out.setdefault((e.key, "gap_s"), []).append(e.gap_s)
        if len(widths[e.key]) == 1:
            for i, p in enumerate(e.params):
                out.setdefault((e.key, f"p{i + 1}"), []).append(float(p))
    return out


def fit_param_model(events: Sequence[ParamEvent], holdout: float = 0.2, quantile: float = 0.999,
                    seed: int = 0) -> ParamModel:
    """Ranges from normal lines: centre and spread from the fit sessions, width from the held-out ones."""
    sessions = sorted({e.session for e in events})
    if len(sessions) < 2:
        raise UsageError("the parameter model needs at least two sessions (one to hold out)")
    order = np.random.default_rng(seed).permutation(len(sessions))
    held_out = {sessions[i] for i in order[int(len(sessions) * (1 - holdout)):]}
    fit_values = _values_by_key([e for e in events if e.session not in held_out])
    held_values = _values_by_key([e for e in events if e.session in held_out])
    ranges = []
    for (key, name), values in sorted(fit_values.items()):
        x = np.log1p(np.maximum(values, 0.0))
        centre = float(np.median(x))
        scale = max(float(np.median(np.abs(x - centre))), MIN_SCALE)
        held = np.log1p(np.maximum(held_values.get((key, name), []), 0.0))
        t = max(float(np.quantile(np.abs(held - centre) / scale, quantile)) if len(held) else 0.0, MIN_THRESHOLD)
        ranges.append(ValueRange(key=key, value=name, lo=max(float(np.expm1(centre - t * scale)), 0.0),
                                 hi=float(np.expm1(centre + t * scale)), lines=len(values)))
    return ParamModel(ranges=ranges, quantile=quantile, holdout_sessions=len(held_out))
