"""TF (tf_keras) -> ONNX with tf2onnx, checked for fused recurrent ops and parity against TensorFlow.

Training side only: imports TensorFlow through ``models.tf``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

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

    Parity: max |ONNX - TF| over every output on ``parity_samples`` random inputs (or ``sample_inputs``)
    must be within ``tolerance``. The graph must contain no Loop/Scan nodes.
    """
    import onnxruntime as ort
    import tf2onnx

    from models.tf import tf

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
    diff = max(float(np.max(np.abs(np.asarray(t, dtype=np.float64).reshape(o.shape) - o))) if o.size else 0.0
               for t, o in zip(tf_out, onnx_out))
    if diff > tolerance:
        raise ExportError(f"ONNX/TF parity {diff:.2e} exceeds {tolerance:.0e}")
    return ExportReport(path=out_path, op_histogram=hist, parity_max_abs=diff, outputs=names)
