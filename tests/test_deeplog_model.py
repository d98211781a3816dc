"""A tiny DeepLog trained end to end through the CLI: registry, fused-LSTM ONNX, parity, the rule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytestmark = pytest.mark.slow

NORMAL = ["1 2 3 4 5 6"] * 40 + ["1 2 4 3 5 6"] * 10 + ["7 1 2 3 4 5 6"] * 5


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    from fabwatch.stream.cli.main import app

    root = tmp_path_factory.mktemp("deeplog")
    (root / "train").write_text("\n".join(NORMAL) + "\n")
    result = CliRunner().invoke(app, ["logs", "train", "--data", str(root / "train"), "--registry", str(root / "reg"),
                                      "--h", "3", "--top-g", "2", "--epochs", "300", "--json"])
    assert result.exit_code == 0, result.output
    return root, json.loads(result.stdout)


def test_export_is_fused_lstm_with_parity(trained: tuple[Path, dict]) -> None:
    from fabwatch.export.registry import Registry

    root, summary = trained
    assert summary["version"] == "v0001" and summary["promoted"]
    ops = summary["onnx_ops"]
    assert ops.get("LSTM") == 2 and "Loop" not in ops and "Scan" not in ops
    assert summary["parity_max_abs"] <= 1e-4
    _, manifest = Registry(root / "reg").resolve()
    assert manifest.task == "logkeys"
    assert manifest.extra["vocabulary"] == ["1", "2", "3", "4", "5", "6", "7"]
    assert (manifest.extra["h"], manifest.extra["top_g"]) == (3, 2)


def test_count_invariants_stored_as_json_in_the_same_version(trained: tuple[Path, dict]) -> None:
    from fabwatch.export.registry import Registry
    from fabwatch.stream.logs.invariants import INVARIANTS, CountModel

    root, summary = trained
    vdir, manifest = Registry(root / "reg").resolve(summary["version"])
    assert INVARIANTS in manifest.files  # hashed and verified like the model
    stored = json.loads((vdir / INVARIANTS).read_text())
    assert stored["format"] == "fabwatch-invariants/1"
    model = CountModel.from_registry(root / "reg")
    assert model is not None and "count(1) == count(2)" in {inv.describe() for inv in model.invariants}
    assert summary["count_model"]["invariants"] == [inv.describe() for inv in model.invariants]
    assert model.choice["holdout_sessions"] == 11  # min_support chosen on held-out normal sessions


def test_flags_impossible_order_and_passes_frequent_session(trained: tuple[Path, dict]) -> None:
    from fabwatch.stream.logs.score import LogKeyScorer, score_sessions

    root, _ = trained
    scorer = LogKeyScorer.from_registry(root / "reg")
    sessions = [s.split() for s in ("1 2 3 4 5 6", "1 2 4 3 5 6", "6 5 4 3 2 1", "1 2 3 9 5 6", "1 2")]
    v = score_sessions(scorer, sessions)
    assert v.anomalous.tolist() == [False, False, True, True, True]
    assert v.reason.tolist() == ["", "", "unexpected_key", "unknown_key", "short_session"]
    # the top-g a streaming caller would name in an alert: after "1 2 3" the model expects 4
    window = scorer.vocab.encode(["1", "2", "3"])[None, :]
    assert scorer.vocab.token(int(scorer.expected(window)[0, 0])) == "4"
    np.testing.assert_allclose(scorer.probabilities(window).sum(), 1.0, atol=1e-5)


def test_evaluate_cli_reports_metrics(trained: tuple[Path, dict]) -> None:
    from fabwatch.export.errors import UsageError
    from fabwatch.stream.cli.main import app

    root, _ = trained
    (root / "abnormal").write_text("6 5 4 3 2 1\n1 2 3 9 5 6\n")
    result = CliRunner().invoke(app, ["logs", "evaluate", "--registry", str(root / "reg"), "--normal",
                                      str(root / "train"), "--abnormal", str(root / "abnormal"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["TP"], report["FP"], report["FN"], report["TN"]) == (2, 0, 0, len(NORMAL))
    assert report["f1"] == 1.0 and report["paper_balance"]["fp_est"] == 0.0
    assert report["speed"]["cached"]["windows_per_s"] > 0 and report["speed"]["uncached"]["windows"] > 0
    assert report["detector"] == "combined" and set(report["detectors"]) == {"combined", "sequence", "quantitative"}
    # a lost step that keeps the order: 1 2 3 4 5 6 then 1 2 3 4 again (count(1) == count(6) breaks)
    (root / "lost").write_text("1 2 3 4 5 6 1 2 3 4\n")
    alone = CliRunner().invoke(app, ["logs", "evaluate", "--registry", str(root / "reg"), "--abnormal",
                                     str(root / "lost"), "--detector", "quantitative", "--uncached-limit", "0", "--json"])
    assert alone.exit_code == 0, alone.output
    assert json.loads(alone.stdout)["reasons"]["invariant"] == 1
    bad = CliRunner().invoke(app, ["logs", "evaluate", "--registry", str(root / "reg"), "--abnormal",
                                   str(root / "lost"), "--detector", "both"])
    assert isinstance(bad.exception, UsageError) and "--detector must be one of" in str(bad.exception)


def test_choose_top_g_on_held_out_normals() -> None:
    from fabwatch.models.deeplog import DeepLogConfig, choose_top_g

    sessions = [s.split() for s in NORMAL]
    g, info = choose_top_g(sessions, DeepLogConfig(h=3, epochs=200), holdout=0.2)
    rates = list(info["holdout_fpr_by_g"].values())
    assert info["holdout_sessions"] == 11 and 1 <= g <= 7
    assert rates == sorted(rates, reverse=True)  # a larger g never adds false positives
    assert info["holdout_fpr_by_g"][g] <= info["max_fpr"] or g == min(
        info["holdout_fpr_by_g"], key=lambda k: (info["holdout_fpr_by_g"][k], k))
