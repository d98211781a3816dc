"""``fabwatch bench members``: every architecture side by side.

- speed, at full size (the design's figures): parameters, and the member alone exported to ONNX on the CPU:
  batch-1 p50 latency and windows/s at batch 256 (untrained weights: speed does not depend on them);
- quality, at ``size``: each member trained alone (as training trains members before the gate) on labelled
  synthetic fab data, scored on the validation split (the last ``val_fraction`` of each entity's rows): ROC-AUC,
  PR-AUC, and the detection rate at a fixed false-alarm rate (threshold: the ``1 - far`` quantile of the
  member's scores on the validation split's normal windows, i.e. one operating point of its ROC curve), with the
  gated ensemble of all of them for comparison.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fabwatch.models.bench.inference import WINDOW, FEATURES, figures, machine

SPEED_BATCH = 256


def speed(names: Sequence[str], budget_s: float = 2.0) -> dict[str, dict[str, Any]]:
    """Parameters and CPU ONNX figures of each full-size member alone (classify, window 100 x 12)."""
    import onnxruntime as ort

    from fabwatch.export.onnx_export import keras_to_onnx
    from fabwatch.models import ensemble

    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            member = ensemble.build_member(name, WINDOW, FEATURES, "classify", "full")
            path = Path(tmp) / f"{name}.onnx"
            started = time.perf_counter()
            report = keras_to_onnx(member, path, parity_samples=16)
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

            def run_at(b: int):
                x = np.random.default_rng(b).standard_normal((b, WINDOW, FEATURES)).astype(np.float32)
                return lambda: session.run(None, {"window": x})

            figs = figures(run_at, (SPEED_BATCH,), budget_s, min_iters=3, max_iters=100)
            out[name] = {"parameters": member.count_params(), "parity": report.parity_max_abs,
                         "export_s": time.perf_counter() - started, "batch1_p50_ms": figs["batch1"]["p50_ms"],
                         "windows_per_s": figs["throughput"][0]["windows_per_s"]}
    return out


def _detection(score: np.ndarray, y: np.ndarray, far: float) -> dict[str, float]:
    from sklearn.metrics import average_precision_score, roc_auc_score

    normal = y < 0.5
    threshold = float(np.quantile(score[normal], 1 - far))
    return {"roc_auc": float(roc_auc_score(~normal, score)), "pr_auc": float(average_precision_score(~normal, score)),
            "detection_rate": float(np.mean(score[~normal] > threshold)),
            "false_alarm_rate": float(np.mean(score[normal] > threshold))}


def quality(names: Sequence[str], size: str = "small", entities: int = 6, steps: int = 2500, seed: int = 0,
            anomaly_rate: float = 0.2, epochs: int = 3, far: float = 0.01) -> dict[str, Any]:
    """Each member's validation figures, trained alone, and the gated ensemble's (classify, window 100)."""
    from fabwatch.models import ensemble
    from fabwatch.models.training import data, synth
    from fabwatch.models.training.train import TrainConfig, fit_ensemble

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fab.parquet"
        synth.write(synth.generate(entities, steps, seed, anomaly_rate), path)
        cfg = TrainConfig.quick(data=path, registry=Path(tmp) / "reg", members=list(names), size=size,
                                epochs=epochs, seed=seed, val_fraction=0.3)
        table = data.load(path, None, cfg.label_col, cfg.task, cfg.nan_tolerance, cfg.window)
        split = data.split(table, cfg.window, cfg.val_fraction, cfg.stride, val_stride=1,
                           event_stride=max(1, cfg.stride // 4))  # as training splits
        started = time.perf_counter()
        model, report = fit_ensemble(split, cfg, (0.0, 1.0))
        train_s = time.perf_counter() - started
    members, _ = ensemble.members_of(model)
    y = split.val.y
    per_member = {m.name: _detection(m.predict(split.val.x, batch_size=512, verbose=0).reshape(-1), y, far)
                  | {"epochs": report[m.name]["epochs"], "train_s": report[m.name]["seconds"]} for m in members}
    gated = np.asarray(model.predict(split.val.x, batch_size=512, verbose=0)[0]).reshape(-1)
    return {"size": size, "far": far, "data": {"entities": entities, "steps": steps, "seed": seed,
                                               "anomaly_rate": anomaly_rate, "train_windows": len(split.train.x),
                                               "val_windows": len(y), "val_event_rate": float(y.mean())},
            "epochs": epochs, "train_s": train_s, "members": per_member,
            "ensemble": _detection(gated, y, far)}


def members_bench(size: str = "small", entities: int = 6, steps: int = 2500, epochs: int = 3, far: float = 0.01,
                  with_speed: bool = True, with_quality: bool = True) -> dict[str, Any]:
    from fabwatch.models import ensemble

    names = list(ensemble.ARCHITECTURES)
    result: dict[str, Any] = {"machine": machine(), "members": names}
    if with_speed:
        result["speed"] = speed(names)
    if with_quality:
        result["quality"] = quality(names, size, entities, steps, epochs=epochs, far=far)
    return result
