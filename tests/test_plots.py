"""The tree diagram and the charts, on synthetic calibrations (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from treeopt.core.record import write_calibration
from reports import plots
from treeopt.core.errors import TreeoptError
from treeopt.core.published import mc_sim_7b_63
from search.acceptance import node_values
from search.grow import search
from treeopt.core.tree import Tree
from treeopt.core.treefile import write_tree

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_calibration(directory: Path, prompts: int = 30, length: int = 60, heads: int = 4, top_k: int = 10,
                          seed: int = 0) -> Path:
    """Ranks drawn geometric per head (deeper heads worse), -1 past each continuation's end."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(prompts):
        for t in range(length):
            ranks = {f"r{k}": (int(min(rng.geometric(0.65 - 0.1 * k) - 1, top_k)) if t + k < length else -1)
                     for k in range(1, heads + 1)}
            rows.append({"prompt_id": p, "position": t, **ranks})
    ranks = pd.DataFrame(rows)
    conts = pd.DataFrame({"prompt_id": range(prompts), "instruction": [f"q{p}" for p in range(prompts)],
                          "prompt_ids": [[1, 2]] * prompts, "tokens": [list(range(length))] * prompts,
                          "stopped": [False] * prompts})
    meta = {"model": "synthetic", "heads": "synthetic", "top_k": top_k, "max_new_tokens": length, "seed": seed}
    return write_calibration(directory, ranks, conts, meta)


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    from treeopt.core.record import load_calibration

    return load_calibration(synthetic_calibration(tmp_path_factory.mktemp("cal")))


def assert_picture(path: Path, min_bytes: int = 10_000):
    assert path.is_file() and path.stat().st_size > min_bytes, path
    head = path.read_bytes()[:200]
    assert head.startswith(PNG_MAGIC) if path.suffix == ".png" else b"<svg" in path.read_bytes()[:2000]


# ---- tree diagram ----------------------------------------------------------------------------


@pytest.mark.parametrize("nodes", [64, 250])
def test_tree_diagram_renders_small_and_large(tmp_path, calibration, nodes):
    found = search(calibration, nodes)
    assert len(found.tree) == nodes
    for suffix in (".png", ".svg"):
        assert_picture(plots.plot_tree(found.tree, tmp_path / f"t{suffix}", values=found.values, title="t"))


def test_tree_layout_is_hierarchical_without_crossings():
    tree = Tree.from_choices(mc_sim_7b_63)
    g = plots.tree_graph(tree)
    pos = plots.leaf_order_positions(g)
    for n, (x, d) in pos.items():
        assert d == (0 if n == plots.ROOT else len(tree.paths[n]))  # one level per head
    # siblings in rank order left to right, and each subtree's leaves form one contiguous run
    spans = plots.leaf_spans(g)
    for n in g:
        kids = sorted(g.successors(n), key=lambda c: g.nodes[c]["rank"])
        xs = [pos[c][0] for c in kids]
        assert xs == sorted(xs)
        for a, b in zip(kids, kids[1:]):
            assert spans[a][1] < spans[b][0]


def test_most_likely_path_follows_values():
    tree = Tree.cartesian([3, 2])
    values = np.array([0.2, 0.5, 0.1, 0.1, 0.05, 0.05, 0.4, 0.02, 0.01])  # (1,) then (1, 1)
    g = plots.tree_graph(tree, values)
    assert [tree.paths[n] for n in plots.most_likely_path(g)] == [(1,), (1, 1)]
    assert [tree.paths[n] for n in plots.most_likely_path(plots.tree_graph(tree))] == [(0,), (0, 0)]


def test_plot_tree_rejects_bad_input(tmp_path):
    tree = Tree.chain(3)
    with pytest.raises(TreeoptError, match="node values"):
        plots.plot_tree(tree, tmp_path / "t.png", values=[0.5])
    with pytest.raises(TreeoptError, match=r"\.png or \.svg"):
        plots.plot_tree(tree, tmp_path / "t.jpg")


def test_draw_tree_from_spec_with_calibration(tmp_path, calibration):
    out = plots.draw_tree("mc_sim_7b_63", tmp_path / "mc.png", calibration=calibration.directory)
    assert_picture(out)
    write_tree(Tree.cartesian([2, 3]), tmp_path / "c.json")
    assert_picture(plots.draw_tree(tmp_path / "c.json", tmp_path / "c.svg"), min_bytes=5_000)


# ---- charts ----------------------------------------------------------------------------------


def test_heatmap_and_charts_render(tmp_path, calibration, monkeypatch):
    assert_picture(plots.plot_accuracy_heatmap(calibration.accuracy, tmp_path / "a.png"))
    curves = pd.DataFrame({"method": ["searched"] * 3 + ["cartesian-2x3", "mc_sim_7b_63"],
                           "nodes": [8, 16, 32, 8, 63], "tokens_per_step": [1.8, 2.0, 2.2, 1.6, 2.1]})
    bench = pd.DataFrame({"method": ["plain", "searched-64", "cartesian-2x3"], "nodes": [0, 64, 8],
                          "tokens_per_step": [1.0, 2.1, 1.7], "speedup": [1.0, 1.5, 1.3],
                          "tokens_per_s": [50.0, 75.0, 65.0], "predicted_tokens_per_step": [np.nan, 2.2, 1.6]})
    latency = pd.DataFrame({"nodes": [1, 16, 64], "forward_ms": [10.0, 11.0, 15.0], "device": "cpu",
                            "dtype": "float32", "model": "m"})
    assert_picture(plots.plot_budget_curves(curves, tmp_path / "b.png", measured=bench))
    assert_picture(plots.plot_speed(tmp_path / "s.png", bench=bench, latency=latency))
    assert_picture(plots.plot_speed(tmp_path / "s1.png", latency=latency))
    predicted = pd.DataFrame({"nodes": [0, 8, 64], "speedup": [1.0, 1.2, 0.8]})  # a sweep with latency, no bench
    assert_picture(plots.plot_speed(tmp_path / "s2.png", latency=latency, predicted=predicted))
    assert_picture(plots.plot_speed(tmp_path / "s3.png", predicted=predicted))
    by_batch = pd.concat([predicted.assign(batch_size=b, speedup=predicted["speedup"] / b) for b in (1, 4, 16)])
    figures = []
    with monkeypatch.context() as m:
        m.setattr(plots, "save", lambda fig, out: figures.append(fig) or Path(out))
        plots.plot_speed(tmp_path / "s4.png", latency=pd.concat([latency.assign(batch_size=b) for b in (1, 4)]),
                         predicted=by_batch)
    labels = [[line.get_label() for line in ax.lines] for ax in figures[0].axes]
    assert labels[0] == ["cpu float32 batch 1", "cpu float32 batch 4"]
    assert [x for x in labels[1] if "predicted" in x] == [f"searched tree, predicted (calibration x latency), batch {b}"
                                                         for b in (1, 4, 16)]
    assert_picture(plots.plot_predicted_vs_measured(bench, tmp_path / "p.png"))
    with pytest.raises(TreeoptError, match="treeopt bench"):
        plots.plot_speed(tmp_path / "none.png")
