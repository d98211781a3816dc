"""The retrain benchmark's projection: the phases add up the way a retrain spends its time."""

from __future__ import annotations

import pytest

from fabwatch.models.bench.retrain import project

RATES = {"train_windows_per_s": {"a": 10.0, "b": 40.0, "gate": 1000.0}, "members_forward_windows_per_s": 50.0,
         "onnx_windows_per_s": 20.0, "export_s": 30.0}


def test_projection_counts_every_pass_of_a_retrain():
    p = project(1000, 250, RATES, prep_s=5.0, epochs=2)
    assert p["train_s"] == pytest.approx(2 * 1000 * (1 / 10 + 1 / 40 + 1 / 1000))  # members one by one, then gate
    assert p["forward_s"] == pytest.approx((2 * 250 + 1000 + 250) / 50 + 2 * 250 / 1000)  # validation, gate inputs
    assert p["onnx_s"] == pytest.approx(30 + 3 * 250 / 20)  # export, calibration, serving and candidate in the gate
    assert p["total_s"] == pytest.approx(5 + p["train_s"] + p["forward_s"] + p["onnx_s"])


def test_projection_grows_linearly_beyond_the_export():
    small, large = project(1000, 250, RATES, 0.0), project(10_000, 2_500, RATES, 0.0)
    assert large["total_s"] - 30 == pytest.approx(10 * (small["total_s"] - 30))
