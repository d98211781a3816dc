"""``fabwatch bench cv``: out-of-fold figures of each member, the learned gate and searched static weights, and
the wall time of the cross-validation with the members trained one by one against side by side in processes.

Data sets: the labelled synthetic fab data (``synth``), and the supervised Tennessee Eastman task when its folder
is given (``d00.dat`` label 0 and the 21 ``dNN.dat`` fault runs label 1, each run its own entity, as in
``bench tep``). Each runs ``train --cv K``'s cross-validation (the tiny ensemble, quick settings) and the static
weight search on its out-of-fold scores; the final fit on all the data and the export are left out (they do not
change these figures). Figures on the pooled out-of-fold windows: PR-AUC and the detection rate at a fixed
false-alarm rate among normal windows, the threshold taken from those same windows (as the search takes it);
per fold, each member's and the gate's PR-AUC as mean and spread. The timing runs the synthetic cross-validation
twice, sequential and parallel (process start-up included).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fabwatch.models.training import calibrate, data, search, synth

FAR = 0.01  # the fixed false-alarm rate of the detection-rate column


def oof_table(oof: Any, searched: search.SearchResult, task: str, far: float = FAR) -> dict[str, dict[str, float]]:
    """Per member, the gate and the static weights: pooled out-of-fold PR-AUC and detection rate at ``far``,
    and (members, gate) the per-fold PR-AUC mean and std."""
    normal = calibrate.normal_mask(task, len(oof.y), oof.y)
    positive = ~normal
    columns = {n: oof.member_scores[:, i] for i, n in enumerate(oof.members)}
    columns |= {"gate": oof.gate_score, "static weights": oof.member_scores @ np.asarray(searched.weights)}
    table = {}
    for name, score in columns.items():
        row = {"pr_auc": calibrate.ranking_metrics(task, score, oof.y).get("pr_auc", float("nan")),
               "detection_rate": search.detection_rate(positive, score, search.far_threshold(score, normal, far))}
        fold = oof.figures["summary"].get(name, {})
        row |= {k: fold[k] for k in ("pr_auc_mean", "pr_auc_std") if k in fold}
        table[name] = row
    return table


def _cross_validate(path: Path, work: Path, folds: int, window: int, parallel: bool, **config: Any) -> tuple[Any, float]:
    from fabwatch.models.training.train import TrainConfig, cross_validate, member_pool

    cfg = TrainConfig.quick(data=path, registry=work / "registry", window=window, cv=folds, size="tiny",
                            parallel_members=parallel, **config)
    table = data.load(path, cfg.features, cfg.label_col, cfg.task, cfg.nan_tolerance, cfg.window)
    started = time.perf_counter()
    with member_pool(cfg) as pool:
        oof = cross_validate(table, cfg, pool)
    return oof, time.perf_counter() - started


def _evaluate(name: str, oof: Any, trials: int, seed: int, seconds: float) -> dict[str, Any]:
    searched = search.search_weights(oof.member_scores, oof.gate_score, oof.y, "classify", trials, seed,
                                     target_far=FAR)
    return {"data": name, "windows": int(len(oof.y)), "positive_rate": float(np.mean(oof.y > 0.5)),
            "table": oof_table(oof, searched, "classify"), "weight_search": searched.model_dump(),
            "cv_seconds": round(seconds, 1)}


def run(tep_dir: Path | None, folds: int = 5, trials: int = 100, window: int = 30, entities: int = 3,
        steps: int = 1200, tep_folds: int = 3, seed: int = 0, timing: bool = True, synthetic: bool = True,
        progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The benchmark: synthetic (figures, then sequential vs parallel timing), then supervised TEP."""
    result: dict[str, Any] = {"folds": folds, "tep_folds": tep_folds, "trials": trials, "window": window, "far": FAR, "size": "tiny (quick)",
                              "data": {}}
    with tempfile.TemporaryDirectory(prefix="fabwatch-bench-cv-") as tmp:
        work = Path(tmp)
        if synthetic:
            path = work / "synth.parquet"
            synth.write(synth.generate(entities=entities, steps=steps, seed=seed, anomaly_rate=0.3), path)
            progress(f"synthetic: {folds} folds, members one by one")
            oof, sequential = _cross_validate(path, work, folds, window, False, seed=seed)
            result["data"]["synthetic"] = _evaluate(f"synthetic, {entities} entities x {steps} steps", oof, trials,
                                                    seed, sequential)
            if timing:
                progress(f"synthetic: {folds} folds, members in processes")
                _, parallel = _cross_validate(path, work, folds, window, True, seed=seed)
                result["timing"] = {"what": f"{folds} folds x {oof.member_scores.shape[1]} members, synthetic",
                                    "sequential_s": round(sequential, 1), "parallel_s": round(parallel, 1),
                                    "speedup": round(sequential / parallel, 2)}
        if tep_dir is not None:
            from fabwatch.models.bench import tep

            labelled = tep.write_runs(work / "tep.parquet", {
                "d00": (tep.load_run(tep_dir, "d00"), np.zeros(500)),
                **{f"d{k:02d}": (x, np.ones(len(x))) for k in tep.FAULTS
                   for x in [tep.load_run(tep_dir, f"d{k:02d}")]}})
            progress(f"supervised Tennessee Eastman: {tep_folds} folds")
            oof, seconds = _cross_validate(labelled, work, tep_folds, window, False, seed=seed, features=tep.FEATURES)
            result["data"]["tep_supervised"] = _evaluate("Tennessee Eastman, supervised (d00 + 21 fault runs)", oof,
                                                         trials, seed, seconds)
    return result
