"""`fabwatch logs serve` with a model version that holds count invariants: a session whose keys come in a
normal order but lose a step raises an `invariant` alert when it closes; a normal session raises none."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fabwatch.stream.schemas import Alert, alert_id_for
from stream_helpers import REPO, log_has, produce, read_all, serve_env, stop, wait_for

NORMAL = ["E5 E22 E11 E9 E26"] * 40 + ["E22 E5 E11 E9 E26"] * 10


@pytest.mark.slow
@pytest.mark.integration
def test_a_lost_step_is_an_invariant_alert_at_session_close(settings, tmp_path: Path) -> None:
    from fabwatch.stream.cli.main import app

    (tmp_path / "train").write_text("\n".join(NORMAL) + "\n")
    trained = CliRunner().invoke(app, ["logs", "train", "--data", str(tmp_path / "train"), "--registry",
                                       str(tmp_path / "reg"), "--h", "3", "--top-g", "2", "--epochs", "300",
                                       "--min-support", "1.0", "--json"])
    assert trained.exit_code == 0, trained.output
    assert "count(E5) == count(E26)" in json.loads(trained.stdout)["count_model"]["invariants"]

    sessions = {"blk_1": "E5 E22 E11 E9 E26", "blk_2": "E5 E22 E11 E9"}  # blk_2: in order, E26 lost
    keys = [{"session": s, "ts": 1_700_000_000_000 + line, "key": k, "line": line}
            for s, events in sessions.items() for line, k in enumerate(events.split(), start=1)]
    produce(settings, settings.topics.logkeys, keys, key_field="session")
    group = f"logs-{uuid.uuid4().hex[:8]}"
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        serve = subprocess.Popen([sys.executable, "-m", "fabwatch.stream.cli.main", "logs", "serve", "--registry",
                                  str(tmp_path / "reg"), "--idle-timeout-s", "1", "--group", group],
                                 cwd=REPO, env=serve_env(settings), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: log_has(log_path, "serving logkeys model"), timeout_s=60, what="logs serve to start")
        raw = read_all(settings, settings.topics.alerts, expect=1, idle_s=4.0, timeout_s=60)
    finally:
        rc = stop(serve)
    assert rc == 0, log_path.read_text(errors="replace")
    (alert,) = [Alert.model_validate_json(a) for a in raw]
    assert (alert.entity, alert.kind, alert.detail["reason"]) == ("blk_2", "log", "invariant")
    assert alert.detail["relation"] == "count(E5) == count(E26) broken: count(E5)=1, count(E26)=0"
    assert alert.detail["counts"] == {"E5": 1, "E22": 1, "E11": 1, "E9": 1}
    assert alert.alert_id == alert_id_for("blk_2", 4, "v0001", "invariant")
