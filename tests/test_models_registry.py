"""Registry safety without TensorFlow: crash between writing a version and switching ``current``, a crash
while committing, tamper refusal, promote / rollback through the CLI."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import fabwatch.export.registry as registry_mod
from fabwatch.export.registry import PromotionConflict, Registry, RegistryError
from fabwatch.export.runtime import ScoringModel
from fabwatch.stream.cli.main import app
from fabwatch.stream.bench.tiny_models import add_version


def _scores(reg: Registry) -> tuple[str, np.ndarray]:
    model = ScoringModel.from_registry(reg, providers=["CPUExecutionProvider"])
    x = np.full((2, 100, 4), 10.0, np.float32)
    x[0, -1, 0] = 30.0
    return model.version, model.predict(x).score


def test_crash_between_commit_and_switch_keeps_old_version_serving(tmp_path: Path, monkeypatch) -> None:
    reg = Registry(tmp_path)
    old = add_version(tmp_path)
    served_before = _scores(reg)

    real_write = registry_mod.atomic_write_text

    def crash(path: Path, text: str) -> None:  # the process dies before `current` is replaced
        if path.name == "current":
            raise OSError("simulated crash before the rename of current")
        real_write(path, text)

    monkeypatch.setattr(registry_mod, "atomic_write_text", crash)
    with pytest.raises(OSError, match="simulated crash"):
        add_version(tmp_path, weights=(1.0, 0.0))
    monkeypatch.undo()

    assert len(reg.versions()) == 2          # the new version is complete on disk ...
    assert reg.current_version() == old      # ... but the old one still serves
    version, scores = _scores(reg)
    assert version == old and np.allclose(scores, served_before[1])
    reg.verify(reg.versions()[-1])           # and the new one is intact, ready to promote later


def test_crash_while_committing_leaves_no_partial_version(tmp_path: Path, monkeypatch) -> None:
    reg = Registry(tmp_path)
    old = add_version(tmp_path)

    def crash(src, dst) -> None:
        raise OSError("simulated crash during the rename of the version directory")

    monkeypatch.setattr(registry_mod.os, "rename", crash)
    with pytest.raises(OSError):
        add_version(tmp_path)
    monkeypatch.undo()
    assert reg.versions() == [old] and reg.current_version() == old
    staging = list(tmp_path.glob(".staging-*"))
    assert staging, "the half-built version stays in a hidden staging directory"
    os.utime(staging[0], (0, 0))
    reg.remove_stale_staging()
    assert not list(tmp_path.glob(".staging-*"))


@pytest.mark.parametrize("victim", ["model.onnx", "manifest.json"])
def test_tampered_version_is_refused(tmp_path: Path, victim: str) -> None:
    reg = Registry(tmp_path)
    version = add_version(tmp_path)
    path = tmp_path / version / victim
    if victim == "model.onnx":
        path.write_bytes(path.read_bytes() + b"\0")
        match = "failed its sha256 check"
    else:  # point the manifest at a file that is not there
        manifest = json.loads(path.read_text())
        manifest["files"]["extra.bin"] = "0" * 64
        path.write_text(json.dumps(manifest))
        match = "missing"
    with pytest.raises(RegistryError, match=match):
        ScoringModel.from_registry(reg)
    with pytest.raises(RegistryError):
        reg.promote(version)


def test_registry_cli_list_promote_rollback(tmp_path: Path) -> None:
    first = add_version(tmp_path)
    second = add_version(tmp_path)
    runner = CliRunner()

    listed = runner.invoke(app, ["registry", "list", "--registry", str(tmp_path), "--json"])
    assert listed.exit_code == 0, listed.output
    info = json.loads(listed.output)
    assert info["current"] == second and [v["version"] for v in info["versions"]] == [first, second]

    rolled = runner.invoke(app, ["registry", "rollback", "--registry", str(tmp_path), "--json"])
    assert rolled.exit_code == 0 and json.loads(rolled.output)["current"] == first
    promoted = runner.invoke(app, ["registry", "promote", second, "--registry", str(tmp_path)])
    assert promoted.exit_code == 0 and Registry(tmp_path).current_version() == second

    missing = runner.invoke(app, ["registry", "promote", "v0042", "--registry", str(tmp_path)])
    assert missing.exit_code != 0 and "no version v0042" in str(missing.exception)



# ---- promotion as compare-and-swap under the registry lock (issue #16) ---------------------------

def test_promote_compare_and_swap(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    first, second, third = (add_version(tmp_path, promote=False) for _ in range(3))
    reg.promote(first)
    reg.promote(second, expect_current=first)      # current is what the caller started from: swapped
    assert reg.current_version() == second
    history = reg.promotion_history()
    with pytest.raises(PromotionConflict, match=f"current is {second}, not {first}"):
        reg.promote(third, expect_current=first)   # someone promoted meanwhile: nothing changes
    assert reg.current_version() == second and reg.promotion_history() == history
    reg.rollback()
    with pytest.raises(PromotionConflict):
        reg.promote(third, expect_current=second)  # nor after a rollback
    assert reg.current_version() == first
    reg.promote(third)                             # an operator's promote does not compare
    assert reg.current_version() == third


@pytest.mark.parametrize("change", ["promote", "rollback"])
def test_promote_and_rollback_wait_for_the_registry_lock(tmp_path: Path, change: str) -> None:
    """Whoever holds the lock reads and switches ``current`` alone: the check of a compare-and-swap and its
    switch cannot be split by an operator's promote or rollback."""
    reg = Registry(tmp_path)
    first, second = add_version(tmp_path), add_version(tmp_path)
    act = {"promote": lambda: reg.promote(first), "rollback": reg.rollback}[change]
    other = threading.Thread(target=act)
    with reg.locked():
        other.start()
        other.join(1.0)
        assert other.is_alive() and reg.current_version() == second  # waiting for the lock
    other.join(30)
    assert not other.is_alive() and reg.current_version() == first

# ---- a version name or a manifest must not choose what serves (issue #16) ------------------------

@pytest.fixture
def reg_outside(tmp_path: Path) -> tuple[Registry, Path]:
    """A registry and, beside it, a complete version directory outside it."""
    add_version(tmp_path / "elsewhere")
    return Registry(tmp_path / "registry"), tmp_path / "elsewhere" / "v0001"


@pytest.mark.parametrize("name", ["../elsewhere/v0001", "ABSOLUTE", "v0001/..", "current", "", "v1"])
def test_a_version_name_that_is_a_path_is_refused(reg_outside, name: str) -> None:
    reg, outside = reg_outside
    add_version(reg.root)
    with pytest.raises(RegistryError, match="not a version name"):
        reg.resolve(str(outside) if name == "ABSOLUTE" else name)


def test_a_version_folder_linking_outside_the_registry_is_refused(reg_outside) -> None:
    reg, outside = reg_outside
    add_version(reg.root)
    (reg.root / "v0002").symlink_to(outside)
    with pytest.raises(RegistryError, match="outside the registry"):
        reg.resolve("v0002")


def _rewrite_manifest(reg: Registry, version: str, **changes) -> None:
    path = reg.root / version / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_manifest_that_does_not_list_model_onnx_is_refused(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    version = add_version(tmp_path)
    _rewrite_manifest(reg, version, files={})
    with pytest.raises(RegistryError, match="does not list model.onnx"):
        reg.resolve(version)


def test_an_unlisted_file_or_a_listed_path_outside_the_version_is_refused(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    version = add_version(tmp_path)
    (tmp_path / version / "model.fp16.onnx").write_bytes(b"not listed")
    with pytest.raises(RegistryError, match="not listed in the manifest"):
        reg.resolve(version)
    (tmp_path / version / "model.fp16.onnx").unlink()
    (tmp_path / "secret").write_bytes(b"s")
    files = reg.manifest(version).files
    _rewrite_manifest(reg, version, files={**files, "../secret": registry_mod.sha256_file(tmp_path / "secret")})
    with pytest.raises(RegistryError, match="leads outside the version"):
        reg.resolve(version)


def test_the_announced_sha256_must_be_the_model_onnx_loaded(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    version = add_version(tmp_path)
    good = reg.manifest(version).files["model.onnx"]
    assert reg.resolve(version, good)[1].version == version
    with pytest.raises(RegistryError, match="not the one announced"):
        reg.resolve(version, "0" * 64)
