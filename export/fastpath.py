"""The GPU serving fast path: onnxruntime IO binding on buffers allocated once per batch-size bucket, each batch
padded up to its bucket (batches over the largest bucket run in chunks), one CUDA graph captured per bucket, and
a check of where onnxruntime placed every node.

On the CPU the same runner binds host buffers, so CI exercises the padding, chunking and buffer reuse that the
GPU path relies on.
"""

from __future__ import annotations

import bisect
import ctypes
import json
import logging
import os
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
DEFAULT_BUCKETS = tuple(2 ** i for i in range(14))  # 1 .. 8192: padding never more than doubles a batch
PROBE_BATCHES = (2, 3)  # tensors whose shapes differ between the two are data; the others are shape arithmetic
COPY_OPS = ("MemcpyToHost", "MemcpyFromHost")  # what onnxruntime inserts where data crosses host and device
ELEMENT_TYPES: dict[str, Any] = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                                 "tensor(double)": np.float64}
GRAPH_ID_KEY = "gpu_graph_id"  # run option naming the CUDA graph of a run; "-1" runs without capture or replay
SKIP_GRAPH = "-1"
# Capturing a CUDA graph must not overlap CUDA work of this process in another thread (a hot reload builds the
# next model beside the serving one): captures, session creation and probes take this lock.
CUDA_LOCK = threading.RLock()


class PlacementError(RuntimeError):
    """A GPU session runs compute nodes on the CPU, or copies data between host and device inside the graph."""


@dataclass
class Placement:
    """Where onnxruntime ran each node, from the session's profile of two probe batches."""

    ops: dict[str, dict[str, int]]                      # provider -> op type -> nodes
    cpu_compute: list[str] = field(default_factory=list)  # CPU nodes whose tensor shapes follow the batch size
    copies: list[str] = field(default_factory=list)       # host <-> device copy nodes between providers

    def check(self) -> None:
        """Raise unless every node that touches data runs on the GPU.

        The CUDA provider deliberately leaves shape arithmetic (what follows its own Shape nodes, up to Reshape's
        shape input) on the CPU; onnxruntime itself accepts that for CUDA graphs as long as it inserted no copy
        node. A CPU node whose tensors change shape with the batch size handles data: real compute, or a whole
        tensor copied to the host.
        """
        if self.cpu_compute or self.copies:
            raise PlacementError(f"compute on the CPU in a GPU session: nodes {self.cpu_compute or 'none'}, "
                                 f"host/device copies {self.copies or 'none'}")

    def as_dict(self) -> dict[str, Any]:
        return {"ops": self.ops, "cpu_compute": self.cpu_compute, "copies": self.copies}


def placement_from_profile(events: Sequence[dict[str, Any]]) -> Placement:
    """Read an onnxruntime profile (JSON trace events) covering runs at each of ``PROBE_BATCHES``."""
    runs: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        args = event["args"]
        shapes = json.dumps([args.get("input_type_shape"), args.get("output_type_shape")], sort_keys=True)
        runs[event["name"]].append((args["provider"], args["op_name"], shapes))
    ops: dict[str, Counter[str]] = defaultdict(Counter)
    cpu_compute, copies = [], []
    for name, seen in sorted(runs.items()):
        provider, op = seen[0][0], seen[0][1]
        ops[provider][op] += 1
        node = name.removesuffix("_kernel_time")
        if op in COPY_OPS:
            copies.append(node)
        elif provider == "CPUExecutionProvider" and len({shapes for _, _, shapes in seen}) > 1:
            cpu_compute.append(node)
    return Placement({p: dict(sorted(c.items())) for p, c in sorted(ops.items())}, cpu_compute, copies)


def profile_placement(session: ort.InferenceSession) -> Placement:
    """Run the probe batches on a session created with profiling on, end the profile and read the placement.

    Profiling stops with ``end_profiling``, so later runs pay nothing for it.
    """
    inp = session.get_inputs()[0]
    rows = row_shape(inp.shape, inp.name)
    options = skip_graph_options()
    with CUDA_LOCK:
        for batch in PROBE_BATCHES:
            session.run(None, {inp.name: np.zeros((batch, *rows), ELEMENT_TYPES[inp.type])}, options)
    path = session.end_profiling()
    if not path:
        raise ValueError("the session was created without profiling: no placement to read")
    try:
        return placement_from_profile(json.loads(Path(path).read_text()))
    finally:
        os.unlink(path)


def row_shape(shape: Sequence[Any], name: str) -> tuple[int, ...]:
    """The shape of one batch row; buffers are allocated up front, so every dimension after the batch is fixed."""
    rows = tuple(shape[1:])
    if not all(isinstance(d, int) for d in rows):
        raise ValueError(f"input {name} has shape {list(shape)}: the fast path needs fixed dimensions after the batch")
    return rows


def skip_graph_options() -> ort.RunOptions:
    """Run options for a run outside any CUDA graph (probes, the output-shape run)."""
    options = ort.RunOptions()
    options.add_run_config_entry(GRAPH_ID_KEY, SKIP_GRAPH)
    return options


def bucket_for(rows: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``rows`` (at most the largest bucket)."""
    return buckets[bisect.bisect_left(buckets, rows)]


def _copy_into(src: np.ndarray, out: np.ndarray) -> None:
    np.copyto(out, src, casting="same_kind")


def _pinned_host_array(shape: tuple[int, ...], dtype: Any) -> tuple[np.ndarray, ort.OrtValue] | None:
    """A numpy view of page-locked host memory from the CUDA provider's host-accessible allocator (fast DMA to the
    device), with the OrtValue that owns it; None when this onnxruntime build offers none."""
    try:
        devices = [d for d in ort.get_ep_devices() if d.ep_name == "CUDAExecutionProvider"]
        info = devices[0].memory_info(ort.OrtDeviceMemoryType.HOST_ACCESSIBLE) if devices else None
        if info is None:
            return None
        value = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, memory_info=info)
    except Exception as exc:  # a capability probe: any failure means pageable staging, said in the log
        log.info("no pinned host memory from onnxruntime (%s): pageable staging buffers", exc)
        return None
    raw = (ctypes.c_byte * value.tensor_size_in_bytes()).from_address(value.data_ptr())
    return np.frombuffer(raw, dtype=dtype).reshape(shape), value


@dataclass
class _Slot:
    """The bound buffers of one bucket, allocated on first use and reused by every later batch of that bucket."""

    rows: int
    staging: np.ndarray                   # host rows the batch is written into; bound directly on the CPU
    binding: ort.IOBinding
    outputs: list[ort.OrtValue]           # bound output buffers
    host_outputs: list[np.ndarray] | None  # numpy views of the outputs (CPU only)
    device_input: ort.OrtValue | None     # device copy of the staging rows (GPU only)
    run_options: ort.RunOptions | None    # names this bucket's CUDA graph
    owners: list[ort.OrtValue]            # OrtValues of the staging memory (bound on the CPU, pinned on a GPU)
    captured: bool = False
    dirty_rows: int = 0                   # rows past a batch still holding an earlier batch's data


class BoundRunner:
    """Runs batches through IO binding, padding each to its bucket; not for concurrent use from several threads.

    ``session`` decides the device: a GPU provider first means device buffers (staged through pinned host memory
    when onnxruntime can allocate it), else host buffers. ``cuda_graphs`` means the session was created with the
    CUDA provider's ``enable_cuda_graph``: each bucket then gets its own graph id, captured on its first batch.
    ``placement`` is the session's node placement when it was profiled (see ``profile_placement``).
    """

    def __init__(self, session: ort.InferenceSession, buckets: Sequence[int] = DEFAULT_BUCKETS,
                 cuda_graphs: bool = False, placement: Placement | None = None):
        self.session = session
        self.placement = placement
        self.provider = session.get_providers()[0]
        self.device = "cuda" if self.provider in GPU_PROVIDERS else "cpu"
        self.cuda_graphs = cuda_graphs and self.device == "cuda"
        self.buckets = tuple(sorted(set(buckets)))
        inp = session.get_inputs()[0]
        self.input_name, self.dtype = inp.name, ELEMENT_TYPES[inp.type]
        self.row_shape = row_shape(inp.shape, inp.name)
        self.output_names = [o.name for o in session.get_outputs()]
        self.output_dtypes = [ELEMENT_TYPES[o.type] for o in session.get_outputs()]
        self.output_rows = self._output_rows()
        self.pinned = self.device == "cuda" and _pinned_host_array((1,), np.float32) is not None
        self._slots: dict[int, _Slot] = {}

    def describe(self) -> dict[str, Any]:
        """What the runner does, for logs and benchmark reports."""
        return {"provider": self.provider, "summary": self.summary(), "io_binding": True, "buckets": list(self.buckets),
                "cuda_graphs": self.cuda_graphs, "pinned_staging": self.pinned,
                "placement": self.placement.as_dict() if self.placement else None}

    def summary(self) -> str:
        staging = ("host buffers bound directly" if self.device == "cpu"
                   else f"{'pinned' if self.pinned else 'pageable'} host staging")
        return (f"IO binding, buckets {self.buckets[0]}..{self.buckets[-1]}, "
                f"CUDA graphs {'on' if self.cuda_graphs else 'off'}, {staging}")

    def _output_rows(self) -> list[tuple[int, ...]]:
        """Per-output row shapes from one batch-1 run: outputs are bound before a batch runs, so they must be
        batch-major with fixed row shapes."""
        x = np.zeros((1, *self.row_shape), self.dtype)
        with CUDA_LOCK:
            outs = self.session.run(None, {self.input_name: x}, skip_graph_options())
        for name, out in zip(self.output_names, outs):
            if out.ndim == 0 or out.shape[0] != 1:
                raise ValueError(f"output {name} has shape {out.shape} for one row: the fast path needs "
                                 "batch-major outputs")
        return [tuple(out.shape[1:]) for out in outs]

    def _slot(self, rows: int) -> _Slot:
        slot = self._slots.get(rows)
        if slot is None:
            slot = self._slots[rows] = self._allocate(rows)
        return slot

    def _allocate(self, rows: int) -> _Slot:
        shape = (rows, *self.row_shape)
        binding = self.session.io_binding()
        owners: list[ort.OrtValue] = []
        if self.device == "cpu":
            staging = np.zeros(shape, self.dtype)
            owners.append(ort.OrtValue.ortvalue_from_numpy(staging))
            binding.bind_ortvalue_input(self.input_name, owners[-1])
            device_input = None
            host_outputs = [np.zeros((rows, *r), d) for r, d in zip(self.output_rows, self.output_dtypes)]
            outputs = [ort.OrtValue.ortvalue_from_numpy(a) for a in host_outputs]
        else:
            pinned = _pinned_host_array(shape, self.dtype) if self.pinned else None
            if pinned is None:
                staging = np.zeros(shape, self.dtype)
            else:
                staging, owner = pinned
                staging.fill(0)
                owners.append(owner)
            device_input = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), self.dtype, "cuda", 0)
            binding.bind_ortvalue_input(self.input_name, device_input)
            host_outputs = None
            outputs = [ort.OrtValue.ortvalue_from_shape_and_type([rows, *r], d, "cuda", 0)
                       for r, d in zip(self.output_rows, self.output_dtypes)]
        for name, value in zip(self.output_names, outputs):
            binding.bind_ortvalue_output(name, value)
        run_options = None
        if self.cuda_graphs:
            run_options = ort.RunOptions()
            run_options.add_run_config_entry(GRAPH_ID_KEY, str(self.buckets.index(rows) + 1))
        log.debug("allocated %s buffers for batches of up to %d rows", self.device, rows)
        return _Slot(rows, staging, binding, outputs, host_outputs, device_input, run_options, owners)

    def run(self, batch: np.ndarray, write: Callable[[np.ndarray, np.ndarray], None] = _copy_into
            ) -> list[np.ndarray]:
        """The session's outputs for ``batch`` (rows beyond the largest bucket run in chunks).

        ``write(src, out)`` puts the model input for the raw rows ``src`` into ``out`` (a view of the bound
        buffer), so preprocessing such as scaling writes straight into it.
        """
        n, top = len(batch), self.buckets[-1]
        if n == 0:
            return [np.zeros((0, *r), d) for r, d in zip(self.output_rows, self.output_dtypes)]
        if n > top:
            parts = [self.run(batch[lo:lo + top], write) for lo in range(0, n, top)]
            return [np.concatenate(chunks) for chunks in zip(*parts)]
        slot = self._slot(bucket_for(n, self.buckets))
        write(batch, slot.staging[:n])
        if slot.dirty_rows > n:
            slot.staging[n:slot.dirty_rows] = 0  # padding rows are zeros, whatever ran before
        slot.dirty_rows = n
        if slot.device_input is not None:
            slot.device_input.update_inplace(slot.staging)
        if self.cuda_graphs and not slot.captured:
            with CUDA_LOCK:
                self.session.run_with_iobinding(slot.binding, slot.run_options)
            slot.captured = True
        else:
            self.session.run_with_iobinding(slot.binding, slot.run_options)
        if slot.host_outputs is not None:
            return [out[:n].copy() for out in slot.host_outputs]
        return [value.numpy()[:n] for value in slot.outputs]
