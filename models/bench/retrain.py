"""``fabwatch bench retrain``: how long the sidecar trainer's retrain takes against data size on this machine,
held against the design's 2-hour daily retrain of 781k (today) and 1.5M (in six months) windows.

A warm-started retrain of N training windows, with V = N * f / (1 - f) validation windows (f the validation
fraction), spends its time in

- ``prep``: loading the store, windowing, scaling and splitting: grows with N and is measured in full at every
  size;
- ``train``: per epoch, one forward-backward pass of each member over N windows, then the gate's over N;
- ``forward``: per epoch, each member's Keras validation pass over V; once, the frozen members' outputs over
  N + V for the gate (the gate's own validation is counted at its training rate, an upper bound);
- ``onnx``: the export with its parity check, then three scoring passes over V (calibration, and the serving
  and candidate models in the gate).

The per-window rates do not depend on N, so they are measured once on a bounded sample of the full-size
ensemble; the projection adds them up. ``end_to_end`` runs a real ``Trainer.retrain_once`` on N windows (store,
warm start, gate, promotion) and puts the projection for the same N beside it, so the model is checked where
it can be afforded. Untrained weights: speed does not depend on them.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow.parquet as pq

from fabwatch.models.training import data, synth

WINDOW, FEATURES, ENTITIES = 100, len(synth.FEATURES), 8
REQUIREMENT_S = 2 * 3600.0
DESIGN_SIZES = {"today": 781_000, "in six months": 1_500_000}


def _store_with(root: Path, train_windows: int, val_fraction: float, seed: int):
    """A trainer store holding synthetic readings that give about ``train_windows`` training windows."""
    from fabwatch.models.sidecar.store import ReadingStore

    train_rows = train_windows // ENTITIES + WINDOW - 1
    steps = max(int(np.ceil(train_rows / (1 - val_fraction))), int(WINDOW / val_fraction) + 1)  # a split needs that
    table = synth.generate(entities=ENTITIES, steps=steps, seed=seed)
    store = ReadingStore(root, synth.FEATURES)
    values = np.column_stack([table.column(f).to_numpy() for f in synth.FEATURES])
    store.write(table.column("entity").to_pylist(), table.column("ts").to_numpy(), values,
                table.column("label").to_numpy())
    return store


def measure_prep(train_windows: int, val_fraction: float, workdir: Path, seed: int = 0) -> dict[str, Any]:
    """Seconds to go from the store to split windows, as a retrain does (store load, data file, load, split)."""
    from fabwatch.models.sidecar.trainer import TrainerOptions

    defaults = TrainerOptions(registry=workdir, store=workdir)
    store = _store_with(workdir / f"store-{train_windows}", train_windows, val_fraction, seed)
    start = time.perf_counter()
    table = store.load(defaults.recent_days, defaults.older_sample, seed=seed)
    data_file = workdir / f"retrain-{train_windows}.parquet"
    pq.write_table(table, data_file)
    loaded = data.load(data_file, list(synth.FEATURES), "label", "classify", 0.01, WINDOW)
    split = data.split(loaded, WINDOW, val_fraction, 1, val_stride=1, event_stride=1)
    seconds = time.perf_counter() - start
    return {"train_windows": len(split.train.x), "val_windows": len(split.val.x), "store_rows": table.num_rows,
            "prep_s": seconds}


def measure_rates(sample: int = 2048, batch: int = 128, seed: int = 0) -> dict[str, Any]:
    """Windows/s of each training stage, of the members' Keras forward pass and of ONNX scoring, plus the
    export's seconds, on ``sample`` random windows of the full-size ensemble (after a warm-up)."""
    from fabwatch.export.onnx_export import keras_to_onnx
    from fabwatch.export.runtime import create_session
    from fabwatch.models import ensemble
    from fabwatch.models.training.train import compile_stage, dataset, member_outputs
    from fabwatch.models.tf import keras

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    sample -= sample % batch  # equal batches: one traced step function
    x = rng.standard_normal((sample, WINDOW, FEATURES)).astype(np.float32)
    y = (rng.random(sample) < 0.1).astype(np.float32)
    model = ensemble.build(WINDOW, FEATURES, "classify", "full")
    members, gate = ensemble.members_of(model)

    def train_rate(stage: keras.Model, inputs: np.ndarray | tuple[np.ndarray, ...]) -> float:
        compile_stage(stage, "classify", 1e-3, keras.losses.BinaryCrossentropy())
        ds = dataset(inputs, y, batch, seed, shuffle=True)
        stage.fit(ds.take(2), epochs=1, verbose=0)  # tracing
        start = time.perf_counter()
        stage.fit(ds, epochs=1, verbose=0)
        return sample / (time.perf_counter() - start)

    train = {m.name: train_rate(m, x) for m in members}
    member_outputs(members, x, False)  # tracing (Keras traces again once a second batch shape comes)
    start = time.perf_counter()
    outputs = member_outputs(members, x, False)
    forward = sample / (time.perf_counter() - start)
    train["gate"] = train_rate(ensemble.gate_trainer(gate, WINDOW, FEATURES, len(members), "classify"), (x, outputs))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        keras_to_onnx(model, Path(tmp) / "model.onnx", output_names=list(ensemble.OUTPUTS))
        export_s = time.perf_counter() - start
        session = create_session(Path(tmp) / "model.onnx")
        session.run(None, {"window": x[:batch]})
        start = time.perf_counter()
        for i in range(0, sample, 1024):  # the batch calibration and the gate score with
            session.run(None, {"window": x[i:i + 1024]})
        onnx = sample / (time.perf_counter() - start)
    return {"sample_windows": sample, "batch": batch, "train_windows_per_s": train,
            "members_forward_windows_per_s": forward, "onnx_windows_per_s": onnx, "export_s": export_s,
            "parameters": model.count_params()}


def project(train_windows: float, val_windows: float, rates: dict[str, Any], prep_s: float,
            epochs: int = 1) -> dict[str, float]:
    """Seconds of a retrain with ``epochs`` epochs per stage, phase by phase."""
    n, v = float(train_windows), float(val_windows)
    per_window = {name: 1.0 / r for name, r in rates["train_windows_per_s"].items()}
    members_s = sum(s for name, s in per_window.items() if name != "gate")
    phases = {
        "prep_s": prep_s,
        "train_s": epochs * n * (members_s + per_window["gate"]),
        "forward_s": (epochs * v + n + v) / rates["members_forward_windows_per_s"] + epochs * v * per_window["gate"],
        "onnx_s": rates["export_s"] + 3 * v / rates["onnx_windows_per_s"],
    }
    return phases | {"total_s": sum(phases.values())}


def end_to_end(train_windows: int, val_fraction: float, workdir: Path, epochs: int = 1,
               seed: int = 0) -> dict[str, Any]:
    """A real warm-started ``Trainer.retrain_once`` (store, windows, fit, export, calibrate, gate, promote)
    on about ``train_windows`` windows, from a serving version of the untrained full-size ensemble."""
    from fabwatch.export.registry import Manifest, Registry
    from fabwatch.models import ensemble
    from fabwatch.models.training.train import write_version
    from fabwatch.models.sidecar.trainer import Trainer, TrainerOptions
    from fabwatch.stream.kafka.config import Settings

    class OfflineTrainer(Trainer):
        """No broker in this benchmark: the promotion's ModelEvent (one small message) is not sent."""

        def publish_event(self, version: str, version_dir: Path, action: str = "promoted") -> None:
            pass

    registry = Registry(workdir / "registry")
    store = _store_with(workdir / "store", train_windows, val_fraction, seed)
    manifest = Manifest(version="", created="", task="classify", feature_names=list(synth.FEATURES), window=WINDOW,
                        members=list(ensemble.MEMBERS), extra={"size": "full"})
    write_version(ensemble.build(WINDOW, FEATURES, "classify", "full"), manifest, registry)
    options = TrainerOptions(registry=registry.root, store=store.root, epochs=epochs, val_fraction=val_fraction,
                             margin=1.0, seed=seed)
    record = OfflineTrainer(Settings(), options).retrain_once()
    training = registry.manifest(record["candidate"]).metrics["training"]
    return {"train_windows": training["train_windows"], "val_windows": record["gate_windows"], "epochs": epochs,
            "decision": record["decision"],
            "measured_s": record["duration_s"], "train_seconds": record.get("train_seconds")}


def retrain(sizes: Sequence[int] = (10_000, 100_000), val_fraction: float = 0.2, sample: int = 2048,
            end_to_end_windows: int = 10_000, epochs: int = 1, seed: int = 0) -> dict[str, Any]:
    """Rates, prep at every size, projections against the requirement, and the end-to-end check."""
    from fabwatch.models.bench.inference import machine

    result: dict[str, Any] = {"machine": machine(), "val_fraction": val_fraction, "epochs": epochs,
                              "requirement_s": REQUIREMENT_S}
    result["rates"] = rates = measure_rates(sample, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        prep = [measure_prep(n, val_fraction, Path(tmp), seed) for n in sizes]
    result["sizes"] = [p | project(p["train_windows"], p["val_windows"], rates, p["prep_s"], epochs) for p in prep]
    # prep grows linearly with the data: scale the largest measured size to the design's sizes
    largest = max(prep, key=lambda p: p["train_windows"])
    prep_per_window = largest["prep_s"] / largest["train_windows"]
    val_per_train = val_fraction / (1 - val_fraction)
    result["design"] = {label: {"train_windows": n, **project(n, n * val_per_train, rates, prep_per_window * n, epochs)}
                        for label, n in DESIGN_SIZES.items()}
    fixed_s = rates["export_s"]
    per_window_s = project(1.0, val_per_train, rates, prep_per_window, epochs)["total_s"] - fixed_s
    result["windows_within_requirement"] = int((REQUIREMENT_S - fixed_s) / per_window_s)
    if end_to_end_windows:
        with tempfile.TemporaryDirectory() as tmp:
            e2e = end_to_end(end_to_end_windows, val_fraction, Path(tmp), epochs, seed)
        e2e["projected_s"] = project(e2e["train_windows"], e2e["val_windows"], rates,
                                     prep_per_window * e2e["train_windows"], epochs)["total_s"]
        result["end_to_end"] = e2e
    return result
