"""Acceptance models, the greedy tree search, baselines, latency files and the tree-size sweep.

The value of a node (rank path) p = (i1, ..., id) is the probability that a decoding step accepts
it, i.e. that the true continuation's ranks start with p. A step accepts exactly the tree nodes on
the path to its deepest match, so the expected number of accepted tokens is the sum of the tree's
node values, and the predicted tokens/step = 1 + that sum. Two models:

- ``independent`` (the Medusa paper): value(p) = prod_j a_j^(i_j), with a_k^(i) from
  ``Calibration.accuracy`` (each head divides by its own number of valid positions).
- ``empirical``: value(p) = (positions whose rank vector starts with p) / (all positions). It keeps
  the correlation between heads. Every logged position counts in the denominator, including those
  near the end of a continuation where deeper heads have rank -1: -1 matches nothing, as in the
  decoder, which cannot accept tokens past the end either. So this is the mean number of tokens a
  step accepts when it starts at a uniformly drawn position (replay weighs positions by where steps
  actually start; `treeopt.replay` gives that exact figure).

In both models value(child) <= value(parent). Greedy search (add the frontier node of highest
value, ties broken by (depth, path)) therefore picks the n largest values of all nodes, a set that
is closed under parents: no tree of n nodes has a larger sum, and the greedy order makes every
prefix tree[:m] optimal for m nodes, so one search to 256 answers the whole sweep.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from calibrate.format import Calibration
from treeopt.errors import TreeoptError
from treeopt.replay import node_hits
from treeopt.tree import Path as RankPath
from treeopt.tree import Tree

MODELS = ("empirical", "independent")


# ---- acceptance models ---------------------------------------------------------------------------


class Empirical:
    """value(p) = fraction of positions whose rank vector starts with p (see the module docstring)."""

    name = "empirical"

    def __init__(self, ranks: np.ndarray, top_k: int):
        self.ranks, self.top_k = ranks, top_k  # [N, K]
        self.total = max(len(ranks), 1)

    @property
    def num_heads(self) -> int:
        return self.ranks.shape[1]

    def values(self, tree: Tree) -> np.ndarray:
        return node_hits(tree, self.ranks, self.top_k) / self.total  # [n]

    def greedy(self, nodes: int, max_depth: int, top_k: int) -> tuple[list[RankPath], np.ndarray]:
        # Every rank prefix that occurs, level by level. At depth d a prefix's id is its rank among
        # the depth-d prefixes in lexicographic order: code = parent id * top_k + rank, np.unique sorts.
        alive = np.arange(len(self.ranks))  # rows whose prefix so far is a valid path
        uid = np.zeros(len(alive), np.int64)  # [alive] id of that prefix at the previous depth
        codes, counts, depths = [], [], []
        for d in range(max_depth):
            r = self.ranks[alive, d].astype(np.int64)
            ok = (r >= 0) & (r < top_k)
            alive = alive[ok]
            if alive.size == 0:
                break
            code, uid, count = np.unique(uid[ok] * top_k + r[ok], return_inverse=True, return_counts=True)
            codes.append(code)
            counts.append(count)
            depths.append(np.full(len(code), d))
        if not codes or nodes == 0:
            return [], np.zeros(0)
        count, depth = np.concatenate(counts), np.concatenate(depths)
        lex = np.concatenate([np.arange(len(c)) for c in codes])
        # Keep the n largest counts (with all ties at the threshold) before the exact sort.
        if len(count) > nodes:
            threshold = np.partition(count, len(count) - nodes)[len(count) - nodes]
            keep = np.flatnonzero(count >= threshold)
        else:
            keep = np.arange(len(count))
        order = keep[np.lexsort((lex[keep], depth[keep], -count[keep]))][:nodes]

        def path(d: int, i: int) -> RankPath:
            c = int(codes[d][i])
            return (c,) if d == 0 else path(d - 1, c // top_k) + (c % top_k,)

        return [path(int(depth[j]), int(lex[j])) for j in order], count[order] / self.total

    def cartesian_step(self, state, d: int, kmax: int):
        """P(r_1 < k_1, ..., r_d < k_d) for k_d = 1..kmax given the cells `state` that meet the
        constraints above; and a function giving the cells of the child state k_d = k."""
        cells, weight = self._cells
        state = np.arange(len(cells)) if state is None else state
        r = cells[state, d]  # misses and -1 are top_k here: never < k
        mass = np.cumsum(np.bincount(r, weights=weight[state], minlength=kmax + 1)[:kmax]) / self.total
        return mass, lambda k: state[r < k]

    @cached_property
    def _cells(self) -> tuple[np.ndarray, np.ndarray]:
        """The distinct rank vectors [C, K] (-1 mapped to top_k: both never accepted) and their counts [C]."""
        clipped = np.where(self.ranks < 0, self.top_k, self.ranks).astype(np.int64)  # [N, K]
        base = self.top_k + 1
        if base ** self.num_heads < 2**62:  # fast path: one integer per row
            code = clipped @ (base ** np.arange(self.num_heads, dtype=np.int64))
            code, first, count = np.unique(code, return_index=True, return_counts=True)
            return clipped[first], count
        cells, count = np.unique(clipped, axis=0, return_counts=True)
        return cells, count


class Independent:
    """value(p) = prod_j a[j, p_j], a = Calibration.accuracy [K, top_k]."""

    name = "independent"

    def __init__(self, accuracy: np.ndarray):
        self.accuracy = accuracy  # [K, top_k]
        self.top_k = accuracy.shape[1]

    @property
    def num_heads(self) -> int:
        return self.accuracy.shape[0]

    def value(self, path: RankPath) -> float:
        v = 1.0
        for j, i in enumerate(path):
            v *= float(self.accuracy[j, i]) if j < self.num_heads and i < self.top_k else 0.0
        return v

    def values(self, tree: Tree) -> np.ndarray:
        return np.array([self.value(p) for p in tree.paths], dtype=np.float64)

    def greedy(self, nodes: int, max_depth: int, top_k: int) -> tuple[list[RankPath], np.ndarray]:
        a = self.accuracy.tolist()
        heap = [(-a[0][i], 1, (i,)) for i in range(top_k)]  # (-value, depth, path)
        heapq.heapify(heap)
        paths, values = [], []
        while heap and len(paths) < nodes:
            neg, depth, p = heapq.heappop(heap)
            if neg == 0:  # only zero-value nodes remain: they add nothing
                break
            paths.append(p)
            values.append(-neg)
            if depth < max_depth:
                for i in range(top_k):
                    heapq.heappush(heap, (neg * a[depth][i], depth + 1, p + (i,)))
        return paths, np.array(values, dtype=np.float64)

    def cartesian_step(self, state, d: int, kmax: int):
        mass = (1.0 if state is None else state) * np.cumsum(self.accuracy[d, :kmax])  # [kmax]
        return mass, lambda k: mass[k - 1]


def acceptance_model(calibration: Calibration, model: str = "empirical") -> Empirical | Independent:
    if model == "empirical":
        return Empirical(calibration.ranks, calibration.top_k)
    if model == "independent":
        return Independent(calibration.accuracy)
    raise TreeoptError(f"unknown acceptance model {model!r}: use --model empirical or --model independent")


def _limits(calibration: Calibration, max_depth: int | None, top_k: int | None) -> tuple[int, int]:
    K, k = calibration.num_heads, calibration.top_k
    if max_depth is not None and max_depth < 1:
        raise TreeoptError(f"--max-depth {max_depth} must be at least 1")
    if top_k is not None and not 1 <= top_k <= k:
        raise TreeoptError(f"--top-k {top_k} must be between 1 and the calibration's top-k {k}: "
                           f"re-run calibrate with a larger --top-k to search wider trees")
    return min(max_depth or K, K), top_k or k


def truncate(tree: Tree, num_heads: int, top_k: int) -> Tree:
    """The subtree a calibration of `num_heads` heads and top-`top_k` ranks can evaluate."""
    return Tree(tuple(p for p in tree.paths if len(p) <= num_heads and max(p) < top_k))


# ---- predictions ---------------------------------------------------------------------------------


def node_values(tree: Tree, calibration: Calibration, model: str = "empirical") -> np.ndarray:
    """[n] acceptance probability of each node of `tree` (0 for nodes the calibration cannot see:
    depth beyond its heads, rank beyond its top-k)."""
    return acceptance_model(calibration, model).values(tree)


def expected_tokens_per_step(tree: Tree, calibration: Calibration, model: str = "empirical") -> float:
    """Predicted tokens/step = 1 + sum of node values."""
    return 1.0 + float(node_values(tree, calibration, model).sum())


@dataclass(frozen=True)
class SearchResult:
    """A greedily grown tree: every prefix tree[:m] is the optimal m-node tree under `model`."""

    tree: Tree
    values: np.ndarray  # [n] node values, in tree order (non-increasing)
    model: str
    requested: int  # nodes asked for (the tree is smaller only when no other node has value > 0)
    meta: dict = field(default_factory=dict)

    @property
    def tokens_per_step(self) -> float:
        return 1.0 + float(self.values.sum())

    @property
    def curve(self) -> np.ndarray:
        """[n+1] predicted tokens/step of tree[:m] for m = 0..n."""
        return 1.0 + np.concatenate([[0.0], np.cumsum(self.values)])

    def __getitem__(self, item: slice) -> "SearchResult":
        return SearchResult(self.tree[item], self.values[item], self.model, len(self.tree[item]), self.meta)


def search(calibration: Calibration, nodes: int, model: str = "empirical", max_depth: int | None = None,
           top_k: int | None = None) -> SearchResult:
    """The optimal `nodes`-node tree under `model`, grown greedily (see the module docstring)."""
    if nodes < 0:
        raise TreeoptError(f"--nodes {nodes} must be 0 or more (or `auto` with --latency)")
    depth, k = _limits(calibration, max_depth, top_k)
    paths, values = acceptance_model(calibration, model).greedy(nodes, depth, k)
    return SearchResult(Tree(tuple(paths)), values, model, nodes,
                        {"max_depth": depth, "top_k": k, "positions": calibration.num_positions})


def best_chain_length(calibration: Calibration, model: str = "empirical", latency: "Latency | None" = None,
                      max_length: int | None = None) -> int:
    """Chain length to give servers that draft a top-1 chain (vLLM `num_speculative_tokens`, TGI
    `--speculate`). With a latency file: the length that maximizes predicted tokens/s. Without one:
    the longest chain (up to `max_length` and the number of heads) whose last node still has a
    nonzero acceptance probability, i.e. the most tokens/step a chain can reach."""
    K = min(calibration.num_heads, max_length if max_length is not None else calibration.num_heads)
    values = node_values(Tree.chain(K), calibration, model)  # [K]
    if latency is not None:
        tps = latency.tokens_per_second(1.0 + np.concatenate([[0.0], np.cumsum(values)]), np.arange(K + 1))
        if np.isfinite(tps[1:]).any():
            return int(np.nanargmax(tps[1:])) + 1
    return int(np.flatnonzero(values > 0)[-1]) + 1 if (values > 0).any() else 0


# ---- baselines -----------------------------------------------------------------------------------


def best_cartesian(calibration: Calibration, nodes: int, model: str = "empirical", max_depth: int | None = None,
                   top_k: int | None = None) -> list[int]:
    """Sizes [k1, k2, ...] of the best Cartesian tree (top-k1 x top-k2 x ...) with at most `nodes`
    nodes, by exhaustive search; its value is sum_d P(r_1 < k_1, ..., r_d < k_d)."""
    depth, k = _limits(calibration, max_depth, top_k)
    m = acceptance_model(calibration, model)
    best: list = [-1.0, 0, []]  # value, nodes, ks

    def dfs(d: int, state, ks: list[int], size: int, width: int, value: float):
        mass, child = m.cartesian_step(state, d, k)  # [k]
        for kd in range(1, k + 1):
            n = size + width * kd
            if n > nodes:
                break
            v = value + float(mass[kd - 1])
            if v > best[0] or (v == best[0] and n < best[1]):
                best[:] = [v, n, ks + [kd]]
            if d + 1 < depth:
                dfs(d + 1, child(kd), ks + [kd], n, width * kd, v)

    if nodes >= 1:
        dfs(0, None, [], 0, 1, 0.0)
    return best[2]


def baseline_trees(calibration: Calibration, nodes: int, model: str = "empirical", max_depth: int | None = None,
                   top_k: int | None = None) -> dict[str, Tree]:
    """The trees every report compares with, for a budget of `nodes`: `best_cartesian` (chosen on this
    calibration under `model`), `top1_chain` (what vLLM/TGI draft) and Medusa's published trees
    (`treeopt.published.BASELINES`, as published: nodes the calibration cannot see count as misses)."""
    from treeopt.published import BASELINES, PUBLISHED

    depth, _ = _limits(calibration, max_depth, top_k)
    ks = best_cartesian(calibration, nodes, model, max_depth, top_k)
    trees = {"best_cartesian": Tree.cartesian(ks) if ks else Tree(()), "top1_chain": Tree.chain(min(nodes, depth))}
    trees.update({name: Tree(tuple(map(tuple, PUBLISHED[name]))) for name in BASELINES})
    return trees


def describe(tree: Tree, calibration: Calibration) -> str:
    """A short note: a Cartesian tree's shape, or how much of the tree the calibration can see."""
    seen = truncate(tree, calibration.num_heads, calibration.top_k)
    if len(seen) < len(tree):
        return (f"only {len(seen)} of its nodes fit {calibration.num_heads} heads x top-{calibration.top_k}; "
                "the rest count as misses")
    widths = [len({p[d] for p in tree.paths if len(p) > d}) for d in range(tree.depth)]
    if tree.num_nodes > 1 and tree == Tree.cartesian(widths):
        return "x".join(map(str, widths))
    return ""


# ---- latency -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Latency:
    """Forward time of one decoding step vs tree size, from `treeopt profile` (nodes 0 = plain decoding)."""

    nodes: np.ndarray  # [M] sorted, distinct
    forward_ms: np.ndarray  # [M]
    source: str = ""
    meta: dict = field(default_factory=dict)

    def forward(self, nodes) -> np.ndarray:
        """Forward ms at the given tree sizes, interpolated linearly; NaN outside the profiled range."""
        n = np.asarray(nodes, dtype=np.float64)
        ms = np.interp(n, self.nodes, self.forward_ms)
        return np.where((n >= self.nodes[0]) & (n <= self.nodes[-1]), ms, np.nan)

    def tokens_per_second(self, tokens_per_step, nodes) -> np.ndarray:
        return np.asarray(tokens_per_step, dtype=np.float64) / self.forward(nodes) * 1000.0


def read_latency(path: str | Path) -> Latency:
    """Read a latency CSV: columns `nodes` (tree size, root excluded) and `forward_ms`, plus optional
    descriptive columns (device, dtype, model). Repeated sizes are combined by their median."""
    path = Path(path)
    if not path.is_file():
        raise TreeoptError(f"latency file {path} not found: write one with `treeopt profile -o {path}`")
    try:
        df = pd.read_csv(path)
    except Exception as e:  # pandas raises many types for damaged files
        raise TreeoptError(f"latency file {path} is not a readable CSV ({type(e).__name__}): "
                           "re-run `treeopt profile`") from None
    if not {"nodes", "forward_ms"} <= set(df.columns):
        raise TreeoptError(f"latency file {path} lacks the columns nodes,forward_ms: re-run `treeopt profile`")
    nodes = pd.to_numeric(df["nodes"], errors="coerce")
    ms = pd.to_numeric(df["forward_ms"], errors="coerce")
    if df.empty or nodes.isna().any() or ms.isna().any() or (nodes < 0).any() or (nodes % 1 != 0).any() or (ms <= 0).any():
        raise TreeoptError(f"latency file {path} needs integer nodes >= 0 and positive forward_ms on every row: "
                           "re-run `treeopt profile`")
    table = pd.DataFrame({"nodes": nodes.astype(np.int64), "ms": ms}).groupby("nodes")["ms"].median()
    meta = {c: str(df[c].iloc[0]) for c in df.columns if c not in ("nodes", "forward_ms")}
    return Latency(table.index.to_numpy(), table.to_numpy(np.float64), str(path), meta)


def choose_nodes(result: SearchResult, latency: Latency) -> int:
    """The prefix size m >= 1 of a greedy search that maximizes predicted tokens/s."""
    tps = latency.tokens_per_second(result.curve, np.arange(len(result.curve)))  # [n+1]
    if len(tps) < 2 or not np.isfinite(tps[1:]).any():
        raise TreeoptError(f"latency file {latency.source} covers no tree size from 1 to {len(tps) - 1}: "
                           "profile the sizes you search (`treeopt profile`)")
    return int(np.nanargmax(tps[1:])) + 1


def search_auto(calibration: Calibration, latency: Latency, model: str = "empirical", max_nodes: int = 256,
                max_depth: int | None = None, top_k: int | None = None) -> SearchResult:
    """`--nodes auto`: the greedy tree whose size maximizes predicted tokens/s (sizes the latency
    file covers, up to `max_nodes`)."""
    full = search(calibration, min(max_nodes, int(latency.nodes[-1])), model, max_depth, top_k)
    n = choose_nodes(full, latency)
    return SearchResult(full.tree[:n], full.values[:n], model, n, {**full.meta, "nodes": "auto"})


# ---- sweep ---------------------------------------------------------------------------------------


def sweep(calibration: Calibration, max_nodes: int = 256, model: str = "empirical", latency: Latency | None = None,
          max_depth: int | None = None, top_k: int | None = None, replayed: bool = False) -> pd.DataFrame:
    """Predicted tokens/step of the optimal tree for every size 0..max_nodes (one greedy search: its
    prefixes), plus forward_ms, tokens/s and speedup over size 0 given a latency file, and the
    replayed tokens/step if `replayed`. Stops early when no further node has nonzero value."""
    from treeopt.replay import positions, replay

    result = search(calibration, max_nodes, model, max_depth, top_k)
    n = np.arange(len(result.curve))
    df = pd.DataFrame({"nodes": n, "tokens_per_step": result.curve})
    if replayed:
        rows = positions(calibration)
        df["replayed_tokens_per_step"] = [replay(result.tree[:m], rows).tokens_per_step for m in n]
    if latency is not None:
        df["forward_ms"] = latency.forward(n)
        df["tokens_per_s"] = latency.tokens_per_second(df["tokens_per_step"], n)
        df["speedup"] = df["tokens_per_s"] / (1000.0 / latency.forward(0))
    return df


# ---- comparing trees -----------------------------------------------------------------------------


def compare(trees: Mapping[str, Tree], calibration: Calibration, model: str = "empirical",
            fit: Calibration | None = None, latency: Latency | None = None) -> pd.DataFrame:
    """One row per tree: nodes, depth, tokens/step predicted by `model` on `fit` (default: the same
    calibration), tokens/step replayed on `calibration` with a 95 % bootstrap interval over prompts,
    and predicted tokens/s from the replayed figure given a latency file."""
    from treeopt.replay import positions, replay

    fit = fit if fit is not None else calibration
    rows, eval_rows = [], positions(calibration)
    for name, tree in trees.items():
        r = replay(tree, eval_rows)
        lo, hi = r.interval()
        row = {"tree": name, "nodes": tree.num_nodes, "depth": tree.depth,
               "predicted": expected_tokens_per_step(tree, fit, model), "replayed": r.tokens_per_step,
               "ci_low": lo, "ci_high": hi}
        if latency is not None:
            row["forward_ms"] = float(latency.forward(tree.num_nodes))
            row["tokens_per_s"] = float(latency.tokens_per_second(r.tokens_per_step, tree.num_nodes))
        rows.append({**row, "note": describe(tree, calibration)})
    return pd.DataFrame(rows)


def split_prompts(calibration: Calibration, split: float, seed: int = 0) -> tuple[Calibration, Calibration]:
    """(fit, held-out): a random `split` fraction of the prompts and the rest."""
    prompts = np.unique(calibration.prompt_ids)
    n_fit = int(round(split * len(prompts)))
    if not 0 < split < 1 or not 0 < n_fit < len(prompts):
        raise TreeoptError(f"--split {split} leaves no prompt on one side ({len(prompts)} prompts): "
                           "use a fraction like 0.8 and a calibration with more prompts")
    perm = np.random.default_rng(seed).permutation(prompts)
    return calibration.subset(perm[:n_fit]), calibration.subset(perm[n_fit:])


def evaluate(trees: Mapping[str, Tree], calibration: Calibration, model: str = "empirical",
             split: float | None = None, seed: int = 0, latency: Latency | None = None,
             baselines: bool = True) -> pd.DataFrame:
    """Compare `trees` with the baselines at the first tree's size (see `compare`). With `split`,
    fit on that fraction of the prompts (predictions, the best Cartesian tree and a tree searched
    there at each given tree's size) and replay on the held-out rest."""
    fit, held = split_prompts(calibration, split, seed) if split is not None else (calibration, calibration)
    trees = dict(trees)
    if split is not None:
        for n in dict.fromkeys(t.num_nodes for t in list(trees.values())):
            trees[f"searched on fit split ({n})"] = search(fit, n, model).tree
    if baselines and trees:
        n = next(iter(trees.values())).num_nodes
        trees.update({k: v for k, v in baseline_trees(fit, n, model).items() if k not in trees})
    return compare(trees, held, model, fit=fit, latency=latency)


# ---- text ----------------------------------------------------------------------------------------


def render_table(df: pd.DataFrame, digits: int = 3) -> str:
    """Plain aligned text: numbers right-aligned with `digits` decimals, text left-aligned."""
    def fmt(v) -> str:
        if isinstance(v, (float, np.floating)):
            return "" if np.isnan(v) else f"{v:.{digits}f}"
        return str(v)

    cols = list(df.columns)
    cells = [cols] + [[fmt(v) for v in row] for row in zip(*(df[c].tolist() for c in cols))]
    width = [max(len(r[i]) for r in cells) for i in range(len(cols))]
    numeric = [pd.api.types.is_numeric_dtype(df[c]) for c in cols]
    return "\n".join("  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(r, width, numeric)).rstrip()
                     for r in cells)


# ---- the CLI's library twins ---------------------------------------------------------------------


def _header(calibration: Calibration) -> str:
    prompts = len(np.unique(calibration.prompt_ids))
    return (f"calibration {calibration.directory}: {calibration.num_positions} positions, {prompts} prompts, "
            f"{calibration.num_heads} heads, top-{calibration.top_k}")


def search_report(calibration: str | Path, nodes: int | str = 64, model: str = "empirical",
                  max_depth: int | None = None, top_k: int | None = None, latency: str | Path | None = None,
                  max_nodes: int = 256, out: str | Path | None = None, format: str | None = None
                  ) -> tuple[SearchResult, pd.DataFrame, str]:
    """`treeopt search`: search, compare with the baselines, write the tree file; returns the result,
    the comparison table and the text to print."""
    from calibrate.format import load_calibration
    from treeopt.published import BASELINES, PUBLISHED
    from treeopt.treefile import write_tree

    cal = load_calibration(calibration)
    lat = read_latency(latency) if latency is not None else None
    if str(nodes) == "auto":
        if lat is None:
            raise TreeoptError("--nodes auto needs --latency FILE (forward time vs tree size, from `treeopt profile`)")
        result = search_auto(cal, lat, model, max_nodes, max_depth, top_k)
    else:
        try:
            n = int(nodes)
        except ValueError:
            raise TreeoptError(f"--nodes {nodes!r} is not a number: pass e.g. --nodes 64, or --nodes auto") from None
        result = search(cal, n, model, max_depth, top_k)
    tree = result.tree
    chain = best_chain_length(cal, model, lat)
    trees = {f"searched ({model})": tree}
    published = len(PUBLISHED[BASELINES[0]])
    if tree.num_nodes != published:  # the searched tree at the published trees' size, for a like-for-like row
        trees[f"searched, {published} nodes"] = search(cal, published, model, max_depth, top_k).tree
    trees.update(baseline_trees(cal, tree.num_nodes, model, max_depth, top_k))
    table = compare(trees, cal, model, latency=lat)
    meta = {"predicted_tokens_per_step": result.tokens_per_step, "replayed_tokens_per_step": float(table["replayed"][0]),
            "acceptance_model": model, "calibration": str(cal.directory), "calibration_positions": cal.num_positions,
            "num_heads": cal.num_heads, "calibration_top_k": cal.top_k, "max_depth": result.meta["max_depth"],
            "top_k": result.meta["top_k"], "nodes_requested": str(nodes) if str(nodes) == "auto" else result.requested,
            "best_chain_length": chain, "node_values": result.values.round(6).tolist()}
    if lat is not None:
        meta.update({"latency": lat.source, "forward_ms": float(table["forward_ms"][0]),
                     "predicted_tokens_per_s": float(lat.tokens_per_second(result.tokens_per_step, tree.num_nodes))})
    lines = [_header(cal),
             f"searched tree: {tree.num_nodes} nodes, depth {tree.depth}, max rank {tree.max_rank - 1}, "
             f"{model} model" + (f" (--nodes auto: best predicted tokens/s of sizes 1..{min(max_nodes, int(lat.nodes[-1]))})"
                                 if str(nodes) == "auto" else "")]
    if tree.num_nodes < result.requested:
        lines.append(f"note: only {tree.num_nodes} nodes have a nonzero acceptance probability; the tree stops there")
    lines += ["", render_table(table), "",
              "predicted: 1 + sum of node values under the model; replayed: exact greedy decoding replayed on the "
              "logged continuations (95 % bootstrap interval over prompts)",
              f"best top-1 chain length for vLLM num_speculative_tokens / TGI --speculate: {chain}"
              + ("" if lat is not None else " (pass --latency for the length with the best tokens/s)")]
    if out is not None:
        path = write_tree(tree, out, format, **meta)
        lines.append(f"wrote {path}")
    return result, table, "\n".join(lines)


def evaluate_report(trees: list[str], calibration: str | Path, model: str = "empirical", split: float | None = None,
                    seed: int = 0, latency: str | Path | None = None) -> tuple[pd.DataFrame, str]:
    """`treeopt evaluate`: replay tree files (and the baselines) on a calibration."""
    from calibrate.format import load_calibration
    from treeopt.treefile import read_tree

    cal = load_calibration(calibration)
    lat = read_latency(latency) if latency is not None else None
    named = {spec: read_tree(spec) for spec in trees}
    table = evaluate(named, cal, model, split, seed, lat)
    how = (f"predicted on a {split:.0%} fit split, replayed on the other {1 - split:.0%} of prompts (seed {seed})"
           if split is not None else "predicted and replayed on the whole calibration")
    return table, "\n".join([_header(cal), how, "", render_table(table)])


def sweep_report(calibration: str | Path, max_nodes: int = 256, model: str = "empirical",
                 latency: str | Path | None = None, max_depth: int | None = None, top_k: int | None = None,
                 replayed: bool = False, out: str | Path | None = None) -> tuple[pd.DataFrame, str]:
    """`treeopt sweep`: the optimal tree's tokens/step (and tokens/s) for every size 0..max_nodes."""
    from calibrate.format import load_calibration
    from treeopt.fileio import atomic_write

    cal = load_calibration(calibration)
    lat = read_latency(latency) if latency is not None else None
    df = sweep(cal, max_nodes, model, lat, max_depth, top_k, replayed)
    lines = [_header(cal), f"{model} model; row N = the first N nodes of one greedy search", "", render_table(df)]
    if lat is not None and df["tokens_per_s"].notna().iloc[1:].any():
        best = df.iloc[1:]["tokens_per_s"].idxmax()
        speedup = df["speedup"][best]
        lines.append(f"best predicted tokens/s at N = {int(df['nodes'][best])}: {df['tokens_per_s'][best]:.1f}"
                     + ("" if np.isnan(speedup) else f" ({speedup:.2f}x plain decoding)"))
    base = compare(baseline_trees(cal, int(df["nodes"].iloc[-1]), model, max_depth, top_k), cal, model, latency=lat)
    lines += ["", f"baselines (best Cartesian tree within N = {int(df['nodes'].iloc[-1])} nodes):", render_table(base),
              f"best top-1 chain length for vLLM num_speculative_tokens / TGI --speculate: "
              f"{best_chain_length(cal, model, lat)}"]
    if out is not None:
        atomic_write(out, lambda p: df.to_csv(p, index=False))
        lines.append(f"wrote {out}")
    return df, "\n".join(lines)
