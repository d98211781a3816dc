"""Cross-validation and the static weight search (`train --cv K --weight-search N`).

Fast tests: the blocked time-series folds on a table, the seeded Optuna search on scores. Slow tests: one quick
`train --cv 2 --weight-search` run, its manifest, and a version serving searched static weights through
`fabwatch serve` with the scores of `evaluate`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fabwatch.export.errors import UsageError
from fabwatch.export.registry import Registry
from fabwatch.models.training import data, search, synth

WINDOW = 30


def _table(entities: int = 3, steps: int = 600) -> data.Table:
    rng = np.random.default_rng(0)
    n = entities * steps
    return data.Table(feature_names=["a", "b"], x=rng.standard_normal((n, 2)).astype(np.float32),
                      y=(rng.random(n) < 0.1).astype(np.float32), entity=np.repeat(np.arange(entities), steps),
                      entity_names=[f"e{i}" for i in range(entities)], fingerprint="")


def test_cv_3_gives_three_folds_whose_validation_follows_training_after_a_window_gap() -> None:
    table = _table()
    folds = data.cv_folds(table, WINDOW, 3)
    assert len(folds) == 3
    for fold in folds:
        assert len(fold.train_rows) == len(fold.val_rows) == 3  # every entity takes part
        for (ts, te), (vs, ve) in zip(fold.train_rows, fold.val_rows):
            assert ts < te <= vs - WINDOW < vs < ve  # training, then a one-window gap, then validation
        # every validation window ends in the validation rows: one window per validation row
        assert len(fold.split.val.x) == sum(ve - vs for vs, ve in fold.val_rows)
        # the fold's scaler saw its training rows only
        rows = np.concatenate([table.x[s:e] for s, e in fold.train_rows])
        np.testing.assert_allclose(fold.split.scaler.mean, rows.mean(axis=0), atol=1e-5)
    # expanding windows: each fold trains on more of the past and validates on a later block
    assert [f.train_rows[0][1] for f in folds] == sorted({f.train_rows[0][1] for f in folds})
    assert folds[0].val_rows[0][1] <= folds[1].val_rows[0][0]


def test_validation_windows_hold_no_training_row() -> None:
    """A validation window's context lies in the gap: no row is in both a training and a validation window."""
    table = _table(entities=1, steps=400)
    table.x = np.arange(400, dtype=np.float32)[:, None].repeat(2, axis=1)  # each row's value is its index
    for fold in data.cv_folds(table, WINDOW, 3):
        scale = np.asarray(fold.split.scaler.std[0]), np.asarray(fold.split.scaler.mean[0])
        rows = lambda w: np.rint(w[:, :, 0] * scale[0] + scale[1])  # noqa: E731 (back to row indices)
        assert rows(fold.split.train.x).max() < rows(fold.split.val.x).min()


def test_too_many_folds_for_the_rows_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--cv 12"):
        data.cv_folds(_table(entities=1, steps=400), 100, 12)


def _scores(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three members: one informative, one weakly, one noise; and a mediocre gate."""
    rng = np.random.default_rng(seed)
    y = (rng.random(2000) < 0.1).astype(np.float32)
    members = np.column_stack([y * 0.6 + rng.random(2000) * 0.8, y * 0.2 + rng.random(2000), rng.random(2000)])
    return members, members.mean(axis=1), y


def test_weight_search_is_reproducible_with_a_seed_and_favours_the_informative_member() -> None:
    members, gate, y = _scores()
    first = search.search_weights(members, gate, y, "classify", trials=40, seed=3)
    again = search.search_weights(members, gate, y, "classify", trials=40, seed=3)
    assert first == again
    assert np.isclose(sum(first.weights), 1.0) and first.weights[0] == max(first.weights)
    assert first.value >= first.gate_value and first.winner == "static"  # trial 0 is the gate's plain average
    other = search.search_weights(members, gate, y, "classify", trials=40, seed=4)
    assert other.weights != first.weights


def test_weight_search_at_a_false_alarm_rate_scores_the_detection_rate() -> None:
    members, gate, y = _scores()
    result = search.search_weights(members, gate, y, "classify", trials=20, seed=0, target_far=0.05)
    score = members @ np.asarray(result.weights)
    normal = y < 0.5
    assert result.objective == "detection_rate@far=0.05"
    assert np.mean(score[normal] >= result.threshold) == pytest.approx(0.05, abs=0.002)
    assert result.value == pytest.approx(np.mean(score[~normal] >= result.threshold))


def test_cli_refuses_a_search_without_folds_and_folds_for_the_forecast_task(tmp_path: Path) -> None:
    path = tmp_path / "fab.parquet"
    synth.write(synth.generate(entities=1, steps=400, seed=0), path)
    for args, reason in ((["--weight-search", "5"], "needs --cv"), (["--unsupervised", "--cv", "3"], "supervised")):
        proc = _fabwatch("train", "--data", str(path), "--registry", str(tmp_path / "reg"), *args)
        assert proc.returncode == 2 and reason in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, \
            proc.stderr


# ---- end to end: one quick cross-validated training -------------------------------------------------------------

def _fabwatch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fabwatch.stream.cli.main", *args], capture_output=True, text=True,
                          env=dict(os.environ), timeout=1800)


@pytest.fixture(scope="module")
def cv_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """`train --cv 2 --weight-search 30` of the tiny ensemble on 30-step windows (several minutes on 2 cores)."""
    root = tmp_path_factory.mktemp("cv")
    path = root / "fab.parquet"
    synth.write(synth.generate(entities=3, steps=900, seed=1, anomaly_rate=0.3), path)
    proc = _fabwatch("train", "--data", str(path), "--registry", str(root / "registry"), "--quick", "--window",
                     str(WINDOW), "--cv", "2", "--weight-search", "30", "--no-promote", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return path, root / "registry", json.loads(proc.stdout)


@pytest.mark.slow
def test_train_cv_records_folds_search_and_out_of_fold_threshold(cv_model) -> None:
    _, registry, summary = cv_model
    manifest = Registry(registry).manifest(summary["version"])
    cv = manifest.cross_validation
    assert cv["k"] == 2 and len(cv["folds"]) == 2 and cv["gap_rows"] == WINDOW
    for fold in cv["folds"]:
        for (_, train_end), (val_start, _) in zip(fold["train_rows"], fold["val_rows"]):
            assert train_end + WINDOW <= val_start
        assert set(fold["metrics"]) == {*manifest.members, "gate"} and fold["seconds"] > 0
    assert {"pr_auc_mean", "pr_auc_std"} <= set(cv["summary"]["gate"])
    searched = cv["weight_search"]
    assert searched["trials"] == 30 and len(searched["weights"]) == len(manifest.members)
    assert searched["winner"] in ("static", "gate")
    assert "out-of-fold" in manifest.thresholds.method
    if searched["winner"] == "static":
        assert manifest.thresholds.alert == searched["threshold"]


@pytest.mark.slow
@pytest.mark.integration
def test_searched_static_weights_serve_the_scores_of_evaluate(cv_model, settings, tmp_path: Path) -> None:
    """A version whose gate is the searched weight vector: `fabwatch serve` alerts with `evaluate`'s ids and
    scores, and every alert's ``weights`` is that vector."""
    from fabwatch.models.training.train import load_keras, with_static_weights, write_version
    from fabwatch.stream.offline.evaluate import evaluate_file
    from stream_helpers import replay_and_serve_alerts

    data_path, registry_dir, summary = cv_model
    registry = Registry(registry_dir)
    vdir, manifest = registry.resolve(summary["version"])
    weights = manifest.cross_validation["weight_search"]["weights"]
    model = with_static_weights(load_keras(vdir), weights, manifest.task)
    # a low threshold, so the short stream alerts often enough to compare many scores
    static = manifest.model_copy(update={"files": {}, "parity": {}, "thresholds": manifest.thresholds.model_copy(
        update={"alert": 0.05, "close": 0.04})})
    version, _ = write_version(model, static, registry, promote=True)

    offline = {a.alert_id: a for a in evaluate_file(registry_dir, data_path).alerts}
    served = lambda alert: [alert.weights[n] for n in manifest.members]  # noqa: E731
    assert offline and all(np.allclose(served(a), weights, atol=1e-6) for a in offline.values())
    live = replay_and_serve_alerts(settings, data_path, registry_dir, "cv-static", len(offline),
                                   tmp_path / "serve.log")
    assert set(live) == set(offline)
    for alert_id, alert in live.items():
        assert alert.model_version == version
        assert alert.score == pytest.approx(offline[alert_id].score, abs=1e-5)
        assert np.allclose(served(alert), weights, atol=1e-6)


@pytest.mark.slow
def test_parallel_members_train_in_their_own_processes(tmp_path: Path) -> None:
    """`--parallel-members`: every member comes back from its process trained (moved from its seeded start)."""
    from fabwatch.models import ensemble
    from fabwatch.models.training.train import TrainConfig, fit_ensemble, member_pool

    path = tmp_path / "fab.parquet"
    synth.write(synth.generate(entities=2, steps=400, seed=2, anomaly_rate=0.3), path)
    cfg = TrainConfig.quick(data=path, registry=tmp_path / "reg", window=WINDOW, epochs=1, parallel_members=True)
    table = data.load(path, window=WINDOW)
    split = data.split(table, WINDOW, 0.3, cfg.stride, event_stride=2)
    with member_pool(cfg) as pool:
        model, report = fit_ensemble(split, cfg, (0.0, 1.0), pool)
    assert report["parallel_members"]
    from fabwatch.models.tf import keras

    for name in ensemble.member_names("classify"):
        assert report[name]["epochs"] == 1
        keras.utils.set_random_seed(cfg.seed)  # the member process's starting point
        start = ensemble.build_member(name, WINDOW, len(split.feature_names), "classify", "tiny")
        moved = [not np.allclose(a, b) for a, b in zip(model.get_layer(name).get_weights(), start.get_weights())]
        assert any(moved), name
