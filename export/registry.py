"""Versioned model registry on a filesystem: ``<root>/<version>/`` + an atomically switched ``current``.

Layout::

    registry/
      v0001/ model.onnx  [model.fp16.onnx]  [keras/...]  manifest.json
      current            one line: the serving version (write tmp, fsync, rename)
      promotions.jsonl   every promote / rollback, newest last
      decisions.jsonl    the trainer's gate decisions
      .lock              flock held while ``current`` is read and switched (promote, rollback)
      .trainer.lock      flock held by the sidecar trainer for a whole retrain

A version directory is built under a temporary name and renamed into place only when complete, so
a crash never leaves a half-written version visible. Loading re-hashes every file listed in the
manifest and refuses any mismatch, an unlisted file, a listing without ``model.onnx``, and any path (a
version name, a listed file, a symbolic link) that leads outside the registry: a version name can come
from a ModelEvent on Kafka. No pickle: ONNX, JSON and Keras files only.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, Field

from fabwatch.export.errors import UsageError

VERSION_PATTERN = r"^v(\d{4,})$"  # what ``commit`` names versions: never a path
VERSION_RE = re.compile(VERSION_PATTERN)
RUNTIME_CACHE = "trt-cache"  # where fabwatch 0.1 wrote TensorRT's engine cache (now elsewhere): ignored, never loaded
Task = Literal["classify", "regress", "forecast", "logkeys"]


class RegistryError(RuntimeError):
    """The registry is missing, empty, or a version failed verification."""


class PromotionConflict(RegistryError):
    """``current`` is not the version a compare-and-swap promotion expected (someone promoted or rolled back)."""


class Scaler(BaseModel):
    """Standardisation fitted on training rows: ``(x - mean) / std``, applied with numpy when serving."""

    mean: list[float]
    std: list[float]


class FeatureBins(BaseModel):
    """One feature's training distribution for drift checks (``fabwatch.models.training.drift``)."""

    edges: list[float] = Field(description="decile edges of the training rows, ascending, duplicates merged")
    shares: list[float] = Field(description="share of training rows in each of the len(edges) + 1 bins")


class Thresholds(BaseModel):
    """Alert policy figures, in the units of the model's score."""

    alert: float = Field(description="open an alert at or above this score")
    close: float = Field(description="close an open alert below this score (hysteresis)")
    critical: float | None = Field(default=None, description="severity 'critical' at or above this score")
    method: str = Field(default="", description="how the threshold was chosen")


class KeyThresholds(Thresholds):
    """The figures one entity or group alerts at, and where they come from."""

    n_windows: int = Field(description="validation windows of this entity or group")
    source: Literal["entity", "group", "pooled"] = Field(
        description="calibrated on its own windows, or the pooled figures (fewer than min_windows)")


class ThresholdsBy(BaseModel):
    """Thresholds calibrated per entity or per group of entities (``train --threshold-by``).

    An entity alerts at ``keys[entity]`` (``by="entity"``) or ``keys[groups[entity]]`` (``by="group:COLUMN"``);
    an entity or group missing here, such as an entity first seen at serve time, alerts at the pooled
    ``Manifest.thresholds``. A retrain of the sidecar trainer reuses ``by``, ``min_windows`` and ``groups``.
    """

    by: str = Field(pattern=r"^(entity|group:.+)$", description="entity, or group:COLUMN")
    min_windows: int = Field(ge=1, description="validation windows a key needs for its own figures")
    groups: dict[str, str] = Field(default_factory=dict, description="entity -> group (group:COLUMN only), "
                                   "from COLUMN of the training data")
    keys: dict[str, KeyThresholds] = Field(default_factory=dict, description="entity or group -> its figures")

    def for_entity(self, entity: str) -> KeyThresholds | None:
        """The figures ``entity`` alerts at; None: the pooled ones."""
        key = entity if self.by == "entity" else self.groups.get(entity)
        return None if key is None else self.keys.get(key)


class Manifest(BaseModel):
    version: str
    created: str
    task: Task
    feature_names: list[str]
    window: int = 100
    scaler: Scaler | None = None
    thresholds: Thresholds | None = None
    thresholds_by: ThresholdsBy | None = Field(default=None, description="per-entity or per-group thresholds; "
                                               "``thresholds`` are the pooled ones, for every entity not in it")
    calibration: dict[str, float] = Field(default_factory=dict, description="score -> z: mean and std on normal validation data")
    members: list[str] = Field(default_factory=list)
    inputs: dict[str, list[Any]] = Field(default_factory=dict, description="ONNX input names and shapes")
    outputs: list[str] = Field(default_factory=list)
    parity: dict[str, float] = Field(default_factory=dict, description="max |ONNX - TF| per file")
    data_fingerprint: str = ""
    drift_reference: dict[str, FeatureBins] = Field(default_factory=dict, description="feature -> its training "
                                                    "distribution; empty in versions made before drift checks")
    metrics: dict[str, Any] = Field(default_factory=dict)
    cross_validation: dict[str, Any] = Field(default_factory=dict, description="train --cv: per-fold and summary "
                                             "out-of-fold figures of each member and the gate, and --weight-search's "
                                             "static weights against the gate")
    extra: dict[str, Any] = Field(default_factory=dict, description="task-specific settings (logkeys: vocabulary, h, top_g)")
    files: dict[str, str] = Field(default_factory=dict, description="relative path -> sha256, every file but the manifest")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write, fsync, rename, fsync the directory: readers see the old or the new file, never a torn one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


class Registry:
    def __init__(self, root: Path | str):
        self.root = Path(root)

    # ---- reading ---------------------------------------------------------------------------
    def versions(self) -> list[str]:
        if not self.root.is_dir():
            return []
        found = [p.name for p in self.root.iterdir() if p.is_dir() and VERSION_RE.match(p.name)]
        return sorted(found, key=lambda v: int(VERSION_RE.match(v).group(1)))

    def current_version(self) -> str | None:
        try:
            version = (self.root / "current").read_text().strip()
        except FileNotFoundError:
            return None
        return version or None

    def version_dir(self, version: str) -> Path:
        """The folder of ``version``, refused unless it is a version name whose folder lies inside the registry."""
        if not VERSION_RE.match(version):
            raise RegistryError(f"{version[:80]!r} is not a version name (v0001, v0002, ...): not loaded")
        vdir = self.root / version
        if not vdir.resolve().is_relative_to(self.root.resolve()):
            raise RegistryError(f"{version} links outside the registry {self.root}: not loaded")
        return vdir

    def manifest(self, version: str) -> Manifest:
        path = self.version_dir(version) / "manifest.json"
        if not path.exists():
            raise RegistryError(f"version {version} not found in {self.root}")
        return Manifest.model_validate_json(path.read_text())

    def verify(self, version: str) -> Manifest:
        """Re-hash every file of a version against its manifest; raise on any mismatch, on a file the
        manifest does not list (TensorRT's cache aside), on a listing without model.onnx, and on any
        listed path that leads outside the version."""
        manifest = self.manifest(version)
        vdir = self.version_dir(version)
        if "model.onnx" not in manifest.files:
            raise RegistryError(f"{version}: the manifest does not list model.onnx with its sha256: not loaded")
        inside = vdir.resolve()
        present = {str(p.relative_to(vdir)) for p in vdir.rglob("*") if (p.is_file() or p.is_symlink())
                   and p.name != "manifest.json" and p.relative_to(vdir).parts[0] != RUNTIME_CACHE}
        unlisted = sorted(present - set(manifest.files))
        if unlisted:
            raise RegistryError(f"{version}: {unlisted[:3]} not listed in the manifest: refusing unverified files")
        for rel, expected in manifest.files.items():
            path = vdir / rel
            if not path.resolve().is_relative_to(inside):
                raise RegistryError(f"{version}: {rel[:80]!r} listed in the manifest leads outside the version")
            if not path.is_file():
                raise RegistryError(f"{version}: {rel} listed in the manifest is missing")
            actual = sha256_file(path)
            if actual != expected:
                raise RegistryError(f"{version}: {rel} failed its sha256 check (manifest {expected[:12]}…, "
                                    f"file {actual[:12]}…): refusing to load a modified model")
        return manifest

    def resolve(self, version: str | None = None, sha256: str | None = None) -> tuple[Path, Manifest]:
        """The verified directory and manifest of ``version`` (default: ``current``). ``sha256``: the
        model.onnx hash a ModelEvent announced; a version whose model.onnx differs is refused."""
        if version is None:
            if not self.root.is_dir():
                raise UsageError(f"no model registry at {self.root}: train one with `fabwatch train`")
            version = self.current_version()
            if version is None:
                raise UsageError(f"registry {self.root} has no current version: promote one first")
        manifest = self.verify(version)
        if sha256 is not None and manifest.files["model.onnx"] != sha256:
            raise RegistryError(f"{version}: model.onnx is not the one announced (sha256 {sha256[:12]}…): not loaded")
        return self.version_dir(version), manifest

    # ---- writing ---------------------------------------------------------------------------
    def stage(self) -> Path:
        """A fresh temporary directory inside the registry to build a version in."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".staging-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        return tmp

    def commit(self, staging: Path, manifest: Manifest) -> str:
        """Hash the staged files, write the manifest, and rename the directory to the next version."""
        files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != "manifest.json")
        manifest.files = {str(p.relative_to(staging)): sha256_file(p) for p in files}
        for p in files:
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        while True:
            numbers = [int(VERSION_RE.match(v).group(1)) for v in self.versions()]
            version = f"v{(max(numbers) + 1 if numbers else 1):04d}"
            manifest.version = version
            manifest.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
            atomic_write_text(staging / "manifest.json", manifest.model_dump_json(indent=2))
            _fsync_dir(staging)
            try:
                os.rename(staging, self.root / version)  # fails if another writer took the number
            except OSError:
                if (self.root / version).exists():
                    continue
                raise
            _fsync_dir(self.root)
            return version

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the registry's lock (an flock on ``.lock``) while reading and switching ``current``, so a
        compare-and-swap promotion and an operator's promote or rollback cannot interleave. The kernel drops it
        when the holder dies: no stale lock. Needs a filesystem with working flock (local, or NFS v4)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the last descriptor releases the flock

    def promote(self, version: str, action: Literal["promoted", "rolled_back"] = "promoted",
                expect_current: str | None = None) -> Manifest:
        """Verify ``version`` and make it ``current`` atomically. ``expect_current``: compare-and-swap, only if
        ``current`` is still that version (the trainer's serving version at the start of its retrain); else
        :class:`PromotionConflict` and nothing changes."""
        manifest = self.verify(version)  # hashing can take seconds: outside the lock
        with self.locked():
            previous = self.current_version()
            if expect_current is not None and previous != expect_current:
                raise PromotionConflict(f"current is {previous}, not {expect_current}: {version} not promoted")
            self._switch(version, action, previous)
        return manifest

    def _switch(self, version: str, action: Literal["promoted", "rolled_back"], previous: str | None) -> None:
        """Write ``current`` and the promotion record; the caller holds :meth:`locked`."""
        atomic_write_text(self.root / "current", version + "\n")
        _append_jsonl(self.root / "promotions.jsonl", {"ts": time.time(), "action": action, "version": version,
                                                      "previous": previous})

    def rollback(self) -> Manifest:
        """Return to the version that was serving before the current one."""
        with self.locked():
            current = self.current_version()
            # the latest promotion (not rollback) that made ``current`` serve names what served before it
            for record in reversed(self.promotion_history()):
                if record["action"] == "promoted" and record["version"] == current and record.get("previous"):
                    manifest = self.verify(record["previous"])
                    self._switch(record["previous"], "rolled_back", current)
                    return manifest
        raise UsageError(f"nothing to roll back to: {current} has no earlier serving version recorded")

    def promotion_history(self) -> list[dict]:
        path = self.root / "promotions.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def record_decision(self, record: dict) -> None:
        _append_jsonl(self.root / "decisions.jsonl", {"ts": time.time(), **record})

    def remove_stale_staging(self, older_than_s: float = 3600.0) -> None:
        """Delete staging directories left behind by a crashed writer."""
        for p in self.root.glob(".staging-*"):
            if time.time() - p.stat().st_mtime > older_than_s:
                shutil.rmtree(p, ignore_errors=True)
