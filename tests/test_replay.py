"""Replay against a slow hand-written decoding loop, held-out evaluation and `treeopt evaluate`."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_ranks
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from treeopt.core.record import Calibration
from treeopt.cli import app
from treeopt.core.errors import TreeoptError
from treeopt.core.replay import replay
from treeopt.search.acceptance import resolve_model
from treeopt.search.crossval import cross_validated
from treeopt.search.evaluate import evaluate, split_prompts
from treeopt.search.grow import search
from treeopt.core.tree import Tree
from treeopt.core.treefile import write_tree


def reference_steps(tree: Tree, ranks: np.ndarray, top_k: int) -> int:
    """Greedy Medusa decoding on one logged continuation, one step at a time."""
    T, t, steps = len(ranks), 0, 0
    while t < T:
        d = max((len(p) for p in tree.paths if len(p) <= ranks.shape[1]
                 and all(ranks[t, j] == i and i < top_k for j, i in enumerate(p))), default=0)
        t, steps = t + 1 + d, steps + 1
    return steps


@st.composite
def cases(draw):
    K, top_k = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(1, 30), min_size=1, max_size=5))
    ranks = random_ranks(lengths, K, top_k, seed=draw(st.integers(0, 10**6)), miss=draw(st.floats(0, 1)))
    paths = draw(st.lists(st.lists(st.integers(0, top_k), min_size=1, max_size=K + 1), max_size=25))
    tree = Tree.from_choices(paths and list(dict.fromkeys(map(tuple, paths))), complete=True)
    # shuffle the prompts' rows: replay must not rely on the file's order
    pid = np.repeat(np.arange(len(lengths)), lengths).astype(np.int32)
    pos = np.concatenate([np.arange(T) for T in lengths]).astype(np.int32)
    order = np.random.default_rng(0).permutation(len(pid))
    cal = Calibration(np.concatenate(ranks)[order], pid[order], pos[order], top_k)
    return tree, ranks, cal


@settings(max_examples=80, deadline=None)
@given(cases())
def test_replay_equals_step_by_step_decoding(case):
    tree, ranks, cal = case
    result = replay(tree, cal)
    steps = [reference_steps(tree, r, cal.top_k) for r in ranks]
    assert result.steps.tolist() == steps
    assert result.tokens.tolist() == [len(r) for r in ranks]
    assert result.tokens_per_step == pytest.approx(sum(map(len, ranks)) / sum(steps))


def test_replay_by_hand(make_calibration):
    # T = 5; at t=0 ranks (0, 0) -> accept 2, t=3: (1, -1) -> accept 1 with tree [[0],[0,0],[1]], t=5 done
    ranks = np.array([[0, 0], [3, 3], [0, 1], [1, -1], [-1, -1]], np.int16)
    cal = make_calibration([ranks], top_k=3)
    r = replay(Tree(((0,), (0, 0), (1,))), cal)
    assert r.steps.tolist() == [2] and r.tokens_per_step == 2.5
    assert replay(Tree(()), cal).tokens_per_step == 1.0
    assert replay(Tree(((3,),)), cal).tokens_per_step == 1.0  # rank 3 = top_k is a miss, never a match
    lo, hi = r.interval()
    assert lo == hi == 2.5  # one prompt: every bootstrap sample is that prompt


def test_gaps_in_positions_are_an_error():
    cal = Calibration(np.zeros((3, 1), np.int16), np.zeros(3, np.int32), np.array([0, 1, 3], np.int32), 2)
    with pytest.raises(TreeoptError, match="positions 0..T-1"):
        replay(Tree.chain(1), cal)


def test_prediction_tracks_replay_and_held_out_split(make_calibration):
    cal = make_calibration(random_ranks([150] * 20, 3, 5, seed=7), top_k=5)
    tree = search(cal, 16).tree
    fit, held = split_prompts(cal, 0.8, seed=1)
    assert len(np.unique(fit.prompt_ids)) == 16 and len(np.unique(held.prompt_ids)) == 4
    assert not set(fit.prompt_ids) & set(held.prompt_ids)
    table = evaluate({"mine": tree}, cal, split=0.8, seed=1)
    rows = table.set_index("tree")
    assert {"mine", "searched on fit split (16)", "best_cartesian", "top1_chain", "mc_sim_7b_63"} <= set(rows.index)
    searched = rows.loc["searched on fit split (16)"]
    model = resolve_model(cal)  # the smoothing strength is chosen on the whole calibration, then fixed
    assert searched["replayed"] == pytest.approx(replay(search(fit, 16, model).tree, held).tokens_per_step)
    assert searched["predicted"] == searched["replayed"]  # held out already
    assert searched["ci_low"] <= searched["replayed"] <= searched["ci_high"]
    assert (rows["ci_low"] < rows["ci_high"]).all()
    # without a split: the tree searched on the calibration, predicted by cross-validation
    rows = evaluate({"mine": tree}, cal).set_index("tree")
    here = rows.loc["searched here (16), cross-validated"]
    assert here["predicted"] == pytest.approx(cross_validated(cal, [16], model)[0].tokens_per_step)
    assert here["replayed"] == pytest.approx(replay(search(cal, 16, model).tree, cal).tokens_per_step)
    assert rows.loc["mine", "predicted"] == rows.loc["mine", "replayed"]  # a given tree: its replay
    with pytest.raises(TreeoptError, match="--split"):
        split_prompts(cal, 1.0)


def test_evaluate_command(make_calibration, tmp_path):
    cal = make_calibration(random_ranks([100] * 6, 3, 4, seed=8), top_k=4)
    write_tree(search(cal, 10).tree, tmp_path / "t.py")
    r = CliRunner().invoke(app, ["evaluate", "-t", str(tmp_path / "t.py"), "-t", "mc_sim_7b_63", "-t", "[[0], [0, 0]]",
                                 "-c", str(cal.directory), "--split", "0.5", "--seed", "3"])
    assert r.exit_code == 0, r.output
    assert "replayed" in r.output and "how much calibration is enough" in r.output and "only 30 of its nodes fit 3 heads x top-4" in r.output  # mc_sim_7b_63
    r = CliRunner().invoke(app, ["evaluate", "-t", "nope.json", "-c", str(cal.directory)])
    assert r.exit_code == 2 and "not found" in r.output
