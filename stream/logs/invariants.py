"""Quantitative log anomalies (Lou et al., USENIX ATC 2010): count relations between log keys.

A normal workflow ties how often its steps occur: on HDFS every block is written by as many
``PacketResponder .. terminating`` lines (key 9) as ``Received block`` lines (key 11), so
``count(9) == count(11)`` in every normal session. A session that loses a step breaks such a relation
without ever showing a key out of order, which the sequence model (DeepLog) can miss.

Mining (offline, numpy only): the event-count matrix ``X [sessions, keys]`` of normal sessions; an
invariant is a sparse integer vector ``theta`` over 2-3 keys (coefficients in ``[-3, 3]``, mixed signs,
gcd 1) with ``X @ theta == 0``. Every such small vector is tried (about 28k on HDFS's 14 keys, one
matrix product): this is the exhaustive form of Lou et al.'s search for sparse integer vectors in the
null space of ``X``, and it tolerates the few sessions that break a relation, which an exact null space
does not. A relation is kept when it holds in at least ``min_support`` of the sessions where any of its
keys occurs ("active"), with at least ``min_active`` such sessions, so relations among keys that are
simply absent are not counted as support. Kept relations are taken in order of support (then fewer
keys, smaller coefficients), dropping each that is a linear combination of those already taken, so
the set is a small basis that names each broken relation plainly (``count(9) == count(11)``).

Rules at session close, first hit wins: ``unknown_key`` (a key never seen in training: its count was
always 0), ``invariant`` (a mined relation does not hold), and, when enabled, ``unseen_count`` (a
key occurs a number of times never seen in training). ``choose_count_model`` picks ``min_support``
and whether ``unseen_count`` is on from normal sessions held out of the mining, never from labels.

Serving side: plain JSON (``invariants.json`` in a logkeys registry version), numpy, no TensorFlow.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache
from math import gcd
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, Field

from fabwatch.export.errors import UsageError, read_json_model

INVARIANTS = "invariants.json"   # the count model, in a logkeys registry version
MAX_COEFFICIENT = 3              # |theta_i|: relations like count(26) == 2*count(6) + count(9), not beyond
MAX_KEYS = 3                     # keys per relation: small enough to read in an alert
SUPPORT_GRID = (0.98, 0.99, 0.995, 0.999, 1.0)  # min_support candidates, most sensitive first


class Invariant(BaseModel):
    """``sum(coefficients[i] * count(keys[i])) == 0`` in normal sessions."""

    keys: list[str]
    coefficients: list[int]
    support: float = Field(description="share of the mining sessions where a key occurs that hold the relation")
    active_sessions: int = Field(description="mining sessions where at least one of the keys occurs")

    def describe(self) -> str:
        """``count(5) == count(6) + count(9)``: positive terms left, negative right."""
        def side(sign: int) -> str:
            terms = [f"{abs(c)}*count({k})" if abs(c) > 1 else f"count({k})"
                     for k, c in zip(self.keys, self.coefficients) if c * sign > 0]
            return " + ".join(terms)
        return f"{side(1)} == {side(-1)}"


class CountModel(BaseModel):
    """The quantitative detector: keys seen in training, mined invariants, and (optionally) the counts
    each key took in training. Plain JSON on purpose (no pickle in the registry)."""

    format: Literal["fabwatch-invariants/1"] = "fabwatch-invariants/1"
    keys: list[str] = Field(description="log keys seen in training, in count-matrix column order")
    invariants: list[Invariant]
    seen_counts: dict[str, list[int]] | None = Field(
        default=None, description="key -> counts seen in training; None: the unseen_count rule is off")
    min_support: float
    min_active: int
    choice: dict[str, Any] = Field(default_factory=dict, description="how min_support and the rules were chosen")

    @classmethod
    def read(cls, path: Path) -> "CountModel":
        return read_json_model(cls, path, "count model")

    @classmethod
    def from_registry(cls, registry: Path | str, version: str | None = None) -> "CountModel | None":
        """The count model stored with a logkeys version (default: current); None when it has none."""
        from fabwatch.export.registry import Registry

        vdir, _ = Registry(registry).resolve(version)
        return cls.read(vdir / INVARIANTS) if (vdir / INVARIANTS).exists() else None

    def write(self, path: Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=1))

    def check(self, sessions: Sequence[Sequence[str]]) -> "CountVerdicts":
        """The rules on whole (closed) sessions; vectorised over sessions."""
        counts, unknown = count_matrix(sessions, self.keys)
        n = len(sessions)
        reason = np.full(n, "", dtype=object)
        detail = np.full(n, "", dtype=object)
        if self.invariants:
            theta = self._theta()
            broken = (counts @ theta) != 0                  # [S, I]
            texts = [inv.describe() for inv in self.invariants]
            columns = [[self.keys.index(k) for k in inv.keys] for inv in self.invariants]
            hit = broken.any(axis=1)
            for s, i in zip(np.flatnonzero(hit), np.argmax(broken[hit], axis=1)):   # the first broken relation
                observed = ", ".join(f"count({k})={counts[s, j]}" for k, j in zip(self.invariants[i].keys, columns[i]))
                reason[s], detail[s] = "invariant", f"{texts[i]} broken: {observed}"
        if self.seen_counts is not None:
            for j, key in enumerate(self.keys):
                odd = ~np.isin(counts[:, j], self.seen_counts[key]) & (reason == "")
                for s in np.flatnonzero(odd):
                    reason[s] = "unseen_count"
                    detail[s] = f"count({key})={counts[s, j]}, never seen in training ({self.seen_counts[key]})"
        for s in np.flatnonzero(unknown):
            reason[s], detail[s] = "unknown_key", "a key never seen in training"
        return CountVerdicts(anomalous=reason != "", reason=reason, detail=detail)

    def check_session(self, keys: Sequence[str]) -> tuple[str, str] | None:
        """One closed session (the serving path): ``(reason, detail)`` when anomalous, else None."""
        v = self.check([keys])
        return (str(v.reason[0]), str(v.detail[0])) if v.anomalous[0] else None

    def _theta(self) -> np.ndarray:
        theta = np.zeros((len(self.keys), len(self.invariants)), dtype=np.int64)
        for i, inv in enumerate(self.invariants):
            for k, c in zip(inv.keys, inv.coefficients):
                theta[self.keys.index(k), i] = c
        return theta


def close_check(model: CountModel | None, key_counts: Mapping[str, int]) -> tuple[str, str] | None:
    """The serving path, when a session closes: ``(reason, detail)`` for a broken relation or an unseen
    count, else None. ``unknown_key`` is left out: the sequence model alerts on that line already."""
    if model is None:
        return None
    found = model.check_session([key for key, n in key_counts.items() for _ in range(n)])
    return found if found is not None and found[0] != "unknown_key" else None


@dataclass
class CountVerdicts:
    anomalous: np.ndarray  # [S] bool
    reason: np.ndarray     # [S] str: "", "unknown_key", "invariant", "unseen_count"
    detail: np.ndarray     # [S] str: the broken relation with the observed counts, or the odd count


def count_matrix(sessions: Sequence[Sequence[str]], keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``[S, K]`` int64 counts of each key per session, and ``[S]`` bool: the session holds a key not in ``keys``."""
    index = {k: j for j, k in enumerate(keys)}
    lengths = np.fromiter((len(s) for s in sessions), dtype=np.int64, count=len(sessions))
    column = np.fromiter((index.get(k, -1) for s in sessions for k in s), dtype=np.int64, count=int(lengths.sum()))
    row = np.repeat(np.arange(len(sessions)), lengths)
    known = column >= 0
    counts = np.zeros((len(sessions), len(keys)), dtype=np.int64)
    np.add.at(counts, (row[known], column[known]), 1)
    unknown = np.zeros(len(sessions), dtype=bool)
    unknown[row[~known]] = True
    return counts, unknown


@lru_cache(maxsize=8)
def candidate_relations(n_keys: int) -> np.ndarray:
    """``[K, C]`` every integer vector over 2..MAX_KEYS keys with coefficients in ``[-MAX_COEFFICIENT,
    MAX_COEFFICIENT]``, mixed signs (a relation of counts with one sign holds only when all are 0), gcd 1
    and first coefficient positive (so ``theta`` and ``-theta`` are tried once)."""
    columns = []
    values = [c for c in range(-MAX_COEFFICIENT, MAX_COEFFICIENT + 1) if c]
    for r in range(2, MAX_KEYS + 1):
        for subset in itertools.combinations(range(n_keys), r):
            for coefficients in itertools.product(values, repeat=r):
                if coefficients[0] < 0 or all(c > 0 for c in coefficients) or gcd(*coefficients) != 1:
                    continue
                theta = np.zeros(n_keys, dtype=np.int64)
                theta[list(subset)] = coefficients
                columns.append(theta)
    theta = np.array(columns, dtype=np.int64).T if columns else np.zeros((n_keys, 0), dtype=np.int64)
    theta.flags.writeable = False  # cached and shared
    return theta


def mine_invariants(counts: np.ndarray, keys: Sequence[str], min_support: float = 0.98,
                    min_active: int = 10) -> list[Invariant]:
    """Relations that hold in ``min_support`` of their active sessions, reduced to an independent set."""
    theta = candidate_relations(len(keys))
    if not theta.shape[1] or not len(counts):
        return []
    holds = np.zeros(theta.shape[1], dtype=np.int64)
    active = np.zeros(theta.shape[1], dtype=np.int64)
    uses = (theta != 0).astype(np.float32)
    for lo in range(0, len(counts), 4096):   # bounded memory: [4096, C] at a time
        block = counts[lo:lo + 4096]
        on = ((block != 0).astype(np.float32) @ uses) > 0
        active += on.sum(axis=0)
        holds += (on & ((block @ theta) == 0)).sum(axis=0)
    support = holds / np.maximum(active, 1)
    kept = np.flatnonzero((active >= min_active) & (support >= min_support))
    order = sorted(kept, key=lambda j: (-support[j], int((theta[:, j] != 0).sum()), int(np.abs(theta[:, j]).sum())))
    basis = np.zeros((0, len(keys)))
    found = []
    for j in order:
        grown = np.vstack([basis, theta[:, j]])
        if np.linalg.matrix_rank(grown) > len(basis):   # not implied by the relations already taken
            basis = grown
            nz = np.flatnonzero(theta[:, j])
            found.append(Invariant(keys=[keys[i] for i in nz], coefficients=[int(theta[i, j]) for i in nz],
                                   support=float(support[j]), active_sessions=int(active[j])))
    return found


def fit_count_model(sessions: Sequence[Sequence[str]], min_support: float = 0.98, min_active: int = 10,
                    unseen_counts: bool = False, choice: dict[str, Any] | None = None) -> CountModel:
    """Mine a count model from normal sessions with fixed settings."""
    keys = sorted({k for s in sessions for k in s}, key=lambda k: (len(k), k))
    counts, _ = count_matrix(sessions, keys)
    seen = {k: sorted(int(c) for c in np.unique(counts[:, j])) for j, k in enumerate(keys)} if unseen_counts else None
    return CountModel(keys=keys, invariants=mine_invariants(counts, keys, min_support, min_active),
                      seen_counts=seen, min_support=min_support, min_active=min_active, choice=choice or {})


def choose_count_model(fit_on: Sequence[Sequence[str]], held: Sequence[Sequence[str]], max_fpr: float = 0.0015,
                       min_active: int = 10) -> tuple[dict[str, Any], np.ndarray]:
    """Settings for the count model from normal sessions only: mine on ``fit_on``, check on ``held``, and
    take the most sensitive settings (lowest ``min_support``, with ``unseen_count`` before without) whose
    held-out false-positive rate is at most ``max_fpr``; else the settings with the fewest false positives.

    Returns the settings (with the held-out rate of every candidate) and the chosen settings' verdicts
    on ``held``, so a combined verdict can be chosen on the same held-out sessions.
    """
    if not fit_on or not held:
        raise UsageError("choosing the count model needs normal sessions to mine and to hold out")
    tried: list[tuple[float, bool, float, np.ndarray]] = []
    for min_support in SUPPORT_GRID:
        for unseen in (True, False):
            flags = fit_count_model(fit_on, min_support, min_active, unseen).check(held).anomalous
            tried.append((min_support, unseen, float(flags.mean()), flags))
    ok = [t for t in tried if t[2] <= max_fpr]
    chosen = ok[0] if ok else min(tried, key=lambda t: t[2])
    settings = {"min_support": chosen[0], "unseen_counts": chosen[1], "min_active": min_active,
                "max_fpr": max_fpr, "holdout_sessions": len(held),
                "holdout_fpr": [{"min_support": s, "unseen_counts": u, "fpr": f} for s, u, f, _ in tried]}
    return settings, chosen[3]
