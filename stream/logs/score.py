"""DeepLog scoring with onnxruntime and numpy (no TensorFlow): sessions of log keys -> anomalous or not.

Windowing, shared by training (``fabwatch.models.deeplog``) and serving so both see the same windows: a
session is framed as ``[PAD] * h + keys`` and every key is one window ``(previous h keys -> key)``.
The leading padding means every key, the first one included, is predicted, so the model learns how
sessions start. A key absent from the training vocabulary maps to ``UNK``, which the model never
predicts.

Scoring rule (DeepLog): a session is anomalous as soon as one window's next key is outside the
model's top-g predictions (an unknown key always is). Sessions shorter than h + 1 keys are anomalous,
as in DeepLog's reference implementation, which pads them at the end with a key the model can never
predict. We keep that rule on purpose: normal HDFS sessions have 13 keys or more, and a learned
end-of-session key was tried and rejected: with g around 9-11 of only ~15 candidates it ranks in the
top-g after almost any prefix, so truncated sessions passed (recall on hdfs_test_abnormal 0.63-0.90
depending on training and g, against 0.95-0.999 with the length rule).

A streaming caller scores any batch ``windows [B, h]`` against ``next_keys [B]`` with
:meth:`LogKeyScorer.check` and applies the length rule when a session closes.

Sessions repeat the same windows massively, so predictions are cached per unique window: each
distinct window runs through the model once (``cached=True``); ``cached=False`` runs every window.

Combined verdict (``evaluate(detector=...)``): DeepLog alone (``sequence``), the count invariants
of ``fabwatch.stream.logs.invariants`` alone (``quantitative``), or either flagging (``combined``,
the default when the model version has a count model). The two see different failures: DeepLog a
key out of order, the invariants a step lost or repeated in a session whose order looks right.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from fabwatch.export.errors import UsageError
from fabwatch.stream.logs.invariants import CountModel, CountVerdicts

PAD, UNK = 0, 1
SPECIALS = ("<pad>", "<unk>")
PAPER_NORMAL_SESSIONS = 553_366   # normal test sessions of the DeepLog paper (not in our data)
PAPER_ABNORMAL_SESSIONS = 16_838  # == hdfs_test_abnormal


class Vocabulary:
    """Log keys seen in training -> model ids ``2..``; ids 0 and 1 are PAD and UNK."""

    def __init__(self, keys: Sequence[str]):
        self.keys = list(keys)
        self.index = {k: i + len(SPECIALS) for i, k in enumerate(self.keys)}

    @classmethod
    def from_sessions(cls, sessions: Iterable[Sequence[str]]) -> "Vocabulary":
        seen = dict.fromkeys(k for s in sessions for k in s)
        return cls(sorted(seen, key=lambda k: (len(k), k)))

    def __len__(self) -> int:
        return len(SPECIALS) + len(self.keys)

    def token(self, idx: int) -> str:
        return SPECIALS[idx] if idx < len(SPECIALS) else self.keys[idx - len(SPECIALS)]

    def encode(self, session: Sequence[str]) -> np.ndarray:
        return np.fromiter((self.index.get(k, UNK) for k in session), dtype=np.int32, count=len(session))


@dataclass
class Windows:
    """All windows of a set of sessions: ``windows[i]`` predicts ``next_keys[i]`` in ``session[i]``."""

    windows: np.ndarray    # [N, h] int32 model ids
    next_keys: np.ndarray  # [N] int32
    session: np.ndarray    # [N] int64 index of the session
    position: np.ndarray   # [N] int64 index of the next key in its session


def build_windows(encoded: Sequence[np.ndarray], h: int) -> Windows:
    """Frame each session as ``[PAD]*h + keys`` and cut one window per key."""
    lengths = np.fromiter((len(s) for s in encoded), dtype=np.int64, count=len(encoded))
    framed = lengths + h
    starts = np.concatenate([[0], np.cumsum(framed)[:-1]]).astype(np.int64)
    flat = np.full(int(framed.sum()) + h, PAD, dtype=np.int32)  # tail slack keeps the view in bounds
    session = np.repeat(np.arange(len(encoded), dtype=np.int64), lengths)
    position = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    if lengths.sum():
        flat[starts[session] + h + position] = np.concatenate(encoded)
    first = starts[session] + position
    view = np.lib.stride_tricks.sliding_window_view(flat, h)
    return Windows(windows=view[first], next_keys=flat[first + h], session=session, position=position)


def next_key_ranks(probs: np.ndarray, next_keys: np.ndarray) -> np.ndarray:
    """0-based rank of each next key among the known keys (PAD and UNK are never candidates).

    ``next_keys[i]`` is within the top-g of its window exactly when its rank is below g; an unknown
    key ranks past every g.
    """
    known = probs[:, len(SPECIALS):]
    target = known[np.arange(len(known)), np.maximum(next_keys - len(SPECIALS), 0)]
    ranks = (known > target[:, None]).sum(axis=1)
    return np.where(next_keys < len(SPECIALS), np.iinfo(np.int32).max, ranks)


def session_max_rank(w: Windows, ranks: np.ndarray, sessions: Sequence[Sequence[Any]], h: int) -> np.ndarray:
    """Per session, the worst next-key rank; short sessions (the length rule) rank past every g."""
    worst = np.full(len(sessions), -1, dtype=np.int64)
    np.maximum.at(worst, w.session, ranks.astype(np.int64))
    short = np.fromiter((len(s) < h + 1 for s in sessions), dtype=bool, count=len(sessions))
    return np.where(short, np.iinfo(np.int32).max, worst)


def window_codes(windows: np.ndarray, vocab_size: int) -> np.ndarray:
    """One hashable code per window: an int64 when ``vocab_size ** h`` fits, else the row's bytes."""
    h = windows.shape[1]
    if vocab_size ** h < 2 ** 62:
        powers = vocab_size ** np.arange(h, dtype=np.int64)
        return windows.astype(np.int64) @ powers
    rows = np.ascontiguousarray(windows)
    return rows.view(np.dtype((np.void, rows.dtype.itemsize * h))).ravel()


class LogKeyScorer:
    """A ``logkeys`` registry version: top-g next-key predictions for windows of model ids.

    ``expected`` and ``check`` take any batch ``[B, h]`` (windows of many sessions mixed), so a
    streaming processor can micro-batch across sessions: keep per session a ring buffer of the last h
    ids (``vocab.encode``) initialised with PAD (0), which reproduces the leading padding, check each
    new key against the buffer before pushing it, and apply the length rule when the session closes
    (idle timeout). ``expected`` names the top-g keys for an alert (``vocab.token``). The cache maps a window code to its top-g
    ids and is bounded by ``cache_size`` windows (cleared when full).
    """

    def __init__(self, session: Any, manifest: Any, top_g: int | None = None, batch_size: int = 8192,
                 cache_size: int = 1_000_000):
        extra = manifest.extra
        self.manifest = manifest
        self.version: str = manifest.version
        self.vocab = Vocabulary(extra["vocabulary"])
        self.h: int = int(extra["h"])
        self.top_g: int = int(top_g or extra["top_g"])
        if not 1 <= self.top_g <= len(self.vocab.keys):
            raise UsageError(f"top-g must be between 1 and {len(self.vocab.keys)} (the known keys), got {self.top_g}")
        self.session = session
        self.input_name: str = session.get_inputs()[0].name
        self.batch_size = batch_size
        self.cache_size = cache_size
        self._cache: dict[Any, np.ndarray] = {}
        self.model_windows = 0  # windows that went through the model (cache misses), for reporting

    @classmethod
    def from_registry(cls, registry: Path | str, version: str | None = None, providers: Sequence[str] | None = None,
                      top_g: int | None = None, sha256: str | None = None) -> "LogKeyScorer":
        """``version`` (default: ``current``), its files verified (and ``model.onnx`` against ``sha256`` if given)."""
        from fabwatch.export.registry import Registry
        from fabwatch.export.runtime import create_session

        vdir, manifest = Registry(registry).resolve(version, sha256)
        if manifest.task != "logkeys":
            raise UsageError(f"registry {registry} version {manifest.version} is a {manifest.task!r} model, not logkeys")
        return cls(create_session(vdir / "model.onnx", providers), manifest, top_g=top_g)

    def clear_cache(self) -> None:
        self._cache.clear()

    def probabilities(self, windows: np.ndarray, progress: bool = False) -> np.ndarray:
        """Next-key probabilities ``[B, V]`` straight from the model (no cache)."""
        from tqdm import tqdm

        windows = np.ascontiguousarray(windows, dtype=np.int32)
        if windows.ndim != 2 or windows.shape[1] != self.h:
            raise UsageError(f"windows must be [B, {self.h}], got {list(windows.shape)}")
        if windows.size and (windows.min() < 0 or windows.max() >= len(self.vocab)):
            raise UsageError(f"window key ids must be in [0, {len(self.vocab)})")
        out = np.empty((len(windows), len(self.vocab)), dtype=np.float32)
        for lo in tqdm(range(0, len(windows), self.batch_size), desc="windows", unit="batch", leave=False,
                       disable=not progress or len(windows) <= self.batch_size):
            out[lo:lo + self.batch_size] = self.session.run(None, {self.input_name: windows[lo:lo + self.batch_size]})[0]
        self.model_windows += len(windows)
        return out

    def _top_g(self, probs: np.ndarray) -> np.ndarray:
        """Top-g ids per row, most likely first; PAD and UNK are never candidates (never a next key)."""
        probs = probs.copy()
        probs[:, :len(SPECIALS)] = -1.0
        top = np.argpartition(-probs, self.top_g - 1, axis=1)[:, :self.top_g]
        order = np.argsort(-np.take_along_axis(probs, top, axis=1), axis=1, kind="stable")
        return np.take_along_axis(top, order, axis=1).astype(np.int32)

    def expected(self, windows: np.ndarray, cached: bool = True, progress: bool = False) -> np.ndarray:
        """The top-g next keys ``[B, g]`` (model ids, most likely first) for each window."""
        if not cached:
            return self._top_g(self.probabilities(windows, progress))
        codes = window_codes(np.asarray(windows), len(self.vocab))
        unique, first, inverse = np.unique(codes, return_index=True, return_inverse=True)
        keys = unique.tolist() if unique.dtype.kind != "V" else [u.tobytes() for u in unique]
        missing = [i for i, key in enumerate(keys) if key not in self._cache]
        if missing:
            top = self._top_g(self.probabilities(np.asarray(windows)[first[missing]], progress))
            if len(self._cache) + len(missing) > self.cache_size:
                self._cache.clear()
            self._cache.update(zip((keys[i] for i in missing), top))
        table = np.stack([self._cache[key] for key in keys]) if keys else np.empty((0, self.top_g), np.int32)
        return table[inverse.reshape(-1)]

    def check(self, windows: np.ndarray, next_keys: np.ndarray, cached: bool = True,
              progress: bool = False) -> np.ndarray:
        """True where ``next_keys[i]`` is among the top-g of ``windows[i]`` (and is a known key)."""
        next_keys = np.asarray(next_keys)
        top = self.expected(windows, cached=cached, progress=progress)
        return (top == next_keys[:, None]).any(axis=1) & (next_keys != UNK)


# ---- sessions and evaluation ------------------------------------------------------------------------

def read_sessions(path: Path) -> tuple[list[list[str]], list[int] | None]:
    """Sessions of log keys from a file, with labels when the file has them.

    Formats: DeepLog (one session per line, space-separated keys); a labelled CSV (``Sequence,label``);
    the rows of ``fabwatch logs parse`` (``LineId,BlockId,EventId``, grouped by block in line order).
    """
    path = Path(path)
    try:
        with open(path, newline="") as f:
            head = f.readline().strip()
            if head.startswith("Sequence,"):
                reader = csv.DictReader(f, fieldnames=head.split(","))
                rows = [(r["Sequence"].split(), int(r["label"])) for r in reader]
                return [s for s, _ in rows], [label for _, label in rows]
            if head.startswith("LineId,BlockId,EventId"):
                blocks: dict[str, list[str]] = {}
                for row in csv.reader(f):
                    blocks.setdefault(row[1], []).append(row[2])
                return list(blocks.values()), None
            sessions = [line.split() for line in [head, *f] if line.strip()]
            return sessions, None
    except FileNotFoundError:
        raise UsageError(f"session file {path} not found") from None
    except (KeyError, ValueError, IndexError) as exc:
        raise UsageError(f"{path}: cannot read sessions ({exc})") from None


@dataclass
class SessionVerdicts:
    """Per session: anomalous or not, why, and where (the first offending key; its length when short)."""

    anomalous: np.ndarray       # [S] bool
    first_position: np.ndarray  # [S] int64, -1 when normal
    reason: np.ndarray          # [S] str: "", "unknown_key", "unexpected_key", "short_session"
    windows: int
    unique_windows: int
    model_windows: int
    seconds: float


def score_sessions(scorer: LogKeyScorer, sessions: Sequence[Sequence[str]], cached: bool = True,
                   progress: bool = False) -> SessionVerdicts:
    """Apply the scoring rule to whole (closed) sessions; windowing is included in the timing."""
    t0 = time.perf_counter()
    before = scorer.model_windows
    w = build_windows([scorer.vocab.encode(s) for s in sessions], scorer.h)
    ok = scorer.check(w.windows, w.next_keys, cached=cached, progress=progress)
    bad = np.flatnonzero(~ok)
    # windows are grouped by session in position order: the first bad window of a session wins
    bad_sessions, idx = np.unique(w.session[bad], return_index=True)
    hits = bad[idx]
    lengths = np.fromiter((len(s) for s in sessions), dtype=np.int64, count=len(sessions))
    first = np.where(lengths < scorer.h + 1, lengths, -1)
    reason = np.where(first >= 0, "short_session", "").astype(object)
    first[bad_sessions] = w.position[hits]
    reason[bad_sessions] = np.where(w.next_keys[hits] == UNK, "unknown_key", "unexpected_key")
    seconds = time.perf_counter() - t0
    unique = len(np.unique(window_codes(w.windows, len(scorer.vocab)))) if len(w.windows) else 0
    return SessionVerdicts(anomalous=first >= 0, first_position=first, reason=reason, windows=len(w.windows),
                           unique_windows=unique, model_windows=scorer.model_windows - before, seconds=seconds)


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else 0.0


@dataclass
class Confusion:
    tp: int
    fp: int
    fn: int
    tn: int

    @classmethod
    def from_labels(cls, labels: np.ndarray, predicted: np.ndarray) -> "Confusion":
        labels, predicted = np.asarray(labels, dtype=bool), np.asarray(predicted, dtype=bool)
        return cls(tp=int((labels & predicted).sum()), fp=int((~labels & predicted).sum()),
                   fn=int((labels & ~predicted).sum()), tn=int((~labels & ~predicted).sum()))

    def metrics(self) -> dict[str, Any]:
        """Measured figures plus precision/F1 at the paper's balance (FP_est = FPR x 553,366 normals,
        TP_est = recall x 16,838 abnormals), since the paper's normal test sessions are not in our data."""
        precision = _ratio(self.tp, self.tp + self.fp)
        recall = _ratio(self.tp, self.tp + self.fn)
        fpr = _ratio(self.fp, self.fp + self.tn)
        fp_est = fpr * PAPER_NORMAL_SESSIONS
        tp_est = recall * PAPER_ABNORMAL_SESSIONS
        precision_est = _ratio(tp_est, tp_est + fp_est)
        return {
            "TP": self.tp, "FP": self.fp, "FN": self.fn, "TN": self.tn,
            "precision": precision, "recall": recall, "f1": _ratio(2 * precision * recall, precision + recall),
            "fpr": fpr,
            "paper_balance": {"normal_sessions": PAPER_NORMAL_SESSIONS, "abnormal_sessions": PAPER_ABNORMAL_SESSIONS,
                              "fp_est": fp_est, "fn_est": PAPER_ABNORMAL_SESSIONS - tp_est,
                              "precision_est": precision_est,
                              "f1_est": _ratio(2 * precision_est * recall, precision_est + recall)},
        }


def top_g_sweep(scorer: LogKeyScorer, sessions: Sequence[Sequence[str]], labels: Sequence[int],
                around: int = 4, also: np.ndarray | None = None) -> list[dict[str, Any]]:
    """The same evaluation for g near the model's (one model pass over the distinct windows, untimed):
    how recall trades against false positives as g grows. ``also``: ``[S]`` bool verdicts of another
    detector ORed in (the combined verdict's sweep)."""
    w = build_windows([scorer.vocab.encode(s) for s in sessions], scorer.h)
    codes = window_codes(w.windows, len(scorer.vocab))
    _, first, inverse = np.unique(codes, return_index=True, return_inverse=True)
    probs = scorer.probabilities(w.windows[first])[inverse.reshape(-1)]
    worst = session_max_rank(w, next_key_ranks(probs, w.next_keys), sessions, scorer.h)
    rows = []
    for g in range(max(1, scorer.top_g - around), min(len(scorer.vocab.keys), scorer.top_g + around) + 1):
        flagged = worst >= g if also is None else (worst >= g) | also
        m = Confusion.from_labels(np.asarray(labels), flagged).metrics()
        rows.append({"top_g": g, "recall": m["recall"], "fpr": m["fpr"], "FP": m["FP"], "FN": m["FN"], "f1": m["f1"],
                     "f1_est": m["paper_balance"]["f1_est"]})
    return rows


DETECTORS = ("combined", "sequence", "quantitative")
REASONS = ("unknown_key", "unexpected_key", "short_session", "invariant", "unseen_count")


def combine_verdicts(sequence: SessionVerdicts, counts: CountVerdicts | None, detector: str
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Session verdicts of one detector, or of both ORed (``combined``): ``(anomalous [S] bool,
    reason [S] str)``. A session both flag keeps the sequence model's reason, which names the line."""
    if detector not in DETECTORS:
        raise UsageError(f"detector must be one of {', '.join(DETECTORS)}, got {detector!r}")
    if detector == "sequence":
        return sequence.anomalous, sequence.reason
    if counts is None:
        raise UsageError(f"the {detector} verdict needs a count model (invariants.json): this model version has "
                         "none (train it with `logs train`, which mines one unless --no-invariants)")
    if detector == "quantitative":
        return counts.anomalous, counts.reason
    return sequence.anomalous | counts.anomalous, np.where(sequence.anomalous, sequence.reason, counts.reason)


def evaluate(scorer: LogKeyScorer, sessions: Sequence[Sequence[str]], labels: Sequence[int],
             uncached_limit: int | None = 100_000, progress: bool = False, counts: CountModel | None = None,
             detector: str = "sequence") -> dict[str, Any]:
    """Confusion, metrics and speed for labelled sessions (label 1 = abnormal).

    The headline figures are ``detector``'s (``sequence``: DeepLog; ``quantitative``: the count model;
    ``combined``: either flags); ``detectors`` holds each one available alone and combined, from the
    same run. The headline rate caches predictions per unique window, starting from an empty cache
    (after one untimed warm-up batch, as a server would have run), and includes the count model's
    check when the headline uses it; the uncached rate runs every window of the first sessions (up to
    ``uncached_limit`` windows, all when None) through the model, and its verdicts must equal the cached ones.
    """
    if len(sessions) != len(labels):
        raise UsageError("sessions and labels differ in length")
    if not sessions:
        raise UsageError("no sessions to evaluate")
    labels_arr = np.asarray(labels)
    scorer.clear_cache()
    scorer.probabilities(np.zeros((scorer.batch_size, scorer.h), dtype=np.int32))  # warm the session up, untimed
    verdicts = score_sessions(scorer, sessions, cached=True, progress=progress)
    count_verdicts, count_seconds = None, 0.0
    if counts is not None:
        t0 = time.perf_counter()
        count_verdicts = counts.check(sessions)
        count_seconds = time.perf_counter() - t0
    anomalous, reason = combine_verdicts(verdicts, count_verdicts, detector)
    result: dict[str, Any] = {"model_version": scorer.version, "h": scorer.h, "top_g": scorer.top_g,
                              "detector": detector, "sessions": len(sessions), "windows": verdicts.windows,
                              "unique_windows": verdicts.unique_windows}
    result.update(Confusion.from_labels(labels_arr, anomalous).metrics())
    result["reasons"] = _reasons(anomalous, reason)
    result["detectors"] = {}
    for name in DETECTORS if count_verdicts is not None else ("sequence",):
        flags, why = combine_verdicts(verdicts, count_verdicts, name)
        m = Confusion.from_labels(labels_arr, flags).metrics()
        result["detectors"][name] = {"recall": m["recall"], "fpr": m["fpr"], "precision": m["precision"], "f1": m["f1"],
                                     "FP": m["FP"], "FN": m["FN"], "f1_est": m["paper_balance"]["f1_est"],
                                     "reasons": _reasons(flags, why)}
    if counts is not None:
        result["count_model"] = {"invariants": [inv.describe() for inv in counts.invariants],
                                 "unseen_counts": counts.seen_counts is not None, "min_support": counts.min_support}
    seconds = verdicts.seconds + (count_seconds if detector != "sequence" else 0.0)
    result["speed"] = {
        "cached": {"note": "predictions cached per unique window: each distinct window runs through the model once"
                   + ("; count model included" if detector != "sequence" else ""),
                   "model_windows": verdicts.model_windows, "seconds": seconds,
                   "sessions_per_s": _ratio(len(sessions), seconds),
                   "windows_per_s": _ratio(verdicts.windows, seconds)},
    }
    result["top_g_sweep"] = top_g_sweep(scorer, sessions, labels)
    if count_verdicts is not None:
        result["top_g_sweep_combined"] = top_g_sweep(scorer, sessions, labels, also=count_verdicts.anomalous)
    if uncached_limit != 0:
        lengths = np.cumsum([len(s) for s in sessions])
        n = len(sessions) if uncached_limit is None else max(1, int(np.searchsorted(lengths, uncached_limit, "right")))
        raw = score_sessions(scorer, sessions[:n], cached=False, progress=progress)
        if not np.array_equal(raw.anomalous, verdicts.anomalous[:n]):
            raise RuntimeError("cached and uncached verdicts differ: the window cache is broken")
        result["speed"]["uncached"] = {"note": "every window through the model (sequence model only)", "sessions": n,
                                       "windows": raw.windows, "seconds": raw.seconds,
                                       "sessions_per_s": _ratio(n, raw.seconds),
                                       "windows_per_s": _ratio(raw.windows, raw.seconds)}
    return result


def _reasons(anomalous: np.ndarray, reason: np.ndarray) -> dict[str, int]:
    flagged = reason[anomalous]
    return {r: int((flagged == r).sum()) for r in REASONS}
