"""The statistical monitor of the unsupervised task: limits from training data that hold on new normal data,
faults above the limit, and the same score from the ONNX graph as from the numpy reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fabwatch.models.members import monitor
from fabwatch.models.training import synth

TARGET_FAR = 0.01  # what the README promises on normal data like the training data


def _segments(seed: int, entities: int, steps: int, anomaly_rate: float = 0.0) -> list[np.ndarray]:
    table = synth.generate(entities=entities, steps=steps, seed=seed, anomaly_rate=anomaly_rate)
    x = np.column_stack([table.column(f).to_numpy() for f in synth.FEATURES]).astype(np.float64)
    entity = np.asarray(table.column("entity").to_pylist())
    return [x[entity == e] for e in dict.fromkeys(entity)]


def test_limits_from_a_short_history_hold_on_another_seed() -> None:
    params = monitor.fit(_segments(seed=1, entities=4, steps=400), window=30)
    unseen = monitor.ratios(params, monitor.statistics_of(params, _segments(seed=2, entities=4, steps=2000)))
    far = float(np.mean(unseen.max(axis=1) > 1))
    assert far <= 2 * TARGET_FAR, far


def test_margins_widen_limits_only_where_halves_disagree() -> None:
    params = monitor.fit(_segments(seed=1, entities=4, steps=400), window=30)
    assert params.names == ["M5", "M20", "M30", "D20", "D29", "Q1", "Q5", "Q20", "S20", "S29"]
    assert min(params.margin) >= 1.0 and max(params.margin) > 1.0
    in_sample = monitor._fit_limits(_segments(seed=1, entities=4, steps=400), 30, monitor.FOLDS)
    unseen = _segments(seed=2, entities=4, steps=2000)
    # without the split-half margin, out-of-fold limits alone alarm more often on new normal data
    assert (monitor.ratios(in_sample, monitor.statistics_of(in_sample, unseen)).max(axis=1) > 1).mean() > \
        (monitor.ratios(params, monitor.statistics_of(params, unseen)).max(axis=1) > 1).mean()


@pytest.mark.parametrize("fault", ["level", "variability", "stuck", "correlation"])
def test_faults_pass_the_limit(fault: str) -> None:
    train = _segments(seed=1, entities=4, steps=600)
    params = monitor.fit(train, window=30)
    window = _segments(seed=5, entities=1, steps=30)[0].copy()
    sd = np.concatenate(train).std(axis=0)
    if fault == "level":          # one feature 4 sd off for the last 20 steps
        window[-20:, 3] += 4 * sd[3]
    elif fault == "variability":  # one feature jitters 6 times its usual step for the whole window
        window[:, 5] += np.random.default_rng(0).standard_normal(30) * 6 * sd[5]
    elif fault == "stuck":        # one sensor freezes at its value for the whole window
        window[:, 2] = window[0, 2]
    else:                          # two features swapped: each level plausible, their relation broken
        window[-10:, [0, 7]] = window[-10:, [7, 0]]
    assert monitor.score_windows(params, window[None])[0] > 1


def _labelled_faults(seed: int, shift_sd: float) -> tuple[np.ndarray, np.ndarray]:
    """A fault run (label 1 throughout, recorded after the fault began): feature 3 shifted by ``shift_sd`` sds."""
    x = _segments(seed=seed, entities=1, steps=300)[0].copy()
    x[:, 3] += shift_sd * x[:, 3].std()
    return x, np.ones(len(x))


def test_labelled_faults_raise_the_limits_within_the_budget() -> None:
    normal = [(s, np.zeros(len(s))) for s in _segments(seed=1, entities=4, steps=400)]
    entities = normal + [_labelled_faults(seed=3, shift_sd=8.0)]
    unsupervised = monitor.fit([s for s, _ in normal], window=30)
    params, factor = monitor.fit_supervised(entities, window=30, budget=0.01)
    # the faults sit far above the limits: the limits rise, and every margin by the same factor
    assert factor > 1.5
    np.testing.assert_allclose(params.margin, np.asarray(unsupervised.margin) * factor)
    # ... at a cost of at most 1 % of the fault windows the unsupervised limits detect
    x = entities[-1][0]
    before = monitor.ratios(unsupervised, monitor.statistics_of(unsupervised, [x])).max(axis=1) >= 1
    after = monitor.ratios(params, monitor.statistics_of(params, [x])).max(axis=1) >= 1
    assert before.mean() - after.mean() <= 0.01 + 1e-9 and after.mean() > 0.9
    # and fewer false alarms on another seed's normal data
    unseen = _segments(seed=2, entities=4, steps=2000)
    assert (monitor.ratios(params, monitor.statistics_of(params, unseen)).max(axis=1) > 1).mean() <= \
        (monitor.ratios(unsupervised, monitor.statistics_of(unsupervised, unseen)).max(axis=1) > 1).mean()


def test_undetected_faults_leave_the_limits_alone() -> None:
    """No evidence of headroom: "faults" that look exactly like the normal history (a copy of it) stay below the
    limits, and the limits stay where the normal history put them."""
    normal = [(s, np.zeros(len(s))) for s in _segments(seed=1, entities=4, steps=400)]
    copy = normal[0][0].copy(), np.ones(400)
    params, factor = monitor.fit_supervised(normal + [copy], window=30, budget=0.01)
    assert factor == 1.0
    assert params.margin == monitor.fit([s for s, _ in normal], window=30).margin


def test_normal_stretches_are_the_label_0_runs() -> None:
    x = np.arange(10.0)[:, None]
    stretches = monitor.normal_stretches(x, np.array([0, 0, 1, 1, 0, 0, 0, 1, 0, 0]))
    assert [s[:, 0].tolist() for s in stretches] == [[0, 1], [4, 5, 6], [8, 9]]


def test_too_short_history_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 200 rows"):
        monitor.fit(_segments(seed=1, entities=3, steps=150), window=100)


@pytest.mark.slow
def test_graph_scores_equal_the_numpy_reference_with_no_loops(tmp_path: Path) -> None:
    from fabwatch.export.onnx_export import keras_to_onnx
    from fabwatch.export.runtime import create_session
    from fabwatch.models import ensemble

    window, segments = 30, _segments(seed=1, entities=2, steps=300)
    scaled = [(s - s.mean(axis=0)) / s.std(axis=0) for s in segments]
    params = monitor.fit(scaled, window)
    fresh = ensemble.build(window=window, n_features=len(synth.FEATURES), task="forecast", size="tiny")
    members, gate = ensemble.members_of(fresh)
    model = ensemble.assemble(members, gate, window, len(synth.FEATURES), "forecast", monitor.layer(params))
    test = _segments(seed=4, entities=1, steps=200, anomaly_rate=0.2)[0]
    test = ((test - segments[0].mean(axis=0)) / segments[0].std(axis=0)).astype(np.float32)
    windows = np.ascontiguousarray(np.lib.stride_tricks.sliding_window_view(test, window, axis=0).transpose(0, 2, 1))
    report = keras_to_onnx(model, tmp_path / "model.onnx", output_names=list(ensemble.output_names("forecast")),
                           sample_inputs=windows)
    assert not {"Loop", "Scan"} & set(report.op_histogram)
    session = create_session(tmp_path / "model.onnx", ["CPUExecutionProvider"])
    score, members_out, weights = session.run(["score", "member_scores", "weights"], {"window": windows})
    reference = monitor.score_windows(params, windows.astype(np.float64))
    np.testing.assert_allclose(score, reference, rtol=1e-4, atol=1e-4)
    assert members_out.shape == weights.shape == (len(windows), len(ensemble.member_names("forecast")))
    np.testing.assert_array_equal(members_out[:, -1], score)  # the monitor's column is the score
    assert (weights[:, -1] == 1).all()


@pytest.mark.slow
def test_export_parity_holds_when_the_ratio_is_large(tmp_path: Path) -> None:
    """A monitor fitted on a narrow normal history sees the exporter's random inputs as hundreds of sds off:
    ratios in the thousands, where float32 differences exceed 1e-4 in absolute terms but not relative ones."""
    from fabwatch.export.onnx_export import keras_to_onnx
    from fabwatch.models import ensemble

    window, segments = 30, _segments(seed=1, entities=2, steps=300)
    narrow = [0.01 * (s - s.mean(axis=0)) / s.std(axis=0) for s in segments]
    params = monitor.fit(narrow, window)
    fresh = ensemble.build(window=window, n_features=len(synth.FEATURES), task="classify", size="tiny")
    members, gate = ensemble.members_of(fresh)
    model = ensemble.assemble(members, gate, window, len(synth.FEATURES), "classify", monitor.layer(params))
    report = keras_to_onnx(model, tmp_path / "model.onnx", output_names=list(ensemble.output_names("classify")),
                           parity_samples=64)
    score = model(np.random.default_rng(0).standard_normal((64, window, len(synth.FEATURES))).astype(np.float32))[0]
    assert float(np.min(score)) > 1e3
    assert report.parity_max_abs > 1e-4  # an absolute 1e-4 check would refuse this graph
