"""Per-key sliding windows in preallocated numpy ring buffers.

A batch of readings is appended with a handful of vectorised numpy operations: the only per-message
Python work is the dict lookup of each key's slot. Duplicate / late detection, ring positions, the
stride choice and the gathering of ready windows are all array operations.

A reading whose timestamp equals its key's latest is a re-send: an identical one (same values) is a
``DUPLICATE``, dropped and counted (at-least-once producers retry); one with other values is a
``CONFLICT``, which callers dead-letter, because the window keeps the first and a correction must not
vanish silently. The label is not compared: it only matters offline.

Out-of-order readings: one older than its key's newest reading by at most ``grace_ms`` is put in
timestamp order in the ring (``REORDERED``); older than that it is ``LATE`` (callers dead-letter it), as
is an in-grace reading older than everything the ring still holds. A reordered reading never closes a
window itself (only a key's newest reading is scored), and windows already scored are not re-scored:
the next newest reading's window holds it in order. A re-send of a held reading inside the grace is a
``DUPLICATE`` or a ``CONFLICT`` as above. Every reading's outcome and the window it closes depend only on
the readings of its key that arrived before it, never on how arrivals were cut into batches, so the
processor, a restart's rebuild and the offline evaluator hold the same windows (``RebuildCoverage``
says how much of a partition's history a rebuild has to re-read for that). A batch holding reordered
readings is handled in rounds, one per reordered reading of its busiest key (``_append_around``): the
in-order path stays a handful of array operations.

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

OK, DUPLICATE, LATE, CONFLICT, REORDERED = 0, 1, 2, 3, 4
# serving's and evaluation's default grace (``--grace-ms``): sensor gateways that batch or retry deliver
# readings a few seconds out of order; the store itself defaults to none (log keys are ordered by line)
DEFAULT_GRACE_MS = 5000
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

    status: np.ndarray                 # int8 [n]: OK, DUPLICATE, LATE, CONFLICT or REORDERED
    ready: np.ndarray                  # int64 [m]: indices into the batch, ascending
    windows: np.ndarray                # float32 [m, window, F]
    window_start_ts: np.ndarray        # int64 [m]


@dataclass
class WindowCounters:
    appended: int = 0
    duplicates: int = 0
    conflicts: int = 0
    late: int = 0
    reordered: int = 0                 # also counted in ``appended``
    evicted_ttl: int = 0
    evicted_cap: int = 0


class WindowStore:
    """Ring buffers for up to ``max_keys`` live keys; idle keys are evicted after ``ttl_s`` seconds.

    ``grace_ms``: how much older than its key's newest reading a reading may be and still be put in order
    (0: every out-of-order reading is ``LATE``); in the unit of the timestamps.
    """

    def __init__(self, window: int, n_features: int, stride: int = 1, max_keys: int = 100_000,
                 ttl_s: float | None = 6 * 3600.0, initial_capacity: int = 256, grace_ms: int = 0):
        if window < 1 or n_features < 1 or stride < 1 or max_keys < 1:
            raise ValueError("window, n_features, stride and max_keys must be positive")
        if grace_ms < 0:
            raise ValueError("grace_ms must not be negative")
        self.window, self.n_features, self.stride = window, n_features, stride
        self.grace_ms = grace_ms
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
        values = np.asarray(values, dtype=np.float32)
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
        return self._append_to(slots, keys, ts, values, score, now, partitions)

    def _append_to(self, slots: np.ndarray, keys: Sequence[str], ts: np.ndarray, values: np.ndarray, score: bool,
                   now: float, partitions: np.ndarray | None) -> AppendResult:
        """``append`` once every reading has its key's slot (``slots`` int64 [n])."""
        n = len(slots)
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
        if self.grace_ms:
            in_grace = (lifted < prev) & (prev - lifted <= self.grace_ms)
            if in_grace.any():  # nothing is written yet: redo the batch in rounds around these readings
                in_grace_before = np.cumsum(in_grace) - in_grace
                in_grace_before -= in_grace_before[starts][group]  # per key
                rounds = np.empty(n, np.int64)
                rounds[order] = in_grace_before
                grace_at = np.zeros(n, bool)
                grace_at[order] = in_grace
                return self._append_around(rounds, grace_at, slots, keys, ts, values, score, now, partitions)
        accepted = status_sorted == OK
        acc_cum = np.cumsum(accepted)
        before_group = (acc_cum - accepted)[starts]
        count_after = self._count[s_sorted] + (acc_cum - before_group[group])

        acc_idx = np.flatnonzero(accepted)
        a_slot, a_pos = s_sorted[acc_idx], (count_after[acc_idx] - 1) % self.ring
        a_values, a_ts = values[order[acc_idx]], t_sorted[acc_idx]
        self._values[a_slot, a_pos], self._ts[a_slot, a_pos] = a_values, a_ts
        mirror = a_pos < self.window - 1
        self._values[a_slot[mirror], a_pos[mirror] + self.ring] = a_values[mirror]
        self._ts[a_slot[mirror], a_pos[mirror] + self.ring] = a_ts[mirror]
        dup_idx = np.flatnonzero(status_sorted == DUPLICATE)
        if len(dup_idx):  # the key's last accepted reading is at count - 1, written above if it is in this batch
            held = self._values[s_sorted[dup_idx], (count_after[dup_idx] - 1) % self.ring]
            differs = (held != values[order[dup_idx]]).any(axis=1)
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

    def _append_around(self, rounds: np.ndarray, in_grace: np.ndarray, slots: np.ndarray, keys: Sequence[str],
                       ts: np.ndarray, values: np.ndarray, score: bool, now: float,
                       partitions: np.ndarray | None) -> AppendResult:
        """A batch holding in-grace readings (``in_grace`` [n]), in rounds: round r appends (``_append_to``)
        each key's readings that follow r of its in-grace readings, gathering their windows before an insert
        moves a ring, then inserts each key's in-grace reading number r + 1 (``_insert``). Keys do
        not share state, so this is the batch in arrival order, one key at a time, with as many rounds as
        one key has in-grace readings in the batch. The statuses are what ``append`` found on the whole
        batch: an insert never moves a key's newest timestamp."""
        status = np.empty(len(slots), np.int8)
        ready: list[np.ndarray] = []
        windows: list[np.ndarray] = []
        start_ts: list[np.ndarray] = []
        for r in range(int(rounds.max()) + 1):
            run = np.flatnonzero((rounds == r) & ~in_grace)
            if len(run):
                res = self._append_to(slots[run], [keys[i] for i in run.tolist()], ts[run], values[run], score,
                                      now, None if partitions is None else partitions[run])
                status[run] = res.status
                ready.append(run[res.ready])
                windows.append(res.windows)
                start_ts.append(res.window_start_ts)
            for i in np.flatnonzero((rounds == r) & in_grace).tolist():
                status[i] = self._insert(int(slots[i]), int(ts[i]), values[i],
                                         None if partitions is None else int(partitions[i]))
        at = np.concatenate(ready) if ready else np.zeros(0, np.int64)
        rank = np.empty(len(at), np.int64)
        rank[np.argsort(at, kind="stable")] = np.arange(len(at))  # where each window goes, in arrival order
        out = np.empty((len(at), self.window, self.n_features), np.float32)
        out_start = np.empty(len(at), np.int64)
        lo = 0
        for w, s in zip(windows, start_ts):  # one copy of each window, straight to its place
            out[rank[lo:lo + len(w)]], out_start[rank[lo:lo + len(w)]] = w, s
            lo += len(w)
        return AppendResult(status, np.sort(at), out, out_start)

    def _insert(self, slot: int, ts: int, values: np.ndarray, partition: int | None) -> int:
        """Put one reading older than its key's newest, within the grace, at its place in the key's ring.

        The ring holds the key's last ``min(count, ring)`` readings in timestamp order; the newer ones move
        up one position, the reading takes the freed one, and a full ring loses its oldest. Returns the status."""
        ring, count = self.ring, int(self._count[slot])
        held = min(count, ring)
        pos = np.arange(count - held, count) % ring  # physical positions, oldest first
        held_ts = self._ts[slot, pos]
        at = int(np.searchsorted(held_ts, ts))
        if partition is not None:
            self._part[slot] = partition
        if at < held and held_ts[at] == ts:  # a re-send of a reading the ring holds
            if np.array_equal(self._values[slot, pos[at]], values):
                self.counters.duplicates += 1
                return DUPLICATE
            self.counters.conflicts += 1
            return CONFLICT
        if at == 0 and held == ring:  # older than all the ring holds: it could never be in a window
            self.counters.late += 1
            return LATE
        newer = pos[at:]  # never empty: the key's newest reading is newer than this one
        moved = (newer + 1) % ring  # on a full ring the newest takes the oldest's place
        self._ts[slot, moved], self._values[slot, moved] = self._ts[slot, newer], self._values[slot, newer]
        self._ts[slot, pos[at]], self._values[slot, pos[at]] = ts, values
        self._ts[slot, ring:] = self._ts[slot, :self.window - 1]  # refresh the mirror
        self._values[slot, ring:] = self._values[slot, :self.window - 1]
        self._count[slot] = count + 1
        self.counters.appended += 1
        self.counters.reordered += 1
        return REORDERED


class RebuildCoverage:
    """Which keys a window rebuild has not yet re-read far enough back (readings arrive newest chunk first).

    A rebuild replays a suffix of a partition and must end with the windows an uninterrupted store holds:
    each key's ``need`` newest readings, and nothing the readings before the suffix could change. Every
    reading that was accepted is at most ``grace_ms`` older than all that came before it, so the history
    before the suffix is no newer than the suffix's oldest reading plus the grace; once ``need`` re-read
    readings are at least that new, the unread history can no longer enter the key's windows (with grace 0:
    ``need`` readings). This assumes the re-read readings were not themselves late when first read.
    """

    def __init__(self, need: int, grace_ms: int):
        self.need, self.grace_ms = need, grace_ms
        self._pending: dict[str, np.ndarray] = {}   # the re-read timestamps of keys still short
        self._covered: set[str] = set()

    def add(self, keys: Sequence[str], ts: np.ndarray) -> bool:
        """Take one chunk (older than those before); True when it holds a key not seen in earlier chunks."""
        by_key: dict[str, list[int]] = {}
        for key, t in zip(keys, np.asarray(ts, dtype=np.int64).tolist()):
            by_key.setdefault(key, []).append(t)
        new_keys = False
        for key, chunk_ts in by_key.items():
            if key in self._covered:
                continue
            held = self._pending.get(key)
            new_keys |= held is None
            held = np.asarray(chunk_ts, np.int64) if held is None else np.r_[held, chunk_ts]
            if np.count_nonzero(held >= held.min() + self.grace_ms) >= self.need:
                self._covered.add(key)
                self._pending.pop(key, None)
            else:
                self._pending[key] = held
        return new_keys

    @property
    def short(self) -> list[str]:
        """Keys whose windows the re-read readings do not yet determine, sorted."""
        return sorted(self._pending)
