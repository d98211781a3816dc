"""DeepLog scoring without a trained model: windowing, the top-g rule, the cache, metrics."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fabwatch.export.errors import UsageError

from fabwatch.stream.logs.score import (PAD, UNK, Confusion, LogKeyScorer, Vocabulary, build_windows, evaluate,
                             read_sessions, score_sessions, window_codes)

KEYS = ["a", "b", "c", "d"]  # model ids 2..5


class ChainSession:
    """Stands in for onnxruntime: after key k expects k + 1 (PAD -> ``a``, ``d`` -> ``a``)."""

    def __init__(self) -> None:
        self.calls = 0

    def get_inputs(self) -> list:
        return [SimpleNamespace(name="keys")]

    def run(self, _outputs: None, feeds: dict) -> list:
        self.calls += 1
        last = feeds["keys"][:, -1]
        expected = np.where((last == PAD) | (last == 5), 2, last + 1)
        probs = np.full((len(last), 2 + len(KEYS)), 0.01, dtype=np.float32)
        probs[np.arange(len(last)), expected] = 0.9
        probs[:, PAD] = probs[:, UNK] = 0.0
        return [probs]


def scorer(top_g: int = 1) -> LogKeyScorer:
    manifest = SimpleNamespace(version="v0001", extra={"vocabulary": KEYS, "h": 2, "top_g": top_g})
    return LogKeyScorer(ChainSession(), manifest)


def test_windows_pad_the_front() -> None:
    vocab = Vocabulary(KEYS)
    w = build_windows([vocab.encode(["a", "b"]), vocab.encode([]), vocab.encode(["x", "c"])], h=3)
    assert w.windows.tolist() == [[0, 0, 0], [0, 0, 2], [0, 0, 0], [0, 0, UNK]]
    assert w.next_keys.tolist() == [2, 3, UNK, 4]
    assert w.session.tolist() == [0, 0, 2, 2]
    assert w.position.tolist() == [0, 1, 0, 1]


def test_window_codes_distinct_and_wide_vocabularies() -> None:
    windows = np.array([[1, 2, 3], [3, 2, 1], [1, 2, 3]], dtype=np.int32)
    codes = window_codes(windows, 7)
    assert codes[0] == codes[2] != codes[1]
    wide = window_codes(windows, 2 ** 30)  # too wide for an int64 code: row bytes instead
    assert wide[0] == wide[2] != wide[1]


def test_rule_flags_order_unknown_keys_and_short_sessions() -> None:
    s = scorer(top_g=1)
    sessions = [["a", "b", "c", "d"], ["b", "a", "c", "d"], ["a", "b", "zz", "d"], ["a", "b"], ["d", "a"]]
    v = score_sessions(s, sessions)
    assert v.anomalous.tolist() == [False, True, True, True, True]
    assert v.reason.tolist() == ["", "unexpected_key", "unknown_key", "short_session", "unexpected_key"]
    assert v.first_position.tolist() == [-1, 0, 2, 2, 0]


def test_cache_runs_each_distinct_window_once_and_matches_uncached() -> None:
    s = scorer(top_g=2)
    sessions = [["a", "b", "c", "d"]] * 50 + [["a", "c", "b", "d"]] * 50
    cached = score_sessions(s, sessions, cached=True)
    assert cached.model_windows == cached.unique_windows < cached.windows
    assert score_sessions(s, sessions, cached=True).model_windows == 0  # warm cache
    raw = score_sessions(s, sessions, cached=False)
    assert raw.model_windows == raw.windows
    np.testing.assert_array_equal(raw.anomalous, cached.anomalous)
    top = s.expected(np.array([[0, 2]]))
    assert top[0, 0] == 3  # most likely first


def test_confusion_metrics_hand_made() -> None:
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    predicted = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0, 0])
    m = Confusion.from_labels(labels, predicted).metrics()
    assert (m["TP"], m["FP"], m["FN"], m["TN"]) == (3, 1, 1, 5)
    assert m["precision"] == pytest.approx(0.75) and m["recall"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(0.75) and m["fpr"] == pytest.approx(1 / 6)
    pb = m["paper_balance"]
    assert pb["fp_est"] == pytest.approx(553_366 / 6)
    tp_est = 0.75 * 16_838
    assert pb["precision_est"] == pytest.approx(tp_est / (tp_est + 553_366 / 6))


def test_evaluate_reports_rates_and_cache() -> None:
    s = scorer(top_g=1)
    sessions = [["a", "b", "c", "d"]] * 20 + [["d", "c", "b"]] * 4 + [["a"]]
    result = evaluate(s, sessions, [0] * 20 + [1] * 5, uncached_limit=None)
    assert (result["TP"], result["FP"], result["FN"], result["TN"]) == (5, 0, 0, 20)
    assert result["reasons"] == {"unknown_key": 0, "unexpected_key": 4, "short_session": 1, "invariant": 0,
                                 "unseen_count": 0}
    assert "cached per unique window" in result["speed"]["cached"]["note"]
    assert result["speed"]["uncached"]["windows"] == result["windows"]


def test_evaluate_combines_sequence_and_count_verdicts() -> None:
    """``a b c d a b`` follows the chain (the sequence model passes it) but breaks count(a) == count(c); ``b a c d``
    breaks the order and no count relation: each detector alone misses one, the combined verdict has both."""
    from fabwatch.stream.logs.invariants import fit_count_model

    counts = fit_count_model([["a", "b", "c", "d"]] * 20, min_support=1.0)
    sessions = [["a", "b", "c", "d"]] * 20 + [["a", "b", "c", "d", "a", "b"], ["b", "a", "c", "d"]]
    labels = [0] * 20 + [1, 1]
    result = evaluate(scorer(top_g=1), sessions, labels, uncached_limit=0, counts=counts, detector="combined")
    assert (result["TP"], result["FP"], result["FN"]) == (2, 0, 0)
    assert result["reasons"]["invariant"] == 1 and result["reasons"]["unexpected_key"] == 1
    alone = result["detectors"]
    assert (alone["sequence"]["FN"], alone["quantitative"]["FN"], alone["combined"]["FN"]) == (1, 1, 0)
    assert "count(a) == count(c)" in result["count_model"]["invariants"]
    at_g1 = {row["top_g"]: row for row in result["top_g_sweep_combined"]}[1]
    assert (at_g1["FN"], at_g1["FP"]) == (0, 0)
    with pytest.raises(UsageError, match="count model"):
        evaluate(scorer(top_g=1), sessions, labels, uncached_limit=0, detector="quantitative")


def test_read_sessions_formats(tmp_path: Path) -> None:
    (tmp_path / "deeplog").write_text("5 5 22\n\n11 9\n")
    assert read_sessions(tmp_path / "deeplog") == ([["5", "5", "22"], ["11", "9"]], None)
    (tmp_path / "l.csv").write_text("Sequence,label\n5 22,0\n9,1\n")
    assert read_sessions(tmp_path / "l.csv") == ([["5", "22"], ["9"]], [0, 1])
    (tmp_path / "rows.csv").write_text("LineId,BlockId,EventId\n1,blk_1,E5\n2,blk_2,E9\n3,blk_1,E11\n")
    assert read_sessions(tmp_path / "rows.csv") == ([["E5", "E11"], ["E9"]], None)


def test_training_set_distinct_windows_and_backoff() -> None:
    from fabwatch.models.deeplog import training_set

    vocab = Vocabulary(KEYS)  # a=2 b=3 c=4 d=5
    sessions = [["a", "b", "c"]] * 3 + [["a", "b", "d"], ["d", "b", "d"]]
    plain = training_set(sessions, vocab, h=2)
    assert plain.total_windows == 15 and len(plain.windows) == 5
    ab, db = plain.windows.tolist().index([2, 3]), plain.windows.tolist().index([5, 3])
    assert plain.counts[ab] == 4 and plain.targets[ab, 4] == pytest.approx(0.75)
    assert plain.targets[db, 5] == pytest.approx(1.0) and plain.targets[db, 4] == 0.0
    blended = training_set(sessions, vocab, h=2, backoff=0.5, backoff_order=1)
    np.testing.assert_allclose(blended.targets.sum(axis=1), 1.0, rtol=1e-6)
    # after "b" alone: c 3 times, d twice, so "d b" now also expects c, though never seen after "d b"
    assert blended.targets[db, 4] == pytest.approx(0.5 * 0.6)
    assert blended.targets[db, 5] == pytest.approx(0.5 + 0.5 * 0.4)
