"""Held-out predictions: folds, K-fold and leave-one-source-out replays against their definitions,
the calibration curve, the strength choice, prefix replays, stratified prompt draws and overlaps."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import random_ranks
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from treeopt.search.acceptance import STRENGTH_SIZES, STRENGTHS, choose_strength, resolve_model, strength_scores
from treeopt.search.crossval import calibration_curve, cross_validated, leave_one_source_out, per_source
from treeopt.search.grow import search
from treeopt.cli import app
from treeopt.core.prompts import load_prompts, normalized, overlap, stratified_sample
from treeopt.core.record import Calibration
from treeopt.core.replay import replay, replay_prefixes
from treeopt.core.treefile import read_tree_meta

SOURCES = ["a", "b", "a", "c", "b", "a", "c", "b"]


@pytest.fixture
def cal(make_calibration):
    lengths = [40, 55, 30, 60, 45, 50, 35, 42]
    return make_calibration(random_ranks(lengths, 3, 5, seed=11), top_k=5, sources=SOURCES,
                            instructions=[f"prompt {i}" for i in range(len(lengths))])


def by_hand(cal: Calibration, groups, nodes: int, model: str):
    """tokens, steps summed over groups: each replayed with the tree searched on the other prompts."""
    tokens = steps = 0
    for g in groups:
        fit = cal.subset(np.setdiff1d(cal.prompts, g))
        r = replay(search(fit, nodes, model).tree, cal.subset(g))
        tokens, steps = tokens + r.tokens.sum(), steps + r.steps.sum()
    return tokens, steps


def test_folds_partition_the_prompts(cal):
    folds = cal.folds(3, seed=1)
    assert sorted(np.concatenate(folds).tolist()) == cal.prompts.tolist()
    assert sorted(len(f) for f in folds) == [2, 3, 3]
    assert [f.tolist() for f in cal.folds(3, seed=1)] == [f.tolist() for f in folds]  # seeded
    assert [f.tolist() for f in cal.folds(3, seed=2)] != [f.tolist() for f in folds]


def test_cross_validated_is_held_out_replay(cal):
    model = "smoothed:4"
    r16, r32 = cross_validated(cal, [16, 32], model, folds=4)
    for r, n in ((r16, 16), (r32, 32)):
        tokens, steps = by_hand(cal, cal.folds(4), n, model)
        assert sorted(r.prompt_ids.tolist()) == cal.prompts.tolist()  # every prompt held out once
        assert (r.tokens.sum(), r.steps.sum()) == (tokens, steps)
    lo, hi = r16.interval()
    assert lo <= r16.tokens_per_step <= hi
    # one prompt: nothing to hold out, the replay is in-sample
    one = cal.subset(np.array([0]))
    assert cross_validated(one, [8], model)[0].tokens_per_step == replay(search(one, 8, model).tree, one).tokens_per_step


def test_leave_one_source_out_and_per_source(cal):
    model = "smoothed:4"
    loso = leave_one_source_out(cal, [16], model)[0]
    groups = cal.source_groups()
    assert list(groups) == ["a", "b", "c"] and groups["a"].tolist() == [0, 2, 5]
    assert (loso.tokens.sum(), loso.steps.sum()) == by_hand(cal, list(groups.values()), 16, model)
    cv = cross_validated(cal, [16], model)[0]
    table = per_source(cal, cv, loso)
    assert table["source"].tolist() == ["a", "b", "c"] and table["prompts"].tolist() == [3, 3, 2]
    keep = np.isin(loso.prompt_ids, groups["c"])
    assert table["leave_one_source_out"][2] == pytest.approx(loso.tokens[keep].sum() / loso.steps[keep].sum())
    assert table["tokens"].sum() == cv.tokens.sum()
    # no sources recorded: no leave-one-source-out figure
    plain = Calibration(cal.ranks, cal.prompt_ids, cal.positions, cal.top_k)
    assert leave_one_source_out(plain, [16], model) is None and per_source(plain, cv).empty


def test_calibration_curve_ends_at_the_cross_validated_figure(cal):
    model = "smoothed:4"
    curve = calibration_curve(cal, 16, model)
    assert curve["fit_prompts"].tolist() == [4, 6]  # 4, then all 6 training prompts of each fold
    assert curve["predicted"].iloc[-1] == pytest.approx(cross_validated(cal, [16], model)[0].tokens_per_step)
    assert (curve["ci_low"] <= curve["predicted"]).all() and (curve["predicted"] <= curve["ci_high"]).all()


def test_strength_is_the_best_cross_validated_candidate(cal):
    scores = np.array([np.mean([r.tokens_per_step for r in cross_validated(cal, STRENGTH_SIZES, f"smoothed:{s:g}")])
                       for s in STRENGTHS])
    np.testing.assert_allclose(strength_scores(cal), scores)
    chosen = STRENGTHS.index(choose_strength(cal))
    assert scores[chosen] == pytest.approx(scores.max()) and (scores[chosen + 1:] < scores.max() - 1e-12).all()
    tie = 0.01  # scores within 1 % of the best tie, and the strongest of them wins
    chosen = STRENGTHS.index(choose_strength(cal, tie=tie))
    assert scores[chosen] >= scores.max() * (1 - tie) and (scores[chosen + 1:] < scores.max() * (1 - tie)).all()


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 30))
def test_replay_prefixes_equal_replays_of_the_prefixes(seed, nodes):
    ranks = random_ranks([25, 3, 40], 3, 4, seed=seed)
    pid = np.repeat(np.arange(3), [len(r) for r in ranks]).astype(np.int32)
    pos = np.concatenate([np.arange(len(r)) for r in ranks]).astype(np.int32)
    cal = Calibration(np.concatenate(ranks), pid, pos, 4)
    tree = search(cal, nodes, "empirical").tree
    sizes = [0, 1, nodes // 2, nodes, nodes + 5]
    for m, r in zip(sizes, replay_prefixes(tree, cal, sizes)):
        assert r.steps.tolist() == replay(tree[:m], cal).steps.tolist()


def test_stratified_sample_and_overlap(tmp_path):
    sources = ["x"] * 50 + ["y"] * 30 + ["z"] * 20
    picked = stratified_sample(sources, 10, seed=3)
    assert picked == sorted(picked) and len(set(picked)) == 10
    assert [sum(sources[i] == s for i in picked) for s in "xyz"] == [5, 3, 2]
    assert stratified_sample(sources, 10, seed=3) == picked and stratified_sample(sources, 10, seed=4) != picked
    assert [sum(sources[i] == s for i in stratified_sample(sources, 7)) for s in "xyz"] == [4, 2, 1]  # largest remainders
    assert stratified_sample(sources, 500) == list(range(100))
    f = tmp_path / "p.json"
    f.write_text(json.dumps([{"instruction": "A b", "dataset": "x"}, {"instruction": "c"}, "d"]))
    assert load_prompts(str(f)) == (["A b", "c", "d"], ["x", "", ""])
    assert normalized("  A \n b ") == "a b"
    assert overlap(["a  B", "zz", "c"], ["A b", "c", "q"]) == 2


def test_search_file_and_evaluate_report_the_held_out_figures(cal, make_calibration, tmp_path):
    runner = CliRunner()
    out = tmp_path / "tree.json"
    r = runner.invoke(app, ["search", "-c", str(cal.directory), "--nodes", "16", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "leave one source out" in r.output and "per source" in r.output
    _, meta = read_tree_meta(out)
    model = resolve_model(cal)
    assert meta["leave_one_source_out_tokens_per_step"] == pytest.approx(
        leave_one_source_out(cal, [16], model)[0].tokens_per_step)
    assert [row["source"] for row in meta["per_source"]] == ["a", "b", "c"]
    # evaluated on another calibration sharing 3 prompts with the tree's own: a warning with the count
    other = make_calibration(random_ranks([30] * 5, 3, 5, seed=12), top_k=5, name="other",
                             instructions=["prompt 0", "Prompt  1", "new", "prompt 7", "newer"])
    r = runner.invoke(app, ["evaluate", "-t", str(out), "-c", str(other.directory)])
    assert r.exit_code == 0, r.output
    assert "warning: 3 of the 5 evaluation" in r.output and "how much calibration is enough" in r.output
