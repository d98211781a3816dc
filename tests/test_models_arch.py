"""Architecture: parameter counts at full size (build only, no training), outputs of every task, the summary."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from fabwatch.models import ensemble
from fabwatch.stream.cli.main import app

TOLERANCE = 0.15


@pytest.fixture(scope="module")
def full_classify():
    return ensemble.build(window=100, n_features=12, task="classify", size="full")


def test_full_size_parameter_counts_match_the_design(full_classify) -> None:
    counts = ensemble.parameter_counts(full_classify)
    for name, module in ensemble.MEMBERS.items():
        assert abs(counts[name] - module.DESIGN_PARAMS) <= TOLERANCE * module.DESIGN_PARAMS, (name, counts[name])
    assert abs(counts["total"] - ensemble.DESIGN_PARAMS) <= TOLERANCE * ensemble.DESIGN_PARAMS
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    assert counts["gate"] < 0.01 * counts["total"]  # the gate is small


def test_contract_outputs_for_every_task(full_classify) -> None:
    assert full_classify.output_names == ["score", "member_scores", "weights"]
    classify = ensemble.build(window=100, n_features=12, task="classify", size="tiny")
    x = np.random.default_rng(0).standard_normal((3, 100, 12)).astype(np.float32)
    score, member_scores, weights = (np.asarray(o) for o in classify(x))
    assert score.shape == (3,) and member_scores.shape == (3, 5) and weights.shape == (3, 5)
    assert np.allclose(weights.sum(axis=1), 1, atol=1e-5) and ((0 <= member_scores) & (member_scores <= 1)).all()
    assert np.allclose(score, (member_scores * weights).sum(axis=1), atol=1e-5)

    # forecast symbolically (running it is covered through ONNX by the training tests)
    forecast = ensemble.build(window=100, n_features=7, task="forecast", size="tiny")
    assert forecast.output_names == ["score", "member_scores", "weights", "feature_error"]
    assert forecast.output_shape == [(None,), (None, 5), (None, 5), (None, 7)]


def test_summary_reports_counts_per_member() -> None:
    result = CliRunner().invoke(app, ["models", "summary", "--size", "tiny", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["members"]
    assert set(rows) == {*ensemble.ARCHITECTURES, "gate", "total"}  # every architecture by default
    assert rows["total"]["parameters"] < 50_000 and rows["spike"]["design"] == 520_000
