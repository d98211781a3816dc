"""``python -m fabwatch.stream.bench.policy_state``: how many non-quiet keys of one partition fit in the
committed offset's metadata (``MAX_OFFSET_METADATA`` characters), packed as ``AlertPolicy.export_state``
does, against the JSON that fabwatch carried before. No broker, no model: the state is synthetic.

Names: ``tool-0042`` (a numbered fleet), ``fab2/etch-017/ch-3`` (a hierarchy), UUIDs (no shared structure).
States: ``open`` (open alerts seen within the last hour) and ``mixed`` (a third each of open alerts, runs
and cooldowns that closed within the last 10 minutes).
"""

from __future__ import annotations

import json
import platform
import random
import sys
import uuid
from typing import Callable

from fabwatch.export.registry import Manifest, Thresholds
from fabwatch.stream.policy import MINUTE_MS, AlertPolicy, KeyState
from fabwatch.stream.processor import MAX_OFFSET_METADATA
NOW_MS = 1_790_000_000_000
FLEET = 20_000

NAMES: dict[str, Callable[[int], str]] = {
    "tool-0042": lambda i: f"tool-{i:05d}",
    "fab/etch/ch": lambda i: f"fab{i % 3}/etch-{i // 12:04d}/ch-{i % 4}",
    "uuid": lambda i: str(uuid.UUID(int=random.Random(i).getrandbits(128))),
}


def _state(kind: str, i: int, rng: random.Random) -> KeyState:
    last_ms = NOW_MS - rng.randrange(3_600_000)
    role = "open" if kind == "open" else ("open", "run", "cooldown")[i % 3]
    return KeyState(partition=0, open=role == "open", run=1 if role == "run" else 0,
                    closed_at=last_ms - rng.randrange(600_000) if role == "cooldown" else -1,
                    last_min=last_ms // MINUTE_MS)


def _policy(names: Callable[[int], str], kind: str, n: int) -> AlertPolicy:
    rng = random.Random(n)
    policy = AlertPolicy(Manifest(version="v1", created="", task="classify", feature_names=["x"], window=2,
                                  thresholds=Thresholds(alert=1.0, close=0.5)))
    for i in sorted(rng.sample(range(FLEET), n)):
        policy.states[names(i)] = _state(kind, i, rng)
    policy._clock_min[0] = NOW_MS // MINUTE_MS
    return policy


def _json_chars(policy: AlertPolicy) -> int:
    """The layout before: ``{"entity": [open, run, closed_at], ...}``."""
    return len(json.dumps({e: [int(s.open), s.run, s.closed_at] for e, s in policy.states.items()},
                          separators=(",", ":")))


def _fits(chars: Callable[[AlertPolicy], int], names: Callable[[int], str], kind: str) -> int:
    """The most keys whose state is at most MAX_OFFSET_METADATA characters (binary search)."""
    lo, hi = 0, 5_000
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if chars(_policy(names, kind, mid)) <= MAX_OFFSET_METADATA:
            lo = mid
        else:
            hi = mid - 1
    return lo


def main() -> None:
    print(f"# {platform.node()} python {platform.python_version()}: {' '.join(sys.argv)}")
    print(f"non-quiet keys of one partition that fit in {MAX_OFFSET_METADATA} characters of offset metadata")
    print(f"{'names':<14}{'states':<8}{'json (before)':>15}{'packed (after)':>16}{'chars/key':>11}")
    for label, names in NAMES.items():
        for kind in ("open", "mixed"):
            before = _fits(_json_chars, names, kind)
            after = _fits(lambda p: len(p.export_state(0)), names, kind)
            per_key = len(_policy(names, kind, after).export_state(0)) / max(after, 1)
            print(f"{label:<14}{kind:<8}{before:>15}{after:>16}{per_key:>11.2f}")


if __name__ == "__main__":
    main()
