"""Commands of this area, registered on the root ``fabwatch`` app by ``fabwatch.stream.cli.main``.

Module-level imports stay light: TensorFlow loads inside the commands that need it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from fabwatch.export.errors import UsageError
from fabwatch.stream.cli.options import (EntityColOpt, EntityOpt, FeaturesOpt, JsonFlag, RegistryOpt, TsColOpt, dataset_dir,
                                         emit, require_extra)

TASKS = ("classify", "regress", "forecast")
SIZES = ("full", "small", "tiny")



def _log_to_stderr() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")


MembersOpt = Annotated[Optional[str], typer.Option(
    help="the ensemble's members: a comma list (stacked_lstm,patchtst) or +NAME to add to the default five "
         "(+patchtst); architectures: stacked_lstm, residual_gru, cnn_lstm, spike, rule_based, patchtst")]


def _members(spec: str | None) -> list[str]:
    """``--members`` as a list of architectures (imports TensorFlow: call it inside the command)."""
    from fabwatch.models import ensemble

    try:
        return ensemble.resolve_members(spec)
    except ValueError as exc:
        raise UsageError(f"--members: {exc}") from None


def _choice(value: str | None, allowed: tuple[str, ...], option: str) -> None:
    if value is not None and value not in allowed:
        raise UsageError(f"{option} must be one of {', '.join(allowed)}, got {value!r}")


def synth(out: Annotated[Path, typer.Option("--out", help="output file, .parquet or .csv")],
          entities: Annotated[int, typer.Option(help="vehicles and stockers")] = 8,
          steps: Annotated[int, typer.Option(help="readings per entity, one a minute (10080 = a week)")] = 10_080,
          seed: Annotated[int, typer.Option(help="same seed, same data")] = 0,
          anomaly_rate: Annotated[float, typer.Option(help="fraction of rows inside injected events")] = 0.05,
          as_json: JsonFlag = False) -> None:
    """Synthetic fab material-handling readings with labelled injected events."""
    import numpy as np

    from fabwatch.models.training import synth as generator

    generator.check_out(out)
    table = generator.generate(entities, steps, seed, anomaly_rate)
    generator.write(table, out)
    events = table.column("event").to_numpy(zero_copy_only=False)
    kinds, counts = np.unique(events[events != ""], return_counts=True)
    info = {"out": str(out), "rows": table.num_rows, "entities": entities, "features": list(generator.FEATURES),
            "label_rate": float(np.mean(table.column("label").to_numpy())),
            "event_rows": {str(k): int(c) for k, c in zip(kinds, counts)}}
    emit(info, as_json, f"wrote {info['rows']} readings of {entities} entities to {out} "
                         f"({info['label_rate']:.1%} labelled: {info['event_rows']})")


def train(data: Annotated[Path, typer.Option("--data", help="CSV, Parquet or JSONL readings")],
          registry: RegistryOpt,
          label_col: Annotated[str, typer.Option("--label-col", help="label column (0/1, or delay minutes)")] = "label",
          unsupervised: Annotated[bool, typer.Option("--unsupervised", help="no labels: the forecast task")] = False,
          task: Annotated[Optional[str], typer.Option(help="classify | regress | forecast")] = None,
          features: FeaturesOpt = None,
          ts_col: TsColOpt = None,
          entity_col: EntityColOpt = None,
          entity: EntityOpt = None,
          window: Annotated[Optional[int], typer.Option(help="steps per window (default 100); serving, evaluate "
                                                              "and the trainer take it from the model")] = None,
          epochs: Annotated[Optional[int], typer.Option(help="maximum epochs per stage (early stopping)")] = None,
          quick: Annotated[bool, typer.Option("--quick", help="tiny ensemble, few epochs: CI and demos")] = False,
          size: Annotated[Optional[str], typer.Option(help="full | small | tiny")] = None,
          members: MembersOpt = None,
          batch_size: Annotated[Optional[int], typer.Option(help="windows per batch")] = None,
          stride: Annotated[Optional[int], typer.Option(help="a training window every STRIDE steps")] = None,
          seed: Annotated[int, typer.Option(help="reproducible initialisation and shuffling")] = 0,
          nan_tolerance: Annotated[Optional[float], typer.Option(help="largest fraction of missing values per "
                                                                      "feature, forward-filled")] = None,
          target_far: Annotated[Optional[float], typer.Option(help="threshold for this false-alarm rate "
                                                                   "instead of best F1")] = None,
          monitor: Annotated[bool, typer.Option("--monitor", help="classify: the statistical monitor decides, "
                                                                 "fitted on the label-0 rows, its limits raised as "
                                                                 "far as the labelled faults allow (losing at most "
                                                                 "--target-far, default 0.01, of their detected "
                                                                 "windows)")] = False,
          threshold_by: Annotated[Optional[str], typer.Option(
              "--threshold-by", help="calibrate thresholds per entity or per group of entities: entity | "
                                     "group:COLUMN (COLUMN names each entity's group); unknown entities use the "
                                     "pooled threshold")] = None,
          threshold_min_windows: Annotated[Optional[int], typer.Option(
              "--threshold-min-windows", help="validation windows an entity or group needs for its own "
                                              "threshold, else the pooled one (default 200)")] = None,
          fp16: Annotated[bool, typer.Option("--fp16", help="also write model.fp16.onnx")] = False,
          no_promote: Annotated[bool, typer.Option("--no-promote", help="commit without making it current")] = False,
          warm_start: Annotated[bool, typer.Option("--warm-start", help="start from the current version")] = False,
          force: Annotated[bool, typer.Option("--force", help="promote even a model no better than chance or "
                                                             "a simple baseline on its validation data")] = False,
          cv: Annotated[Optional[int], typer.Option("--cv", help="K blocked time-series folds: out-of-fold figures "
                                                          "and threshold; the final model fits all the data")] = None,
          weight_search: Annotated[Optional[int], typer.Option("--weight-search", help="N Optuna trials of static "
                                                                     "member weights and threshold on the "
                                                                     "out-of-fold scores, against the gate "
                                                                     "(with --cv)")] = None,
          parallel_members: Annotated[bool, typer.Option("--parallel-members", help="train the members in "
                                                                                    "processes of their own")] = False,
          as_json: JsonFlag = False) -> None:
    """Train the ensemble, export it to ONNX, commit it to the registry and promote it (unless its validation
    shows it no better than chance or a simple baseline: then it is committed, not promoted, and says why)."""
    from pydantic import ValidationError

    _choice(task, TASKS, "--task")
    _choice(size, SIZES, "--size")
    if unsupervised and task not in (None, "forecast"):
        raise UsageError(f"--unsupervised trains the forecast task, not --task {task}")
    if threshold_by is not None and threshold_by != "entity" and not threshold_by.startswith("group:"):
        raise UsageError(f"--threshold-by takes entity or group:COLUMN, not {threshold_by!r}")
    if weight_search:
        require_extra("train", "optuna")
    _log_to_stderr()
    from fabwatch.models.training.train import TrainConfig
    from fabwatch.models.training.train import train as run

    member_list = _members(members)
    options = {"data": data, "registry": registry, "task": "forecast" if unsupervised else task or "classify",
               "label_col": None if unsupervised else label_col, "seed": seed, "fp16": fp16,
               "promote": not no_promote, "warm_start": warm_start, "force": force, "members": member_list,
               "parallel_members": parallel_members, "monitor": monitor,
               "features": [f.strip() for f in features.split(",") if f.strip()] if features else None,
               **{k: v for k, v in dict(epochs=epochs, size=size, batch_size=batch_size, stride=stride,
                                        nan_tolerance=nan_tolerance, target_far=target_far, window=window, cv=cv,
                                        weight_search=weight_search,
                                        threshold_by=threshold_by, threshold_min_windows=threshold_min_windows,
                                        ts_col=ts_col, entity_col=entity_col, entity=entity).items() if v is not None}}
    try:
        config = TrainConfig.quick(**options) if quick else TrainConfig(**options)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise UsageError(f"--{'-'.join(map(str, err['loc'])).replace('_', '-')}: {err['msg']}") from None
    result = run(config)
    m = result.manifest
    summary = {"version": result.version, "promoted": result.promoted, "task": m.task, "seconds": result.seconds,
               "thresholds": m.thresholds.model_dump() if m.thresholds else None, "parity": m.parity,
               "thresholds_by": m.thresholds_by.model_dump() if m.thresholds_by else None,
               "metrics": {k: v for k, v in m.metrics.items() if k != "training"},
               "train_windows_per_s": m.metrics["training"]["windows_per_s"],
               "cross_validation": {k: v for k, v in m.cross_validation.items() if k != "folds"}}
    auc, by = m.metrics.get("roc_auc"), m.thresholds_by
    own = (f"thresholds by {by.by}: {sum(k.source != 'pooled' for k in by.keys.values())} of {len(by.keys)} have "
           f"their own, the rest the pooled one\n" if by else "")
    emit(summary, as_json, f"{result.version} ({'promoted' if result.promoted else 'not promoted'}) in "
                            f"{result.seconds:.0f}s: " + (f"ROC-AUC {auc:.3f}, " if auc is not None else "")
                            + f"threshold {m.thresholds.alert:.4g} ({m.thresholds.method}), parity {m.parity}\n"
                            + own + f"quality: {m.metrics['quality']['reason']}")


def export(registry: RegistryOpt,
           version: Annotated[Optional[str], typer.Option(help="version whose Keras model to export "
                                                               "(default: current)")] = None,
           fp16: Annotated[bool, typer.Option("--fp16", help="also write model.fp16.onnx")] = False,
           no_promote: Annotated[bool, typer.Option("--no-promote", help="commit without making it current")] = False,
           as_json: JsonFlag = False) -> None:
    """Re-export a version's Keras model to ONNX as a new registry version (versions are immutable)."""
    _log_to_stderr()
    from fabwatch.export.registry import Registry
    from fabwatch.models.training.train import load_keras, write_version

    reg = Registry(registry)
    vdir, manifest = reg.resolve(version)
    source = manifest.version
    manifest.extra["exported_from"] = source
    new, promoted = write_version(load_keras(vdir), manifest.model_copy(update={"files": {}, "parity": {}}), reg,
                                  fp16=fp16, promote=not no_promote)
    parity = reg.manifest(new).parity
    emit({"version": new, "from": source, "promoted": promoted, "parity": parity}, as_json,
          f"{new} exported from {source} ({'promoted' if promoted else 'not promoted'}), parity {parity}")


def models_summary(size: Annotated[str, typer.Option(help="full | small | tiny")] = "full",
                   features: Annotated[int, typer.Option(help="features per reading")] = 12,
                   window: Annotated[int, typer.Option(help="steps per window")] = 100,
                   task: Annotated[str, typer.Option(help="classify | regress | forecast")] = "classify",
                   members: Annotated[Optional[str], typer.Option(help="as train's --members (default: every "
                                                                      "architecture)")] = None,
                   as_json: JsonFlag = False) -> None:
    """Parameter count of every member, the gate and the whole ensemble, against the design figures."""
    _choice(size, SIZES, "--size")
    _choice(task, TASKS, "--task")
    from fabwatch.models import ensemble

    names = _members(members) if members else list(ensemble.ARCHITECTURES)
    counts = ensemble.parameter_counts(ensemble.build(window, features, task, size, members=names))
    design = ensemble.design_parameters(names)
    rows = {name: {"parameters": n, "design": design.get(name),
                   "deviation": (n - design[name]) / design[name] if size == "full" and name in design else None}
            for name, n in counts.items()}
    lines = [f"{'member':<14}{'parameters':>12}{'design':>10}{'deviation':>11}"]
    lines += [f"{name:<14}{r['parameters']:>12,}{r['design'] or '':>10}"
              f"{'' if r['deviation'] is None else format(r['deviation'], '+.1%'):>11}" for name, r in rows.items()]
    emit({"size": size, "window": window, "features": features, "task": task, "members": rows}, as_json,
          "\n".join(lines))


def registry_list(registry: RegistryOpt, as_json: JsonFlag = False) -> None:
    """Every version with its task, creation time, parity and validation ROC-AUC; * marks current."""
    from fabwatch.export.registry import Registry

    reg = Registry(registry)
    current = reg.current_version()
    rows = []
    for v in reg.versions():
        m = reg.manifest(v)
        rows.append({"version": v, "current": v == current, "created": m.created, "task": m.task,
                     "features": len(m.feature_names), "parity": m.parity, "roc_auc": m.metrics.get("roc_auc")})
    human = "\n".join(f"{'*' if r['current'] else ' '} {r['version']}  {r['created']}  {r['task']:<9}"
                      f" F={r['features']}  roc_auc={r['roc_auc'] if r['roc_auc'] is None else round(r['roc_auc'], 3)}"
                      f"  parity={r['parity']}" for r in rows) or f"no versions in {registry}"
    emit({"current": current, "versions": rows}, as_json, human)


def registry_promote(version: Annotated[str, typer.Argument(help="version to serve, e.g. v0003")],
                     registry: RegistryOpt, as_json: JsonFlag = False) -> None:
    """Verify a version's hashes and make it current."""
    from fabwatch.export.registry import Registry, RegistryError

    reg = Registry(registry)
    if version not in reg.versions():
        raise UsageError(f"no version {version} in {registry} (have {', '.join(reg.versions()) or 'none'})")
    try:
        reg.promote(version)
    except RegistryError as exc:
        raise UsageError(str(exc)) from None
    emit({"current": version}, as_json, f"{version} is now current")


def registry_rollback(registry: RegistryOpt, as_json: JsonFlag = False) -> None:
    """Serve the version that served before the current one again."""
    from fabwatch.export.registry import Registry

    reg = Registry(registry)
    before = reg.current_version()
    manifest = reg.rollback()
    emit({"current": manifest.version, "previous": before}, as_json,
          f"rolled back from {before} to {manifest.version}")


def bench_inference(batches: Annotated[Optional[str], typer.Option(
                        help="comma-separated batch sizes for windows/s (default 256,1024,8192 on a GPU, 32,256 on "
                             "the CPU); batch-1 latency is always measured")] = None,
                    providers: Annotated[Optional[str], typer.Option(help="comma-separated onnxruntime providers "
                                                                          "(default: every available one)")] = None,
                    budget_s: Annotated[float, typer.Option(help="seconds of timed runs per batch size")] = 3.0,
                    train_steps: Annotated[int, typer.Option(help="training batches timed when the models are "
                                                                  "built in this run (0: skip)")] = 4,
                    size: Annotated[str, typer.Option(help="ensemble size: full | small | tiny")] = "full",
                    models: Annotated[Optional[Path], typer.Option(
                        "--models", help="keep the exported models here and reuse them next time (a GPU machine "
                                         "then needs no TensorFlow)")] = None,
                    as_json: JsonFlag = False) -> None:
    """The ensemble through the serving fast path per provider, fp32 and fp16: batch-1 latency p50/p99 and
    windows/s; the PyTorch reference as ratios when torch is installed; training windows/s."""
    from fabwatch.models.bench.inference import inference

    _choice(size, SIZES, "--size")
    try:
        sizes = [int(b) for b in batches.split(",")] if batches else None
    except ValueError:
        raise UsageError(f"--batches must be comma-separated integers, got {batches!r}") from None
    result = inference(sizes, [p.strip() for p in providers.split(",")] if providers else None, budget_s,
                       train_steps=train_steps, size=size, models_dir=models)
    m, model = result["machine"], result["model"]
    lines = [f"{m['command']}", f"{m['cpu']}, {m['cores']} cores, load {m['load_avg_1m']:.1f}; {model['size']} "
             f"ensemble {model['parameters']['total']:,} parameters, fp16 parity {model['fp16_parity']:.1e}"]
    for provider, per_variant in result["providers"].items():
        for variant, f in per_variant.items():
            b1 = f["batch1"]
            lines.append(f"{provider:<26} {variant}  batch 1: p50 {b1['p50_ms']:8.2f} ms  p99 {b1['p99_ms']:8.2f} ms"
                         + "".join(f"; batch {r['batch']}: {r['windows_per_s']:,.0f} windows/s" for r in f["throughput"]))
        fast = per_variant["fp32"]["fast_path"]
        on_cpu = sum(fast["placement"]["ops"].get("CPUExecutionProvider", {}).values()) if fast["placement"] else None
        lines.append(f"{'':<26} {fast['summary']}"
                     + ("" if on_cpu is None else f"; placement checked, {on_cpu} shape nodes on the CPU"))
    ref = result["reference"]
    if "skipped" in ref:
        lines.append(ref["skipped"])
    else:
        lines.append(f"PyTorch {ref['torch']} reference on {ref['device']}, {ref['parameters']:,} parameters")
        for variant, f in ref["variants"].items():
            lines.append(f"  {variant}: {f['skipped']}" if "skipped" in f else
                         f"  {variant}  batch 1: p50 {f['batch1']['p50_ms']:8.2f} ms"
                         + "".join(f"; batch {r['batch']}: {r['windows_per_s']:,.0f} windows/s" for r in f["throughput"]))
    for variant, r in {k: v for k, v in result.get("ratios", {}).items() if k != "onnx_provider"}.items():
        lines.append(f"ONNX ({result['ratios']['onnx_provider']}) / PyTorch, {variant}: batch-1 p50 "
                     f"{r['batch1_p50_ms']:.2f}x, windows/s " + ", ".join(f"{b}: {x:.2f}x" for b, x in r["windows_per_s"].items()))
    verdict = {True: "yes", False: "NO", None: "n/a"}
    for provider, per_variant in result["targets"].items():
        lines += [f"targets on {provider} {variant}: batch-1 p50 <= 2 ms {verdict[t['batch1_p50_ms']]}, >= 300,000 "
                  f"windows/s {verdict[t['windows_per_s']]}, faster than PyTorch {verdict[t['faster_than_torch']]}"
                  for variant, t in per_variant.items()]
    if "training" in result:
        t = result["training"]
        lines.append(f"training ({t['device']}, batch {t['batch']}): {t['windows_per_s']:.0f} windows/s")
    emit(result, as_json, "\n".join(lines))


def bench_members(size: Annotated[str, typer.Option(help="size of the members trained for the quality figures: "
                                                     "full | small | tiny (speed is at full size)")] = "small",
                  entities: Annotated[int, typer.Option(min=1, help="synthetic entities")] = 6,
                  steps: Annotated[int, typer.Option(min=300, help="synthetic readings per entity")] = 2500,
                  epochs: Annotated[int, typer.Option(min=1, help="epochs per member")] = 3,
                  far: Annotated[float, typer.Option(min=0.0001, max=0.5, help="false-alarm rate of the detection-rate "
                                                                                "figure")] = 0.01,
                  speed: Annotated[bool, typer.Option(help="parameters and CPU inference rate per member")] = True,
                  quality: Annotated[bool, typer.Option(help="each member trained alone on synthetic data")] = True,
                  as_json: JsonFlag = False) -> None:
    """Every architecture side by side: parameters and CPU ONNX inference rate at full size, and each member
    trained alone on labelled synthetic data (validation ROC-AUC, PR-AUC, detection rate at a fixed FAR)."""
    require_extra("eval", "sklearn")
    _choice(size, SIZES, "--size")
    _log_to_stderr()
    from fabwatch.models.bench.members import members_bench

    result = members_bench(size, entities, steps, epochs, far, speed, quality)
    lines = [result["machine"]["command"]]
    if "speed" in result:
        lines.append(f"{'full size, CPU ONNX':<20}{'parameters':>12}{'batch-1 p50 ms':>16}{'windows/s @256':>16}")
        lines += [f"{n:<20}{r['parameters']:>12,}{r['batch1_p50_ms']:>16.2f}{r['windows_per_s']:>16,.0f}"
                  for n, r in result["speed"].items()]
    if "quality" in result:
        q = result["quality"]
        lines.append(f"{q['size'] + ' size, validation':<20}{'ROC-AUC':>10}{'PR-AUC':>10}"
                     f"{'DR @ FAR ' + format(q['far'], '.0%'):>16}  ({q['data']['val_windows']:,} windows, "
                     f"{q['data']['val_event_rate']:.1%} events)")
        rows = [*q["members"].items(), ("gated ensemble", q["ensemble"])]
        lines += [f"{n:<20}{r['roc_auc']:>10.3f}{r['pr_auc']:>10.3f}{r['detection_rate']:>16.3f}" for n, r in rows]
    emit(result, as_json, "\n".join(lines))


def bench_retrain(windows: Annotated[str, typer.Option(help="comma-separated training-window counts")] = "10000,100000",
                  epochs: Annotated[int, typer.Option(min=1, help="epochs per stage in the projection")] = 1,
                  sample: Annotated[int, typer.Option(min=256, help="windows timed per rate")] = 2048,
                  end_to_end: Annotated[int, typer.Option(help="run a real retrain on this many windows "
                                                               "(0: skip)")] = 10_000,
                  as_json: JsonFlag = False) -> None:
    """Retrain time against data size: measured rates, projections to 781k and 1.5M windows against the
    2-hour requirement, and a real retrain to check the projection."""
    from fabwatch.models.bench.retrain import retrain

    try:
        sizes = [int(n) for n in windows.split(",")]
    except ValueError:
        raise UsageError(f"--windows must be comma-separated integers, got {windows!r}") from None
    if min(sizes) < 1_000:
        raise UsageError("--windows: each size needs at least 1000 windows")
    result = retrain(sizes, sample=sample, end_to_end_windows=end_to_end, epochs=epochs)
    m, r = result["machine"], result["rates"]
    lines = [m["command"], f"{m['cpu']}, {m['cores']} cores, load {m['load_avg_1m']:.1f}; "
             f"full ensemble {r['parameters']:,} parameters, {epochs} epoch(s) per stage",
             "training windows/s: " + ", ".join(f"{k} {v:.0f}" for k, v in r["train_windows_per_s"].items()),
             f"members' forward {r['members_forward_windows_per_s']:.0f} windows/s, ONNX scoring "
             f"{r['onnx_windows_per_s']:.0f} windows/s, export {r['export_s']:.0f} s"]
    rows = [(f"{s['train_windows']:,} (measured prep)", s) for s in result["sizes"]]
    rows += [(f"{d['train_windows']:,} ({label})", d) for label, d in result["design"].items()]
    lines += [f"{name:<26} prep {p['prep_s']:8.0f} s  train {p['train_s']:8.0f} s  forward {p['forward_s']:7.0f} s"
              f"  onnx {p['onnx_s']:6.0f} s  total {p['total_s'] / 3600:6.2f} h"
              f"{'' if p['total_s'] <= result['requirement_s'] else '  > 2 h'}" for name, p in rows]
    lines.append(f"training windows a retrain of {epochs} epoch(s) can take within 2 h: "
                 f"{result['windows_within_requirement']:,}")
    if "end_to_end" in result:
        e = result["end_to_end"]
        lines.append(f"real retrain of {e['train_windows']:,} windows: {e['measured_s']:.0f} s measured, "
                     f"{e['projected_s']:.0f} s projected ({e['decision']})")
    emit(result, as_json, "\n".join(lines))


def bench_tep(data_dir: Annotated[Optional[Path], typer.Option(
                  "--data-dir", help="the Tennessee Eastman files (default: $FABWATCH_DATASETS/tep, else "
                  "../shared/datasets/tep)")] = None,
              windows: Annotated[str, typer.Option(help="comma-separated window lengths (samples of 3 min)")] = "100,30",
              supervised: Annotated[bool, typer.Option(help="also the supervised table")] = True,
              size: Annotated[str, typer.Option(help="full | small | tiny (the neural members)")] = "small",
              as_json: JsonFlag = False) -> None:
    """Fault detection on the Tennessee Eastman process by the data set's protocol: false-alarm rate, detection
    rate per fault and delay, for fabwatch (thresholds from training data only) and for PCA / DPCA."""
    require_extra("eval", "sklearn")
    _choice(size, SIZES, "--size")
    _log_to_stderr()
    from fabwatch.models.bench.tep import run
    from fabwatch.stream.bench.kafka import machine_info

    try:
        lengths = [int(w) for w in windows.split(",")]
    except ValueError:
        raise UsageError(f"--windows must be comma-separated integers, got {windows!r}") from None
    result = {"machine": machine_info(), **run(dataset_dir("tep", data_dir), lengths, supervised, size,
                                               progress=lambda step: logging.getLogger(__name__).info("%s", step))}
    rows = [(name, f) for name, f in result["baselines"].items()]
    rows += [(f"fabwatch {task}, window {w}", f) for task in ("unsupervised", "supervised")
             for w, f in result[task].items()]
    lines = [result["machine"]["command"], f"{'method':<40} {'FAR d00_te':>10} {'FAR 1..160':>10} {'FDR 18':>7} "
             f"{'FDR 21':>7}"]
    lines += [f"{name:<40} {f['far_d00_te']:>10.1%} {f['far_fault_runs_1_160'] or 0:>10.1%} {f['mean_fdr_18']:>7.3f} "
              f"{f['mean_fdr_21']:>7.3f}" for name, f in rows]
    emit(result, as_json, "\n".join(lines))


def bench_cv(data_dir: Annotated[Optional[Path], typer.Option(
                 "--data-dir", help="the Tennessee Eastman files (default: $FABWATCH_DATASETS/tep, else "
                 "../shared/datasets/tep)")] = None,
             synthetic: Annotated[bool, typer.Option(help="the labelled synthetic data (and the timing)")] = True,
             tep: Annotated[bool, typer.Option(help="the supervised Tennessee Eastman task")] = True,
             folds: Annotated[int, typer.Option(help="K of the blocked time-series folds")] = 5,
             trials: Annotated[int, typer.Option(help="Optuna trials of the static weight search")] = 100,
             window: Annotated[int, typer.Option(help="steps per window")] = 30,
             steps: Annotated[int, typer.Option(help="synthetic readings per entity (3 entities)")] = 1200,
             tep_folds: Annotated[int, typer.Option(help="K on the Tennessee Eastman task")] = 3,
             timing: Annotated[bool, typer.Option(help="also time the synthetic folds with the members in "
                                                       "processes of their own")] = True,
             as_json: JsonFlag = False) -> None:
    """Cross-validation: out-of-fold PR-AUC and detection rate at 1 % false alarms of each member, the gate and
    searched static weights; the CV wall time with members one by one against in parallel processes."""
    require_extra("train", "optuna")
    if min(folds, tep_folds) < 2 or trials < 1:
        raise UsageError("--folds and --tep-folds must be at least 2, --trials at least 1")
    _log_to_stderr()
    from fabwatch.models.bench.cv import run as run_cv
    from fabwatch.stream.bench.kafka import machine_info

    result = {"machine": machine_info(), **run_cv(dataset_dir("tep", data_dir) if tep else None, folds, trials, window,
                                                  steps=steps, tep_folds=tep_folds, timing=timing,
                                                  synthetic=synthetic,
                                                  progress=lambda step: logging.getLogger(__name__).info("%s", step))}
    lines = [result["machine"]["command"]]
    for figures in result["data"].values():
        ws = figures["weight_search"]
        lines += [f"{figures['data']}: {figures['windows']} out-of-fold windows, {figures['cv_seconds']:.0f} s; "
                  f"served: {ws['winner']}",
                  f"  {'':<16} {'PR-AUC':>7} {'folds mean+-std':>16} {'DR@1%FAR':>9}"]
        for name, row in figures["table"].items():
            spread = (f"{row['pr_auc_mean']:.3f}+-{row['pr_auc_std']:.3f}" if "pr_auc_mean" in row else "")
            lines.append(f"  {name:<16} {row['pr_auc']:>7.3f} {spread:>16} {row['detection_rate']:>9.3f}")
    if "timing" in result:
        t = result["timing"]
        lines.append(f"{t['what']}: sequential {t['sequential_s']:.0f} s, parallel {t['parallel_s']:.0f} s "
                     f"(x{t['speedup']})")
    emit(result, as_json, "\n".join(lines))


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add this area's commands to ``app`` and its benchmarks to ``bench_app``."""
    app.command("synth")(synth)
    app.command("train")(train)
    app.command("export")(export)
    models_app = typer.Typer(help="The ensemble's architecture.", no_args_is_help=True)
    models_app.command("summary")(models_summary)
    app.add_typer(models_app, name="models")
    registry_app = typer.Typer(help="Model registry: versions, promote, rollback.", no_args_is_help=True)
    registry_app.command("list")(registry_list)
    registry_app.command("promote")(registry_promote)
    registry_app.command("rollback")(registry_rollback)
    app.add_typer(registry_app, name="registry")
    bench_app.command("inference")(bench_inference)
    bench_app.command("members")(bench_members)
    bench_app.command("retrain")(bench_retrain)
    bench_app.command("tep")(bench_tep)
    bench_app.command("cv")(bench_cv)
