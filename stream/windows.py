"""Per-key sliding windows in preallocated numpy ring buffers.

A batch of readings is appended with a handful of vectorised numpy operations: the only per-message
Python work is the dict lookup of each key's slot. Duplicate / late detection, ring positions, the
stride choice and the gathering of ready windows are all array operations.

A reading whose timestamp equals its key's latest is a re-send: an identical one (same values) is a
``DUPLICATE``, dropped and counted (at-least-once producers retry); one with other values is a
``CONFLICT``, which callers dead-letter, because the window keeps the first and a correction must not
vanish silently. The label is not compared: it only matters offline.

The ring holds ``2 * window`` steps so that a key may receive up to ``window`` more readings in the
same batch after one of its windows became ready, and that window is still intact when it is
gathered at the end of the batch (bigger per-key bursts are split automatically). The first
``window - 1`` ring positions are mirrored past its end, so every window is one contiguous slice of
a key's buffer and gathering a batch of windows is a block copy per window.

Which readings are scored at stride K is a pure function of the data (a hash of the entity and the
reading's timestamp selects on average one reading in K), not of a counter: a restart, a rebalance,
two instances sharing the partitions, and the offline evaluator all pick exactly the same windows.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

OK, DUPLICATE, LATE, CONFLICT = 0, 1, 2, 3
_TS_SPAN = np.int64(1 << 45)  # timestamps (epoch ms) must be below this (year 3084) for the segment trick
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def key_hash(key: str) -> int:
    """A process-independent 64-bit hash (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * _MIX1
    x = x ^ (x >> np.uint64(27))
    x = x * _MIX2
    return x ^ (x >> np.uint64(31))


def stride_selects(hashes: np.ndarray, ts: np.ndarray, stride: int) -> np.ndarray:
    """Boolean mask: is the reading (entity hash, ts) one of the ~1/stride that get scored."""
    if stride <= 1:
        return np.ones(len(ts), dtype=bool)
    mixed = _splitmix(hashes.astype(np.uint64) ^ ts.astype(np.uint64))
    return (mixed % np.uint64(stride)) == 0


@dataclass
class AppendResult:
    """Outcome of one ``append``: a status per input reading and the windows that are ready to score."""

    status: np.ndarray                 # int8 [n]: OK, DUPLICATE, LATE or CONFLICT
    ready: np.ndarray                  # int64 [m]: indices into the batch, ascending
    windows: np.ndarray                # float32 [m, window, F]
    window_start_ts: np.ndarray        # int64 [m]


@dataclass
class WindowCounters:
    appended: int = 0
    duplicates: int = 0
    conflicts: int = 0
    late: int = 0
    evicted_ttl: int = 0
    evicted_cap: int = 0


class WindowStore:
    """Ring buffers for up to ``max_keys`` live keys; idle keys are evicted after ``ttl_s`` seconds."""

    def __init__(self, window: int, n_features: int, stride: int = 1, max_keys: int = 100_000,
                 ttl_s: float | None = 6 * 3600.0, initial_capacity: int = 256):
        if window < 1 or n_features < 1 or stride < 1 or max_keys < 1:
            raise ValueError("window, n_features, stride and max_keys must be positive")
        self.window, self.n_features, self.stride = window, n_features, stride
        self.max_keys, self.ttl_s = max_keys, ttl_s
        self.ring = 2 * window
        self.counters = WindowCounters()
        self._slot: dict[str, int] = {}
        self._keys: list[str | None] = []
        self._free: list[int] = []
        self._alloc(min(initial_capacity, max_keys))

    # ---- storage ----------------------------------------------------------------------------
    def _alloc(self, capacity: int) -> None:
        """Grow the preallocated arrays to ``capacity`` slots (amortised doubling, bounded by max_keys)."""
        old = len(self._keys)
        length = self.ring + self.window - 1  # the mirror of positions [0, window - 1)
        values = np.zeros((capacity, length, self.n_features), dtype=np.float32)
        ts = np.zeros((capacity, length), dtype=np.int64)
        count = np.zeros(capacity, dtype=np.int64)
        last_ts = np.full(capacity, -1, dtype=np.int64)
        seen = np.zeros(capacity, dtype=np.float64)
        hashes = np.zeros(capacity, dtype=np.uint64)
        part = np.full(capacity, -1, dtype=np.int32)
        live = np.zeros(capacity, dtype=bool)
        if old:
            live[:old] = self._live
            values[:old], ts[:old], count[:old] = self._values, self._ts, self._count
            last_ts[:old], seen[:old], hashes[:old], part[:old] = self._last_ts, self._seen, self._hash, self._part
        self._values, self._ts, self._count, self._last_ts = values, ts, count, last_ts
        self._seen, self._hash, self._part, self._live = seen, hashes, part, live
        self._keys.extend([None] * (capacity - old))
        self._free.extend(range(capacity - 1, old - 1, -1))

    def _new_slot(self, key: str, now: float, protected: set[int]) -> int:
        """A slot for ``key``; at the cap the least recently seen key is evicted, never one of ``protected``
        (the keys of the call in hand: their readings are already routed to their slots)."""
        if not self._free:
            if len(self._keys) < self.max_keys:
                self._alloc(min(self.max_keys, 2 * len(self._keys)))
            else:
                candidates = self._live.copy()
                candidates[list(protected)] = False
                victim = int(np.argmin(np.where(candidates, self._seen, np.inf)))
                self._release(victim)
                self.counters.evicted_cap += 1
        slot = self._free.pop()
        self._slot[key] = slot
        self._keys[slot] = key
        self._live[slot] = True
        self._count[slot], self._last_ts[slot], self._seen[slot] = 0, -1, now
        self._hash[slot] = np.uint64(key_hash(key))
        return slot

    def _release(self, slot: int) -> None:
        key = self._keys[slot]
        if key is not None:
            del self._slot[key]
            self._keys[slot] = None
            self._live[slot] = False
            self._free.append(slot)

    # ---- public -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, key: str) -> bool:
        return key in self._slot

    def keys(self) -> list[str]:
        return list(self._slot)

    def last_ts(self, key: str) -> int | None:
        slot = self._slot.get(key)
        return None if slot is None or self._last_ts[slot] < 0 else int(self._last_ts[slot])

    def filled(self, key: str) -> int:
        """Readings currently held for ``key`` (at most ``window``)."""
        slot = self._slot.get(key)
        return 0 if slot is None else int(min(self._count[slot], self.window))

    def keys_in(self, partitions: Sequence[int]) -> list[str]:
        """Live keys whose latest reading came from one of ``partitions``."""
        wanted = set(partitions)
        return [k for k, slot in self._slot.items() if int(self._part[slot]) in wanted]

    def drop(self, keys: Sequence[str]) -> None:
        """Forget keys (their partition was revoked: the new owner rebuilds them)."""
        for key in keys:
            slot = self._slot.get(key)
            if slot is not None:
                self._release(slot)

    def remap(self, table: np.ndarray, feature: int = 0) -> None:
        """Replace every held value ``v`` of ``feature`` by ``table[int(v)]`` (the log server re-encodes the key
        ids it holds when a new model brings another vocabulary)."""
        held = self._values[:, :, feature]
        self._values[:, :, feature] = np.asarray(table, np.float32)[held.astype(np.int64)]

    def evict_idle(self, now: float | None = None) -> int:
        """Release keys not seen for ``ttl_s`` seconds; returns how many."""
        if self.ttl_s is None or not self._slot:
            return 0
        now = time.monotonic() if now is None else now
        slots = np.fromiter(self._slot.values(), dtype=np.int64, count=len(self._slot))
        idle = slots[self._seen[slots] < now - self.ttl_s]
        for slot in idle.tolist():
            self._release(slot)
        self.counters.evicted_ttl += len(idle)
        return len(idle)

    def append(self, keys: Sequence[str], ts: np.ndarray, values: np.ndarray, score: bool = True,
               now: float | None = None, partitions: np.ndarray | None = None) -> AppendResult:
        """Append readings in arrival order; return per-reading status and the windows ready to score.

        ``score=False`` only fills the buffers (state rebuild after an assignment): nothing is ready.
        """
        n = len(keys)
        ts = np.asarray(ts, dtype=np.int64)
        if n == 0:
            return AppendResult(np.zeros(0, np.int8), np.zeros(0, np.int64),
                                np.zeros((0, self.window, self.n_features), np.float32), np.zeros(0, np.int64))
        if ts.min() < 0 or ts.max() >= _TS_SPAN:
            raise ValueError("timestamps must be epoch milliseconds in [0, 2**45)")
        now = time.monotonic() if now is None else now
        get = self._slot.get
        slots = np.fromiter((get(k, -1) for k in keys), dtype=np.int64, count=n)
        known = slots >= 0
        self._seen[slots[known]] = now
        if not known.all():
            new_at = np.flatnonzero(~known).tolist()
            if len(self._slot) + len(new_at) > self.max_keys and len(set(keys)) > self.max_keys:
                return self._split(keys, ts, values, score, now, partitions)  # more keys than fit at once
            protected = set(slots[known].tolist())
            for i in new_at:
                slot = self._slot.get(keys[i])
                if slot is None:
                    slot = self._new_slot(keys[i], now, protected)
                    protected.add(slot)
                slots[i] = slot

        order = np.argsort(slots, kind="stable")
        s_sorted = slots[order]
        starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
        sizes = np.diff(np.r_[starts, n])
        if score and sizes.max() > self.window:  # a burst bigger than the ring's slack
            return self._split(keys, ts, values, score, now, partitions)

        group = np.repeat(np.arange(len(starts), dtype=np.int64), sizes)
        group_slot = s_sorted[starts]
        t_sorted = ts[order]
        # running max of earlier timestamps of the same key (the stored last_ts included), made
        # segment-wise by lifting each group into its own range of the int64 line
        lifted = t_sorted + group * _TS_SPAN
        base = (group * _TS_SPAN + self._last_ts[group_slot][group])
        prev = np.maximum(np.r_[np.int64(-1), np.maximum.accumulate(lifted)[:-1]], base)
        status_sorted = np.where(lifted > prev, OK, np.where(lifted == prev, DUPLICATE, LATE)).astype(np.int8)
        accepted = status_sorted == OK
        acc_cum = np.cumsum(accepted)
        before_group = (acc_cum - accepted)[starts]
        count_after = self._count[s_sorted] + (acc_cum - before_group[group])

        acc_idx = np.flatnonzero(accepted)
        a_slot, a_pos = s_sorted[acc_idx], (count_after[acc_idx] - 1) % self.ring
        a_values, a_ts = np.asarray(values, dtype=np.float32)[order[acc_idx]], t_sorted[acc_idx]
        self._values[a_slot, a_pos], self._ts[a_slot, a_pos] = a_values, a_ts
        mirror = a_pos < self.window - 1
        self._values[a_slot[mirror], a_pos[mirror] + self.ring] = a_values[mirror]
        self._ts[a_slot[mirror], a_pos[mirror] + self.ring] = a_ts[mirror]
        dup_idx = np.flatnonzero(status_sorted == DUPLICATE)
        if len(dup_idx):  # the key's last accepted reading is at count - 1, written above if it is in this batch
            held = self._values[s_sorted[dup_idx], (count_after[dup_idx] - 1) % self.ring]
            differs = (held != np.asarray(values, dtype=np.float32)[order[dup_idx]]).any(axis=1)
            status_sorted[dup_idx[differs]] = CONFLICT
        if partitions is not None:
            self._part[s_sorted] = np.asarray(partitions, dtype=np.int32)[order]
        self._count[group_slot] += np.add.reduceat(accepted.astype(np.int64), starts)
        self._last_ts[group_slot] = np.maximum(self._last_ts[group_slot], np.maximum.reduceat(t_sorted, starts))

        status = np.empty(n, dtype=np.int8)
        status[order] = status_sorted
        n_acc = len(acc_idx)
        self.counters.appended += n_acc
        n_dup = int(np.count_nonzero(status_sorted == DUPLICATE))
        n_conflict = int(np.count_nonzero(status_sorted == CONFLICT))
        self.counters.duplicates += n_dup
        self.counters.conflicts += n_conflict
        self.counters.late += n - n_acc - n_dup - n_conflict

        if not score:
            return AppendResult(status, np.zeros(0, np.int64),
                                np.zeros((0, self.window, self.n_features), np.float32), np.zeros(0, np.int64))
        full = count_after[acc_idx] >= self.window
        chosen = acc_idx[full]
        chosen = chosen[stride_selects(self._hash[s_sorted[chosen]], t_sorted[chosen], self.stride)]
        by_arrival = np.argsort(order[chosen], kind="stable")
        chosen = chosen[by_arrival]
        r_slot = s_sorted[chosen]
        start = (count_after[chosen] - self.window) % self.ring  # the window is [start, start + window)
        st = self._values.strides  # a read-only view [slot, start, step, feature] over the buffers
        blocks = np.lib.stride_tricks.as_strided(self._values, (len(self._keys), self.ring, self.window,
                                                                self.n_features), (st[0], st[1], st[1], st[2]),
                                                 writeable=False)
        return AppendResult(status, order[chosen].astype(np.int64), blocks[r_slot, start], self._ts[r_slot, start])

    def _split(self, keys: Sequence[str], ts: np.ndarray, values: np.ndarray, score: bool, now: float,
               partitions: np.ndarray | None) -> AppendResult:
        """``append`` the two halves of a batch one after the other (for bursts and for more keys than the cap)."""
        half = len(keys) // 2
        parts = (None, None) if partitions is None else (partitions[:half], partitions[half:])
        first = self.append(keys[:half], ts[:half], values[:half], score, now, parts[0])
        second = self.append(keys[half:], ts[half:], values[half:], score, now, parts[1])
        return AppendResult(np.r_[first.status, second.status], np.r_[first.ready, second.ready + half],
                            np.concatenate([first.windows, second.windows]),
                            np.r_[first.window_start_ts, second.window_start_ts])
