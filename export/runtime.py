"""onnxruntime sessions for serving: provider fallback TensorRT -> CUDA -> CPU, and the scoring model
that applies the manifest's scaler with numpy and returns the registry contract's outputs."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from export.registry import Manifest, Registry

log = logging.getLogger(__name__)

PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def choose_providers(requested: Sequence[str] | None = None) -> list[str]:
    """The preferred providers this onnxruntime build has; ``FABWATCH_PROVIDERS`` (comma list) overrides."""
    available = set(ort.get_available_providers())
    if requested is None and os.environ.get("FABWATCH_PROVIDERS"):
        requested = [p.strip() for p in os.environ["FABWATCH_PROVIDERS"].split(",") if p.strip()]
    wanted = list(requested) if requested else list(PROVIDER_PREFERENCE)
    chosen = [p for p in wanted if p in available]
    if not chosen:
        raise RuntimeError(f"none of the providers {wanted} is available (this build has {sorted(available)})")
    return chosen


def create_session(model_path: Path | str, providers: Sequence[str] | None = None,
                   cache_dir: Path | None = None, intra_op_threads: int = 0) -> ort.InferenceSession:
    """An InferenceSession on the best available provider; logs which one it got."""
    chosen = choose_providers(providers)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    provider_args: list[str | tuple[str, dict]] = []
    for p in chosen:
        if p == "TensorrtExecutionProvider":
            cache = Path(cache_dir or Path(model_path).parent / "trt-cache")
            provider_args.append((p, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                                      "trt_fp16_enable": True}))
        else:
            provider_args.append(p)
    session = ort.InferenceSession(str(model_path), sess_options=options, providers=provider_args)
    log.info("onnxruntime session for %s on %s", Path(model_path).name, session.get_providers()[0])
    return session


@dataclass
class ModelOutput:
    score: np.ndarray                 # [B]
    member_scores: np.ndarray         # [B, M]
    weights: np.ndarray               # [B, M]
    feature_error: np.ndarray | None  # [B, F] for the forecast task


class ScoringModel:
    """A registry version ready to score raw (unscaled) windows ``[B, window, F]``."""

    def __init__(self, version_dir: Path, manifest: Manifest, providers: Sequence[str] | None = None,
                 fp16: bool = False):
        self.manifest = manifest
        self.version = manifest.version
        path = version_dir / ("model.fp16.onnx" if fp16 else "model.onnx")
        self.session = create_session(path, providers)
        self.provider = self.session.get_providers()[0]
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        if manifest.scaler is not None:
            self._mean = np.asarray(manifest.scaler.mean, dtype=np.float32)
            self._inv_std = (1.0 / np.maximum(np.asarray(manifest.scaler.std, dtype=np.float32), 1e-6)).astype(np.float32)
        else:
            self._mean = self._inv_std = None

    @classmethod
    def from_registry(cls, registry: Registry | Path | str, version: str | None = None,
                      providers: Sequence[str] | None = None) -> "ScoringModel":
        reg = registry if isinstance(registry, Registry) else Registry(registry)
        vdir, manifest = reg.resolve(version)
        return cls(vdir, manifest, providers)

    @property
    def feature_names(self) -> list[str]:
        return self.manifest.feature_names

    def scale(self, windows: np.ndarray) -> np.ndarray:
        if self._mean is None:
            return windows.astype(np.float32, copy=False)
        # flattened to [B, steps * F] with the scaler tiled per step: long inner loops instead of F-long ones
        b, steps, f = windows.shape
        mean, inv_std = np.tile(self._mean, steps), np.tile(self._inv_std, steps)
        out = np.subtract(windows.reshape(b, steps * f), mean, dtype=np.float32)
        out *= inv_std
        return out.reshape(b, steps, f)

    def predict(self, windows: np.ndarray) -> ModelOutput:
        """Score raw windows; scaling happens here so every caller scales the same way."""
        outs = dict(zip(self.output_names, self.session.run(None, {self.input_name: self.scale(windows)})))
        score = np.asarray(outs["score"], dtype=np.float32).reshape(-1)
        batch = score.shape[0]
        members = outs.get("member_scores", score.reshape(batch, 1))
        weights = outs.get("weights", np.ones_like(members))
        return ModelOutput(score=score, member_scores=np.asarray(members).reshape(batch, -1),
                           weights=np.asarray(weights).reshape(batch, -1), feature_error=outs.get("feature_error"))
