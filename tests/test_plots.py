"""The tree diagram and the charts, on synthetic calibrations (no model needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from treeopt.core.record import write_calibration
from treeopt.reports import plots
from treeopt.core.errors import TreeoptError
from treeopt.core.published import mc_sim_7b_63
from treeopt.search.grow import search
from treeopt.core.tree import Tree
from treeopt.core.treefile import write_tree

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_calibration(directory: Path, prompts: int = 30, length: int = 60, heads: int = 4, top_k: int = 10,
                          seed: int = 0, name: str = "q") -> Path:
    """Ranks drawn geometric per head (deeper heads worse), -1 past each continuation's end."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(prompts):
        for t in range(length):
            ranks = {f"r{k}": (int(min(rng.geometric(0.65 - 0.1 * k) - 1, top_k)) if t + k < length else -1)
                     for k in range(1, heads + 1)}
            rows.append({"prompt_id": p, "position": t, **ranks})
    ranks = pd.DataFrame(rows)
    conts = pd.DataFrame({"prompt_id": range(prompts), "instruction": [f"{name}{p}" for p in range(prompts)],
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
        assert_picture(plots.save(plots.tree_figure(found.tree, values=found.values, title="t"), tmp_path / f"t{suffix}"))


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
        plots.tree_figure(tree, values=[0.5])
    with pytest.raises(TreeoptError, match=r"\.png or \.svg"):
        plots.save(plots.tree_figure(tree), tmp_path / "t.jpg")


def test_draw_tree_from_spec_with_calibration(tmp_path, calibration):
    out = plots.draw_tree("mc_sim_7b_63", tmp_path / "mc.png", calibration=calibration.directory)
    assert_picture(out)
    write_tree(Tree.cartesian([2, 3]), tmp_path / "c.json")
    assert_picture(plots.draw_tree(tmp_path / "c.json", tmp_path / "c.svg"), min_bytes=5_000)


# ---- charts ----------------------------------------------------------------------------------


def demo_like_tables():
    """Tables shaped like the demo's: six trees at three sizes, labels that crowd, a 64-node sweep."""
    names = ["searched-4", "chain-4", "searched-16", "cartesian-8x1", "searched-63", "mc_sim_7b_63"]
    bench = pd.DataFrame({"method": ["plain"] + names, "nodes": [0, 4, 4, 16, 16, 63, 63],
                          "tokens_per_step": [1.0, 1.55, 1.45, 1.74, 1.69, 1.90, 1.87],
                          "speedup": [1.0, 0.80, 0.78, 0.71, 0.69, 0.47, 0.46],
                          "tokens_per_s": [19.4, 15.5, 15.1, 13.8, 13.4, 9.1, 8.9],
                          "predicted_tokens_per_step": [np.nan, 1.57, 1.44, 1.85, 1.75, 2.05, 2.02]})
    latency = pd.DataFrame({"nodes": [0, 1, 2, 4, 8, 16, 32, 64], "forward_ms": [52, 100, 133, 108, 132, 130, 165, 221.0],
                            "device": "cpu", "dtype": "float32", "model": "m"})
    n = np.arange(65)
    predicted = pd.DataFrame({"nodes": n, "speedup": (1 + 0.3 * np.log1p(n)) / np.interp(n, latency["nodes"],
                                                                                         latency["forward_ms"]) * 52})
    curves = pd.concat([pd.DataFrame({"method": "searched (sweep.csv)", "nodes": n[1:], "tokens_per_step": 1 + 0.25 * np.log2(1 + n[1:])}),
                        pd.DataFrame({"method": "best Cartesian", "nodes": [2, 4, 8, 16, 32, 64, 128, 256],
                                      "tokens_per_step": [1.4, 1.5, 1.6, 1.75, 1.85, 1.93, 1.99, 2.06]}),
                        pd.DataFrame({"method": "Medusa's published trees", "nodes": [63] * 4,
                                      "tokens_per_step": [2.025, 2.022, 2.013, 2.028]})])
    return bench, latency, predicted, curves


def drawn_texts(fig) -> list[tuple[str, object]]:
    """(text, display box) of every text the renderer draws: tick labels inside their axis' view only."""
    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ticks, shown = set(), []
    for ax in fig.axes:
        for axis, (lo, hi), i in ((ax.xaxis, ax.get_xlim(), 0), (ax.yaxis, ax.get_ylim(), 1)):
            lo, hi = sorted((lo, hi))
            for t in axis.get_ticklabels(which="both"):
                ticks.add(id(t))
                if ax.axison and lo - 1e-9 <= t.get_position()[i] <= hi + 1e-9:
                    shown.append(t)
    shown += [t for t in fig.findobj(Text) if id(t) not in ticks]
    return [(t.get_text(), t.get_window_extent(renderer)) for t in shown if t.get_visible() and t.get_text().strip()]


def assert_readable(fig):
    """No two drawn texts overlap; every data axis spans its lines' data with at most 25 % to spare
    on each side (a lower limit of 0 is allowed: ratios and times start there)."""
    texts = drawn_texts(fig)
    for i, (a, box_a) in enumerate(texts):
        for b, box_b in texts[i + 1:]:
            assert not plots._overlaps(box_a, box_b, slack=1.0), f"{a!r} overlaps {b!r}"
    for ax in fig.axes:
        lines = [l for l in ax.get_lines() if l.get_transform() == ax.transData and len(l.get_xdata())]
        if not lines or not ax.axison:
            continue
        for axis, get in (("x", ax.get_xlim), ("y", ax.get_ylim)):
            log = (ax.get_xscale() if axis == "x" else ax.get_yscale()) == "log"
            f = np.log2 if log else (lambda v: np.asarray(v, float))
            data = f(np.concatenate([np.asarray(l.get_xdata() if axis == "x" else l.get_ydata(), float) for l in lines]))
            data = data[np.isfinite(data)]
            lo, hi = get()
            span = max(data.max() - data.min(), 1e-9)
            assert (f(lo) <= data.min() or np.isclose(f(lo), data.min())) and f(hi) >= data.max() - 1e-9, (axis, lo, hi)
            assert f(hi) - data.max() <= 0.25 * span, f"{axis} axis runs to {hi} for data up to {data.max()}"
            assert lo == 0 or data.min() - f(lo) <= 0.25 * span, f"{axis} axis starts at {lo} for data from {data.min()}"


def figures(calibration):
    bench, latency, predicted, curves = demo_like_tables()
    found = search(calibration, 63)
    return {"tree-16": lambda: plots.tree_figure(found.tree[:16], values=found.values[:16], title="searched-16"),
            "tree-63": lambda: plots.tree_figure(found.tree, values=found.values, title="searched-63"),
            "tree-250": lambda: plots.tree_figure(search(calibration, 250).tree, title="wide"),
            "accuracy": lambda: plots.accuracy_figure(calibration.accuracy),
            "budget": lambda: plots.budget_figure(curves, measured=bench),
            "speed": lambda: plots.speed_figure(bench=bench, latency=latency, predicted=predicted),
            "speed-latency-only": lambda: plots.speed_figure(latency=latency),
            "speed-predicted-only": lambda: plots.speed_figure(predicted=predicted),
            "predicted_vs_measured": lambda: plots.predicted_vs_measured_figure(bench)}


@pytest.mark.parametrize("name", ["tree-16", "tree-63", "tree-250", "accuracy", "budget", "speed", "speed-latency-only",
                                  "speed-predicted-only", "predicted_vs_measured"])
def test_figures_are_readable(tmp_path, calibration, name):
    fig = figures(calibration)[name]()
    assert_readable(fig)
    assert_picture(plots.save(fig, tmp_path / f"{name}.png", tmp_path / f"{name}.svg"), min_bytes=5_000)
    assert_picture(tmp_path / f"{name}.svg", min_bytes=5_000)


def test_speed_axis_fits_the_sweep():
    """The issue's case: a 64-node sweep must not stretch the x axis to 88."""
    bench, latency, predicted, _ = demo_like_tables()
    ax = plots.speed_figure(bench=bench, latency=latency, predicted=predicted).axes[1]
    assert 64 <= ax.get_xlim()[1] <= 64 * 1.1
    labels = [t.get_text() for t in ax.texts]
    assert sorted(labels) == sorted(f"{m}, {v:.0f} tok/s" for m, v in zip(bench["method"][1:], bench["tokens_per_s"][1:]))


def test_tree_colour_bar_is_linear_and_labelled(calibration):
    found = search(calibration, 16)
    bar = plots.tree_figure(found.tree, values=found.values).axes[-1]
    assert "linear scale" in bar.get_ylabel()
    assert bar.get_yscale() == "linear"  # a PowerNorm's colour bar gets a 'function' scale
    assert bar.get_ylim() == pytest.approx((0.0, found.values.max()))


def test_place_labels_avoids_each_other_on_one_spot():
    fig, ax = plots.plt.subplots(figsize=(4, 3))
    ax.plot([0, 10], [0, 10], "o")
    ax.set_xlim(-1, 11)
    ax.set_ylim(-1, 11)
    plots.place_labels(ax, [(5, 5)] * 4, [f"label number {i}" for i in range(4)])
    assert_readable(fig)


def test_speed_curves_per_batch_size():
    latency = pd.DataFrame({"nodes": [0, 16, 64], "forward_ms": [10.0, 11.0, 15.0], "device": "cpu", "dtype": "float32"})
    predicted = pd.DataFrame({"nodes": [0, 8, 64], "speedup": [1.0, 1.2, 0.8]})
    by_batch = pd.concat([predicted.assign(batch_size=b, speedup=predicted["speedup"] / b) for b in (1, 4, 16)])
    fig = plots.speed_figure(latency=pd.concat([latency.assign(batch_size=b) for b in (1, 4)]), predicted=by_batch)
    labels = [[line.get_label() for line in ax.lines] for ax in fig.axes]
    assert labels[0] == ["cpu float32 batch 1", "cpu float32 batch 4"]
    assert [x for x in labels[1] if "predicted" in x] == [f"searched tree, predicted (calibration x latency), batch {b}"
                                                         for b in (1, 4, 16)]
    assert_readable(fig)


def test_plot_speed_needs_data():
    with pytest.raises(TreeoptError, match="treeopt bench"):
        plots.speed_figure()
