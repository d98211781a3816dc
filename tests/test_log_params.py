"""DeepLog's parameter-value check: per key, the range of the gap since the session's previous line and of each
numeric parameter, learned from raw lines (tests/fixtures/hdfs_tiny.log)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from fabwatch.export.errors import UsageError
from fabwatch.stream.cli.main import app
from fabwatch.stream.logs.params import fit_param_model, read_events

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "hdfs_tiny.log"
TEMPLATES = FIXTURES / "hdfs_tiny_templates.csv"
BLOCK = "blk_-1608999687919862906"


def test_events_carry_the_gap_since_the_sessions_previous_line_and_standalone_numbers() -> None:
    events = [e for e in read_events(TINY, TEMPLATES) if e.session == BLOCK]
    assert [e.gap_s for e in events] == [None, 0.0, 1.0, 0.0, 2.0]
    received = next(e for e in events if "91178" in map(str, e.params))
    assert received.params == (91178,)   # the block id, the address and the port are not parameters


def test_a_late_line_is_flagged_and_the_normal_log_passes(tmp_path: Path) -> None:
    """Lines of the fitted log stay in range; the same log with one line an hour late is flagged on its gap."""
    model = fit_param_model(read_events(TINY, TEMPLATES))
    assert model.check(read_events(TINY, TEMPLATES)) == []
    late = TINY.read_text().replace("081109 203521 19 INFO", "081109 213521 19 INFO")
    (tmp_path / "late.log").write_text(late)
    findings = model.check(read_events(tmp_path / "late.log", TEMPLATES))
    assert len(findings) == 1
    assert findings[0]["session"] == BLOCK and findings[0]["value"] == "gap_s" and findings[0]["observed"] == 3602.0
    assert findings[0]["detail"].startswith("gap_s=3602 outside [")


def test_cli_fit_then_check(tmp_path: Path) -> None:
    runner = CliRunner()
    fitted = runner.invoke(app, ["logs", "params-fit", str(TINY), "--templates", str(TEMPLATES),
                                 "--out", str(tmp_path / "params.json"), "--json"])
    assert fitted.exit_code == 0, fitted.output
    assert json.loads((tmp_path / "params.json").read_text())["format"] == "fabwatch-params/1"
    assert any(r["value"] == "gap_s" for r in json.loads(fitted.stdout)["ranges"])
    (tmp_path / "slow.log").write_text(TINY.read_text().replace("081109 203519 145 INFO", "081109 233519 145 INFO"))
    checked = runner.invoke(app, ["logs", "params-check", str(tmp_path / "slow.log"), "--templates", str(TEMPLATES),
                                  "--model", str(tmp_path / "params.json"), "--json"])
    assert checked.exit_code == 0, checked.output
    report = json.loads(checked.stdout)
    assert report["flagged_sessions"] == 1 and report["findings"][0]["value"] == "gap_s"
    bad = runner.invoke(app, ["logs", "params-fit", str(TINY), "--out", str(tmp_path / "p.json"), "--quantile", "2"])
    assert isinstance(bad.exception, UsageError) and "--quantile" in str(bad.exception)  # exit code 2 in `fabwatch`
