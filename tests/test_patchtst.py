"""PatchTST, the sixth member: patching, RevIN, export into the ensemble's graph (no Loop/Scan, parity) for
every task, `--members` choosing the ensemble, and a six-member model trained, committed and evaluated."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fabwatch.export.errors import UsageError
from fabwatch.export.onnx_export import FORBIDDEN_OPS, keras_to_onnx
from fabwatch.export.runtime import create_session
from fabwatch.models import ensemble
from fabwatch.models.members import patchtst
from fabwatch.stream.cli.main import app

TASKS = ("classify", "regress", "forecast")


def test_patches_end_at_the_newest_step_and_pad_the_oldest() -> None:
    assert patchtst.patch_starts(100).tolist() == list(range(0, 91, 10))        # 10 of 10 steps, none padded
    assert patchtst.patch_starts(99).tolist() == list(range(-1, 90, 10))        # forecast context: 1 step padded
    starts = patchtst.patch_starts(100, patch_len=16, stride=8)
    assert len(starts) == 12 and starts[-1] + 16 == 100 and starts[0] == -4


def test_patch_layer_is_channel_independent() -> None:
    x = np.arange(2 * 99 * 3, dtype=np.float32).reshape(2, 99, 3)
    patches = np.asarray(patchtst.Patches()(x))
    assert patches.shape == (2 * 3, 10, 10)
    np.testing.assert_array_equal(patches[4, -1], x[1, -10:, 1])                 # sample 1, feature 1, newest patch
    np.testing.assert_array_equal(patches[4, 0], x[1, [0, *range(9)], 1])       # the oldest step repeated


def test_full_size_is_within_the_design_and_tiny_is_small() -> None:
    full = ensemble.build_member(patchtst.NAME, 100, 12, "classify", "full").count_params()
    assert abs(full - patchtst.DESIGN_PARAMS) <= 0.15 * patchtst.DESIGN_PARAMS, full
    assert ensemble.build_member(patchtst.NAME, 100, 12, "classify", "tiny").count_params() < 20_000


def test_forecast_is_restored_to_the_window_scale() -> None:
    """RevIN: the member forecasts a scaled and shifted window as the same scaling and shift of its forecast."""
    member = ensemble.build_member(patchtst.NAME, 30, 4, "forecast", "tiny")
    x = np.random.default_rng(0).standard_normal((8, 29, 4)).astype(np.float32)
    y, moved = np.asarray(member(x)), np.asarray(member(3 * x + 5))
    np.testing.assert_allclose(moved, 3 * y + 5, atol=1e-3)


@pytest.mark.parametrize("task", ("classify", "forecast"))
def test_keras_file_round_trips(task: str, tmp_path: Path) -> None:
    """Warm start and `fabwatch export` reload the Keras file: PatchTST's custom layers, and an ensemble of one
    member, must load from config."""
    from fabwatch.models.tf import keras

    model = ensemble.build(window=30, n_features=3, task=task, size="tiny", members=["patchtst"])
    model.save(tmp_path / "m.keras", save_format="keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", compile=False)
    x = np.random.default_rng(2).standard_normal((4, 30, 3)).astype(np.float32)
    for a, b in zip(model(x), loaded(x)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.parametrize("task", TASKS)
def test_patchtst_exports_into_the_ensemble_graph(task: str, tmp_path: Path) -> None:
    model = ensemble.build(window=100, n_features=6, task=task, size="tiny", members=["rule_based", "patchtst"])
    report = keras_to_onnx(model, tmp_path / "model.onnx", output_names=list(ensemble.output_names(task)),
                           parity_samples=64)
    assert report.parity_max_abs <= 1e-4
    assert not set(FORBIDDEN_OPS) & set(report.op_histogram), report.op_histogram
    assert report.op_histogram.get("LSTM", 0) == 1  # rule_based's, fused, beside PatchTST's attention
    x = np.random.default_rng(1).standard_normal((5, 100, 6)).astype(np.float32)
    out = dict(zip(report.outputs, create_session(tmp_path / "model.onnx", ["CPUExecutionProvider"])
                   .run(None, {"window": x})))
    assert out["member_scores"].shape == out["weights"].shape == (5, 2)
    np.testing.assert_allclose(out["weights"].sum(axis=1), 1, atol=1e-5)


def test_members_option_resolves_and_rejects() -> None:
    assert ensemble.resolve_members(None) == list(ensemble.MEMBERS) and len(ensemble.MEMBERS) == 5
    assert ensemble.resolve_members("+patchtst") == [*ensemble.MEMBERS, "patchtst"]
    assert ensemble.resolve_members("spike, patchtst") == ["spike", "patchtst"]
    runner = CliRunner()
    for spec in ("+lstm", "spike,+patchtst", "spike,spike"):
        result = runner.invoke(app, ["train", "--data", "x.csv", "--registry", "r", "--members", spec])
        assert isinstance(result.exception, UsageError) and "--members" in str(result.exception), spec
    helped = runner.invoke(app, ["train", "--help"], terminal_width=200).output
    assert all(name in helped for name in ensemble.ARCHITECTURES)


@pytest.mark.slow
def test_train_with_patchtst_added_commits_six_members_and_evaluates(tmp_path: Path) -> None:
    runner = CliRunner()
    data, reg = tmp_path / "fab.parquet", tmp_path / "reg"
    made = runner.invoke(app, ["synth", "--out", str(data), "--entities", "4", "--steps", "1500",
                               "--anomaly-rate", "0.2"])
    assert made.exit_code == 0, made.output
    trained = runner.invoke(app, ["train", "--data", str(data), "--registry", str(reg), "--quick",
                                  "--members", "+patchtst", "--epochs", "2", "--force", "--json"])
    assert trained.exit_code == 0, trained.output
    from fabwatch.export.registry import Registry

    registry = Registry(reg)
    manifest = registry.manifest(registry.versions()[-1])
    assert manifest.members == [*ensemble.MEMBERS, "patchtst"]
    assert set(manifest.metrics["member_roc_auc"]) == set(manifest.members)
    assert manifest.extra["parameters"]["patchtst"] > 0 and manifest.parity["model.onnx"] <= 1e-4
    assert not set(FORBIDDEN_OPS) & set(manifest.extra["onnx_ops"])
    evaluated = runner.invoke(app, ["evaluate", "--registry", str(reg), "--data", str(data), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.stdout[evaluated.stdout.index("{"):])
    assert report["rows_scored"] > 0 and report["model_version"] == manifest.version
