"""Synthetic fab material-handling data: overhead hoist vehicles (OHT) and stockers with daily load cycles,
sensor noise and labelled injected events. Deterministic by seed. No TensorFlow here (the stream side reuses it).

Every row is one reading: ``entity, ts (epoch ms), <12 features>, label (0/1), event`` where ``event`` names the
injected event covering that row (``""`` when normal) and ``label`` is 1 where the event shows in the data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from fabwatch.export.errors import UsageError

FEATURES: tuple[str, ...] = (
    "speed_mps", "accel_mps2", "motor_current_a", "motor_temp_c", "vibration_rms_mm_s", "position_error_mm",
    "battery_v", "wheel_slip_pct", "transfer_time_s", "queue_len", "load_port_wait_s", "comm_latency_ms",
)
EVENTS: tuple[str, ...] = ("spike", "level_shift", "drift", "stuck", "delay")
STEP_MS = 60_000                      # one reading per minute
DAY_STEPS = 24 * 60
START_MS = 1_767_225_600_000          # 2026-01-01T00:00:00Z
# per feature: level at zero load, gain with load, noise std, AR(1) coefficient of the noise
_BASE = np.array([2.6, 0.0, 10.0, 42.0, 2.0, 1.0, 48.0, 1.0, 30.0, 2.0, 10.0, 20.0])
_GAIN = np.array([-0.6, 0.0, 8.0, 14.0, 0.8, 0.4, -2.0, 0.8, 25.0, 8.0, 40.0, 6.0])
_NOISE = np.array([0.08, 0.05, 0.6, 0.6, 0.15, 0.12, 0.15, 0.15, 2.0, 0.8, 3.0, 2.0])
_AR = np.array([0.6, 0.0, 0.5, 0.95, 0.6, 0.3, 0.9, 0.4, 0.5, 0.8, 0.6, 0.3])
_IDX = {name: i for i, name in enumerate(FEATURES)}


def _normal_series(rng: np.random.Generator, steps: int) -> np.ndarray:
    """Daily load cycle (two shifts, random phase) driving every feature, plus AR(1) noise per feature."""
    t = np.arange(steps)
    phase = rng.uniform(0, 2 * np.pi)
    load = 0.5 + 0.3 * np.sin(2 * np.pi * t / DAY_STEPS + phase) + 0.1 * np.sin(4 * np.pi * t / DAY_STEPS + 2 * phase)
    load = np.clip(load + 0.05 * rng.standard_normal(steps), 0.0, 1.0)
    eps = rng.standard_normal((steps, len(FEATURES))) * _NOISE * np.sqrt(1 - _AR**2)
    noise = np.empty_like(eps)
    noise[0] = eps[0]
    for i in range(1, steps):  # AR(1) recursion: inherently sequential, one vector op per step
        noise[i] = _AR * noise[i - 1] + eps[i]
    x = _BASE + np.outer(load, _GAIN) + noise
    x[:, _IDX["accel_mps2"]] = np.gradient(x[:, _IDX["speed_mps"]]) + 0.05 * rng.standard_normal(steps)
    x[:, _IDX["battery_v"]] -= 1.5 * ((t % 480) / 480)          # discharge / recharge every 8 hours
    x[:, _IDX["queue_len"]] = np.maximum(np.round(x[:, _IDX["queue_len"]]), 0)
    return x


def _spike(x: np.ndarray, rng: np.random.Generator, start: int) -> int:
    length = int(rng.integers(1, 4))
    cols = rng.choice(len(FEATURES), size=int(rng.integers(1, 3)), replace=False)
    x[start:start + length, cols] += rng.choice([-1, 1], size=len(cols)) * rng.uniform(6, 10, len(cols)) * _NOISE[cols]
    return length


def _level_shift(x: np.ndarray, rng: np.random.Generator, start: int) -> int:
    length = int(rng.integers(60, 200))
    col = int(rng.integers(len(FEATURES)))
    x[start:start + length, col] += rng.choice([-1, 1]) * rng.uniform(4, 7) * _NOISE[col]
    return length


def _stuck(x: np.ndarray, rng: np.random.Generator, start: int) -> int:
    length = int(rng.integers(60, 200))
    col = int(rng.integers(len(FEATURES)))
    x[start:start + length, col] = x[start, col]
    return length


def _delay(x: np.ndarray, rng: np.random.Generator, start: int, length: int | None = None) -> int:
    length = length or int(rng.integers(40, 150))
    ramp = np.minimum(np.arange(length) / 10.0, 1.0)[:, None]
    severity = rng.uniform(3, 6)
    for name, sign in (("transfer_time_s", 1), ("load_port_wait_s", 1), ("queue_len", 1), ("speed_mps", -1)):
        col = _IDX[name]
        x[start:start + length, col:col + 1] += sign * severity * _NOISE[col] * ramp
    return length


def _drift(x: np.ndarray, rng: np.random.Generator, start: int) -> int:
    """Wear: vibration and motor temperature rise slowly; the drift ends in a delay episode."""
    length = int(rng.integers(200, 500))
    ramp = np.linspace(0, 1, length)[:, None]
    for name in ("vibration_rms_mm_s", "motor_temp_c", "motor_current_a"):
        col = _IDX[name]
        x[start:start + length, col:col + 1] += rng.uniform(4, 7) * _NOISE[col] * ramp
    return length


_INJECTORS: dict[str, Callable[[np.ndarray, np.random.Generator, int], int]] = {
    "spike": _spike, "level_shift": _level_shift, "drift": _drift, "stuck": _stuck, "delay": _delay}
# events are dealt from a shuffled deck, so every entity gets every kind (spikes are short: two of them)
_DECK = ("spike", "spike", "level_shift", "drift", "stuck", "delay")
DRIFT_UNLABELLED = 0.4  # first share of a drift left unlabelled
_TAIL = 700  # rows generated past the end so an event near the end is cut off, not left out
_MEAN_LEN = {"spike": 2, "level_shift": 130, "drift": 350 + 60, "stuck": 130, "delay": 95}


def _inject(x: np.ndarray, rng: np.random.Generator, anomaly_rate: float) -> tuple[np.ndarray, np.ndarray]:
    """Place non-overlapping events, about ``anomaly_rate`` of the rows, one after another with random normal
    stretches between them (``x`` has ``_TAIL`` extra rows at its end, cut off afterwards)."""
    steps = len(x) - _TAIL
    event = np.full(len(x), "", dtype=object)
    label = np.zeros(len(x), np.int8)
    mean_len = float(np.mean([_MEAN_LEN[e] for e in _DECK]))
    mean_gap = mean_len * (1 - anomaly_rate) / anomaly_rate
    start = int(rng.integers(50, 50 + mean_gap))
    deck: list[str] = []
    while start < steps:
        deck = deck or list(rng.permutation(_DECK))
        kind = str(deck.pop())
        end = start + _INJECTORS[kind](x, rng, start)
        event[start:end] = kind
        # a drift's early ramp is below the noise floor: labelled from where it reaches about 2 noise std
        label[start + int(DRIFT_UNLABELLED * (end - start)) if kind == "drift" else start:end] = 1
        if kind == "drift":  # wear leads to a delay episode right after the drift
            delay_end = end + _delay(x, rng, end, int(rng.integers(40, 100)))
            event[end:delay_end] = "delay"
            label[end:delay_end] = 1
            end = delay_end
        start = end + 20 + int(rng.exponential(mean_gap))  # a normal stretch between events
    return label[:steps], event[:steps]


def generate(entities: int = 8, steps: int = 10_080, seed: int = 0, anomaly_rate: float = 0.05) -> pa.Table:
    """The synthetic readings as an Arrow table, rows ordered by entity then time."""
    if entities < 1 or steps < 1:
        raise UsageError("--entities and --steps must be at least 1")
    if not 0.0 <= anomaly_rate < 0.5:
        raise UsageError(f"--anomaly-rate must be in [0, 0.5), got {anomaly_rate}")
    root = np.random.SeedSequence(seed)
    columns: dict[str, list[np.ndarray]] = {k: [] for k in ("entity", "ts", *FEATURES, "label", "event")}
    for e, child in enumerate(root.spawn(entities)):
        rng = np.random.default_rng(child)
        x = _normal_series(rng, steps + _TAIL)
        label, event = _inject(x, rng, anomaly_rate) if anomaly_rate > 0 else (
            np.zeros(steps, np.int8), np.full(steps, "", dtype=object))
        x = x[:steps]
        kind = "OHT" if e % 4 else "STK"
        columns["entity"].append(np.full(steps, f"{kind}-{e:03d}", dtype=object))
        columns["ts"].append(START_MS + np.arange(steps, dtype=np.int64) * STEP_MS)
        for i, name in enumerate(FEATURES):
            columns[name].append(x[:, i].astype(np.float32))
        columns["label"].append(label)
        columns["event"].append(event)
    return pa.table({k: np.concatenate(v) for k, v in columns.items()})


def check_out(out: Path) -> None:
    if out.suffix.lower() not in (".parquet", ".pq", ".csv"):
        raise UsageError(f"--out must end in .parquet or .csv, got {out.name}")


def write(table: pa.Table, out: Path) -> None:
    """Parquet for ``.parquet``/``.pq``, CSV for ``.csv``."""
    check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, out)
    else:
        import pyarrow.parquet as pq

        pq.write_table(table, out)
