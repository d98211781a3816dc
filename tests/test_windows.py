"""Window store: ring buffers, duplicates / late, stride, caps and eviction (no broker)."""

from __future__ import annotations

import numpy as np

from fabwatch.stream.windows import CONFLICT, DUPLICATE, LATE, OK, WindowStore, stride_selects


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
