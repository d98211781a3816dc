"""onnxruntime sessions for serving: provider fallback TensorRT -> CUDA -> CPU, and the scoring model that applies
the manifest's scaler with numpy and returns the registry contract's outputs. On a GPU the scoring model runs
through the fast path of ``fabwatch.export.fastpath`` (IO binding, batch buckets, CUDA graphs, fp16 where parity holds)."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from fabwatch.export.fastpath import (
    CUDA_LOCK,
    DEFAULT_BUCKETS,
    GPU_PROVIDERS,
    BoundRunner,
    profile_placement,
)
from fabwatch.export.registry import Manifest, Registry

log = logging.getLogger(__name__)

PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
FP16_FILE = "model.fp16.onnx"
# The GPU path serves the fp16 variant only when the manifest's parity figure for it (max |fp16 - fp32| over
# every output, probability units for classify) is within this.
FP16_PARITY_LIMIT = 1e-3
TRT_OPT_BATCH = 256  # the batch size TensorRT tunes its kernels for (the processor's default micro-batch)


def trt_cache_dir(model_path: Path | str) -> Path:
    """Where TensorRT keeps the engines it builds for this model file: ``$FABWATCH_TRT_CACHE``, else
    ``~/.cache/fabwatch/trt`` (under ``$FABWATCH_CACHE`` when set), in a folder named by the file's sha256.

    Never beside the model: processors mount the registry read-only. The content hash keeps the engines of
    different versions (and of fp32 and fp16) apart, and lets a version keep its engines across restarts.
    """
    root = os.environ.get("FABWATCH_TRT_CACHE") or Path(
        os.environ.get("FABWATCH_CACHE") or Path.home() / ".cache" / "fabwatch") / "trt"
    digest = hashlib.sha256()
    with open(model_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return Path(root) / digest.hexdigest()[:16]


def tensorrt_present() -> bool:
    """Whether TensorRT's runtime library loads: onnxruntime-gpu lists the TensorRT provider either way, and
    without the library its session falls back to the next provider without the options set for it."""
    for name in ("libnvinfer.so.10", "libnvinfer.so"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def choose_providers(requested: Sequence[str] | None = None) -> list[str]:
    """The preferred providers this onnxruntime build can start; ``FABWATCH_PROVIDERS`` (comma list) overrides."""
    available = set(ort.get_available_providers())
    if "TensorrtExecutionProvider" in available and not tensorrt_present():
        available.discard("TensorrtExecutionProvider")
    if requested is None and os.environ.get("FABWATCH_PROVIDERS"):
        requested = [p.strip() for p in os.environ["FABWATCH_PROVIDERS"].split(",") if p.strip()]
    wanted = list(requested) if requested else list(PROVIDER_PREFERENCE)
    chosen = [p for p in wanted if p in available]
    if not chosen:
        raise RuntimeError(f"none of the providers {wanted} is available (this build has {sorted(available)})")
    return chosen


@functools.cache
def _preload_cuda_libraries() -> None:
    """CUDA and cuDNN from the nvidia-* wheels (e.g. PyTorch's) when the system has none; once per process."""
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


def _trt_shape_profile(model_path: Path, max_batch: int) -> dict[str, str]:
    """One TensorRT optimization profile for batches 1..max_batch, so padded buckets never rebuild the engine."""
    import onnx

    graph_input = onnx.load(str(model_path), load_external_data=False).graph.input[0]
    row = "x".join(str(d.dim_value) for d in graph_input.type.tensor_type.shape.dim[1:])
    name = graph_input.name
    return {"trt_profile_min_shapes": f"{name}:1x{row}",
            "trt_profile_opt_shapes": f"{name}:{min(TRT_OPT_BATCH, max_batch)}x{row}",
            "trt_profile_max_shapes": f"{name}:{max_batch}x{row}"}


def provider_options(chosen: Sequence[str], model_path: Path | str, *, cuda_graphs: bool = False,
                     max_batch: int | None = None) -> list[str | tuple[str, dict]]:
    """The providers with their options, as ``InferenceSession`` takes them; TensorRT's engine cache is
    ``trt_cache_dir(model_path)``, created here."""
    provider_args: list[str | tuple[str, dict]] = []
    for p in chosen:
        if p == "TensorrtExecutionProvider":
            cache = trt_cache_dir(model_path)
            cache.mkdir(parents=True, exist_ok=True)
            trt = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache), "trt_fp16_enable": True}
            provider_args.append((p, trt | (_trt_shape_profile(Path(model_path), max_batch) if max_batch else {})))
        elif p == "CUDAExecutionProvider" and cuda_graphs:
            provider_args.append((p, {"enable_cuda_graph": "1"}))
        else:
            provider_args.append(p)
    return provider_args


def create_session(model_path: Path | str, providers: Sequence[str] | None = None, intra_op_threads: int = 0, *,
                   cuda_graphs: bool = False, profile: bool = False, max_batch: int | None = None) -> ort.InferenceSession:
    """An InferenceSession on the best available provider; logs which one it got.

    ``cuda_graphs`` turns on the CUDA provider's graph capture (runs must then use IO binding, see
    ``fabwatch.export.fastpath``); ``profile`` records the first runs for ``profile_placement``; ``max_batch`` gives
    TensorRT one shape profile up to that batch size.
    """
    chosen = choose_providers(providers)
    if any(p in GPU_PROVIDERS for p in chosen):
        _preload_cuda_libraries()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tempfile.gettempdir(), f"fabwatch-placement-{os.getpid()}")
    provider_args = provider_options(chosen, model_path, cuda_graphs=cuda_graphs, max_batch=max_batch)
    session = ort.InferenceSession(str(model_path), sess_options=options, providers=provider_args)
    log.info("onnxruntime session for %s on %s", Path(model_path).name, session.get_providers()[0])
    return session


def open_fast_path(model_path: Path | str, providers: Sequence[str] | None = None,
                   buckets: Sequence[int] = DEFAULT_BUCKETS) -> BoundRunner:
    """A bound runner on the best available provider. On the CUDA provider each bucket gets a CUDA graph; on a GPU
    the node placement is checked and ``PlacementError`` raised when compute runs on the CPU."""
    chosen = choose_providers(providers)
    gpu, graphs = chosen[0] in GPU_PROVIDERS, chosen[0] == "CUDAExecutionProvider"
    with CUDA_LOCK:
        try:
            session = create_session(model_path, chosen, cuda_graphs=graphs, profile=gpu, max_batch=max(buckets))
        except Exception as exc:  # onnxruntime refuses graph capture for graphs it cannot capture: say so, go on
            if not graphs:
                raise
            log.warning("CUDA graphs refused for %s (%s): IO binding without graphs", Path(model_path).name, exc)
            session = create_session(model_path, chosen, profile=gpu, max_batch=max(buckets))
    enabled = session.get_provider_options().get("CUDAExecutionProvider", {}).get("enable_cuda_graph") == "1"
    runner = BoundRunner(session, buckets, cuda_graphs=enabled, placement=profile_placement(session) if gpu else None)
    if runner.device == "cuda" and runner.placement is not None:
        runner.placement.check()
    return runner


def _switch(env: str, value: bool | None, default: bool) -> bool:
    """An explicit argument, else ``env`` set to 1 or 0, else ``default``."""
    if value is not None:
        return value
    setting = os.environ.get(env, "").strip()
    if setting not in ("", "0", "1"):
        raise ValueError(f"{env} must be 1 or 0, got {setting!r}")
    return default if setting == "" else setting == "1"


def fp16_parity_holds(version_dir: Path, manifest: Manifest) -> bool:
    """Whether the version has an fp16 variant whose recorded parity is within ``FP16_PARITY_LIMIT``."""
    parity = manifest.parity.get(FP16_FILE)
    return (version_dir / FP16_FILE).exists() and parity is not None and parity <= FP16_PARITY_LIMIT


@dataclass
class ModelOutput:
    score: np.ndarray                 # [B]
    member_scores: np.ndarray         # [B, M]
    weights: np.ndarray               # [B, M]
    feature_error: np.ndarray | None  # [B, F] for the forecast task


class ScoringModel:
    """A registry version ready to score raw (unscaled) windows ``[B, window, F]``.

    On a GPU provider it scores through the fast path, with the fp16 variant where its parity holds. ``fast_path``
    (or ``FABWATCH_FAST_PATH=1|0``) and ``fp16`` (or ``FABWATCH_FP16=1|0``) override those choices, e.g. to run
    the fast path on the CPU. The fast path reuses its buffers: one ScoringModel per scoring thread.
    """

    def __init__(self, version_dir: Path, manifest: Manifest, providers: Sequence[str] | None = None,
                 fp16: bool | None = None, fast_path: bool | None = None, buckets: Sequence[int] = DEFAULT_BUCKETS):
        self.manifest = manifest
        self.version = manifest.version
        chosen = choose_providers(providers)
        on_gpu = chosen[0] in GPU_PROVIDERS
        self.fp16 = _switch("FABWATCH_FP16", fp16, on_gpu and fp16_parity_holds(version_dir, manifest))
        path = version_dir / (FP16_FILE if self.fp16 else "model.onnx")
        if self.fp16 and not path.exists():
            raise FileNotFoundError(f"{self.version} has no {FP16_FILE}: export it with --fp16")
        fast = _switch("FABWATCH_FAST_PATH", fast_path, on_gpu)
        self.runner = open_fast_path(path, chosen, buckets) if fast else None
        self.session = self.runner.session if self.runner else create_session(path, chosen)
        self.provider = self.session.get_providers()[0]
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        if manifest.scaler is not None:
            self._mean = np.asarray(manifest.scaler.mean, dtype=np.float32)
            self._inv_std = (1.0 / np.maximum(np.asarray(manifest.scaler.std, dtype=np.float32), 1e-6)).astype(np.float32)
        else:
            self._mean = self._inv_std = None
        log.info("scoring %s with %s on %s: %s", self.version, path.name, self.provider,
                 self.runner.summary() if self.runner else "plain session.run")

    @classmethod
    def from_registry(cls, registry: Registry | Path | str, version: str | None = None,
                      providers: Sequence[str] | None = None) -> "ScoringModel":
        reg = registry if isinstance(registry, Registry) else Registry(registry)
        vdir, manifest = reg.resolve(version)
        return cls(vdir, manifest, providers)

    @property
    def feature_names(self) -> list[str]:
        return self.manifest.feature_names

    def scale(self, windows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Scaled float32 windows, written into ``out`` when given (the fast path's bound buffer)."""
        if self._mean is None:
            if out is None:
                return windows.astype(np.float32, copy=False)
            np.copyto(out, windows, casting="same_kind")
            return out
        # flattened to [B, steps * F] with the scaler tiled per step: long inner loops instead of F-long ones
        b, steps, f = windows.shape
        mean, inv_std = np.tile(self._mean, steps), np.tile(self._inv_std, steps)
        flat = np.subtract(windows.reshape(b, steps * f), mean, dtype=np.float32,
                           out=None if out is None else out.reshape(b, steps * f))
        flat *= inv_std
        return flat.reshape(b, steps, f)

    def predict(self, windows: np.ndarray) -> ModelOutput:
        """Score raw windows; scaling happens here so every caller scales the same way."""
        if self.runner is not None:
            results = self.runner.run(windows, self.scale)
        else:
            results = self.session.run(None, {self.input_name: self.scale(windows)})
        outs = dict(zip(self.output_names, results))
        score = np.asarray(outs["score"], dtype=np.float32).reshape(-1)
        batch = score.shape[0]
        members = outs.get("member_scores", score.reshape(batch, 1))
        weights = outs.get("weights", np.ones_like(members))
        return ModelOutput(score=score, member_scores=np.asarray(members).reshape(batch, -1),
                           weights=np.asarray(weights).reshape(batch, -1), feature_error=outs.get("feature_error"))
