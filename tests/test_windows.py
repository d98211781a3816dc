"""Window store: ring buffers, duplicates / late / out of order within the grace, stride, caps and eviction
(no broker)."""

from __future__ import annotations

import numpy as np
import pytest

from fabwatch.stream.windows import (CONFLICT, DUPLICATE, LATE, OK, REORDERED, RebuildCoverage, WindowStore,
                                     stride_selects)


def _series(n: int, f: int = 3, t0: int = 1_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return t0 + np.arange(n, dtype=np.int64) * 10, rng.standard_normal((n, f)).astype(np.float32)


def test_windows_hold_the_last_readings_in_order_whatever_the_batching() -> None:
    ts, vals = _series(250)
    one = WindowStore(window=100, n_features=3)
    res = one.append(["a"] * 250, ts, vals)
    assert res.ready.tolist() == list(range(99, 250))  # a window once 100 readings are in
    for j, i in enumerate(res.ready.tolist()):
        np.testing.assert_array_equal(res.windows[j], vals[i - 99:i + 1])
        assert res.window_start_ts[j] == ts[i - 99]
    single = WindowStore(window=100, n_features=3)
    for i in range(250):
        r = single.append(["a"], ts[i:i + 1], vals[i:i + 1])
        if i >= 99:
            np.testing.assert_array_equal(r.windows[0], vals[i - 99:i + 1])


def test_interleaved_keys_are_independent() -> None:
    ts, vals = _series(300)
    keys = ["a", "b", "c"] * 100
    ts3 = np.repeat(ts[:100], 3)
    store = WindowStore(window=100, n_features=3)
    res = store.append(keys, ts3, vals)
    assert sorted(keys[i] for i in res.ready.tolist()) == ["a", "b", "c"]
    for j, i in enumerate(res.ready.tolist()):
        k = keys[i]
        own = [x for x in range(300) if keys[x] == k]
        np.testing.assert_array_equal(res.windows[j], vals[own])


def test_duplicates_dropped_and_late_flagged() -> None:
    store = WindowStore(window=3, n_features=1)
    ts = np.array([10, 20, 20, 15, 30, 30], dtype=np.int64)
    res = store.append(["k"] * 6, ts, np.array([0, 1, 1, 3, 4, 4], dtype=np.float32)[:, None])
    assert res.status.tolist() == [OK, OK, DUPLICATE, LATE, OK, DUPLICATE]
    assert store.counters.duplicates == 2 and store.counters.late == 1
    np.testing.assert_array_equal(res.windows[0, :, 0], [0, 1, 4])  # the window skips the rejected ones
    again = store.append(["k", "k"], np.array([30, 5], dtype=np.int64), np.full((2, 1), 4, np.float32))
    assert again.status.tolist() == [DUPLICATE, LATE]  # against the stored last timestamp too
    assert store.last_ts("k") == 30


def test_a_resend_with_other_values_is_a_conflict_and_the_first_reading_stays() -> None:
    store = WindowStore(window=2, n_features=2)
    res = store.append(["k", "j", "k", "k", "j"], np.array([10, 10, 10, 20, 10], dtype=np.int64),
                       np.array([[1, 2], [5, 5], [1, 2.5], [3, 4], [5, 5]], dtype=np.float32))
    assert res.status.tolist() == [OK, OK, CONFLICT, OK, DUPLICATE]  # within a batch
    np.testing.assert_array_equal(res.windows[0], [[1, 2], [3, 4]])
    later = store.append(["k", "k", "j"], np.array([20, 20, 10], dtype=np.int64),
                         np.array([[3, 4], [3, -4], [5, 6]], dtype=np.float32))
    assert later.status.tolist() == [DUPLICATE, CONFLICT, CONFLICT]  # against the stored reading
    assert (store.counters.duplicates, store.counters.conflicts, store.counters.late) == (2, 3, 0)


def test_bursts_longer_than_the_ring_slack_are_split() -> None:
    ts, vals = _series(1000, f=2)
    store = WindowStore(window=10, n_features=2)
    res = store.append(["a"] * 1000, ts, vals)
    assert len(res.ready) == 991
    for j, i in enumerate(res.ready.tolist()):
        np.testing.assert_array_equal(res.windows[j], vals[i - 9:i + 1])


def test_stride_is_a_function_of_the_data() -> None:
    ts, vals = _series(5000, f=1)
    a, b = WindowStore(10, 1, stride=10), WindowStore(10, 1, stride=10)
    ra = a.append(["x"] * 5000, ts, vals)
    picked_b = np.concatenate([b.append(["x"] * 500, ts[i:i + 500], vals[i:i + 500]).ready + i
                               for i in range(0, 5000, 500)])
    assert ra.ready.tolist() == picked_b.tolist()
    assert 350 < len(ra.ready) < 650  # ~1 in 10
    h = np.full(4, 12345, dtype=np.uint64)
    assert stride_selects(h, np.arange(4, dtype=np.int64), 1).all()


def test_cap_evicts_least_recent_and_ttl_evicts_idle() -> None:
    store = WindowStore(window=5, n_features=1, max_keys=3, ttl_s=10.0, initial_capacity=1)
    one = np.zeros((1, 1), np.float32)
    for t, key in enumerate(["a", "b", "c"]):
        store.append([key], np.array([t], dtype=np.int64), one, now=float(t))
    store.append(["d"], np.array([9], dtype=np.int64), one, now=5.0)
    assert set(store.keys()) == {"b", "c", "d"} and store.counters.evicted_cap == 1
    assert store.evict_idle(now=13.5) == 2  # b (seen at 1) and c (2) idle > 10 s; d (5) stays
    assert store.keys() == ["d"] and store.counters.evicted_ttl == 2


def test_warm_fill_then_score_and_partition_drop() -> None:
    ts, vals = _series(120)
    store = WindowStore(window=100, n_features=3)
    warm = store.append(["a"] * 99, ts[:99], vals[:99], score=False, partitions=np.zeros(99, np.int32))
    assert len(warm.ready) == 0 and store.filled("a") == 99
    res = store.append(["a"], ts[99:100], vals[99:100], partitions=np.zeros(1, np.int32))
    np.testing.assert_array_equal(res.windows[0], vals[:100])
    assert store.keys_in([0]) == ["a"] and store.keys_in([1]) == []
    store.drop(store.keys_in([0]))
    assert len(store) == 0


def test_more_keys_in_one_call_than_the_cap_never_share_a_buffer() -> None:
    """A rebuild re-reads many keys in one ``append``: a new key must not take the slot of a key of the
    same call (both would then write one buffer), whatever the cap."""
    keys = ["a", "b", "c", "a", "b", "c", "a", "b", "c"]
    ts = np.repeat(np.array([10, 20, 30], dtype=np.int64), 3)
    vals = np.array([[1], [100], [1000], [2], [200], [2000], [3], [300], [3000]], dtype=np.float32)
    store = WindowStore(window=2, n_features=1, max_keys=2, initial_capacity=1)
    res = store.append(keys, ts, vals)
    assert len(store) == 2 and store.counters.evicted_cap >= 1 and len(res.ready) > 0
    for j, i in enumerate(res.ready.tolist()):  # every window holds its own entity's readings only
        own = vals[[x for x in range(len(keys)) if keys[x] == keys[i] and x <= i], 0][-2:]
        np.testing.assert_array_equal(res.windows[j, :, 0], own)
    warm = WindowStore(window=2, n_features=1, max_keys=2, initial_capacity=1)
    status = warm.append(keys, ts, vals, score=False).status
    assert (status == OK).all()  # mixed buffers would call later readings of one key late or conflicting


# ---- out-of-order readings within the grace ---------------------------------------------------------

def _reference(keys: list[str], ts: np.ndarray, vals: np.ndarray, window: int, grace: int) -> tuple[list[int], dict]:
    """The rules, one reading at a time in plain Python: statuses and the window each newest reading closes."""
    ring = 2 * window
    held: dict[str, list[tuple[int, np.ndarray]]] = {}
    status, windows = [], {}
    for i, (k, t, v) in enumerate(zip(keys, ts.tolist(), vals)):
        h = held.setdefault(k, [])
        in_ring = h[-ring:]
        same = [x for x in in_ring if x[0] == t]
        if not h or t > h[-1][0]:
            h.append((t, v))
            status.append(OK)
            if len(h) >= window:
                windows[i] = np.stack([x[1] for x in h[-window:]])
        elif h[-1][0] - t > grace:  # a re-send too: beyond the grace nothing is compared
            status.append(LATE)
        elif same:
            status.append(DUPLICATE if np.array_equal(same[0][1], v) else CONFLICT)
        elif len(h) >= ring and t < in_ring[0][0]:
            status.append(LATE)
        else:
            h.append((t, v))
            h.sort(key=lambda x: x[0])
            status.append(REORDERED)
    return status, windows


def _jittered(n_per_key: int, keys: tuple[str, ...] = ("a", "b", "c"), seed: int = 0):
    """Readings 10 ms apart per key, arriving shuffled within ~40 ms, with re-sends, corrections and stragglers."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in keys:
        t = 1_000 + np.arange(n_per_key, dtype=np.int64) * 10
        arrival = t + rng.integers(0, 40, n_per_key)
        for j in range(n_per_key):
            rows.append((int(arrival[j]), k, int(t[j]), rng.standard_normal(2).astype(np.float32)))
    rows.sort(key=lambda r: r[0])
    out = list(rows)
    for j in rng.choice(len(rows), 30, replace=False).tolist():  # re-sends, same and other values, later on
        _, k, t, v = rows[j]
        out.insert(min(len(out), j + int(rng.integers(1, 8))), (0, k, t, v if j % 2 else v + 1))
    for j in rng.choice(len(rows) - 100, 10, replace=False).tolist():  # stragglers far beyond the grace
        _, k, t, v = rows[j]
        out.insert(j + 100, (0, k, t - 1, v))
    keys_ = [r[1] for r in out]
    return keys_, np.array([r[2] for r in out], np.int64), np.stack([r[3] for r in out])


def test_in_grace_readings_land_in_order_and_the_next_newest_window_holds_them() -> None:
    store = WindowStore(window=3, n_features=1, grace_ms=50)
    res = store.append(["k"] * 5, np.array([10, 20, 40, 30, 50], np.int64),
                       np.array([1, 2, 4, 3, 5], np.float32)[:, None])
    assert res.status.tolist() == [OK, OK, OK, REORDERED, OK]
    assert res.ready.tolist() == [2, 4]  # the reordered reading closes no window itself
    np.testing.assert_array_equal(res.windows[0, :, 0], [1, 2, 4])  # scored before 30 came: not re-scored
    np.testing.assert_array_equal(res.windows[1, :, 0], [3, 4, 5])  # in timestamp order
    assert res.window_start_ts.tolist() == [10, 30]
    assert store.last_ts("k") == 50 and store.counters.reordered == 1 and store.counters.late == 0


def test_beyond_the_grace_a_reading_stays_late_and_grace_zero_is_the_old_rule() -> None:
    store = WindowStore(window=3, n_features=1, grace_ms=50)
    res = store.append(["k"] * 4, np.array([100, 200, 149, 150], np.int64), np.zeros((4, 1), np.float32))
    assert res.status.tolist() == [OK, OK, LATE, REORDERED]  # 51 ms late vs exactly the grace
    strict = WindowStore(window=3, n_features=1)  # grace 0, the store's default
    res = strict.append(["k"] * 4, np.array([100, 200, 199, 150], np.int64), np.zeros((4, 1), np.float32))
    assert res.status.tolist() == [OK, OK, LATE, LATE] and strict.counters.reordered == 0


def test_re_sends_inside_the_grace_stay_duplicates_or_conflicts() -> None:
    store = WindowStore(window=2, n_features=1, grace_ms=1_000)
    store.append(["k"] * 3, np.array([10, 20, 30], np.int64), np.array([[1], [2], [3]], np.float32))
    res = store.append(["k"] * 3, np.array([20, 20, 25], np.int64), np.array([[2], [9], [2.5]], np.float32))
    assert res.status.tolist() == [DUPLICATE, CONFLICT, REORDERED]
    again = store.append(["k", "k"], np.array([25, 40], np.int64), np.array([[2.5], [4]], np.float32))
    assert again.status.tolist() == [DUPLICATE, OK]  # the reordered reading is held like any other
    np.testing.assert_array_equal(again.windows[0, :, 0], [3, 4])


def test_an_in_grace_reading_older_than_all_a_full_ring_holds_is_late() -> None:
    store = WindowStore(window=2, n_features=1, grace_ms=1_000)  # ring of 4
    store.append(["k"] * 5, np.array([10, 20, 30, 40, 50], np.int64), np.zeros((5, 1), np.float32))
    res = store.append(["k", "k"], np.array([15, 25], np.int64), np.zeros((2, 1), np.float32))
    assert res.status.tolist() == [LATE, REORDERED]  # the ring holds 20..50


@pytest.mark.parametrize("cut", ["one batch", "singles", "random"])
def test_out_of_order_streams_match_the_one_at_a_time_rules_whatever_the_batching(cut: str) -> None:
    keys, ts, vals = _jittered(150)
    status, windows = _reference(keys, ts, vals, window=5, grace=30)
    assert {OK, DUPLICATE, CONFLICT, LATE, REORDERED} <= set(status)  # the stream exercises every rule
    store = WindowStore(window=5, n_features=2, grace_ms=30)
    rng = np.random.default_rng(1)
    bounds = {"one batch": [0, len(keys)], "singles": list(range(len(keys) + 1)),
              "random": sorted({0, len(keys), *rng.integers(1, len(keys), 40).tolist()})}[cut]
    got_status, got = [], {}
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        res = store.append(keys[lo:hi], ts[lo:hi], vals[lo:hi])
        got_status += res.status.tolist()
        got.update({lo + i: w for i, w in zip(res.ready.tolist(), res.windows)})
    assert got_status == status
    assert sorted(got) == sorted(windows)
    for i, w in windows.items():
        np.testing.assert_array_equal(got[i], w)


def test_a_rebuild_that_reads_back_as_far_as_coverage_says_holds_the_same_windows() -> None:
    """The restart case: warm a fresh store from the newest chunks until ``RebuildCoverage`` has no short key,
    then both stores must treat what follows alike; counting ``window - 1`` readings is not enough."""
    keys, ts, vals = _jittered(150, seed=3)
    cut, window, grace = 300, 5, 30
    live = WindowStore(window=window, n_features=2, grace_ms=grace)
    live.append(keys[:cut], ts[:cut], vals[:cut])

    def rebuilt(coverage: RebuildCoverage) -> WindowStore:
        hi = cut
        while hi > 0:
            lo = max(0, hi - 4)  # chunks of 4, newest first
            if not coverage.add(keys[lo:hi], ts[lo:hi]) and not coverage.short:
                break
            hi = lo
        store = WindowStore(window=window, n_features=2, grace_ms=grace)
        store.append(keys[lo:cut], ts[lo:cut], vals[lo:cut], score=False)
        return store

    def after(store: WindowStore) -> tuple[list[int], list[np.ndarray]]:
        res = store.append(keys[cut:], ts[cut:], vals[cut:])
        return res.status.tolist(), list(res.windows)

    expected = after(live)
    got = after(rebuilt(RebuildCoverage(window - 1, grace)))
    assert got[0] == expected[0] and len(got[1]) == len(expected[1])
    for a, b in zip(got[1], expected[1]):
        np.testing.assert_array_equal(a, b)
    naive = after(rebuilt(RebuildCoverage(window - 1, 0)))  # grace ignored: too little history
    assert naive[0] != expected[0] or any(not np.array_equal(a, b) for a, b in zip(naive[1], expected[1]))
