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
