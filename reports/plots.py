"""Pictures of a run: the tree diagram and the charts the report shows. Matplotlib (Agg) + networkx.

Every `*_figure` function takes plain values (a Tree, arrays, DataFrames) and returns a matplotlib
Figure; `save(fig, out)` writes it as .png or .svg. None of them loads a model or reads a run
directory. Readability rules every figure keeps (checked by tests/test_plots.py): axes fitted to the
data, no two texts overlapping (`place_labels` finds each point label a free spot), colour bars
labelled with their (linear) scale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib
import matplotlib.font_manager
import matplotlib.ticker

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import networkx as nx  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

from treeopt.core.errors import TreeoptError  # noqa: E402
from treeopt.core.fileio import atomic_write  # noqa: E402
from treeopt.core.settings import DEFAULT_ACCEPTANCE_MODEL  # noqa: E402
from treeopt.core.tree import Tree  # noqa: E402

ROOT = -1  # the implicit root: the base model's own next token
CMAP = "viridis"
PATH_COLOR = "#d62728"  # the most likely path
PLAIN_NODE = "#9ecae1"  # nodes when no acceptance model is given
FORMATS = (".png", ".svg")
# One colour per method family, shared by every chart.
FAMILY_COLORS = {"searched": "#d62728", "cartesian": "#1f77b4", "medusa": "#2ca02c", "chain": "#9467bd",
                 "plain": "#7f7f7f", "other": "#8c564b"}


def save(fig, *outs: str | Path, dpi: int = 150) -> Path:
    """Write `fig` to each of `outs` (.png or .svg) atomically, close it; returns the first path."""
    outs = tuple(Path(o) for o in outs)
    for out in outs:
        if out.suffix.lower() not in FORMATS:
            plt.close(fig)
            raise TreeoptError(f"cannot write a picture to {out}: name it .png or .svg")
    for out in outs:
        atomic_write(out, lambda p: fig.savefig(p, format=out.suffix.lower()[1:], dpi=dpi, bbox_inches="tight"))
    plt.close(fig)
    return outs[0]


# ---- the tree diagram ------------------------------------------------------------------------


def tree_graph(tree: Tree, values: Sequence[float] | None = None) -> nx.DiGraph:
    """The tree as a networkx graph: node ROOT, then node n (index in tree.paths) with its rank path,
    rank (last entry), depth (= the head that proposes it) and value (acceptance probability or None)."""
    g = nx.DiGraph()
    g.add_node(ROOT, path=(), rank=None, depth=0, value=1.0 if values is not None else None)
    for n, (p, parent) in enumerate(zip(tree.paths, tree.parents)):
        g.add_node(n, path=p, rank=p[-1], depth=len(p), value=None if values is None else float(values[n]))
        g.add_edge(parent, n)
    return g


def leaf_spans(g: nx.DiGraph, gap: float = 0.0) -> dict[int, tuple[float, float]]:
    """(first, last) leaf slot under each node, leaves numbered in rank order by a depth-first walk
    (so every subtree owns a contiguous run of slots). `gap` extra slots separate leaves of different
    parents, which keeps sibling groups apart in the node-link drawing."""
    spans: dict[int, tuple[float, float]] = {}
    state = {"next": 0.0, "parent": None}

    def place(n, parent):
        children = sorted(g.successors(n), key=lambda c: g.nodes[c]["rank"])
        if not children:
            if state["parent"] is not None and state["parent"] != parent:
                state["next"] += gap
            spans[n] = (state["next"], state["next"])
            state["next"] += 1.0
            state["parent"] = parent
            return
        for c in children:
            place(c, n)
        spans[n] = (spans[children[0]][0], spans[children[-1]][1])

    place(ROOT, None)
    return spans


def leaf_order_positions(g: nx.DiGraph, gap: float = 0.4) -> dict[int, tuple[float, float]]:
    """(slot, depth) per node: leaves take consecutive slots in rank order, a parent sits midway
    between its first and last child. A clean hierarchical layout with no crossing edges."""
    pos: dict[int, tuple[float, float]] = {}

    def place(n):
        children = sorted(g.successors(n), key=lambda c: g.nodes[c]["rank"])
        for c in children:
            place(c)
        x = spans[n][0] if not children else 0.5 * (pos[children[0]][0] + pos[children[-1]][0])
        pos[n] = (x, g.nodes[n]["depth"])

    spans = leaf_spans(g, gap)
    place(ROOT)
    return pos


def most_likely_path(g: nx.DiGraph) -> list[int]:
    """From the root, always to the child most likely accepted (rank 0 first when there are no
    values): the path a decoding step accepts most often. Node ids, root excluded."""
    path, n = [], ROOT
    while True:
        children = list(g.successors(n))
        if not children:
            return path
        n = max(children, key=lambda c: (g.nodes[c]["value"] if g.nodes[c]["value"] is not None else 0.0,
                                         -g.nodes[c]["rank"]))
        path.append(n)


def _colors(g: nx.DiGraph, nodes: list[int], values) -> tuple[list, object]:
    """Fill colour per node and the norm for the colour bar (None without values): linear from 0 to
    the largest value, so equal colour steps are equal steps in probability."""
    if values is None:
        return [PLAIN_NODE] * len(nodes), None
    norm = Normalize(vmin=0.0, vmax=max(1e-9, float(np.max(values))))
    cmap = plt.get_cmap(CMAP)
    return [cmap(norm(g.nodes[n]["value"])) for n in nodes], norm


def _ink(rgba) -> str:
    """Black or white text, whichever reads on this fill."""
    r, gr, b = matplotlib.colors.to_rgb(rgba)
    return "white" if 0.299 * r + 0.587 * gr + 0.114 * b < 0.5 else "black"


def tree_figure(tree: Tree, values: Sequence[float] | None = None, title: str | None = None,
                value_label: str = "P(a decoding step accepts the node)", max_link_leaves: int = 70):
    """The tree diagram: one level per head, each node labelled with its rank within its head and
    coloured by its acceptance probability (`values`, one per node of `tree`, e.g. its path's value
    under the empirical model; a linear colour bar), the most likely path in red. Trees with at most
    `max_link_leaves` leaves are drawn as a node-link diagram growing downwards; wider ones as a compact
    left-to-right icicle (each node a block spanning its descendants), labels only where they fit."""
    if tree.num_nodes == 0:
        raise TreeoptError("the tree is empty: nothing to draw")
    if values is not None and len(values) != tree.num_nodes:
        raise TreeoptError(f"{len(values)} node values for a tree of {tree.num_nodes} nodes: "
                           "pass the calibration the tree was searched with")
    g = tree_graph(tree, values)
    leaves = sum(1 for n in g if g.out_degree(n) == 0)
    draw = _draw_links if leaves <= max_link_leaves else _draw_icicle
    fig, ax, mappable_norm = draw(g, tree.depth, values)
    if mappable_norm is not None:
        sm = matplotlib.cm.ScalarMappable(norm=mappable_norm, cmap=CMAP)
        cbar = fig.colorbar(sm, ax=ax, fraction=0.025, pad=0.01, aspect=30)
        cbar.set_label(f"{value_label}, linear scale", fontsize=9)
        cbar.ax.tick_params(labelsize=8)
    head = title or "tree"
    red = "the most likely path" if values is not None else "the top-1 path"
    ax.set_title(f"{head}: {tree.num_nodes} nodes, depth {tree.depth}\nlabel = the node's rank in its head's "
                 f"top-k; red = {red}", fontsize=10, loc="left")
    return fig


def _draw_links(g: nx.DiGraph, depth: int, values):
    """Node-link drawing, root on top, one row per head."""
    slots = leaf_order_positions(g)
    span = max(x for x, _ in slots.values()) + 1
    pitch_in = min(0.42, max(0.24, 15.0 / span))
    fig, ax = plt.subplots(figsize=(max(5.5, span * pitch_in + 2.0), 1.2 * depth + 1.9))
    pos = {n: (x, -d) for n, (x, d) in slots.items()}
    diameter = min(20.0, 0.78 * pitch_in * 72)  # marker diameter in points
    font = max(4.5, min(8.0, 0.45 * diameter))

    on_path = set(most_likely_path(g))
    path_edges = [(u, v) for u, v in g.edges if v in on_path]
    other_edges = [(u, v) for u, v in g.edges if v not in on_path]
    nodes = [n for n in g if n != ROOT]
    fills, norm = _colors(g, nodes, values)
    nx.draw_networkx_edges(g, pos, edgelist=other_edges, ax=ax, arrows=False, width=0.7, edge_color="#a0a0a0")
    nx.draw_networkx_edges(g, pos, edgelist=path_edges, ax=ax, arrows=False, width=2.4, edge_color=PATH_COLOR)
    nx.draw_networkx_nodes(g, pos, nodelist=nodes, ax=ax, node_size=diameter ** 2, node_color=fills,
                           linewidths=[2.0 if n in on_path else 0.5 for n in nodes],
                           edgecolors=[PATH_COLOR if n in on_path else "#444444" for n in nodes])
    nx.draw_networkx_nodes(g, pos, nodelist=[ROOT], ax=ax, node_shape="s", node_size=(1.6 * diameter) ** 2,
                           node_color="#e5e5e5", edgecolors="#444444", linewidths=0.8)
    for n, fill in zip(nodes, fills):
        ax.text(*pos[n], str(g.nodes[n]["rank"]), ha="center", va="center", fontsize=font, color=_ink(fill),
                fontweight="bold" if n in on_path else "normal")
    ax.text(*pos[ROOT], "root", ha="center", va="center", fontsize=font)
    for d in range(1, depth + 1):
        ax.axhline(-d, color="#eeeeee", lw=0.8, zorder=0)
        ax.text(-0.8, -d, f"head {d}", ha="right", va="center", fontsize=9, color="#555555")
    ax.set_xlim(-0.8 - 2.2 * 0.42 / pitch_in, span - 0.3)
    ax.set_ylim(-depth - 0.5, 0.5)
    ax.set_axis_off()
    return fig, ax, norm


def _draw_icicle(g: nx.DiGraph, depth: int, values):
    """Left-to-right icicle: column d holds head d's nodes, each a block as tall as its leaves."""
    spans = leaf_spans(g)
    rows = max(hi for _, hi in spans.values()) + 1
    pitch_in = 0.115
    col_w = 1.0  # data units per column; the root column is narrower
    fig, ax = plt.subplots(figsize=(2.0 * depth + 2.6, rows * pitch_in + 1.0))
    nodes = [n for n in g if n != ROOT]
    fills, norm = _colors(g, nodes, values)
    on_path = set(most_likely_path(g))
    row_pt = pitch_in * 72
    for n, fill in zip(nodes, fills):
        lo, hi = spans[n]
        d = g.nodes[n]["depth"]
        x0 = 0.35 + (d - 1) * col_w
        rect = Rectangle((x0, -hi - 1), col_w, hi - lo + 1, facecolor=fill, edgecolor="white", lw=0.4)
        ax.add_patch(rect)
        height_pt = (hi - lo + 1) * row_pt
        if height_pt >= 5.5:
            font = min(9.0, 0.8 * height_pt, 5.5 + 0.1 * height_pt)
            ax.text(x0 + 0.06, -0.5 * (lo + hi + 1), str(g.nodes[n]["rank"]), ha="left", va="center",
                    fontsize=font, color=_ink(fill), fontweight="bold" if n in on_path else "normal")
    for n in on_path:  # outline on top of the blocks
        lo, hi = spans[n]
        x0 = 0.35 + (g.nodes[n]["depth"] - 1) * col_w
        ax.add_patch(Rectangle((x0, -hi - 1), col_w, hi - lo + 1, fill=False, edgecolor=PATH_COLOR, lw=2.0))
    ax.add_patch(Rectangle((0, -rows), 0.33, rows, facecolor="#e5e5e5", edgecolor="white"))
    ax.text(0.165, -rows / 2, "root", rotation=90, ha="center", va="center", fontsize=8)
    for d in range(1, depth + 1):
        ax.text(0.35 + (d - 0.5) * col_w, 0.4, f"head {d}", ha="center", va="bottom", fontsize=9, color="#555555")
    ax.set_xlim(0, 0.35 + depth * col_w)
    ax.set_ylim(-rows, 2.2)
    ax.set_axis_off()
    return fig, ax, norm


# ---- labels --------------------------------------------------------------------------------


def _overlaps(a, b, slack: float = 0.5) -> bool:
    """Whether two display-space boxes overlap by more than `slack` pixels each way."""
    return a.x0 < b.x1 - slack and b.x0 < a.x1 - slack and a.y0 < b.y1 - slack and b.y0 < a.y1 - slack


# Candidate label offsets (points), nearest first: right, left, above, below, then farther out.
_OFFSETS = [(dx * r, dy * r) for r in (1, 2, 3, 4) for dx, dy in
            ((7, 3), (7, -10), (-7, 3), (-7, -10), (0, 9), (0, -16), (12, 12), (-12, 12), (12, -18), (-12, -18))]


def place_labels(ax, points: Sequence[tuple[float, float]], texts: Sequence[str], fontsize: float = 7,
                 marker_pt: float = 8.0) -> list:
    """Annotate each data point with its text at the first candidate offset (nearest first) whose box
    stays inside the axes and covers no other label, no point's marker and not the legend; a leader
    line joins labels placed farther out. Call after the axes limits and the layout are final."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    fig.draw_without_rendering()  # settle the layout, so display coordinates are final
    frame = ax.get_window_extent(renderer)
    scale = fig.dpi / 72.0
    half = 0.5 * marker_pt * scale
    marks = [ax.transData.transform(p) for p in points]
    taken = [Bbox([[x - half, y - half], [x + half, y + half]]) for x, y in marks]
    if ax.get_legend() is not None:
        taken.append(ax.get_legend().get_window_extent(renderer))
    prop = matplotlib.font_manager.FontProperties(size=fontsize)
    placed = []
    for (x, y), text in zip(marks, texts):
        w, h, _ = renderer.get_text_width_height_descent(text, prop, ismath=False)
        best = None
        for dx, dy in _OFFSETS:
            x0 = x + dx * scale - (w if dx < 0 else w / 2 if dx == 0 else 0)
            y0 = y + dy * scale - (h if dy < 0 else 0)
            box = Bbox([[x0 - 1, y0 - 1], [x0 + w + 1, y0 + h + 1]])
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            score = (not inside, sum(_overlaps(box, t) for t in taken), abs(dx) + abs(dy))
            if best is None or score < best[0]:
                best = (score, dx, dy, box)
            if score[:2] == (False, 0):
                break
        _, dx, dy, box = best
        far = abs(dx) > 14 or abs(dy) > 20
        placed.append(ax.annotate(text, ax.transData.inverted().transform((x, y)), xytext=(dx, dy),
                                  textcoords="offset points", fontsize=fontsize,
                                  ha="left" if dx > 0 else "right" if dx < 0 else "center",
                                  va="bottom" if dy > 0 else "top",
                                  arrowprops=dict(arrowstyle="-", color="#888888", lw=0.6) if far else None))
        taken.append(box)
    return placed


def _fit_axis(ax, values, axis: str = "x", pad: float = 0.05, floor: float | None = None, log: bool = False):
    """Axis limits fitted to the data: its range plus `pad` of it each side (a factor on a log axis),
    never below `floor`."""
    v = np.asarray([x for x in values if pd.notna(x)], dtype=float)
    if not len(v):
        return
    lo, hi = float(v.min()), float(v.max())
    if log:
        lo, hi = lo / (1 + 3 * pad), hi * (1 + 3 * pad)
    else:
        span = max(hi - lo, 1e-9 + 0.1 * abs(hi))
        lo, hi = lo - pad * span, hi + pad * span
    if floor is not None:
        lo = max(lo, floor)
    (ax.set_xlim if axis == "x" else ax.set_ylim)(lo, hi)


# ---- charts --------------------------------------------------------------------------------


def accuracy_figure(accuracy: np.ndarray, show: int | None = None, title: str = "head accuracy $a_k^{(i)}$"):
    """a_k^(i) as a heatmap: rows = heads k, columns = ranks i (0 = top-1), each cell annotated."""
    accuracy = np.asarray(accuracy, dtype=float)  # [K, top_k]
    if accuracy.ndim != 2 or accuracy.size == 0:
        raise TreeoptError(f"accuracy must be a [heads, ranks] table, got shape {accuracy.shape}")
    if show is not None and show < accuracy.shape[1]:
        title += f", ranks 0-{show - 1} of {accuracy.shape[1]}"
        accuracy = accuracy[:, :show]
    K, R = accuracy.shape
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * R + 2.5), 0.55 * K + 1.6))
    im = ax.imshow(accuracy, cmap="magma", vmin=0.0, vmax=max(1e-9, accuracy.max()), aspect="auto")
    if R <= 25:
        for k in range(K):
            for i in range(R):
                v = accuracy[k, i]
                ax.text(i, k, f"{v:.2f}"[1:] if 0 < v < 1 else f"{v:.0f}", ha="center", va="center", fontsize=7,
                        color="black" if v > 0.55 * accuracy.max() else "white")
    ax.set_xticks(range(R), [str(i) for i in range(R)], fontsize=8)
    ax.set_yticks(range(K), [f"head {k + 1}" for k in range(K)], fontsize=8)
    ax.set_xlabel("rank i (0 = the head's top-1 token)")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02).set_label("P(rank-i token is the base model's), linear",
                                                                fontsize=8)
    ax.set_title(title, fontsize=10, loc="left")
    return fig


def family(method: str) -> str:
    """The chart colour group of a method or tree name."""
    m = str(method).lower()
    for key in ("plain", "cartesian", "chain", "medusa"):
        if key in m:
            return key
    if m.startswith(("mc_", "vicuna", "zephyr")):
        return "medusa"
    if "search" in m or "greedy" in m or "tree" in m or "found" in m or "ceiling" in m:
        return "searched"
    return "other"


def budget_figure(curves: pd.DataFrame, measured: pd.DataFrame | None = None,
                  title: str = "tokens per step vs node budget"):
    """Predicted tokens/step vs nodes (log scale), one line per `method` of `curves` (columns method,
    nodes, tokens_per_step); a method whose rows all have one size is drawn as markers (e.g. Medusa's
    published trees); `measured` (method, nodes, tokens_per_step, e.g. a bench table) adds hollow
    markers. Every series is named in the legend, so no label sits on the plot."""
    need = {"method", "nodes", "tokens_per_step"}
    if not need <= set(curves.columns):
        raise TreeoptError(f"budget curves need columns {sorted(need)}, got {list(curves.columns)}")
    curves = curves[curves["nodes"] > 0]
    measured = measured[measured["nodes"] > 0] if measured is not None else curves.iloc[:0]
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    markers = iter("osD^v<>ph*" * 3)
    for method, df in curves.groupby("method", sort=False):
        df = df.sort_values("nodes")
        color = FAMILY_COLORS[family(method)]
        if df["nodes"].nunique() > 1:
            ax.plot(df["nodes"], df["tokens_per_step"], "-", color=color, lw=2.2 if family(method) == "searched" else 1.2,
                    label=str(method), marker="." if len(df) < 40 else None)
        else:
            ax.plot(df["nodes"], df["tokens_per_step"], next(markers), color=color, ms=7, ls="none", label=str(method),
                    alpha=0.8)
    for method, df in measured.groupby("method", sort=False):
        ax.plot(df["nodes"], df["tokens_per_step"], "o", mfc="none", mec=FAMILY_COLORS[family(method)], mew=1.8,
                ms=11, ls="none", label=f"{method} (measured)")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    _fit_axis(ax, list(curves["nodes"]) + list(measured["nodes"]), "x", log=True)
    _fit_axis(ax, list(curves["tokens_per_step"]) + list(measured["tokens_per_step"]), "y")
    ax.set_xlabel("nodes (candidate tokens verified per step, log scale)")
    ax.set_ylabel("tokens per decoding step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title(title + (":\nlines and filled marks predicted from the calibration, hollow marks measured"
                          if len(measured) else "\n(predicted from the calibration)"), fontsize=9, loc="left")
    fig.tight_layout()
    return fig


def _latency_panel(ax, latency: pd.DataFrame):
    """Forward ms vs tree size, one line per device/dtype (and batch size, where profiled)."""
    keys = [c for c in ("device", "dtype", "batch_size") if c in latency.columns]
    groups = latency.groupby(keys, sort=False) if keys else [((), latency)]
    for key, df in groups:
        key = key if isinstance(key, tuple) else (key,)
        label = " ".join(f"batch {v}" if k == "batch_size" else str(v) for k, v in zip(keys, key))
        df = df.sort_values("nodes")
        ax.plot(df["nodes"], df["forward_ms"], "o-", ms=3, label=label or None)
    _fit_axis(ax, latency["nodes"], "x", pad=0.03)
    ax.set_ylim(0, 1.08 * float(latency["forward_ms"].max()))
    ax.set_xlabel("tree nodes (0 = plain decoding)")
    ax.set_ylabel("forward pass (ms)")
    ax.set_title("latency of one decoding step's forward pass", fontsize=10, loc="left")
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)


def speed_figure(bench: pd.DataFrame | None = None, latency: pd.DataFrame | None = None,
                 predicted: pd.DataFrame | None = None, title: str | None = None):
    """Left: forward-pass latency vs tree size (`latency`: nodes, forward_ms, from a profile). Right:
    speedup over plain decoding vs nodes: one dot per `bench` row labelled with its name and tokens/s,
    over the searched tree's `predicted` curve (nodes, speedup: a sweep with a latency file). Panels
    without data are left out; axes span the data."""
    has = lambda df: df is not None and len(df) > 0  # noqa: E731
    panels = (["latency"] if has(latency) else []) + (["speedup"] if has(bench) or has(predicted) else [])
    if not panels:
        raise TreeoptError("no bench or latency table to plot: run `treeopt bench` or `treeopt profile` first")
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.4), squeeze=False)
    labels = None
    for ax, panel in zip(axes[0], panels):
        if panel == "latency":
            _latency_panel(ax, latency)
            continue
        rows = bench if has(bench) else pd.DataFrame(columns=["method", "nodes", "speedup"])
        is_plain = rows["method"].map(family) == "plain"  # a Series mask: also right on an empty table
        plain, dots = rows[is_plain], rows[~is_plain]
        tps = lambda r: f", {r['tokens_per_s']:.0f} tok/s" if pd.notna(r.get("tokens_per_s")) else ""  # noqa: E731
        ax.axhline(1.0, color=FAMILY_COLORS["plain"], ls="--", lw=1,
                   label="plain decoding" + (tps(plain.iloc[0]) if len(plain) else ""))
        xs, ys = [0] + list(dots["nodes"]), [1.0] + list(dots["speedup"])
        if has(predicted):  # one curve per batch size (a sweep's batch_size column; none: batch 1)
            p = predicted.dropna(subset=["speedup"])
            curves = list(p.groupby("batch_size")) if "batch_size" in p.columns else [(1, p)]
            for i, (b, p) in enumerate(curves):
                p = p.sort_values("nodes")
                ax.plot(p["nodes"], p["speedup"], "-", color=FAMILY_COLORS["searched"], lw=1.2,
                        alpha=0.6 if len(curves) == 1 else 0.3 + 0.7 * (i + 1) / len(curves),
                        label="searched tree, predicted (calibration x latency)" + (f", batch {b}" if len(curves) > 1 else ""))
                xs, ys = xs + list(p["nodes"]), ys + list(p["speedup"])
        for _, r in dots.iterrows():
            ax.plot(r["nodes"], r["speedup"], "o", color=FAMILY_COLORS[family(r["method"])], ms=7)
        _fit_axis(ax, xs, "x", pad=0.04)
        _fit_axis(ax, ys + [0.0], "y", pad=0.12, floor=0.0)
        ax.set_xlabel("tree nodes")
        ax.set_ylabel("speedup over plain decoding (tokens/s ratio)")
        ax.set_title("speedup over plain decoding" + (": measured (dots)" if len(dots) else ""), fontsize=10, loc="left")
        ax.legend(fontsize=8, loc="lower left" if dots["nodes"].max() > 0.5 * ax.get_xlim()[1] else "lower right")
        ax.grid(alpha=0.3)
        labels = (ax, list(zip(dots["nodes"], dots["speedup"])), [f"{r['method']}{tps(r)}" for _, r in dots.iterrows()])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if labels is not None:
        place_labels(*labels)
    return fig


def predicted_vs_measured_figure(bench: pd.DataFrame, title: str = "predicted vs measured tokens per step"):
    """One point per benched tree: the calibration's prediction against the decoder's measurement."""
    df = bench.dropna(subset=["predicted_tokens_per_step", "tokens_per_step"])
    df = df[df["method"].map(family) != "plain"]
    if df.empty:
        raise TreeoptError("the bench has no predicted tokens/step: bench trees searched from a calibration")
    fig, ax = plt.subplots(figsize=(5.2, 5.0))
    both = pd.concat([df["predicted_tokens_per_step"], df["tokens_per_step"]]).astype(float)
    pad = 0.12 * max(float(both.max() - both.min()), 0.2)
    lo, hi = max(1.0, float(both.min()) - pad), float(both.max()) + pad
    ax.plot([lo, hi], [lo, hi], "--", color="#999999", lw=1, label="measured = predicted")
    for _, r in df.iterrows():
        ax.plot(r["predicted_tokens_per_step"], r["tokens_per_step"], "o", ms=7, color=FAMILY_COLORS[family(r["method"])])
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel("predicted tokens/step (calibration)")
    ax.set_ylabel("measured tokens/step (decoder, held-out prompts)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title, fontsize=10, loc="left")
    fig.tight_layout()
    place_labels(ax, list(zip(df["predicted_tokens_per_step"], df["tokens_per_step"])), list(df["method"].astype(str)))
    return fig


# ---- the CLI's twin ------------------------------------------------------------------------


def draw_tree(spec: str | Path, out: str | Path, calibration: str | Path | None = None,
              model: str = DEFAULT_ACCEPTANCE_MODEL) -> Path:
    """`treeopt plot`: the diagram of a tree spec (file, published name or list string), coloured by
    each node's acceptance probability under `calibration` (a calibration directory) when given."""
    from treeopt.core.treefile import read_tree_meta

    tree, meta = read_tree_meta(spec)
    name = Path(str(spec)).stem if Path(str(spec)).is_file() else str(spec) if len(str(spec)) < 40 else "tree"
    values, title = None, name
    if calibration is not None:
        from treeopt.core.record import load_calibration
        from treeopt.search.acceptance import node_values

        cal = load_calibration(calibration)
        values = node_values(tree, cal, model)
        title = f"{name}, predicted {1 + values.sum():.2f} tokens/step ({model} model on {Path(calibration).name})"
    return save(tree_figure(tree, values=values, title=title,
                            value_label=f"P(node accepted), {model} model" if values is not None else ""), out)
