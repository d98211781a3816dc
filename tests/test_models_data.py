"""Synthetic data, loading, windows, split and the bad-data table (no TensorFlow)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from fabwatch.export.errors import UsageError
from fabwatch.models.training import data, synth


def _write_csv(path: Path, columns: dict[str, list]) -> Path:
    pacsv.write_csv(pa.table(columns), path)
    return path


def _good_columns(rows: int = 150, features: int = 3) -> dict[str, list]:
    rng = np.random.default_rng(0)
    cols: dict[str, list] = {"entity": ["a"] * rows, "ts": list(range(rows))}
    cols.update({f"f{i}": rng.standard_normal(rows).tolist() for i in range(features)})
    cols["label"] = [0] * (rows - 5) + [1] * 5
    return cols


def test_synth_is_deterministic_labelled_and_has_every_event(tmp_path: Path) -> None:
    a = synth.generate(entities=4, steps=3000, seed=7, anomaly_rate=0.1)
    assert a.equals(synth.generate(entities=4, steps=3000, seed=7, anomaly_rate=0.1))
    assert not a.equals(synth.generate(entities=4, steps=3000, seed=8, anomaly_rate=0.1))
    assert a.column_names == ["entity", "ts", *synth.FEATURES, "label", "event"]
    events = np.asarray(a.column("event").to_pylist())
    label = a.column("label").to_numpy()
    assert set(events) >= {"", *synth.EVENTS} - {"level_shift"} and 0.03 < label.mean() < 0.2
    assert not label[events == ""].any()
    for suffix in (".parquet", ".csv"):
        synth.write(a, tmp_path / f"s{suffix}")
        table = data.load(tmp_path / f"s{suffix}")
        assert table.feature_names == list(synth.FEATURES) and table.x.shape == (12_000, 12)


def test_windows_split_and_scaler_use_training_rows_only(tmp_path: Path) -> None:
    cols = _good_columns(rows=400)
    cols["f0"] = list(range(400))  # a ramp: the scaler must only see the first 300 rows
    table = data.load(_write_csv(tmp_path / "d.csv", cols), window=50)
    split = data.split(table, window=50, val_fraction=0.25)
    assert split.scaler.mean[0] == pytest.approx(149.5)
    assert split.train.x.shape == (300 - 49, 50, 3) and split.val.x.shape == (100, 50, 3)
    raw_val_targets = split.val.x[:, -1, 0] * split.scaler.std[0] + split.scaler.mean[0]
    assert raw_val_targets.min() == pytest.approx(300, abs=1e-3)  # no validation target was a training row
    w = data.windows(np.arange(20, dtype=np.float32).reshape(10, 2), np.arange(10.0), window=4, stride=3)
    assert w.x.shape == (3, 4, 2) and w.x[1, 0, 0] == 6 and list(w.y) == [3, 6, 9]
    events = np.array([0, 0, 0, 0, 1, 1, 1, 0, 0, 0.0])
    with_events = data.windows(np.arange(10, dtype=np.float32)[:, None], events, window=4, stride=3, event_stride=2)
    assert list(with_events.x[:, -1, 0]) == [3, 5, 6, 9]  # every 3rd window, plus every 2nd ending on an event


def test_explicit_features_any_width_and_gaps_within_tolerance(tmp_path: Path) -> None:
    cols = _good_columns(rows=200, features=5)
    cols["f1"][10] = None
    table = data.load(_write_csv(tmp_path / "d.csv", cols), features=["f4", "f1"], nan_tolerance=0.01)
    assert table.feature_names == ["f4", "f1"] and np.isfinite(table.x).all()
    assert table.x[10, 1] == pytest.approx(cols["f1"][9], rel=1e-6)  # forward-filled from the last reading


BAD_DATA = {
    "missing column": ({"drop": "label"}, {}, "label column 'label' not in the file"),
    "missing feature": ({}, {"features": ["f0", "nope"]}, "feature column(s) nope not in the file"),
    "non-numeric": ({"set": ("f1", 7, "abc")}, {}, "non-numeric value 'abc' at row 8"),
    "NaN beyond tolerance": ({"nan": ("f2", 20)}, {}, "is 13.3% missing"),
    "fewer rows than a window": ({"rows": 60}, {}, "fewer than one window of 100"),
    "bad label values": ({"set": ("label", 3, 2)}, {}, "must hold 0/1"),
    "negative delay": ({"set": ("label", 3, -4)}, {"task": "regress"}, "delay minutes >= 0"),
}


@pytest.mark.parametrize("case", BAD_DATA, ids=list(BAD_DATA))
def test_bad_data_is_a_one_line_usage_error(tmp_path: Path, case: str) -> None:
    change, kwargs, message = BAD_DATA[case]
    cols = _good_columns(rows=change.get("rows", 150))
    if "drop" in change:
        del cols[change["drop"]]
    if "set" in change:
        col, row, value = change["set"]
        cols[col] = [str(v) for v in cols[col]] if isinstance(value, str) else cols[col]
        cols[col][row] = value
    if "nan" in change:
        col, n = change["nan"]
        cols[col][:n] = [None] * n
    path = _write_csv(tmp_path / "bad.csv", cols)
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        data.load(path, window=100, **kwargs)
    assert "\n" not in str(err.value)


def test_cli_bad_data_exits_2_with_one_line(tmp_path: Path) -> None:
    cols = _good_columns(rows=60)
    path = _write_csv(tmp_path / "short.csv", cols)
    proc = subprocess.run([sys.executable, "-m", "fabwatch.stream.cli.main", "train", "--data", str(path), "--registry",
                           str(tmp_path / "reg"), "--quick"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fabwatch:")]
    assert len(lines) == 1 and "fewer than one window" in lines[0]
    assert not (tmp_path / "reg").exists()
