"""The quantitative detector: count invariants mined from normal sessions (no TensorFlow, no model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fabwatch.stream.logs.invariants import (CountModel, candidate_relations, choose_count_model, count_matrix,
                                             fit_count_model, mine_invariants)


def workflow(receivers: int, retries: int = 0) -> list[str]:
    """A block write: allocate, then per receiver a receive and a responder-terminating line, plus retries
    that each log a warning and a retry line; ends with a commit."""
    keys = ["alloc"]
    for _ in range(receivers):
        keys += ["recv", "term"]
    keys += ["warn", "retry"] * retries
    return keys + ["commit"]


NORMAL = [workflow(r, t) for r in (1, 2, 3) for t in (0, 0, 0, 1, 2) for _ in range(8)]


def test_mined_relations_catch_a_missing_step_and_pass_a_normal_session() -> None:
    model = fit_count_model(NORMAL, min_support=1.0, min_active=5)
    relations = {inv.describe() for inv in model.invariants}
    assert "count(recv) == count(term)" in relations
    assert "count(alloc) == count(commit)" in relations
    assert "count(warn) == count(retry)" in relations
    missing_term = workflow(3)
    missing_term.remove("term")
    verdicts = model.check([workflow(2, 1), workflow(3), missing_term, workflow(1) + ["boom"]])
    assert verdicts.anomalous.tolist() == [False, False, True, True]
    assert verdicts.reason.tolist() == ["", "", "invariant", "unknown_key"]
    assert verdicts.detail[2] == "count(recv) == count(term) broken: count(recv)=3, count(term)=2"
    assert model.check_session(workflow(1)) is None
    assert model.check_session(missing_term) == ("invariant", verdicts.detail[2])


def test_relations_form_an_independent_set() -> None:
    """alloc == commit and recv == term are kept; combinations of kept relations (alloc + recv == commit + term)
    and relations implied by them are not."""
    model = fit_count_model(NORMAL, min_support=1.0, min_active=5)
    theta = np.array([[dict(zip(inv.keys, inv.coefficients)).get(k, 0) for k in model.keys] for inv in model.invariants])
    assert np.linalg.matrix_rank(theta) == len(model.invariants)
    counts, _ = count_matrix(NORMAL, model.keys)
    assert not (counts @ theta.T).any()  # every kept relation holds in every training session


def test_support_counts_only_sessions_where_the_keys_occur() -> None:
    """warn == retry breaks in 2 of the 50 sessions with retries: kept at min_support 0.95, dropped at 0.97; the
    72 sessions without retries (both counts 0) do not count as support."""
    odd = [workflow(1, 1)[:-2] + ["commit"]] * 2  # a retry line lost: warn, no retry
    sessions = NORMAL + odd
    keys = ["alloc", "recv", "term", "warn", "retry", "commit"]
    counts, _ = count_matrix(sessions, keys)
    at_95 = {inv.describe(): inv for inv in mine_invariants(counts, keys, min_support=0.95, min_active=5)}
    assert at_95["count(warn) == count(retry)"].active_sessions == 50
    assert at_95["count(warn) == count(retry)"].support == 48 / 50
    assert "count(warn) == count(retry)" not in {inv.describe() for inv in mine_invariants(counts, keys, 0.97, 5)}


def test_candidates_are_small_mixed_sign_integer_relations() -> None:
    theta = candidate_relations(4)
    nonzero = (theta != 0).sum(axis=0)
    assert set(nonzero.tolist()) == {2, 3} and np.abs(theta).max() == 3
    assert ((theta > 0).any(axis=0) & (theta < 0).any(axis=0)).all()
    assert len({tuple(c) for c in theta.T} & {tuple(-c) for c in theta.T}) == 0  # theta and -theta tried once


def test_unseen_counts_rule() -> None:
    model = fit_count_model(NORMAL, min_support=1.0, min_active=5, unseen_counts=True)
    assert model.seen_counts is not None and model.seen_counts["recv"] == [1, 2, 3]
    verdicts = model.check([workflow(4), workflow(2)])
    assert verdicts.reason.tolist() == ["unseen_count", ""]
    assert verdicts.detail[0].startswith("count(recv)=4, never seen in training")


def test_settings_chosen_on_held_out_normals_keep_their_false_positive_rate() -> None:
    rng = np.random.default_rng(0)
    sessions = [NORMAL[i] for i in rng.permutation(len(NORMAL))]
    settings, held_flags = choose_count_model(sessions[:96], sessions[96:], max_fpr=0.0)
    assert len(held_flags) == 24 and not held_flags.any()
    assert settings["min_support"] == 0.98 and len(settings["holdout_fpr"]) == 10
    # a sensitive rule that fires on held-out normals is not chosen: recv three times appears only held out
    held = [workflow(3)] * 4
    fit_on = [workflow(r, t) for r in (1, 2) for t in (0, 1) for _ in range(10)]
    settings, held_flags = choose_count_model(fit_on, held, max_fpr=0.0)
    assert settings["unseen_counts"] is False and not held_flags.any()


def test_count_model_is_plain_json(tmp_path: Path) -> None:
    model = fit_count_model(NORMAL, min_support=1.0, min_active=5, unseen_counts=True)
    model.write(tmp_path / "invariants.json")
    raw = json.loads((tmp_path / "invariants.json").read_text())
    assert raw["format"] == "fabwatch-invariants/1" and raw["invariants"][0]["coefficients"]
    again = CountModel.read(tmp_path / "invariants.json")
    assert again == model


def test_serving_checks_the_count_model_when_a_session_closes() -> None:
    """`logs serve`'s sessions (Kafka-free): a session that follows the key order but repeats half the workflow
    raises an `invariant` alert at close, naming the relation and the counts; a normal session raises none."""
    from types import SimpleNamespace

    from fabwatch.stream.logs.score import LogKeyScorer
    from fabwatch.stream.logs.serve import LogSessions
    from fabwatch.stream.schemas import LogKey
    from test_deeplog_metrics import ChainSession

    manifest = SimpleNamespace(version="v0001", extra={"vocabulary": ["a", "b", "c", "d"], "h": 2, "top_g": 1})
    count_model = fit_count_model([["a", "b", "c", "d"]] * 20, min_support=1.0)
    live = LogSessions(LogKeyScorer(ChainSession(), manifest), count_model=count_model)
    keys = [LogKey(session=s, ts=1_000 * i, key=k, line=i)
            for i, (s, k) in enumerate([("ok", k) for k in "abcd"] + [("half", k) for k in "abcdab"], start=1)]
    assert live.process(keys, [None] * len(keys), now=0.0) == []  # the order is right in both
    closed = live.close_idle(5.0, now=10.0)
    assert [(a.entity, a.detail["reason"]) for a in closed] == [("half", "invariant")]
    assert closed[0].detail["relation"].startswith("count(a) == count(c) broken: count(a)=2, count(c)=1")
    assert closed[0].detail["counts"] == {"a": 2, "b": 2, "c": 1, "d": 1}
