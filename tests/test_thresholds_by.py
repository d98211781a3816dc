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
MONITOR = Thresholds(alert=1.0, close=0.8, critical=1.5, method="statistical monitor")


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
    assert short.method == "pooled: 50 validation windows, fewer than 200"


def test_best_f1_keys_need_events_of_their_own() -> None:
    rng = np.random.default_rng(3)
    scores, y = rng.uniform(0, 0.6, 600), np.zeros(600, np.float32)
    scores[:30], y[:30] = rng.uniform(0.5, 1.0, 30), 1.0  # key "a" has events, key "b" none
    keys = np.repeat(["a", "b"], 300)
    figures = calibrate.thresholds_by_key("classify", scores, y, keys, POOLED, source="group")
    assert figures["a"].source == "group" and "best F1" in figures["a"].method
    assert figures["b"].source == "pooled" and figures["b"].alert == POOLED.alert
    # with a false-alarm target the rule needs normal windows only
    far = calibrate.thresholds_by_key("classify", scores, y, keys, POOLED, source="group", target_far=0.01)
    assert far["b"].source == "group" and far["b"].alert == pytest.approx(np.quantile(scores[300:], 0.99))


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
    figures = calibrate.thresholds_by_key("forecast", scores, None, keys, MONITOR, source="entity", monitor=True)
    assert figures["quiet"].alert == 1.0 and figures["quiet"].source == "entity"
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


def _recording(seed: int, steps: int, events: dict[str, tuple[int, float]]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Entities, timestamps and values (time-major) of the quiet and noisy entities; ``events[entity]`` is
    (step, size in scaler std) of a spike on feature 0."""
    rng = np.random.default_rng(seed)
    entities = [*QUIET, NOISY]
    noise = rng.standard_normal((steps, len(entities), N_FEATURES))
    noise[:, 2] *= 3.0
    for e, (step, size) in events.items():
        noise[step, entities.index(e), 0] = size
    values = (10.0 + 2.0 * noise).astype(np.float32)
    keys = [e for _ in range(steps) for e in entities]
    ts = np.repeat(1_700_000_000_000 + np.arange(steps, dtype=np.int64) * 1000, len(entities))
    return keys, ts, values.reshape(-1, N_FEATURES)


def test_per_entity_monitor_thresholds_silence_the_noisy_entity_and_still_catch_events(tmp_path: Path) -> None:
    """Calibrated as `train` calibrates a forecast model (the statistical monitor's raise-only rule per entity,
    on clean validation scores): the pooled threshold sits in the noisy entity's tail, so its normal readings
    cross it; its own threshold does not stop a real event, and the quiet entities keep the pooled one."""
    from fabwatch.export.runtime import ScoringModel
    from fabwatch.stream.engine import ScoringEngine, run_offline

    base = tmp_path / "base"
    add_version(base, N_FEATURES, window=30)
    keys, ts, values = _recording(seed=11, steps=1200, events={})  # clean history: the validation data
    _, cols, _ = run_offline(ScoringEngine(ScoringModel.from_registry(base)), keys, ts, values)
    score = np.concatenate([c.score for c in cols])
    window_keys = np.asarray(keys, dtype=object)[np.concatenate([c.index for c in cols])].astype(str)
    pooled = calibrate.choose_thresholds("forecast", score, None)
    by = ThresholdsBy(by="entity", min_windows=200, keys=calibrate.thresholds_by_key(
        "forecast", score, None, window_keys, pooled, source="entity", monitor=True))
    assert by.keys[NOISY].alert > pooled.alert == by.keys[QUIET[0]].alert

    def opened(thresholds_by: ThresholdsBy | None) -> dict[str, list[int]]:
        registry = tmp_path / ("per-entity" if thresholds_by else "pooled")
        add_version(registry, N_FEATURES, window=30, alert=pooled.alert, close=pooled.close,
                    critical=pooled.critical, thresholds_by=thresholds_by)
        keys, ts, values = _recording(seed=12, steps=600, events={QUIET[0]: (300, 12.0), NOISY: (400, 40.0)})
        alerts, _, _ = run_offline(ScoringEngine(ScoringModel.from_registry(registry)), keys, ts, values)
        return {e: [(t - 1_700_000_000_000) // 1000 for t in at] for e, at in _opened(alerts).items()}

    pooled_opened = opened(None)
    assert [s for s in pooled_opened[NOISY] if s != 400] and 400 in pooled_opened[NOISY]
    assert opened(by) == {QUIET[0]: [300], NOISY: [400]}


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


def test_train_refuses_a_bad_threshold_by_in_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    n = 400
    path = _write_csv(tmp_path / "d.csv", {"entity": ["a"] * n, "ts": list(range(n)),
                                           "x": np.random.default_rng(0).normal(size=n).tolist()})
    for value, says in (("zone", "--threshold-by takes entity or group:COLUMN, not 'zone'"),
                        ("group:zone", "--threshold-by group:zone: no column 'zone' in the file")):
        proc = subprocess.run([sys.executable, "-m", "fabwatch.stream.cli.main", "train", "--data", str(path),
                               "--registry", str(tmp_path / "reg"), "--unsupervised", "--quick", "--window", "20",
                               "--threshold-by", value], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and says in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]


@pytest.mark.slow
def test_training_records_group_thresholds_with_a_pooled_fallback(trained) -> None:
    """`train`'s calibration on the exported graph, ``--threshold-by group:COLUMN`` with the map a retrain
    passes: a group with enough validation windows gets its own figures, a small one the pooled."""
    from fabwatch.models.training.train import TrainConfig, calibrate_on

    result, registry = trained
    cfg = TrainConfig.model_validate(result.manifest.extra["config"])
    table = data.load(cfg.data, cfg.features, cfg.label_col, cfg.task, cfg.nan_tolerance, cfg.window)
    split = data.split(table, cfg.window, cfg.val_fraction, cfg.stride, val_stride=1)
    names = table.entity_names
    groups = {**{e: "big" for e in names[:4]}, names[4]: "small"}  # names[5]: no group
    per_entity = len(split.val.x) // len(names)
    cfg = cfg.model_copy(update={"threshold_by": "group:line", "threshold_min_windows": 2 * per_entity})
    manifest = result.manifest.model_copy(deep=True)
    calibrate_on(registry.version_dir(result.version) / "model.onnx", manifest, split=split, cfg=cfg, groups=groups)

    by = manifest.thresholds_by
    assert (by.by, by.min_windows, by.groups) == ("group:line", 2 * per_entity, groups)
    assert set(by.keys) == {"big", "small"}
    assert by.keys["big"].n_windows == int(np.isin(split.val_entity, names[:4]).sum())
    assert by.keys["big"].source == "group" and "best F1" in by.keys["big"].method
    assert by.keys["small"].source == "pooled" and by.keys["small"].alert == manifest.thresholds.alert
    assert by.for_entity(names[0]) == by.keys["big"] and by.for_entity(names[5]) is None


def test_a_retrain_keeps_the_serving_models_threshold_by(tmp_path: Path) -> None:
    """The sidecar trainer passes the serving manifest's option and group map to the candidate's training
    (its store has no group column). No broker: the candidate's training is stopped where it would start."""
    from fabwatch.models.sidecar.store import ReadingStore
    from fabwatch.models.sidecar.trainer import Trainer, TrainerOptions
    from fabwatch.models.training.train import TrainConfig

    by = ThresholdsBy(by="group:line", min_windows=50, groups={"Q-1": "L1", "N-1": "L2"})
    add_version(tmp_path / "registry", N_FEATURES, window=30, task="forecast", thresholds_by=by)
    keys, ts, values = _recording(seed=3, steps=200, events={})
    ReadingStore(tmp_path / "store", feature_names(N_FEATURES)).write(keys, ts, values, np.full(len(ts), -1))
    seen: list[TrainConfig] = []

    class Probe(Trainer):
        def train_candidate(self, overrides: dict) -> tuple[str, float]:
            seen.append(TrainConfig.quick(**overrides))
            raise UsageError("stopped before training")

    record = Probe(Settings(), TrainerOptions(registry=tmp_path / "registry", store=tmp_path / "store",
                                              quick=True)).retrain_once()
    assert record["decision"] == "skipped" and len(seen) == 1
    assert (seen[0].threshold_by, seen[0].threshold_min_windows, seen[0].entity_groups) == (
        "group:line", 50, {"Q-1": "L1", "N-1": "L2"})
