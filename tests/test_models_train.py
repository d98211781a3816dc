"""Quick training end to end (TensorFlow): held-out detection quality through the serving path, the exported
graph (fused recurrent ops, parity, fp16), the manifest, re-export, and the forecast task.

One tiny ensemble is trained once per session and shared by the tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from fabwatch.export.onnx_export import FORBIDDEN_OPS, op_histogram
from fabwatch.export.runtime import ScoringModel
from fabwatch.models.training import data, drift, synth

pytestmark = pytest.mark.slow


def _held_out() -> tuple[np.ndarray, np.ndarray]:
    """Raw windows and labels of fresh entities from another seed: nothing the model trained or calibrated on."""
    table = synth.generate(entities=4, steps=1500, seed=1, anomaly_rate=0.2)
    feats = np.column_stack([table.column(f).to_numpy() for f in synth.FEATURES]).reshape(4, 1500, 12)
    label = table.column("label").to_numpy().astype(np.float32).reshape(4, 1500)
    parts = [data.windows(feats[e], label[e], 100, stride=2) for e in range(4)]
    return np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts])


def test_quick_training_detects_held_out_events(trained) -> None:
    result, registry = trained
    assert result.manifest.metrics["roc_auc"] >= 0.9, result.manifest.metrics
    windows, labels = _held_out()
    assert 0.03 < labels.mean() < 0.3
    model = ScoringModel.from_registry(registry, providers=["CPUExecutionProvider"])
    auc = roc_auc_score(labels, model.predict(windows).score)
    noise = roc_auc_score(labels, np.random.default_rng(0).random(len(labels)))
    assert auc >= 0.9, auc
    assert noise < 0.6  # the same yardstick fails a model that outputs noise


def test_exported_graph_is_fused_and_in_parity(trained) -> None:
    from fabwatch.models.training.train import load_keras

    result, registry = trained
    vdir, manifest = registry.resolve(result.version)
    for name in ("model.onnx", "model.fp16.onnx"):
        ops = op_histogram(vdir / name)
        assert not set(FORBIDDEN_OPS) & set(ops), ops
        assert ops.get("LSTM", 0) >= 6 and ops.get("GRU", 0) == 3
    assert manifest.parity["model.onnx"] <= 1e-4 and manifest.parity["model.fp16.onnx"] <= 1e-2

    x = np.random.default_rng(3).standard_normal((64, 100, 12)).astype(np.float32)
    keras_score = np.asarray(load_keras(vdir)(x)[0])
    for fp16, tolerance in ((False, 1e-4), (True, 1e-2)):
        unscaled = manifest.model_copy(update={"scaler": None})  # compare on the same (already scaled) input
        onnx_model = ScoringModel(vdir, unscaled, ["CPUExecutionProvider"], fp16=fp16)
        assert np.max(np.abs(onnx_model.predict(x).score - keras_score)) <= tolerance


def test_manifest_holds_the_serving_contract(trained) -> None:
    result, registry = trained
    m = registry.verify(result.version)
    assert registry.current_version() == result.version
    assert m.task == "classify" and m.feature_names == list(synth.FEATURES) and len(m.scaler.mean) == 12
    assert m.outputs == ["score", "member_scores", "weights"] and m.members == ["stacked_lstm", "residual_gru",
                                                                               "cnn_lstm", "spike", "rule_based"]
    assert 0 < m.thresholds.close < m.thresholds.alert < m.thresholds.critical and "F1" in m.thresholds.method
    assert set(m.calibration) == {"mean", "std"} and m.calibration["std"] > 0
    assert {"model.onnx", "model.fp16.onnx", "keras/ensemble.keras"} <= set(m.files)
    assert m.metrics["training"]["windows_per_s"] > 0 and len(m.data_fingerprint) == 64
    # the training rows' distribution, for drift checks: the training file itself shows none
    assert set(m.drift_reference) == set(synth.FEATURES)
    table = pq.read_table(Path(m.extra["config"]["data"]))
    x = np.column_stack([table.column(f).to_numpy() for f in synth.FEATURES])
    assert max(drift.feature_psi(m.drift_reference, x, synth.FEATURES).values()) < 0.01


def test_export_command_writes_a_new_version_from_the_keras_model(trained) -> None:
    from fabwatch.stream.cli.main import app

    result, registry = trained
    out = CliRunner().invoke(app, ["export", "--registry", str(registry.root), "--version", result.version,
                                   "--no-promote", "--json"])
    assert out.exit_code == 0, out.output
    info = json.loads(out.stdout)
    assert info["from"] == result.version and not info["promoted"]
    assert registry.current_version() == result.version
    new = registry.verify(info["version"])
    assert new.parity["model.onnx"] <= 1e-4 and new.thresholds == result.manifest.thresholds


def test_forecast_task_trains_unsupervised_and_explains_per_feature(tmp_path: Path) -> None:
    from fabwatch.models.training.train import TrainConfig, train

    path = tmp_path / "fab.csv"
    table = synth.generate(entities=2, steps=600, seed=2, anomaly_rate=0.05)
    synth.write(table.drop_columns(["label"]), path)
    # a 30-step window keeps this test cheap; the 100-step contract is covered above
    result = train(TrainConfig.quick(data=path, registry=tmp_path / "reg", task="forecast", label_col=None,
                                     window=30, epochs=1, stride=4))
    m = result.manifest
    assert m.outputs == ["score", "member_scores", "weights", "feature_error"]
    assert m.members[-1] == "monitor" and m.thresholds.alert == 1.0 and "statistical monitor" in m.thresholds.method
    model = ScoringModel.from_registry(tmp_path / "reg", providers=["CPUExecutionProvider"])
    x = np.column_stack([table.column(f).to_numpy() for f in synth.FEATURES])[:30][None].repeat(2, axis=0)
    x[1, -1, 3] += 40 * np.asarray(m.scaler.std)[3]  # the newest motor temperature jumps
    out = model.predict(x)
    assert out.feature_error.shape == (2, 12) and int(np.argmax(out.feature_error[1])) == 3
    assert out.score[1] > max(1.0, out.score[0])  # past the monitor's limit, and above the unchanged window
    np.testing.assert_array_equal(out.member_scores[:, -1], out.score)


def test_monitor_decides_a_supervised_model_with_limits_raised_by_its_faults(tmp_path: Path) -> None:
    from fabwatch.models.training.train import TrainConfig, train

    path = tmp_path / "fab.csv"
    synth.write(synth.generate(entities=2, steps=800, seed=2, anomaly_rate=0.2), path)
    result = train(TrainConfig.quick(data=path, registry=tmp_path / "reg", window=30, epochs=1, stride=4,
                                     monitor=True, force=True))
    m = result.manifest
    assert m.task == "classify" and m.members[-1] == "monitor" and len(m.members) == 6
    factor = m.extra["monitor"]["fault_factor"]
    assert factor >= 1.0 and "labelled faults" in m.thresholds.method and m.thresholds.alert == 1.0
    model = ScoringModel.from_registry(tmp_path / "reg", providers=["CPUExecutionProvider"])
    table = synth.generate(entities=1, steps=200, seed=4, anomaly_rate=0.0)
    x = np.column_stack([table.column(f).to_numpy() for f in synth.FEATURES]).astype(np.float32)
    out = model.predict(data.windows(x, None, 30, stride=20).x)
    np.testing.assert_array_equal(out.member_scores[:, -1], out.score)  # the monitor decides
    assert ((out.member_scores[:, :-1] >= 0) & (out.member_scores[:, :-1] <= 1)).all()  # the classifiers still run


def test_monitor_needs_the_classify_task(tmp_path: Path) -> None:
    from fabwatch.export.errors import UsageError
    from fabwatch.models.training.train import TrainConfig, train

    with pytest.raises(UsageError, match="--monitor"):
        train(TrainConfig.quick(data=tmp_path / "none.csv", registry=tmp_path / "reg", task="forecast",
                                label_col=None, monitor=True))


def test_time_budget_stops_a_stage_mid_epoch() -> None:
    """A budget that has run out ends training after the batch in hand, not at the end of the epoch."""
    import time

    from fabwatch.models.tf import keras, tf
    from fabwatch.models.training.train import Deadline

    batches: list[int] = []
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    ds = tf.data.Dataset.from_tensor_slices((np.zeros((80, 4), np.float32), np.zeros(80, np.float32))).batch(8)
    counter = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: batches.append(batch))
    model.fit(ds, epochs=3, verbose=0, callbacks=[counter, Deadline(time.monotonic() - 1.0)])
    assert batches == [0]  # 1 of 10 batches in the first of 3 epochs
