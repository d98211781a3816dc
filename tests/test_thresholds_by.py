"""Per-entity and per-group thresholds (``train --threshold-by``): calibration with a pooled fallback, the
manifest field, and the alert policy that the processor and `evaluate` share applying them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from fabwatch.export.errors import UsageError
from fabwatch.export.registry import KeyThresholds, Registry, Thresholds, ThresholdsBy
from fabwatch.models.training import calibrate, data
from fabwatch.stream.kafka.config import Settings
from fabwatch.stream.offline.evaluate import evaluate_file
from onnx_fixtures import add_version, feature_names
from stream_helpers import replay_and_serve

POOLED = Thresholds(alert=3.0, close=2.4, critical=5.0, method="pooled")


def test_each_key_with_enough_windows_gets_its_own_threshold_and_short_ones_the_pooled() -> None:
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(0, 3, 1000), rng.normal(0, 1, 1000), rng.normal(0, 1, 50)])
    keys = np.repeat(["noisy", "quiet", "short"], [1000, 1000, 50])
    figures = calibrate.thresholds_by_key("forecast", scores, None, keys, POOLED, source="entity", min_windows=200)

    noisy, quiet, short = figures["noisy"], figures["quiet"], figures["short"]
    assert (noisy.source, quiet.source, short.source) == ("entity", "entity", "pooled")
    assert (noisy.n_windows, quiet.n_windows, short.n_windows) == (1000, 1000, 50)
    # the pooled rule (the 0.99 quantile of normal validation scores) on each key's own windows
    assert noisy.alert == pytest.approx(np.quantile(scores[:1000], 0.99))
    assert noisy.alert > 2.5 * quiet.alert
    assert noisy.close == pytest.approx(calibrate.CLOSE_RATIO * noisy.alert)
    assert (short.alert, short.close, short.critical) == (POOLED.alert, POOLED.close, POOLED.critical)


def test_labelled_event_windows_do_not_raise_a_keys_threshold() -> None:
    rng = np.random.default_rng(1)
    scores = rng.normal(0, 1, 400)
    y = np.zeros(400, np.float32)
    scores[:20], y[:20] = 50.0, 1.0  # an event: forecast thresholds come from normal windows only
    figures = calibrate.thresholds_by_key("forecast", scores, y, np.repeat("a", 400), POOLED, source="entity")
    assert figures["a"].alert == pytest.approx(np.quantile(scores[20:], 0.99))


def test_monitor_keys_only_ever_raise_the_monitors_limit() -> None:
    rng = np.random.default_rng(2)
    scores = np.concatenate([rng.uniform(0.0, 0.5, 300), rng.uniform(0.5, 2.0, 300)])
    keys = np.repeat(["quiet", "noisy"], 300)
    figures = calibrate.thresholds_by_key("forecast", scores, None, keys, POOLED, source="entity", monitor=True)
    assert figures["quiet"].alert == 1.0
    assert figures["noisy"].alert == pytest.approx(np.quantile(scores[300:], calibrate.KEY_MONITOR_QUANTILE))


def test_entities_resolve_to_their_group_and_unknown_ones_to_the_pooled() -> None:
    by = ThresholdsBy(by="group:line", min_windows=200, groups={"a": "L1", "b": "L2", "c": "L1"},
                      keys={"L1": KeyThresholds(alert=9.0, close=7.2, n_windows=400, source="group")})
    assert by.for_entity("a") == by.for_entity("c") == by.keys["L1"]
    assert by.for_entity("b") is None  # its group had no figures: pooled
    assert by.for_entity("new") is None  # first seen at serve time: pooled
    with pytest.raises(ValueError):
        ThresholdsBy(by="line", min_windows=1)


def _write_csv(path: Path, rows: dict[str, list]) -> Path:
    pacsv.write_csv(pa.table(rows), path)
    return path


def test_group_column_is_read_per_entity_and_never_a_feature(tmp_path: Path) -> None:
    n = 40
    path = _write_csv(tmp_path / "g.csv", {"entity": ["a"] * n + ["b"] * n, "ts": list(range(n)) * 2,
                                           "x": np.arange(2 * n, dtype=float).tolist(), "line": [7] * n + [8] * n})
    table = data.load(path, label_col=None, task="forecast", window=10, group_col="line")
    assert table.feature_names == ["x"] and table.groups == {"a": "7", "b": "8"}

    mixed = _write_csv(tmp_path / "m.csv", {"entity": ["a"] * n, "ts": list(range(n)),
                                            "x": [1.0] * n, "line": [7] * (n - 1) + [8]})
    with pytest.raises(UsageError, match="one group per entity; 'a' has several"):
        data.load(mixed, label_col=None, task="forecast", window=10, group_col="line")
    with pytest.raises(UsageError, match="no column 'zone'"):
        data.load(path, label_col=None, task="forecast", window=10, group_col="zone")


# ---- the alert policy: a spike model whose noisy entity would alert all along at the pooled threshold ----

N_FEATURES = 4
STEPS = 400
QUIET, NOISY = ["Q-1", "Q-2"], "N-1"
QUIET_EVENT, NOISY_EVENT = 250, 320  # steps where a real event (a large spike on feature 0) happens


def _noisy_entity_readings(path: Path) -> Path:
    """Readings around 10 with the scaler's std (2) for the quiet entities and three times it for ``N-1``;
    one clear event each for ``Q-1`` and ``N-1``. The spike model scores a reading k std off about k/2."""
    rng = np.random.default_rng(5)
    entities = [*QUIET, NOISY]
    noise = rng.standard_normal((STEPS, len(entities), N_FEATURES)).clip(-3.5, 3.5)
    noise[:, 2] *= 3.0
    noise[QUIET_EVENT, 0, 0] = 15.0
    noise[NOISY_EVENT, 2, 0] = 40.0
    values = 10.0 + 2.0 * noise
    rows = [{"entity": e, "ts": 1_700_000_000_000 + s * 1000, **dict(zip(feature_names(N_FEATURES),
                                                                        np.round(values[s, j], 4).tolist()))}
            for s in range(STEPS) for j, e in enumerate(entities)]
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def _per_entity(noisy_alert: float) -> ThresholdsBy:
    return ThresholdsBy(by="entity", min_windows=200, keys={
        NOISY: KeyThresholds(alert=noisy_alert, close=0.8 * noisy_alert, critical=noisy_alert + 4, n_windows=300,
                             source="entity"),
        "Q-2": KeyThresholds(alert=3.0, close=1.5, critical=5.0, n_windows=60, source="pooled")})


def _opened(alerts) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for a in alerts:
        if a.state == "open":
            out.setdefault(a.entity, []).append(a.window_end_ts)
    return out


@pytest.fixture
def noisy_data(tmp_path: Path) -> Path:
    return _noisy_entity_readings(tmp_path / "noisy.jsonl")


def test_per_entity_thresholds_change_which_entities_alert(tmp_path: Path, noisy_data: Path) -> None:
    pooled_reg, per_entity_reg = tmp_path / "pooled", tmp_path / "per-entity"
    add_version(pooled_reg, N_FEATURES, window=30)
    add_version(per_entity_reg, N_FEATURES, window=30, thresholds_by=_per_entity(10.0))
    event_ts = {e: 1_700_000_000_000 + s * 1000 for e, s in ((QUIET[0], QUIET_EVENT), (NOISY, NOISY_EVENT))}

    pooled = _opened(evaluate_file(pooled_reg, noisy_data).alerts)
    assert pooled[NOISY][0] < event_ts[NOISY]  # the noisy entity's normal readings cross the pooled threshold
    assert pooled[QUIET[0]] == [event_ts[QUIET[0]]] and QUIET[1] not in pooled

    ev = evaluate_file(per_entity_reg, noisy_data)
    assert _opened(ev.alerts) == {QUIET[0]: [event_ts[QUIET[0]]], NOISY: [event_ts[NOISY]]}
    noisy_open = next(a for a in ev.alerts if a.entity == NOISY and a.state == "open")
    assert noisy_open.threshold == 10.0 and noisy_open.severity == "critical"
    assert next(a for a in ev.alerts if a.entity == QUIET[0] and a.state == "open").threshold == 3.0
    assert ev.metrics["thresholds_by"] == "entity" and ev.figures(NOISY).alert == 10.0


@pytest.mark.integration
def test_processor_and_evaluate_agree_with_per_entity_thresholds(settings: Settings, tmp_path: Path,
                                                                 noisy_data: Path) -> None:
    registry = tmp_path / "registry"
    add_version(registry, N_FEATURES, window=30, thresholds_by=_per_entity(10.0))
    offline = evaluate_file(registry, noisy_data).alerts
    assert {a.entity for a in offline} == {QUIET[0], NOISY}
    assert Registry(registry).resolve()[1].thresholds_by.keys[NOISY].alert == 10.0

    live = replay_and_serve(settings, noisy_data, registry, "thresholds-by", len(offline), tmp_path / "serve.log")
    assert live == {a.alert_id for a in offline}
