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
  actually start; `treeopt.core.replay` gives that exact figure).

In both models value(child) <= value(parent). Greedy search (add the frontier node of highest
value, ties broken by (depth, path)) therefore picks the n largest values of all nodes, a set that
is closed under parents: no tree of n nodes has a larger sum, and the greedy order makes every
prefix tree[:m] optimal for m nodes, so one search to 256 answers the whole sweep.
"""

from __future__ import annotations

import heapq
from functools import cached_property

import numpy as np

from treeopt.core.errors import TreeoptError
from treeopt.core.record import Calibration
from treeopt.core.replay import node_hits
from treeopt.core.tree import Path as RankPath
from treeopt.core.tree import Tree

MODELS = ("empirical", "independent")


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
    raise TreeoptError(f"unknown acceptance model {model!r}: use --acceptance-model empirical or independent")


def node_values(tree: Tree, calibration: Calibration, model: str = "empirical") -> np.ndarray:
    """[n] acceptance probability of each node of `tree` (0 for nodes the calibration cannot see:
    depth beyond its heads, rank beyond its top-k)."""
    return acceptance_model(calibration, model).values(tree)


def expected_tokens_per_step(tree: Tree, calibration: Calibration, model: str = "empirical") -> float:
    """Predicted tokens/step = 1 + sum of node values."""
    return 1.0 + float(node_values(tree, calibration, model).sum())
