"""The serving fast path on the CPU: IO binding with per-bucket buffers, padding and chunking give the scores of a
plain session; buffers are allocated once per bucket; the placement check tells shape arithmetic from compute;
``fabwatch bench inference`` reports the CPU figures."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from fabwatch.export.fastpath import BoundRunner, PlacementError, placement_from_profile, profile_placement
from fabwatch.export.registry import Manifest
from fabwatch.export.runtime import (FP16_FILE, ScoringModel, create_session, fp16_parity_holds, provider_options,
                                      trt_cache_dir)
from fabwatch.models.bench.inference import META_FILE, NO_TORCH, ratios, targets
from onnx_fixtures import make_registry
from fabwatch.stream.cli.main import app
from fabwatch.stream.bench.tiny_models import build_model

BUCKETS = (1, 4, 16)
WINDOW, FEATURES, HIDDEN = 20, 3, 8


def lstm_model(path: Path) -> Path:
    """A recurrent graph with the registry contract's outputs: its GEMMs see the whole (padded) batch, as the
    ensemble's do, so a padding or slicing mistake shows in the scores."""
    rng = np.random.default_rng(0)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)

    nodes = [
        helper.make_node("Transpose", ["window"], ["steps"], perm=[1, 0, 2]),
        helper.make_node("LSTM", ["steps", "W", "R", "B"], ["", "h_last"], hidden_size=HIDDEN),
        helper.make_node("Squeeze", ["h_last", "axis0"], ["h"]),
        helper.make_node("MatMul", ["h", "member_head"], ["member_logits"]),
        helper.make_node("Sigmoid", ["member_logits"], ["member_scores"]),
        helper.make_node("MatMul", ["h", "gate_head"], ["gate_logits"]),
        helper.make_node("Softmax", ["gate_logits"], ["weights"], axis=1),
        helper.make_node("Mul", ["member_scores", "weights"], ["weighted"]),
        helper.make_node("ReduceSum", ["weighted", "axis1"], ["score"], keepdims=0),
    ]
    initializers = [init("W", 1, 4 * HIDDEN, FEATURES), init("R", 1, 4 * HIDDEN, HIDDEN), init("B", 1, 8 * HIDDEN),
                    init("member_head", HIDDEN, 2), init("gate_head", HIDDEN, 2),
                    numpy_helper.from_array(np.asarray([0], np.int64), "axis0"),
                    numpy_helper.from_array(np.asarray([1], np.int64), "axis1")]
    window_input = helper.make_tensor_value_info("window", TensorProto.FLOAT, ["batch", WINDOW, FEATURES])
    graph = helper.make_graph(
        nodes, "lstm-contract", [window_input],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"]),
         helper.make_tensor_value_info("member_scores", TensorProto.FLOAT, ["batch", 2]),
         helper.make_tensor_value_info("weights", TensorProto.FLOAT, ["batch", 2])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def windows(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, WINDOW, FEATURES)).astype(np.float32)


@pytest.mark.parametrize("n", [1, 3, 4, 5, 15, 16, 17, 40])
def test_padded_buckets_and_chunks_score_like_a_plain_session(tmp_path: Path, n: int):
    path = lstm_model(tmp_path / "model.onnx")
    plain = create_session(path, ["CPUExecutionProvider"])
    runner = BoundRunner(create_session(path, ["CPUExecutionProvider"]), BUCKETS)
    x = windows(n)
    runner.run(windows(BUCKETS[-1], seed=7))  # earlier, larger batches leave data in the bound buffers
    got = runner.run(x)
    want = plain.run(None, {"window": x})
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-6)


def test_each_bucket_allocates_once_and_onnxruntime_writes_into_the_bound_buffers(tmp_path: Path):
    runner = BoundRunner(create_session(lstm_model(tmp_path / "model.onnx"), ["CPUExecutionProvider"]), BUCKETS)
    runner.run(windows(3))
    slot = runner._slots[4]
    staging, outputs = slot.staging, [v.data_ptr() for v in slot.outputs]
    for n in (2, 4, 3):
        runner.run(windows(n, seed=n))
        assert runner._slots[4] is slot and slot.staging is staging
        assert [v.data_ptr() for v in slot.binding.get_outputs()] == outputs  # results land in our buffers
    assert np.all(slot.staging[3:] == 0)  # rows past the batch are zero padding, not the earlier batch
    runner.run(windows(9))
    assert sorted(runner._slots) == [4, 16]


def test_scoring_model_fast_path_on_the_cpu_matches_the_plain_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    reg = make_registry(tmp_path / "reg")
    vdir, manifest = reg.resolve()
    plain = ScoringModel(vdir, manifest, ["CPUExecutionProvider"])
    assert plain.runner is None  # on the CPU the fast path is opt-in
    monkeypatch.setenv("FABWATCH_FAST_PATH", "1")
    fast = ScoringModel.from_registry(reg, providers=["CPUExecutionProvider"])
    assert fast.runner is not None and not fast.fp16
    rng = np.random.default_rng(2)
    for n in (1, 6, 300, 9000):  # 9000: over the largest bucket, scored in chunks
        raw = 10.0 + 2.0 * rng.standard_normal((n, 100, 4))
        want, got = plain.predict(raw), fast.predict(raw)
        for field in ("score", "member_scores", "weights"):
            np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=0, atol=1e-6)


def test_fp16_variant_is_served_only_where_its_parity_holds(tmp_path: Path):
    manifest = Manifest(version="v0001", created="", task="classify", feature_names=["a"])
    assert not fp16_parity_holds(tmp_path, manifest)
    (tmp_path / FP16_FILE).write_bytes(b"")
    manifest.parity[FP16_FILE] = 5e-4
    assert fp16_parity_holds(tmp_path, manifest)
    manifest.parity[FP16_FILE] = 5e-3
    assert not fp16_parity_holds(tmp_path, manifest)


def _node(name: str, provider: str, op: str, inputs: list, outputs: list) -> dict:
    return {"cat": "Node", "name": f"{name}_kernel_time", "args": {
        "provider": provider, "op_name": op, "input_type_shape": inputs, "output_type_shape": outputs}}


def _profile(batch: int) -> list[dict]:
    """One probe run of a GPU session: the shape arithmetic after CUDA's Shape node on the CPU, the model on CUDA."""
    return [
        _node("shape", "CUDAExecutionProvider", "Shape", [{"float": [batch, 100, 12]}], [{"int64": [3]}]),
        _node("gather", "CPUExecutionProvider", "Gather", [{"int64": [3]}, {"int64": []}], [{"int64": []}]),
        _node("concat", "CPUExecutionProvider", "Concat", [{"int64": [1]}, {"int64": [1]}], [{"int64": [2]}]),
        _node("lstm", "CUDAExecutionProvider", "LSTM", [{"float": [100, batch, 12]}], [{"float": [1, batch, 8]}]),
    ]


def test_placement_allows_shape_arithmetic_on_the_cpu():
    placement = placement_from_profile(_profile(2) + _profile(3))
    placement.check()
    assert placement.ops == {"CPUExecutionProvider": {"Concat": 1, "Gather": 1},
                             "CUDAExecutionProvider": {"LSTM": 1, "Shape": 1}}


def test_placement_fails_on_a_cpu_compute_node_or_a_host_device_copy():
    def relu(batch: int) -> dict:
        return _node("relu", "CPUExecutionProvider", "Relu", [{"float": [batch, 8]}], [{"float": [batch, 8]}])

    placement = placement_from_profile(_profile(2) + [relu(2)] + _profile(3) + [relu(3)])
    assert placement.cpu_compute == ["relu"]
    with pytest.raises(PlacementError, match="relu"):
        placement.check()
    copy = _node("copy", "CUDAExecutionProvider", "MemcpyToHost", [{"float": [1]}], [{"float": [1]}])
    with pytest.raises(PlacementError, match="copy"):
        placement_from_profile(_profile(2) + [copy] + _profile(3) + [copy]).check()


def test_placement_of_a_real_session_finds_the_cpu_compute_and_ends_profiling(tmp_path: Path):
    session = create_session(lstm_model(tmp_path / "model.onnx"), ["CPUExecutionProvider"], profile=True)
    placement = profile_placement(session)
    assert {"LSTM", "MatMul", "Sigmoid"} <= set(placement.ops["CPUExecutionProvider"])
    assert len(placement.cpu_compute) >= 5  # what a GPU session must not leave on the CPU
    with pytest.raises(PlacementError):
        placement.check()
    assert session.end_profiling() == ""  # profiling stopped: later runs pay nothing for it


def _bench_models(directory: Path) -> Path:
    """A ``--models`` directory as ``fabwatch bench inference`` leaves it, holding the tiny contract graph."""
    from fabwatch.export.onnx_export import to_fp16

    directory.mkdir()
    model = build_model(12)
    for i, node in enumerate(model.graph.node):
        node.name = f"node{i}"  # the fp16 converter names its casts after the nodes
    onnx.save(model, str(directory / "model.onnx"))
    parity = to_fp16(directory / "model.onnx", directory / FP16_FILE, parity_samples=8)
    (directory / META_FILE).write_text(json.dumps({"size": "tiny", "window": 100, "features": 12,
                                                   "parameters": {"total": 0}, "fp16_parity": parity}))
    return directory


def test_bench_inference_reports_cpu_figures_for_fp32_and_fp16(tmp_path: Path):
    models = _bench_models(tmp_path / "models")
    result = CliRunner().invoke(app, ["bench", "inference", "--json", "--size", "tiny", "--models", str(models),
                                      "--providers", "CPUExecutionProvider", "--batches", "4,16", "--budget-s", "0.05"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    cpu = report["providers"]["CPUExecutionProvider"]
    for variant in ("fp32", "fp16"):
        assert cpu[variant]["fast_path"]["io_binding"] is True
        latency = cpu[variant]["batch1"]
        assert 0 < latency["p50_ms"] <= latency["p99_ms"]
        assert [r["batch"] for r in cpu[variant]["throughput"]] == [4, 16]
        assert all(r["windows_per_s"] > 0 for r in cpu[variant]["throughput"])
    if importlib.util.find_spec("torch") is None:
        assert report["reference"] == {"skipped": NO_TORCH}
    assert report["targets"] == {}  # the GPU targets are judged on GPU providers only


def test_bench_inference_refuses_models_of_another_size(tmp_path: Path):
    models = _bench_models(tmp_path / "models")
    result = CliRunner().invoke(app, ["bench", "inference", "--models", str(models), "--budget-s", "0"])
    assert result.exit_code != 0 and "holds the tiny ensemble" in str(result.exception)


def test_ratios_and_targets_compare_onnx_with_the_reference():
    onnx_figs = {"batch1": {"p50_ms": 1.5}, "throughput": [{"batch": 256, "windows_per_s": 400_000.0},
                                                        {"batch": 8192, "windows_per_s": 900_000.0}]}
    torch_figs = {"batch1": {"p50_ms": 3.0}, "throughput": [{"batch": 256, "windows_per_s": 200_000.0},
                                                          {"batch": 8192, "windows_per_s": 1_000_000.0}]}
    ratio = ratios(onnx_figs, torch_figs)
    assert ratio == {"batch1_p50_ms": 0.5, "windows_per_s": {"256": 2.0, "8192": 0.9}}
    assert targets(onnx_figs, ratio) == {"batch1_p50_ms": True, "windows_per_s": True, "faster_than_torch": False}
    assert targets(onnx_figs, None)["faster_than_torch"] is None


def test_torch_reference_mirrors_the_keras_layer_sizes():
    torch = pytest.importorskip("torch")
    from fabwatch.models.bench import torch_reference

    model = torch_reference.build(100, 12, "full")
    # the Keras ensemble has 1,645,090 parameters; PyTorch's LSTMs add a second bias vector per direction
    extra_lstm_bias = 4 * (128 + 128 + 64) + 4 * (2 * 128 + 64) + 4 * 2 * 128 + 4 * 32  # stacked, cnn, spike, rules
    assert torch_reference.parameter_count(model) == 1_645_090 + extra_lstm_bias
    with torch.inference_mode():
        score, members, weights = model(torch.zeros(3, 100, 12))
    assert score.shape == (3,) and members.shape == weights.shape == (3, 5)


def test_a_read_only_registry_loads_and_the_tensorrt_cache_lives_outside_it(tmp_path: Path, monkeypatch):
    """Processors mount the registry read-only: loading writes nothing there, and TensorRT's engine cache goes to
    $FABWATCH_TRT_CACHE (else ~/.cache/fabwatch/trt), one folder per model file's sha256."""
    root = tmp_path / "registry"
    vdir = make_registry(root).resolve()[0]
    cache_root = tmp_path / "writable" / "trt"
    monkeypatch.setenv("FABWATCH_TRT_CACHE", str(cache_root))
    tree = [root, *root.rglob("*")]
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in tree}
    for p in tree:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        model = ScoringModel.from_registry(root, providers=["CPUExecutionProvider"])
        assert model.predict(np.zeros((2, model.manifest.window, len(model.feature_names)), np.float32)).score.shape == (2,)
        trt, cpu = provider_options(["TensorrtExecutionProvider", "CPUExecutionProvider"], vdir / "model.onnx",
                                    max_batch=64)
        cache = Path(trt[1]["trt_engine_cache_path"])
        assert cache.parent == cache_root and cache.is_dir() and cpu == "CPUExecutionProvider"
        monkeypatch.delenv("FABWATCH_TRT_CACHE")
        monkeypatch.delenv("FABWATCH_CACHE", raising=False)
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        assert trt_cache_dir(vdir / "model.onnx") == tmp_path / "home" / ".cache" / "fabwatch" / "trt" / cache.name
    finally:
        for p in tree:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in tree} == before
    assert sorted(root.rglob("*")) == sorted(tree[1:])
