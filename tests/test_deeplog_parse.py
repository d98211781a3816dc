"""Log parsing: template matching and Drain against loghub's structured HDFS_2k (>= 99 % agreement)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from fabwatch.stream.logs.parse import (UNMATCHED, TemplateMatcher, grouping_agreement, parse_file, read_structured,
                             write_rows)

FIXTURES = Path(__file__).parent / "fixtures"
HDFS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hdfs"
needs_hdfs = pytest.mark.skipif(not (HDFS / "HDFS_2k.log").exists(), reason="shared HDFS data set not present")


def test_template_parse_of_fixture_rows_per_block() -> None:
    rows, _ = parse_file(FIXTURES / "hdfs_tiny.log", FIXTURES / "hdfs_tiny_templates.csv")
    events = [(r.line_id, r.block_id, r.event_id) for r in rows]
    assert events[:4] == [(1, "blk_-1608999687919862906", "E5"), (2, "blk_-1608999687919862906", "E22"),
                          (3, "blk_-1608999687919862906", "E11"), (4, "blk_-1608999687919862906", "E9")]
    # the non-HDFS line 5 is skipped; a line naming two blocks yields a row for each
    assert (6, "blk_-1608999687919862906", "E26") in events
    assert [(r.block_id, r.event_id) for r in rows if r.line_id == 7] == [
        ("blk_7503483334202473044", "E30"), ("blk_-3544583377289625738", "E30")]
    # the most specific template wins: E6 ("... src: .. dest: .. of size") over E5 and E9
    assert events[-1] == (8, "blk_7503483334202473044", "E6")
    out = io.StringIO()
    write_rows(rows, out)
    assert out.getvalue().splitlines()[0] == "LineId,BlockId,EventId"


def test_unmatched_content() -> None:
    assert TemplateMatcher([("E1", "<*>Served block<*>to<*>")]).event_id("nothing like it") == UNMATCHED


def test_agreement_ignores_numbering() -> None:
    truth = {1: "E1", 2: "E1", 3: "E2", 4: "E3"}
    assert grouping_agreement({1: "x", 2: "x", 3: "y", 4: "z"}, truth)["mapped"] == 1.0
    split = grouping_agreement({1: "x", 2: "w", 3: "y", 4: "z"}, truth)
    assert split["mapped"] == 0.75 and split["grouping_accuracy"] == 0.5


@needs_hdfs
@pytest.mark.parametrize("templates", [HDFS / "HDFS_templates.csv", None], ids=["templates", "drain"])
def test_hdfs_2k_agreement(templates: Path | None) -> None:
    rows, _ = parse_file(HDFS / "HDFS_2k.log", templates)
    agreement = grouping_agreement({r.line_id: r.event_id for r in rows}, read_structured(HDFS / "HDFS_2k.log_structured.csv"))
    assert agreement["lines"] == 2000
    assert agreement["mapped"] >= 0.99
    assert agreement["grouping_accuracy"] >= 0.99


def test_parse_cli_json_summary(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from fabwatch.stream.cli.main import app

    out = tmp_path / "rows.csv"
    result = CliRunner().invoke(app, ["logs", "parse", str(FIXTURES / "hdfs_tiny.log"), "--templates",
                                      str(FIXTURES / "hdfs_tiny_templates.csv"), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["parser"], summary["rows"], summary["lines"], summary["blocks"]) == ("templates", 8, 7, 3)
    assert out.read_text().splitlines()[1] == "1,blk_-1608999687919862906,E5"
