"""Deployment targets: constrained searches over many random calibrations export trees that each
consumer's re-implemented code (treeopt.search.consumers) builds exactly as meant; the targets' check agrees
with those consumers on arbitrary trees; the CLI refuses to export a tree a consumer would reject or alter."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import random_ranks
from hypothesis import given, settings
from hypothesis import strategies as st
from test_search import in_memory
from test_tree import one_line_error, trees
from typer.testing import CliRunner

from treeopt.search.budget import Latency, best_chain_length, search_auto
from treeopt.search.consumers import CONSUMERS, Rejected, deploys, intended, trtllm_cpp, trtllm_python
from treeopt.search.grow import search
from treeopt.search.targets import TARGETS, bounds, check, contiguous_walk
from treeopt.cli import app
from treeopt.core.errors import TreeoptError
from treeopt.core.tree import Tree
from treeopt.core.treefile import format_tree, read_tree_meta

HEADS_BOUND = ("medusa", "trtllm", "vllm")  # consumers whose own code bounds depth by the heads


@st.composite
def calibrations(draw):
    K, top_k = draw(st.integers(1, 5)), draw(st.integers(1, 18))
    lengths = draw(st.lists(st.integers(1, 40), min_size=1, max_size=5))
    seed, miss = draw(st.integers(0, 10**6)), draw(st.floats(0, 1))
    return in_memory(random_ranks(lengths, K, top_k, seed=seed, miss=miss), top_k)


@settings(max_examples=150, deadline=None)
@given(calibrations(), st.sampled_from(list(TARGETS)), st.integers(1, 80), st.sampled_from(["empirical", "independent"]))
def test_constrained_searches_deploy_unchanged(cal, name, nodes, model):
    target = TARGETS[name]
    if target.max_nodes is not None and nodes > target.max_nodes:
        with pytest.raises(TreeoptError, match=f"--nodes {target.max_nodes} or fewer"):
            search(cal, nodes, model, target=target)
        return
    result = search(cal, nodes, model, target=target)
    tree = result.tree
    assert len(result.values) == len(tree) <= nodes
    if len(tree) == 0:  # no node within the target's ranks and depth is ever accepted
        depth, top_k = bounds(target, nodes, cal.num_heads, cal.top_k)
        assert len(search(cal, nodes, model, depth, top_k).tree) == 0
        return
    assert check(tree, target, cal.num_heads) is None
    assert deploys(tree, name, cal.num_heads)
    # a greedy growth: every prefix keeps the rules (what --nodes auto picks from)
    assert all(check(tree[:m], target, cal.num_heads) is None for m in range(1, len(tree) + 1))


@settings(max_examples=200, deadline=None)
@given(trees(max_nodes=70, max_rank=18, max_depth=5)
       | st.lists(st.integers(1, 4), min_size=1, max_size=3).map(Tree.cartesian)
       | st.integers(1, 6).map(Tree.chain),
       st.integers(1, 5), st.sampled_from(list(TARGETS)))
def test_check_agrees_with_the_consumers(tree, num_heads, name):
    """check() passes a tree iff the consumer builds it exactly. TensorRT-LLM's rank 16 passes its
    own check and only sometimes aliases another node's prefix key: treeopt keeps ranks <= 15."""
    heads = num_heads if name in HEADS_BOUND else None
    ok = check(tree, TARGETS[name], heads) is None
    if ok:
        assert deploys(tree, name, num_heads)
    elif not (name == "trtllm" and tree.max_rank == 17):
        assert not deploys(tree, name, num_heads), check(tree, TARGETS[name], heads)


def test_consumers_on_known_cases():
    two = Tree(((0,), (0, 0), (1,)))
    assert CONSUMERS["medusa"](format_tree(two, "python"), 2) == intended(two)
    # Medusa: rank 15 at depth 1 reads head 2's rank-5 token; too deep overruns the candidates
    wide = format_tree(Tree(((15,),)), "python")
    assert CONSUMERS["medusa"](wide, 2).paths == {((1, 5),)}
    with pytest.raises(Rejected, match="IndexError"):
        CONSUMERS["medusa"](format_tree(Tree.chain(3), "python"), 2)
    # vLLM 0.32 drafts a top-1 chain of num_speculative_tokens; it has no speculative_token_tree field
    assert json.loads(format_tree(Tree.chain(3), "vllm")) == {"method": "medusa", "num_speculative_tokens": 3}
    assert CONSUMERS["vllm"](format_tree(Tree.chain(3), "vllm"), 4) == intended(Tree.chain(3))
    with pytest.raises(Rejected, match="unexpected"):
        CONSUMERS["vllm"]('{"num_speculative_tokens": 2, "speculative_token_tree": "[(0,), (0, 0)]"}', 2)
    with pytest.raises(Rejected, match="greater than zero"):
        CONSUMERS["vllm"]('{"method": "medusa", "num_speculative_tokens": 0}', 2)
    with pytest.raises(Rejected, match="checkpoint holds 2"):
        CONSUMERS["vllm"](format_tree(Tree.chain(3), "vllm"), 2)
    with pytest.raises(TreeoptError, match="top-1 chain only"):
        format_tree(two, "vllm")
    # TensorRT-LLM's Python runtime numbers first-level nodes by rank: [1] alone makes two nodes
    assert trtllm_python("[[1]]", 2).tokens == 2 and trtllm_cpp("[[1]]", 2) == intended(Tree(((1,),)))


def test_trtllm_attaches_a_node_without_its_parent_to_the_root():
    built = trtllm_cpp("[[0], [1, 0], [0, 0]]", 2)  # [1, 0] without [1]
    assert ((1, 0),) in built.paths and ((0, 1), (1, 0)) not in built.paths  # head 2's token right after the root
    assert built != intended(Tree.from_choices([[0], [1, 0], [0, 0]], complete=True))
    # treeopt reads such a list with the missing parent added, and writes every parent
    tree, _ = read_tree_meta("[[0], [1, 0], [0, 0]]")
    assert (1,) in tree and trtllm_cpp(format_tree(tree, "trtllm"), 2) == intended(tree)


def test_first_level_contiguity_waits_and_unlocks():
    # the empirical model (counts only: rank 2, never seen, has value 0); head 1's rank 1 is accepted far more often than rank 0, and rank 2 never
    paths = [(1,), (1, 0), (0,), (3,)]
    assert [paths[i] for i in contiguous_walk(paths, 3)] == [(0,), (1,), (1, 0)]
    ranks = np.array([[1, 0]] * 30 + [[0, 5]] * 2 + [[3, 0]] * 5, np.int16)
    cal = in_memory([ranks], 6)
    free = search(cal, 3, "empirical").tree
    assert free.paths == ((1,), (1, 0), (3,))
    tree = search(cal, 3, "empirical", target=TARGETS["trtllm"]).tree
    assert tree.paths == ((0,), (1,), (1, 0)) and deploys(tree, "trtllm", 2)
    unlocked = search(cal, 6, "empirical", target=TARGETS["trtllm"])  # rank 2 (never accepted) only to reach rank 3
    assert unlocked.tree.paths == ((0,), (1,), (1, 0), (0, 5), (2,), (3,)) and unlocked.values[4] == 0
    assert search(cal, 8, "empirical", target=TARGETS["trtllm"]).tree.paths[-1] == (3, 0)  # no zero-valued node at the end


def test_constraints_that_do_not_bind_change_nothing():
    cal = in_memory(random_ranks([300, 200], 3, 8, seed=3, miss=0.2), 8)  # top-8 < Medusa's 10
    for n in (5, 16, 40):
        assert search(cal, n, target=TARGETS["medusa"]).tree == search(cal, n).tree
    assert search(cal, 10, target=TARGETS["chain"]).tree == Tree.chain(best_chain_length(cal))
    assert search(cal, 10, target=TARGETS["vllm"]).tree == Tree.chain(best_chain_length(cal))  # vLLM drafts a chain


def test_search_refuses_exports_a_consumer_would_reject_or_alter(make_calibration, tmp_path):
    """The issue's case: a top-16 calibration, a 20-node tree holds rank 15, Medusa reads rank < 10."""
    ranks = np.stack([np.arange(320) % 16, np.zeros(320)], axis=1).astype(np.int16)
    ranks[-1:, 1] = -1
    cal = make_calibration([ranks], top_k=16)
    runner = CliRunner()
    base = ["search", "-c", str(cal.directory), "--nodes", "20"]
    r = runner.invoke(app, [*base, "-o", str(tmp_path / "t.py")])
    assert r.exit_code == 2 and "ranks <= 9" in r.output and "--target medusa" in r.output
    assert not (tmp_path / "t.py").exists()
    r = runner.invoke(app, [*base, "--target", "medusa", "-o", str(tmp_path / "t.py")])
    assert r.exit_code == 0, r.output
    tree, meta = read_tree_meta(tmp_path / "t.py")
    assert meta["target"] == "medusa" and tree.max_rank == 10
    assert CONSUMERS["medusa"]((tmp_path / "t.py").read_text(), 2) == intended(tree)
    for name in ("trtllm", "vllm", "chain"):
        out = tmp_path / f"t-{name}.json"
        r = runner.invoke(app, [*base, "--target", name, "-o", str(out), "--format", TARGETS[name].format])
        assert r.exit_code == 0, r.output
        back, _ = read_tree_meta(out)
        assert CONSUMERS[name](out.read_text(), 2) == intended(back)
    r = runner.invoke(app, [*base[:-1], "64", "--target", "trtllm"])
    assert r.exit_code == 2 and "--nodes 63 or fewer" in r.output
    # export: the Medusa tree passes TensorRT-LLM's rules, and is no chain
    r = runner.invoke(app, ["export", "-t", str(tmp_path / "t.py"), "-o", str(tmp_path / "t.txt"), "--target", "trtllm"])
    assert r.exit_code == 0 and "TensorRT-LLM" in r.output
    assert CONSUMERS["trtllm"]((tmp_path / "t.txt").read_text(), 2) == intended(tree)
    r = runner.invoke(app, ["export", "-t", str(tmp_path / "t.py"), "-o", str(tmp_path / "c.json"), "--format", "chain"])
    assert r.exit_code == 2 and "top-1 chain only" in r.output and not (tmp_path / "c.json").exists()
    one_line_error(format_tree, Tree(((0,), (1,))), "chain", match="--target chain")


def test_auto_size_keeps_the_node_cap():
    cal = in_memory(random_ranks([400, 300], 4, 16, seed=4, miss=0.1), 16)
    flat = Latency(np.array([0, 128]), np.array([10.0, 10.0]))  # every size costs the same: biggest wins
    assert search_auto(cal, flat).tree.num_nodes > 63
    tree = search_auto(cal, flat, target=TARGETS["trtllm"]).tree
    assert tree.num_nodes == 63 and check(tree, TARGETS["trtllm"], 4) is None
    assert search_auto(cal, flat, target=TARGETS["vllm"]).tree == Tree.chain(4)  # a chain, at most one node per head
