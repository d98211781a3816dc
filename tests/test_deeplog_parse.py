"""Log parsing: template matching and Drain against loghub's structured HDFS_2k (>= 99 % agreement)."""

from __future__ import annotations

import io
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from fabwatch.export.errors import UsageError
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


# ---- Drain keys: independent of line order, stored with the model, never re-learned when serving ------

def _hdfs_log(path: Path, blocks: int = 6) -> Path:
    """The fixture's HDFS lines for several blocks, block after block, with two endings of the
    PacketResponder line so that a template generalises (``<*>``) as Drain meets the second one."""
    fixture = [line for line in (FIXTURES / "hdfs_tiny.log").read_text().splitlines() if line[:6].isdigit()]
    out = []
    for b in range(blocks):
        for line in fixture:
            if b % 2 and "terminating" in line:
                line = line.replace("terminating", "closing")
            out.append(re.sub(r"blk_-?\d+", f"blk_{1000 + b}", line).replace(" 91178", f" {91178 + b}"))
    path.write_text("\n".join(out) + "\n")
    return path


def _key_of_line(path: Path, **kwargs) -> dict[str, str]:
    """Line text -> its key (every line of these logs names one block, so one row per line)."""
    lines = path.read_text().splitlines()
    rows, _ = parse_file(path, **kwargs)
    return {lines[r.line_id - 1]: r.event_id for r in rows}


def _reordered(src: Path, dst: Path, order: list[int]) -> Path:
    lines = src.read_text().splitlines()
    dst.write_text("\n".join(lines[i] for i in order) + "\n")
    return dst


def test_drain_keys_do_not_depend_on_line_order(tmp_path: Path) -> None:
    log = _hdfs_log(tmp_path / "hdfs.log")
    keys = _key_of_line(log)
    assert len(set(keys.values())) == 7 and UNMATCHED not in keys.values()
    n = len(log.read_text().splitlines())
    swapped = _reordered(log, tmp_path / "swapped.log", [1, 0, *range(2, n)])  # two lines of different templates
    assert _key_of_line(swapped) == keys
    shuffled = _reordered(log, tmp_path / "shuffled.log", random.Random(0).sample(range(n), n))
    assert _key_of_line(shuffled) == keys


@pytest.fixture(scope="module")
def drain_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """`logs parse --save-drain-state` then `logs train --drain-state`: (the training log, the registry)."""
    from typer.testing import CliRunner

    from fabwatch.stream.cli.main import app

    root = tmp_path_factory.mktemp("drain-model")
    log = _hdfs_log(root / "train.log")
    runner = CliRunner()
    parsed = runner.invoke(app, ["logs", "parse", str(log), "--out", str(root / "rows.csv"),
                                 "--save-drain-state", str(root / "drain.json"), "--json"])
    assert parsed.exit_code == 0, parsed.output
    trained = runner.invoke(app, ["logs", "train", "--data", str(root / "rows.csv"), "--registry", str(root / "reg"),
                                  "--drain-state", str(root / "drain.json"), "--h", "2", "--top-g", "2", "--epochs", "2",
                                  "--json"])
    assert trained.exit_code == 0, trained.output
    return log, root / "reg"


@pytest.mark.slow
def test_a_model_serves_a_shuffled_log_with_its_training_keys(drain_model: tuple[Path, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fabwatch.export.registry import Registry, sha256_file
    from fabwatch.stream.cli.main import app
    from fabwatch.stream.logs.parse import DRAIN_STATE, DrainState
    from fabwatch.stream.logs.score import UNK, LogKeyScorer
    from fabwatch.stream.offline.replay import log_messages
    from fabwatch.stream.schemas import LogKey

    log, registry = drain_model
    trained_keys = _key_of_line(log)
    vdir, manifest = Registry(registry).resolve()
    assert manifest.files[DRAIN_STATE] == sha256_file(vdir / DRAIN_STATE)

    # served on a shuffled copy, with a line of a template never seen in training
    n = len(log.read_text().splitlines())
    served = _reordered(log, tmp_path / "served.log", random.Random(1).sample(range(n), n))
    new_line = "081109 214043 2561 INFO dfs.DataNode: Deleting block blk_1000 file /mnt/hadoop/dfs/data/current/blk_1000"
    served.write_text(served.read_text() + new_line + "\n")
    state = DrainState.from_registry(registry)
    assert _key_of_line(served, drain=state) == {**trained_keys, new_line: UNMATCHED}
    lines = served.read_text().splitlines()
    replayed = [LogKey.model_validate_json(v) for v in log_messages(served, drain=state).values]
    assert {lines[k.line - 1]: k.key for k in replayed} == {**trained_keys, new_line: UNMATCHED}

    rows = tmp_path / "served_rows.csv"
    parsed = CliRunner().invoke(app, ["logs", "parse", str(served), "--registry", str(registry), "--out", str(rows),
                                      "--json"])
    assert parsed.exit_code == 0, parsed.output
    served_keys = [line.split(",")[2] for line in rows.read_text().splitlines()[1:]]
    scorer = LogKeyScorer.from_registry(registry)
    ids = scorer.vocab.encode(served_keys)
    assert (ids == UNK).sum() == 1 and served_keys[int(np.flatnonzero(ids == UNK)[0])] == UNMATCHED

    # keys the state does not know cannot be trained against it
    (tmp_path / "other.txt").write_text("E5 E22 E11 E9 E26\n" * 5)
    foreign = CliRunner().invoke(app, ["logs", "train", "--data", str(tmp_path / "other.txt"), "--registry",
                                       str(tmp_path / "reg"), "--drain-state", str(registry.parent / "drain.json")])
    assert isinstance(foreign.exception, UsageError) and "not in the Drain state" in str(foreign.exception)


@pytest.mark.slow
def test_a_tampered_drain_state_is_refused(drain_model: tuple[Path, Path], tmp_path: Path) -> None:
    from fabwatch.export.registry import Registry, RegistryError
    from fabwatch.stream.logs.parse import DRAIN_STATE, DrainState

    registry = Path(shutil.copytree(drain_model[1], tmp_path / "reg"))
    vdir, _ = Registry(registry).resolve()
    path = vdir / DRAIN_STATE
    path.write_text(path.read_text().replace("Receiving block", "Sending block"))
    with pytest.raises(RegistryError, match=f"{DRAIN_STATE} failed its sha256 check"):
        DrainState.from_registry(registry)
