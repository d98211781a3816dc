"""The wheel works outside the checkout: built from this tree, installed with its dependencies into a fresh
virtual environment, and run from a directory that is not the checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.integration  # installs dependencies from the package index


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(REPO)], check=True)
    (built,) = out.glob("fabwatch-*.whl")
    return built


def test_wheel_holds_only_the_fabwatch_namespace(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"fabwatch"}
    assert "fabwatch/stream/kafka/recipe/pom.xml" in names  # the broker recipe travels with the code
    assert {"fabwatch/stream/py.typed", "fabwatch/models/py.typed", "fabwatch/export/py.typed"} <= set(names)
    assert not any(n.startswith("fabwatch/stream/__pycache__") for n in names)


def test_installed_wheel_runs_from_elsewhere(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([venv / "bin" / "pip", "install", "-q", str(wheel)], check=True, timeout=900)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FABWATCH_", "KAFKA_", "PYTHON"))}

    def fabwatch(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([venv / "bin" / "fabwatch", *args], cwd=elsewhere, env=env, capture_output=True,
                              text=True, timeout=300)

    version = fabwatch("--version")
    assert version.returncode == 0 and version.stdout.startswith("fabwatch "), version.stderr
    assert fabwatch("schemas", "--out", "schemas").returncode == 0
    assert sorted(p.name for p in (elsewhere / "schemas").iterdir()) == sorted(
        p.name for p in (REPO / "deploy" / "schemas").iterdir())
    try:
        up = fabwatch("broker", "up", "--json")
        assert up.returncode == 0, up.stderr
        status = fabwatch("broker", "status", "--json")
        assert status.returncode == 0 and json.loads(status.stdout)["healthy"], status.stdout + status.stderr
    finally:
        down = fabwatch("broker", "down", "--json")
    assert down.returncode == 0 and json.loads(down.stdout)["stopped"]
    imported = subprocess.run([venv / "bin" / "python", "-c", "import stream"], cwd=elsewhere, env=env,
                              capture_output=True)
    assert imported.returncode != 0  # nothing named `stream` at the top of site-packages
