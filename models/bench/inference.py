"""``fabwatch bench inference``: the ensemble through the serving fast path (IO binding, batch buckets, CUDA graphs
on a GPU) per execution provider, fp32 and fp16: batch-1 latency p50/p99 and windows/s at larger batches; the same
figures for the PyTorch reference of the same architecture when torch is installed, as ratios; TensorFlow
training throughput. Untrained weights: speed does not depend on them.

The exported models are kept in ``--models DIR`` when given, so a GPU machine without TensorFlow reuses the ones
exported elsewhere.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from fabwatch.export.errors import UsageError

WINDOW, FEATURES = 100, 12
GPU_BATCHES = (256, 1024, 8192)
CPU_BATCHES = (32, 256)
VARIANTS = {"fp32": "model.onnx", "fp16": "model.fp16.onnx"}
META_FILE = "bench-model.json"
TARGETS = {"batch1_p50_ms": 2.0, "windows_per_s": 300_000}  # issue #9, on an H100 with the full-size ensemble
NO_TORCH = "torch not installed: reference skipped"


def machine() -> dict[str, Any]:
    """What the figures were measured on, and how."""
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
            "load_avg_1m": os.getloadavg()[0], "command": " ".join(["fabwatch", *sys.argv[1:]])}


@dataclass
class BenchModels:
    directory: Path
    meta: dict[str, Any]  # size, window, features, Keras parameter counts, fp16 parity
    keras: Any | None     # the Keras model when it was built in this run (for the training figure)


def bench_models(size: str, directory: Path) -> BenchModels:
    """The exported ensemble of ``size`` in ``directory``: reused when one is there, else built with TensorFlow
    and exported there (fp32 and fp16)."""
    meta_path = directory / META_FILE
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta["size"] != size:
            raise UsageError(f"{directory} holds the {meta['size']} ensemble, not {size}: pass --size "
                             f"{meta['size']} or another --models directory")
        return BenchModels(directory, meta, None)
    from fabwatch.export.onnx_export import keras_to_onnx, to_fp16
    from fabwatch.models import ensemble
    from fabwatch.models.tf import tf

    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)  # leave the GPU to onnxruntime and torch
    model = ensemble.build(WINDOW, FEATURES, "classify", size)
    directory.mkdir(parents=True, exist_ok=True)
    fp32, fp16 = directory / VARIANTS["fp32"], directory / VARIANTS["fp16"]
    keras_to_onnx(model, fp32, output_names=list(ensemble.OUTPUTS), parity_samples=16)
    meta = {"size": size, "window": WINDOW, "features": FEATURES, "parameters": ensemble.parameter_counts(model),
            "fp16_parity": to_fp16(fp32, fp16, parity_samples=64)}
    meta_path.write_text(json.dumps(meta, indent=2))
    return BenchModels(directory, meta, model)


def _timed(run: Callable[[], object], budget_s: float, min_iters: int, max_iters: int) -> np.ndarray:
    """Seconds per call after one warm-up call (allocations, CUDA graph capture, TensorRT engine, cuDNN tuning)."""
    run()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return np.asarray(times)


def figures(run_at: Callable[[int], Callable[[], object]], batches: Sequence[int], budget_s: float,
            min_iters: int, max_iters: int) -> dict[str, Any]:
    """Batch-1 latency p50/p99 and windows/s per batch size; ``run_at(b)`` prepares a batch of ``b`` (untimed)
    and returns the call to time, host input to host output."""
    ms = _timed(run_at(1), budget_s, min_iters, max_iters) * 1e3
    result: dict[str, Any] = {"batch1": {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                                         "iterations": len(ms)}, "throughput": []}
    for b in batches:
        s = _timed(run_at(b), budget_s, min_iters, max_iters)
        result["throughput"].append({"batch": b, "windows_per_s": float(b * len(s) / s.sum()),
                                     "p50_ms": float(np.median(s) * 1e3), "iterations": len(s)})
    return result


def _windows(batch: int) -> np.ndarray:
    return np.random.default_rng(batch).standard_normal((batch, WINDOW, FEATURES)).astype(np.float32)


def onnx_figures(path: Path, provider: str, batches: Sequence[int], budget_s: float, min_iters: int,
                 max_iters: int) -> dict[str, Any] | None:
    """Figures through the serving fast path; None when this build lists the provider but cannot start it.
    On a GPU, ``PlacementError`` when a compute node runs on the CPU."""
    from fabwatch.export.runtime import PROVIDER_PREFERENCE, open_fast_path

    # as in serving, the providers after this one take the nodes it cannot run (TensorRT -> CUDA)
    fallbacks = PROVIDER_PREFERENCE[PROVIDER_PREFERENCE.index(provider):] if provider in PROVIDER_PREFERENCE else ()
    runner = open_fast_path(path, list(fallbacks) or [provider])
    if runner.provider != provider:
        return None

    def run_at(b: int) -> Callable[[], object]:
        x = _windows(b)
        return lambda: runner.run(x)

    return {"fast_path": runner.describe(), **figures(run_at, batches, budget_s, min_iters, max_iters)}


def torch_figures(meta: dict[str, Any], batches_for: Callable[[bool], Sequence[int]], budget_s: float,
                  min_iters: int, max_iters: int) -> dict[str, Any]:
    """The PyTorch reference (cuDNN on a GPU; fp16 by autocast), host input to host output like the ONNX figures."""
    try:
        import torch
    except ImportError:
        return {"skipped": NO_TORCH}
    from fabwatch.models.bench import torch_reference

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    torch.backends.cudnn.benchmark = True
    model = torch_reference.build(meta["window"], meta["features"], meta["size"]).to(device)
    result: dict[str, Any] = {"torch": torch.__version__, "device": device,
                              "parameters": torch_reference.parameter_count(model), "variants": {}}
    for variant in VARIANTS:
        if variant == "fp16" and not cuda:
            result["variants"][variant] = {"skipped": "fp16 autocast is measured on CUDA only"}
            continue

        def run_at(b: int, half: bool = variant == "fp16") -> Callable[[], object]:
            x = torch.from_numpy(_windows(b))
            x = x.pin_memory() if cuda else x

            def run() -> list[Any]:
                with torch.inference_mode(), torch.autocast(device, torch.float16, enabled=half):
                    return [out.float().cpu() for out in model(x.to(device, non_blocking=True))]
            return run

        result["variants"][variant] = figures(run_at, batches_for(cuda), budget_s, min_iters, max_iters)
    return result


def ratios(onnx: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """ONNX figure / PyTorch figure: under 1 for latency and over 1 for windows/s mean ONNX is faster."""
    out: dict[str, Any] = {"batch1_p50_ms": onnx["batch1"]["p50_ms"] / reference["batch1"]["p50_ms"]}
    ref = {row["batch"]: row["windows_per_s"] for row in reference["throughput"]}
    out["windows_per_s"] = {str(row["batch"]): row["windows_per_s"] / ref[row["batch"]]
                            for row in onnx["throughput"] if row["batch"] in ref}
    return out


def targets(onnx: dict[str, Any], ratio: dict[str, Any] | None) -> dict[str, Any]:
    """Issue #9's GPU targets for one variant: batch-1 p50, peak windows/s, and both better than PyTorch."""
    peak = max((row["windows_per_s"] for row in onnx["throughput"]), default=0.0)
    beats = None if ratio is None else (ratio["batch1_p50_ms"] < 1
                                        and all(r > 1 for r in ratio["windows_per_s"].values()))
    return {"batch1_p50_ms": onnx["batch1"]["p50_ms"] <= TARGETS["batch1_p50_ms"],
            "windows_per_s": peak >= TARGETS["windows_per_s"], "faster_than_torch": beats}


def inference(batches: Sequence[int] | None = None, providers: Sequence[str] | None = None, budget_s: float = 3.0,
              min_iters: int = 3, max_iters: int = 200, train_batch: int = 256, train_steps: int = 4,
              size: str = "full", models_dir: Path | None = None) -> dict[str, Any]:
    """Every figure of the module docstring. ``batches`` defaults to ``GPU_BATCHES`` on a GPU provider and
    ``CPU_BATCHES`` on the CPU."""
    from fabwatch.export.fastpath import GPU_PROVIDERS
    from fabwatch.export.runtime import choose_providers

    def batches_for(gpu: bool) -> Sequence[int]:
        return batches or (GPU_BATCHES if gpu else CPU_BATCHES)

    with tempfile.TemporaryDirectory() as tmp:
        models = bench_models(size, models_dir or Path(tmp))
        result: dict[str, Any] = {"machine": machine(), "model": models.meta, "providers": {}}
        for provider in choose_providers(providers):
            per_variant = {variant: onnx_figures(models.directory / name, provider,
                                                 batches_for(provider in GPU_PROVIDERS), budget_s, min_iters, max_iters)
                           for variant, name in VARIANTS.items()}
            if all(figs is not None for figs in per_variant.values()):
                result["providers"][provider] = per_variant
    reference = result["reference"] = torch_figures(models.meta, batches_for, budget_s, min_iters, max_iters)
    # the reference is compared with the ONNX provider on its own device
    same_device = GPU_PROVIDERS if reference.get("device") == "cuda" else ("CPUExecutionProvider",)
    compared = next((p for p in same_device if p in result["providers"]), None) if "variants" in reference else None
    if compared:
        result["ratios"] = {"onnx_provider": compared, **{
            variant: ratios(result["providers"][compared][variant], ref)
            for variant, ref in reference["variants"].items() if "batch1" in ref}}
    result["targets"] = {
        provider: {variant: targets(figs, result["ratios"].get(variant) if provider == compared else None)
                   for variant, figs in per_variant.items()}
        for provider, per_variant in result["providers"].items() if provider in GPU_PROVIDERS}
    if models.keras is not None and train_steps > 0:
        result["training"] = training_throughput(models.keras, train_batch, train_steps)
    return result


def training_throughput(model, batch: int, steps: int) -> dict[str, Any]:
    """Windows/s of a full training step (forward, backward, Adam) of the whole ensemble, after a warm-up epoch."""
    from fabwatch.models.tf import keras, tf

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch * steps, WINDOW, FEATURES)).astype(np.float32)
    y = (rng.random(batch * steps) < 0.1).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).cache().prefetch(tf.data.AUTOTUNE)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss={"score": keras.losses.BinaryCrossentropy()})
    model.fit(ds, epochs=1, verbose=0)  # tracing and warm-up
    start = time.perf_counter()
    model.fit(ds, epochs=1, verbose=0)
    seconds = time.perf_counter() - start
    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    return {"device": device, "batch": batch, "steps": steps, "windows_per_s": batch * steps / seconds}
