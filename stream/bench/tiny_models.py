"""Tiny ONNX models that meet the registry contract, built with the onnx helper API (no TensorFlow).

``spike``: member "spike" = max |x| of the last (scaled) step, member "level" = mean |x| over the window,
score = weighted sum, so a reading ``k`` standard deviations off scores about ``k/2``. ``noop``: the
cheapest graph that still has the contract's outputs. Used by tests and by ``fabwatch bench stream``
(the no-op model isolates the processor's own overhead from inference).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fabwatch.export.registry import Manifest, Registry, Scaler, Thresholds, ThresholdsBy

Kind = Literal["spike", "noop"]


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))


def build_model(n_features: int, window: int = 100, kind: Kind = "spike", weights: Sequence[float] = (0.5, 0.5),
                feature_error: bool = False) -> onnx.ModelProto:
    """An ONNX graph: input "window" float32 [batch, window, F] -> score, member_scores, weights (+ feature_error)."""
    i64 = lambda *v: np.asarray(v, dtype=np.int64)  # noqa: E731
    nodes = [
        _const("start", i64(-1)), _const("end", i64(window)), _const("ax1", i64(1)),
        helper.make_node("Slice", ["window", "start", "end", "ax1"], ["last3"]),
        helper.make_node("Squeeze", ["last3", "ax1"], ["last"]),                      # [B, F]
    ]
    outputs = [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"]),
               helper.make_tensor_value_info("member_scores", TensorProto.FLOAT, ["batch", None]),
               helper.make_tensor_value_info("weights", TensorProto.FLOAT, ["batch", None])]
    if kind == "noop":
        nodes += [
            helper.make_node("ReduceMax", ["last", "ax1"], ["m"], keepdims=1),     # [B, 1]
            _const("zero", np.zeros((1, 1), np.float32)), _const("one", np.ones((1, 1), np.float32)),
            helper.make_node("Mul", ["m", "zero"], ["member_scores"]),
            helper.make_node("Add", ["member_scores", "one"], ["weights"]),
            helper.make_node("Squeeze", ["member_scores", "ax1"], ["score"]),
        ]
    else:
        nodes += [
            helper.make_node("Abs", ["last"], ["abs_last"]),
            helper.make_node("ReduceMax", ["abs_last", "ax1"], ["spike"], keepdims=1),    # [B, 1]
            helper.make_node("Abs", ["window"], ["abs_all"]), _const("ax12", i64(1, 2)),
            helper.make_node("ReduceMean", ["abs_all", "ax12"], ["level"], keepdims=0),
            helper.make_node("Unsqueeze", ["level", "ax1"], ["level2"]),                  # [B, 1]
            helper.make_node("Concat", ["spike", "level2"], ["member_scores"], axis=1),  # [B, 2]
            _const("w", np.asarray([weights], dtype=np.float32)), _const("zero", np.zeros((1, 2), np.float32)),
            helper.make_node("Mul", ["member_scores", "zero"], ["zeros"]),
            helper.make_node("Add", ["zeros", "w"], ["weights"]),
            helper.make_node("Mul", ["member_scores", "weights"], ["weighted"]),
            helper.make_node("ReduceSum", ["weighted", "ax1"], ["score"], keepdims=0),
        ]
        if feature_error:
            nodes.append(helper.make_node("Identity", ["abs_last"], ["feature_error"]))
            outputs.append(helper.make_tensor_value_info("feature_error", TensorProto.FLOAT, ["batch", n_features]))
    graph = helper.make_graph(nodes, f"fabwatch-test-{kind}",
                              [helper.make_tensor_value_info("window", TensorProto.FLOAT, ["batch", window, n_features])],
                              outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def feature_names(n: int) -> list[str]:
    return [f"f{i:02d}" for i in range(n)]


def add_version(root: Path | str, n_features: int = 4, *, kind: Kind = "spike", window: int = 100,
                mean: float = 10.0, std: float = 2.0, alert: float = 3.0, close: float = 1.5,
                critical: float | None = 5.0, task: str = "classify", weights: Sequence[float] = (0.5, 0.5),
                promote: bool = True, feature_error: bool = False, thresholds_by: ThresholdsBy | None = None) -> str:
    """Stage, commit (and promote) one version into the registry at ``root``; returns its version."""
    reg = Registry(root)
    staging = reg.stage()
    onnx.save(build_model(n_features, window, kind, weights, feature_error), str(staging / "model.onnx"))
    members = ["spike", "level"] if kind == "spike" else ["noop"]
    manifest = Manifest(
        version="pending", created="", task=task, feature_names=feature_names(n_features), window=window,
        scaler=Scaler(mean=[mean] * n_features, std=[std] * n_features),
        thresholds=Thresholds(alert=alert, close=close, critical=critical, method="test fixture"),
        thresholds_by=thresholds_by,
        members=members, inputs={"window": ["batch", window, n_features]},
        outputs=["score", "member_scores", "weights"] + (["feature_error"] if feature_error else []),
    )
    version = reg.commit(staging, manifest)
    if promote:
        reg.promote(version)
    return version
