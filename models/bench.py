"""``fabwatch bench inference``: ONNX latency and throughput of the full-size ensemble per execution provider,
and TensorFlow training throughput. Untrained weights: speed does not depend on them."""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

WINDOW, FEATURES = 100, 12


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


def _latencies(session, batch: int, budget_s: float, min_iters: int, max_iters: int) -> dict[str, float]:
    name = session.get_inputs()[0].name
    x = np.random.default_rng(batch).standard_normal((batch, WINDOW, FEATURES)).astype(np.float32)
    session.run(None, {name: x})  # warm-up: allocations, TensorRT engine build
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        session.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    ms = np.asarray(times) * 1e3
    return {"batch": batch, "iterations": len(times), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "windows_per_s": float(batch * len(times) / (ms.sum() / 1e3))}


def inference(batches: Sequence[int] = (1, 32, 256, 1024), providers: Sequence[str] | None = None,
              budget_s: float = 3.0, min_iters: int = 3, max_iters: int = 200, train_batch: int = 256,
              train_steps: int = 4) -> dict[str, Any]:
    """Latency p50/p99 and windows/s per provider and batch size; training windows/s of the same model."""
    import onnxruntime as ort

    from export.onnx_export import keras_to_onnx
    from export.runtime import PROVIDER_PREFERENCE, create_session
    from models import ensemble

    model = ensemble.build(WINDOW, FEATURES, "classify", "full")
    wanted = list(providers) if providers else [p for p in PROVIDER_PREFERENCE if p in ort.get_available_providers()]
    result: dict[str, Any] = {"machine": machine(), "model": {"size": "full", "window": WINDOW, "features": FEATURES,
                                                             "parameters": model.count_params()}, "providers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        keras_to_onnx(model, path, output_names=list(ensemble.OUTPUTS), parity_samples=16)
        for provider in wanted:
            session = create_session(path, [provider])
            if session.get_providers()[0] != provider:
                continue  # this build lists the provider but could not start it (no device)
            result["providers"][provider] = [_latencies(session, b, budget_s, min_iters, max_iters) for b in batches]
    result["training"] = training_throughput(model, train_batch, train_steps)
    return result


def training_throughput(model, batch: int, steps: int) -> dict[str, Any]:
    """Windows/s of a full training step (forward, backward, Adam) of the whole ensemble, after a warm-up epoch."""
    from models.tf import keras, tf

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
