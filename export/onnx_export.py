"""TF (tf_keras) -> ONNX with tf2onnx, checked for fused recurrent ops and parity against TensorFlow.

Training side only: imports TensorFlow through ``fabwatch.models.tf``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    import onnx

FORBIDDEN_OPS = ("Loop", "Scan")
OPSET = 17


class ExportError(RuntimeError):
    """The exported graph breaks the serving contract (forbidden ops, parity over tolerance)."""


@dataclass
class ExportReport:
    path: Path
    op_histogram: dict[str, int]
    parity_max_abs: float
    outputs: list[str] = field(default_factory=list)


def op_histogram(model_path: Path | str) -> dict[str, int]:
    import onnx

    graph = onnx.load(str(model_path)).graph
    counts = Counter(n.op_type for n in graph.node)
    # ops nested in subgraphs (If/Loop bodies) count too
    for node in graph.node:
        for attr in node.attribute:
            if attr.g is not None:
                counts.update(n.op_type for n in attr.g.node)
    return dict(sorted(counts.items()))


def keras_to_onnx(model, out_path: Path, input_name: str = "window", output_names: Sequence[str] | None = None,
                  parity_samples: int = 256, tolerance: float = 1e-4, seed: int = 0,
                  sample_inputs: np.ndarray | None = None) -> ExportReport:
    """Export ``model`` (one float32 input ``[batch, *shape]``) and verify it.

    Parity: |ONNX - TF| over every output on ``parity_samples`` random inputs (or ``sample_inputs``) must be
    within ``tolerance``, relative where TF's value exceeds 1 (float32 keeps about 7 digits: the statistical
    monitor's ratio reaches thousands on random inputs). The report gives the max absolute difference. The graph
    must contain no Loop/Scan nodes.
    """
    import onnxruntime as ort
    import tf2onnx

    from fabwatch.models.tf import tf

    shape = tuple(model.inputs[0].shape[1:])
    dtype = tf.as_dtype(model.inputs[0].dtype)
    spec = [tf.TensorSpec((None, *shape), dtype, name=input_name)]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=OPSET, output_path=str(out_path))
    hist = op_histogram(out_path)
    bad = {op: hist[op] for op in FORBIDDEN_OPS if op in hist}
    if bad:
        raise ExportError(f"exported graph has {bad}: recurrent layers must export as fused LSTM/GRU ops")

    if sample_inputs is None:
        rng = np.random.default_rng(seed)
        sample_inputs = rng.standard_normal((parity_samples, *shape)).astype(dtype.as_numpy_dtype)
    tf_out = model(sample_inputs, training=False)
    if isinstance(tf_out, dict):
        tf_out = list(tf_out.values())
    elif not isinstance(tf_out, (list, tuple)):
        tf_out = [tf_out]
    session = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: sample_inputs})
    names = [o.name for o in session.get_outputs()]
    if output_names is not None and list(output_names) != names:
        raise ExportError(f"ONNX outputs {names} differ from the contract {list(output_names)}")
    pairs = [(np.asarray(t, dtype=np.float64).reshape(o.shape), o) for t, o in zip(tf_out, onnx_out) if o.size]
    diff = max((float(np.max(np.abs(t - o))) for t, o in pairs), default=0.0)
    relative = max((float(np.max(np.abs(t - o) / np.maximum(np.abs(t), 1.0))) for t, o in pairs), default=0.0)
    if relative > tolerance:
        raise ExportError(f"ONNX/TF parity {relative:.2e} (relative above 1) exceeds {tolerance:.0e}")
    return ExportReport(path=out_path, op_histogram=hist, parity_max_abs=diff, outputs=names)


def _casts_to(node: onnx.NodeProto, dtype: int) -> bool:
    return node.op_type == "Cast" and any(a.name == "to" and a.i == dtype for a in node.attribute)


def _dedicated_output_nodes(model: onnx.ModelProto) -> None:
    """Give every graph output its own Identity producer, so a tensor that is both an output and consumed
    inside the graph (e.g. ``weights``) can be cast back to fp32 for the caller while staying fp16 inside."""
    import onnx

    for out in model.graph.output:
        inner = f"{out.name}__inner"
        for node in model.graph.node:
            node.output[:] = [inner if o == out.name else o for o in node.output]
            node.input[:] = [inner if i == out.name else i for i in node.input]
        model.graph.node.append(onnx.helper.make_node("Identity", [inner], [out.name], name=f"{out.name}__identity"))


def _bypass_input_roundtrips(model: onnx.ModelProto) -> None:
    """A blocked (fp32) node fed from a graph input gets the input itself, not its fp16-rounded copy: the
    in-graph rules compare against thresholds, and rounding the window to fp16 would flip flags."""
    from onnx import TensorProto

    inputs = {i.name for i in model.graph.input}
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if not _casts_to(node, TensorProto.FLOAT):
            continue
        src = producer.get(node.input[0])
        if src is not None and src.op_type == "Cast" and src.input[0] in inputs:
            node.input[0] = src.input[0]


def to_fp16(src: Path, dst: Path, block_nodes: Sequence[str] = ("rule_flags",), parity_samples: int = 256,
            tolerance: float = 1e-2, seed: int = 0, sample_inputs: np.ndarray | None = None) -> float:
    """Write an fp16 variant of ``src`` with fp32 inputs/outputs; returns its max |fp16 - fp32| output difference.

    onnxconverter-common's converter, as-is, breaks on these graphs in two places that are fixed here: ``Cast``
    nodes to float32 (from tf2onnx's shape arithmetic) stay float32 while the converter types their outputs
    fp16, and outputs that are also consumed inside the graph get mistyped. Nodes whose names contain any of
    ``block_nodes`` (the in-graph rules: threshold comparisons) stay fp32 and read the fp32 input directly.
    """
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto
    from onnxconverter_common import float16

    model = onnx.load(str(src))
    _dedicated_output_nodes(model)
    float_casts = {n.name for n in model.graph.node
                   if _casts_to(n, TensorProto.FLOAT)}
    blocked = [n.name for n in model.graph.node if any(b in n.name for b in block_nodes)]
    half = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=blocked)
    for node in half.graph.node:
        if node.name in float_casts and node.name not in blocked:
            next(a for a in node.attribute if a.name == "to").i = TensorProto.FLOAT16
    _bypass_input_roundtrips(half)
    dst = Path(dst)
    onnx.save(half, str(dst))

    full = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    inp = full.get_inputs()[0]
    if sample_inputs is None:
        shape = [d if isinstance(d, int) else parity_samples for d in inp.shape]
        sample_inputs = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    halved = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    diff = max(float(np.max(np.abs(a - b))) for a, b in
               zip(full.run(None, {inp.name: sample_inputs}), halved.run(None, {inp.name: sample_inputs})))
    if diff > tolerance:
        raise ExportError(f"fp16 parity {diff:.2e} exceeds {tolerance:.0e}")
    return diff
