"""Greedy search is optimal for every acceptance model (brute force on small cases), the smoothed
model's shrinkage, baselines, latency files, the sweep and the `search`/`sweep` commands."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from conftest import random_ranks
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from treeopt.core.record import Calibration
from treeopt.cli import app
from treeopt.core.errors import TreeoptError
from treeopt.core.replay import accepted_depths, replay
from treeopt.search.acceptance import Smoothed, choose_strength, expected_tokens_per_step, node_values, resolve_model
from treeopt.search.crossval import cross_validated_curve, sweep_sizes
from treeopt.search.baselines import baseline_trees, best_cartesian
from treeopt.search.budget import Latency, best_chain_length, choose_nodes, read_latency, search_auto
from treeopt.search.grow import search
from treeopt.search.sweep import sweep
from treeopt.core.tree import Tree
from treeopt.core.treefile import read_tree_meta


def in_memory(ranks_by_prompt, top_k) -> Calibration:
    ranks = np.concatenate(ranks_by_prompt)
    pid = np.repeat(np.arange(len(ranks_by_prompt)), [len(r) for r in ranks_by_prompt]).astype(np.int32)
    pos = np.concatenate([np.arange(len(r)) for r in ranks_by_prompt]).astype(np.int32)
    return Calibration(ranks, pid, pos, top_k)


@st.composite
def small_calibrations(draw):
    K, top_k = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    lengths = draw(st.lists(st.integers(1, 12), min_size=1, max_size=4))
    return in_memory(random_ranks(lengths, K, top_k, seed=draw(st.integers(0, 10**6)), miss=draw(st.floats(0, 1))), top_k)


def all_nodes(depth: int, top_k: int) -> list[tuple[int, ...]]:
    return [p for d in range(1, depth + 1) for p in itertools.product(range(top_k), repeat=d)]


def brute_force_best(cal: Calibration, n: int, model: str, depth: int, top_k: int) -> float:
    """Max of sum of node values over every parent-closed set of n nodes."""
    nodes = all_nodes(depth, top_k)
    values = dict(zip(nodes, node_values(Tree.from_choices(nodes), cal, model)))
    best = 0.0
    for subset in itertools.combinations(nodes, min(n, len(nodes))):
        chosen = set(subset)
        if all(len(p) == 1 or p[:-1] in chosen for p in subset):
            best = max(best, sum(values[p] for p in subset))
    return best


@settings(max_examples=40, deadline=None)
@given(small_calibrations(), st.sampled_from(["empirical", "independent", "smoothed:0", "smoothed:3", "smoothed:inf"]),
       st.integers(1, 2), st.integers(1, 3))
def test_greedy_is_optimal_against_brute_force(cal, model, depth, top_k):
    depth, top_k = min(depth, cal.num_heads), min(top_k, cal.top_k)
    full = search(cal, 64, model, depth, top_k)
    assert np.all(np.diff(full.values) <= 1e-12)  # non-increasing: value(child) <= value(parent)
    for n in range(1, min(len(all_nodes(depth, top_k)), 7) + 1):
        result = search(cal, n, model, depth, top_k)
        assert result.tree.paths == full.tree.paths[:n]  # every prefix is the smaller search
        assert result.tokens_per_step == pytest.approx(expected_tokens_per_step(result.tree, cal, model))
        assert result.tokens_per_step - 1 == pytest.approx(brute_force_best(cal, n, model, depth, top_k), abs=1e-12)


def test_greedy_is_optimal_on_a_deeper_case():
    cal = in_memory(random_ranks([30, 25, 40], 3, 2, seed=3), 2)  # 14 candidate nodes, depth 3
    for model in ("empirical", "independent", "smoothed:2"):
        for n in (3, 5, 7):
            assert search(cal, n, model).tokens_per_step - 1 == pytest.approx(brute_force_best(cal, n, model, 3, 2))


def test_models_on_a_hand_made_case(make_calibration):
    # one prompt, 4 positions, 2 heads, top-2; the last rows have -1 past the end
    ranks = np.array([[0, 1], [0, 0], [1, -1], [-1, -1]], np.int16)
    cal = make_calibration([ranks], top_k=2)
    # empirical: (0,) starts 2 of 4 rows, (0, 0) 1, (0, 1) 1, (1,) 1
    assert node_values(Tree(((0,), (0, 0), (0, 1), (1,))), cal, "empirical").tolist() == [0.5, 0.25, 0.25, 0.25]
    # independent: head 1 is valid at 3 rows (a = 2/3, 1/3), head 2 at 2 rows (a = 1/2, 1/2)
    np.testing.assert_allclose(node_values(Tree(((0,), (0, 0), (1,))), cal, "independent"), [2 / 3, 1 / 3, 1 / 3])
    # the empirical prediction is the mean accepted length over all positions
    tree = search(cal, 3, "empirical").tree
    assert expected_tokens_per_step(tree, cal, "empirical") == pytest.approx(
        1 + accepted_depths(tree, cal.ranks, cal.top_k).mean())
    with pytest.raises(TreeoptError, match="--acceptance-model smoothed, empirical"):
        search(cal, 3, "joint")
    with pytest.raises(TreeoptError, match="strength S >= 0"):
        search(cal, 3, "smoothed:x")
    with pytest.raises(TreeoptError, match="between 1 and"):
        search(cal, 3, top_k=5)


@settings(max_examples=25, deadline=None)
@given(small_calibrations(), st.sampled_from(["empirical", "independent", "smoothed:2"]), st.integers(1, 12))
def test_best_cartesian_against_brute_force(cal, model, nodes):
    K, k = cal.num_heads, cal.top_k
    shapes = [ks for d in range(1, K + 1) for ks in itertools.product(range(1, k + 1), repeat=d)
              if Tree.cartesian(ks).num_nodes <= nodes]
    best = max(expected_tokens_per_step(Tree.cartesian(ks), cal, model) for ks in shapes)
    ks = best_cartesian(cal, nodes, model)
    assert Tree.cartesian(ks).num_nodes <= nodes
    assert expected_tokens_per_step(Tree.cartesian(ks), cal, model) == pytest.approx(best)


def test_baselines_and_chain(make_calibration):
    cal = make_calibration(random_ranks([50, 60, 70], 3, 4, seed=1), top_k=4)
    trees = baseline_trees(cal, 20)
    assert trees["top1_chain"] == Tree.chain(3)
    assert trees["best_cartesian"].num_nodes <= 20
    assert {"mc_sim_7b_63", "vicuna_7b_stage2", "vicuna_13b_stage2", "vicuna_33b_stage2"} <= set(trees)
    # published trees use 4 heads and rank 9: what this calibration cannot see adds nothing
    full = trees["mc_sim_7b_63"]
    seen = Tree(tuple(p for p in full.paths if len(p) <= 3 and max(p) < 4))
    assert expected_tokens_per_step(full, cal) == pytest.approx(expected_tokens_per_step(seen, cal))
    assert best_chain_length(cal) == 3
    # a latency that punishes every extra node makes the best chain short
    steep = Latency(np.arange(0, 5), np.array([10.0, 100.0, 200.0, 300.0, 400.0]))
    assert best_chain_length(cal, latency=steep) == 1


def test_latency_file_and_auto_nodes(make_calibration, tmp_path):
    cal = make_calibration(random_ranks([200, 150], 3, 5, seed=2), top_k=5)
    f = tmp_path / "latency.csv"
    f.write_text("nodes,forward_ms,device\n0,10,cpu\n8,12,cpu\n8,14,cpu\n64,40,cpu\n")
    lat = read_latency(f)
    assert lat.nodes.tolist() == [0, 8, 64] and lat.forward_ms.tolist() == [10, 13, 40] and lat.meta == {"device": "cpu"}
    assert lat.forward(36) == pytest.approx(26.5) and np.isnan(lat.forward(65))
    model = resolve_model(cal)
    full = search(cal, 64, model)
    sizes = sweep_sizes(64)
    assert sizes.tolist() == list(range(33)) + [40, 48, 56, 64]
    curve = cross_validated_curve(cal, sizes, model)
    tps = curve / lat.forward(sizes) * 1000
    n = choose_nodes(sizes, curve, lat)
    assert n == sizes[int(np.argmax(tps[1:])) + 1]
    assert search_auto(cal, lat).tree == full.tree[:n]
    for text, match in [("nodes,ms\n1,2\n", "lacks the columns"), ("nodes,forward_ms\n1,-2\n", "positive"),
                        ("nodes,forward_ms\n1.5,2\n", "integer"), ("", "not a readable CSV")]:
        f.write_text(text)
        with pytest.raises(TreeoptError, match=match):
            read_latency(f)


def test_auto_picks_plain_where_no_tree_wins(make_calibration, caplog):
    sizes, curve = np.arange(5), np.array([1.0, 1.3, 1.5, 1.6, 1.65])
    slow = Latency(np.arange(5), np.array([10.0, 14.0, 16.0, 18.0, 20.0]))  # every tree loses to plain
    with caplog.at_level("WARNING"):
        assert choose_nodes(sizes, curve, slow) == 0
    assert "no tree beats plain decoding" in caplog.text and "2 nodes, 0.94x" in caplog.text
    fast = Latency(np.arange(5), np.array([10.0, 11.0, 12.0, 16.0, 20.0]))
    assert choose_nodes(sizes, curve, fast) == 2  # 1.5 / 12 beats 1 / 10
    assert choose_nodes(sizes[1:], curve[1:], slow) == 2  # no plain size to compare: the best tree
    cal = make_calibration(random_ranks([200, 150], 3, 5, seed=2), top_k=5)
    flat = Latency(np.array([0, 64]), np.array([10.0, 1000.0]))
    assert search_auto(cal, flat).tree.num_nodes == 0


def test_sweep_is_the_prefix_curve(make_calibration, tmp_path):
    cal = make_calibration(random_ranks([80, 90], 3, 4, seed=4), top_k=4)
    f = tmp_path / "latency.csv"
    f.write_text("nodes,forward_ms\n0,10\n30,20\n")
    df = sweep(cal, 30, latency=read_latency(f), replayed=True)
    model = resolve_model(cal)
    tree = search(cal, 30, model).tree
    assert df["nodes"].tolist() == list(range(31))
    np.testing.assert_allclose(df["tokens_per_step"], cross_validated_curve(cal, range(31), model))
    for m in (0, 1, 7, 30):
        assert df["uniform_tokens_per_step"][m] == pytest.approx(expected_tokens_per_step(tree[:m], cal, model))
        assert df["in_sample_tokens_per_step"][m] == pytest.approx(replay(tree[:m], cal).tokens_per_step)
    assert df["speedup"][0] == pytest.approx(1.0)
    assert df["tokens_per_s"][30] == pytest.approx(df["tokens_per_step"][30] / 20 * 1000)


def test_search_and_sweep_commands(make_calibration, tmp_path):
    cal = make_calibration(random_ranks([120, 100, 90], 3, 5, seed=5), top_k=5)
    runner = CliRunner()
    out = tmp_path / "tree.json"
    r = runner.invoke(app, ["search", "-c", str(cal.directory), "--nodes", "12", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "best_cartesian" in r.output and "mc_sim_7b_63" in r.output and "top1_chain" in r.output
    tree, meta = read_tree_meta(out)
    model = resolve_model(cal)
    assert tree == search(cal, 12, model).tree and meta["nodes"] == 12
    assert meta["predicted_tokens_per_step"] == pytest.approx(cross_validated_curve(cal, [12], model)[0])
    assert meta["uniform_tokens_per_step"] == pytest.approx(expected_tokens_per_step(tree, cal, model))
    assert meta["in_sample_tokens_per_step"] == pytest.approx(replay(tree, cal).tokens_per_step)
    lo, hi = meta["predicted_interval"]
    assert lo <= meta["predicted_tokens_per_step"] <= hi
    assert meta["acceptance_model"] == model and model.startswith("smoothed:") and meta["best_chain_length"] == 3
    r = runner.invoke(app, ["search", "-c", str(cal.directory), "--nodes", "5", "--acceptance-model", "independent",
                            "-o", str(tmp_path / "t.txt"), "--format", "python"])
    assert r.exit_code == 0 and (tmp_path / "t.txt").read_text().count("medusa_choices = ") == 1
    r = runner.invoke(app, ["sweep", "-c", str(cal.directory), "--max-nodes", "10", "-o", str(tmp_path / "s.csv")])
    assert r.exit_code == 0 and (tmp_path / "s.csv").read_text().count("\n") == 12
    for args, msg in [(["--nodes", "auto"], "needs --latency"), (["--nodes", "x"], "not a number"),
                      (["--nodes", "4", "--latency", str(tmp_path / "none.csv")], "treeopt profile")]:
        r = runner.invoke(app, ["search", "-c", str(cal.directory), *args])
        assert r.exit_code == 2 and msg in r.output
    r = runner.invoke(app, ["search", "-c", str(tmp_path), "--nodes", "4"])
    assert r.exit_code == 2 and "not a calibration directory" in r.output


def test_json_tree_is_readable_by_others(make_calibration, tmp_path):
    cal = make_calibration(random_ranks([60], 2, 3, seed=6), top_k=3)
    CliRunner().invoke(app, ["search", "-c", str(cal.directory), "--nodes", "4", "-o", str(tmp_path / "t.json")])
    obj = json.loads((tmp_path / "t.json").read_text())
    assert {"medusa_choices", "nodes", "predicted_tokens_per_step", "acceptance_model", "calibration",
            "best_chain_length"} <= set(obj)


def test_batch_sizes_in_latency_files_sweep_and_schedule(make_calibration, tmp_path):
    """A latency profile whose step time grows faster with tree size at larger batch sizes: --batch-size
    picks fewer nodes as B grows, the sweep has one curve per batch size, the schedule file maps each
    batch size to its tree."""
    from treeopt.search.budget import read_latencies
    from treeopt.search.schedule import batch_schedule

    cal = make_calibration(random_ranks([300, 250, 200], 3, 5, seed=7), top_k=5)
    f = tmp_path / "latency.csv"
    rows = [(b, n, 10.0 * (1 + b * n / 64)) for b in (1, 4, 16) for n in (0, 4, 8, 16, 32, 64)]
    f.write_text("batch_size,nodes,forward_ms,device\n" + "".join(f"{b},{n},{ms},cpu\n" for b, n, ms in rows))
    lats = read_latencies(f)
    assert list(lats) == [1, 4, 16] and lats[4].forward(8) == pytest.approx(15.0)
    picks = [search_auto(cal, lats[b]).tree.num_nodes for b in (1, 4, 16)]
    assert picks[0] > picks[1] > picks[2] >= 1
    tps = lambda b, n: b * search(cal, n).tokens_per_step / lats[b].forward(n) * 1000  # noqa: E731
    assert all(tps(b, n) >= tps(b, m) for b, n in zip((1, 4, 16), picks) for m in (1, 4, 8, 16, 32, 64))
    assert read_latency(tmp_path / "latency.csv", 16).batch_size == 16
    with pytest.raises(TreeoptError, match="serving-batches 2"):
        read_latency(f, 2)

    df = sweep(cal, 64, latency=list(lats.values()))
    assert df["batch_size"].unique().tolist() == [1, 4, 16]
    for b, rows_b in df.groupby("batch_size"):
        assert rows_b["speedup"].iloc[0] == pytest.approx(1.0)
        assert int(rows_b.loc[rows_b["tokens_per_s"].iloc[1:].idxmax(), "nodes"]) == picks[[1, 4, 16].index(b)]

    entries = batch_schedule(cal, lats)
    assert [e["nodes"] for e in entries] == picks
    runner = CliRunner()
    out = tmp_path / "schedule.json"
    r = runner.invoke(app, ["search", "-c", str(cal.directory), "--latency", str(f), "--serving-batches", "1,4,16",
                            "-o", str(out)])
    assert r.exit_code == 0, r.output
    written = json.loads(out.read_text())["schedule"]
    trees = {e["batch_size"]: Tree.from_choices(e["medusa_choices"]) for e in written}
    assert list(trees) == [1, 4, 16] and [t.num_nodes for t in trees.values()] == picks
    assert trees[16] == trees[1][:picks[2]]  # prefixes of one greedy search
    assert written[0]["predicted_speedup"] == pytest.approx(entries[0]["predicted_speedup"])
    r = runner.invoke(app, ["search", "-c", str(cal.directory), "--nodes", "auto", "--latency", str(f),
                            "--serving-batch", "16", "-o", str(tmp_path / "t.json")])
    assert r.exit_code == 0 and read_tree_meta(tmp_path / "t.json")[0].num_nodes == picks[2]
    r = runner.invoke(app, ["sweep", "-c", str(cal.directory), "--latency", str(f), "--max-nodes", "64"])
    assert r.exit_code == 0 and "at batch size 16: N = " + str(picks[2]) in r.output


def test_smoothed_shrinks_counts_toward_the_product_model(make_calibration):
    # one prompt, 4 positions, 2 heads, top-2 (the hand-made case above)
    ranks = np.array([[0, 1], [0, 0], [1, -1], [-1, -1]], np.int16)
    cal = make_calibration([ranks], top_k=2)
    tree = Tree(((0,), (0, 0), (0, 1), (1,), (1, 0)))
    b = Smoothed(cal.ranks, 2, 0.0).prior  # head accuracies with half a pseudo-count per rank (and the miss)
    np.testing.assert_allclose(b, [[2.5 / 4.5, 1.5 / 4.5], [1.5 / 3.5, 1.5 / 3.5]])
    # strength 0 is the empirical model, strength inf the product of the prior accuracies
    np.testing.assert_allclose(node_values(tree, cal, "smoothed:0"), node_values(tree, cal, "empirical"))
    np.testing.assert_allclose(node_values(tree, cal, "smoothed:inf"),
                               [b[0, 0], b[0, 0] * b[1, 0], b[0, 0] * b[1, 1], b[0, 1], b[0, 1] * b[1, 0]])
    # s = 2: value(p) = value(parent) * (hits(p) + 2 b) / (hits(parent) + 2); hits: (0,) 2 of 4, (0, 0) 1, (1,) 1, (1, 0) 0
    v0 = (2 + 2 * b[0, 0]) / (4 + 2)
    v1 = (1 + 2 * b[0, 1]) / (4 + 2)
    expect = [v0, v0 * (1 + 2 * b[1, 0]) / (2 + 2), v0 * (1 + 2 * b[1, 1]) / (2 + 2), v1, v1 * (0 + 2 * b[1, 0]) / (1 + 2)]
    np.testing.assert_allclose(node_values(tree, cal, "smoothed:2"), expect)


def test_smoothed_fills_every_budget_and_its_strength_is_cross_validated(make_calibration):
    cal = make_calibration(random_ranks([20, 15], 3, 4, seed=8), top_k=4)  # 35 positions: few observed paths
    assert len(search(cal, 60, "empirical").tree) < 60  # the empirical model stops at the paths it saw
    assert len(search(cal, 60, "smoothed:4").tree) == 60
    assert len(search(cal, 200, "smoothed:4").tree) == 4 + 16 + 64  # every node up to depth 3 x top-4
    for prompts in ([0], [0, 1]):  # the default model, whatever strength it chooses, fills the budget
        assert len(search(cal.subset(np.array(prompts)), 60, "smoothed").tree) == 60
    # the chosen strength is the candidate with the best held-out replay; a calibration of one prompt cannot choose
    from treeopt.search.acceptance import FALLBACK_STRENGTH, STRENGTHS
    assert choose_strength(cal) in STRENGTHS and resolve_model(cal) == f"smoothed:{choose_strength(cal):g}"
    assert choose_strength(cal.subset(np.array([0]))) == FALLBACK_STRENGTH
