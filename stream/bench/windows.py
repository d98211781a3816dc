"""``python -m fabwatch.stream.bench.windows``: what out-of-order readings cost the window store.

Readings of 200 keys, one a second each, appended in polls of 512 as the processor does: in order, and
with 1 % and 10 % of them delayed 1-3 s (inside the default ``--grace-ms``, so they are put in order).
Rates are readings per CPU second of this process (best of the rounds), which a shared machine disturbs
less than the wall clock. No broker, no model.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Sequence

import numpy as np

from fabwatch.stream.bench.stream import machine
from fabwatch.stream.windows import DEFAULT_GRACE_MS, WindowStore

KEYS, WINDOW, FEATURES, POLL = 200, 100, 12, 512


def _stream(n: int, delayed: float, seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``n`` readings in arrival order, ``delayed`` of them arriving 1-3 s after their timestamp."""
    rng = np.random.default_rng(seed)
    keys = [f"E{i % KEYS:05d}" for i in range(n)]
    ts = 1_700_000_000_000 + (np.arange(n, dtype=np.int64) // KEYS) * 1000
    arrival = ts + np.where(rng.random(n) < delayed, rng.integers(1000, 3001, n), 0)
    order = np.argsort(arrival, kind="stable")
    return [keys[i] for i in order], ts[order], rng.standard_normal((n, FEATURES)).astype(np.float32)


def _rate(keys: Sequence[str], ts: np.ndarray, values: np.ndarray, grace_ms: int) -> tuple[float, int]:
    store = WindowStore(WINDOW, FEATURES, grace_ms=grace_ms)
    start = time.process_time()
    for lo in range(0, len(keys), POLL):
        store.append(keys[lo:lo + POLL], ts[lo:lo + POLL], values[lo:lo + POLL])
    return len(keys) / (time.process_time() - start), store.counters.reordered


def run(n: int = 200_000, rounds: int = 3) -> dict:
    cases = {"in order, grace 0": (0.0, 0), "in order": (0.0, DEFAULT_GRACE_MS),
             "1 % delayed 1-3 s": (0.01, DEFAULT_GRACE_MS), "10 % delayed 1-3 s": (0.10, DEFAULT_GRACE_MS)}
    streams = {name: _stream(n, delayed) for name, (delayed, _) in cases.items()}
    rates: dict[str, list[float]] = {name: [] for name in cases}
    reordered: dict[str, int] = {}
    for _ in range(rounds):  # alternated: a shared machine is noisy
        for name, (_, grace) in cases.items():
            rate, reordered[name] = _rate(*streams[name], grace)
            rates[name].append(round(rate))
    return {"command": " ".join(["python -m fabwatch.stream.bench.windows", *sys.argv[1:]]),
            "machine": machine(),
            "readings": n, "keys": KEYS, "window": WINDOW, "features": FEATURES, "poll": POLL,
            "grace_ms": DEFAULT_GRACE_MS,
            "readings_per_cpu_s": {name: {"best": max(r), "rounds": r, "reordered": reordered[name]}
                                   for name, r in rates.items()}}


if __name__ == "__main__":
    print(json.dumps(run(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000), indent=2))
