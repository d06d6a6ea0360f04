"""Acceptance models, the greedy tree search, baselines, latency files and the tree-size sweep.

The value of a node (rank path) p = (i1, ..., id) is the probability that a decoding step accepts
it, i.e. that the true continuation's ranks start with p. A step accepts exactly the tree nodes on
the path to its deepest match, so the expected number of accepted tokens is the sum of the tree's
node values, and the predicted tokens/step = 1 + that sum. Three models:

- ``independent`` (the Medusa paper): value(p) = prod_j a_j^(i_j), with a_k^(i) from
  ``Calibration.accuracy`` (each head divides by its own number of valid positions).
- ``empirical``: value(p) = (positions whose rank vector starts with p) / (all positions). It keeps
  the correlation between heads. Every logged position counts in the denominator, including those
  near the end of a continuation where deeper heads have rank -1: -1 matches nothing, as in the
  decoder, which cannot accept tokens past the end either. So this is the mean number of tokens a
  step accepts when it starts at a uniformly drawn position (replay weighs positions by where steps
  actually start; `treeopt.core.replay` gives that exact figure).
- ``smoothed`` (the default): the empirical counts shrunk toward the product model, one level at a
  time: value(p) = value(parent) * (hits(p) + s * b_d^(i)) / (hits(parent) + s), where hits counts
  the positions whose ranks start with the path, b_d^(i) is head d's rank-i accuracy with half a
  pseudo-count per rank, and s, the strength in pseudo-positions, is chosen by cross-validation
  over prompts (`choose_strength`) among values > 0 (so no node has value 0 and `--nodes N` always
  gets N nodes): s = 0 would be the empirical model, s = inf is the product model. Written
  ``smoothed:S`` for a fixed S.

In all models value(child) <= value(parent). Greedy search (add the frontier node of highest
value, ties broken by (depth, path)) therefore picks the n largest values of all nodes, a set that
is closed under parents: no tree of n nodes has a larger sum, and the greedy order makes every
prefix tree[:m] optimal for m nodes, so one search to 256 answers the whole sweep.
"""

from __future__ import annotations

import heapq
import math
from functools import cached_property

import numpy as np

from treeopt.core.errors import TreeoptError
from treeopt.core.record import Calibration
from treeopt.core.replay import node_hits, positions, replay_prefixes
from treeopt.core.tree import Path as RankPath
from treeopt.core.settings import DEFAULT_ACCEPTANCE_MODEL as DEFAULT_MODEL
from treeopt.core.tree import Tree

MODELS = ("smoothed", "empirical", "independent")
# The candidates `choose_strength` cross-validates: all > 0, so every node the heads can reach has a
# nonzero value and `--nodes N` always gets N nodes (s = 0, the empirical model, gives unseen nodes 0).
STRENGTHS = (1.0, 4.0, 16.0, 64.0, math.inf)
STRENGTH_SIZES = (16, 64)  # tree sizes whose mean held-out replay chooses the strength
FALLBACK_STRENGTH = 16.0  # for a calibration of one prompt, where there is nothing to cross-validate


def prefix_levels(ranks: np.ndarray, max_depth: int, top_k: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every rank prefix that occurs, level by level: codes[d] [U_d] (sorted) and counts[d] [U_d] of the
    prefixes of length d+1. A prefix's id is its index in codes[d]; code = parent id * top_k + rank
    (the root's id is 0), so a parent's children are the codes id * top_k + 0..top_k-1."""
    alive = np.arange(len(ranks))  # rows whose prefix so far is a valid path
    uid = np.zeros(len(alive), np.int64)  # [alive] id of that prefix at the previous depth
    codes, counts = [], []
    for d in range(max_depth):
        r = ranks[alive, d].astype(np.int64)
        ok = (r >= 0) & (r < top_k)
        alive = alive[ok]
        if alive.size == 0:
            break
        row_code = uid[ok] * top_k + r[ok]  # [alive]
        count = np.bincount(row_code)  # [all codes] dense, no sort: O(rows)
        code = np.flatnonzero(count)
        uid = (np.cumsum(count > 0) - 1)[row_code]
        codes.append(code)
        counts.append(count[code])
    return codes, counts


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
        codes, counts = prefix_levels(self.ranks, max_depth, top_k)
        if not codes or nodes == 0:
            return [], np.zeros(0)
        count = np.concatenate(counts)
        depth = np.concatenate([np.full(len(c), d) for d, c in enumerate(codes)])
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


class Smoothed:
    """value(p) = value(parent) * (hits(p) + s * b[d, i]) / (hits(parent) + s) (module docstring)."""

    def __init__(self, ranks: np.ndarray, top_k: int, strength: float):
        self.top_k, self.strength = top_k, float(strength)
        self.total = len(ranks)  # the root's hits
        self.codes, self.counts = prefix_levels(ranks, ranks.shape[1], top_k)
        valid = ranks >= 0  # [N, K]
        hits = np.stack([np.bincount(ranks[valid[:, k], k], minlength=top_k + 1)[: top_k + 1]
                         for k in range(ranks.shape[1])]) if ranks.shape[1] else np.zeros((0, top_k + 1))
        self.prior = (hits[:, :top_k] + 0.5) / (valid.sum(0)[:, None] + 0.5 * (top_k + 1))  # [K, top_k]

    @property
    def name(self) -> str:
        return f"smoothed:{self.strength:g}"

    @property
    def num_heads(self) -> int:
        return self.prior.shape[0]

    def with_strength(self, strength: float) -> "Smoothed":
        """The same counts under another strength (no recount)."""
        other = object.__new__(Smoothed)
        other.__dict__.update(self.__dict__, strength=float(strength))
        return other

    def children(self, d: int, ids: np.ndarray, hits: np.ndarray, values: np.ndarray, k: int):
        """Ranks 0..k-1 below S nodes at depth d-1, given their prefix ids (-1: never observed), hits
        and values [S]: the children's ids, hits and values, each [S, k]."""
        want = ids[:, None] * self.top_k + np.arange(k)  # [S, k] the children's codes
        child_hits, child_ids = np.zeros(want.shape, np.int64), np.full(want.shape, -1)
        if d < len(self.codes):
            j = np.minimum(np.searchsorted(self.codes[d], want), len(self.codes[d]) - 1)  # [S, k]
            found = (ids[:, None] >= 0) & (self.codes[d][j] == want)
            child_hits[found], child_ids[found] = self.counts[d][j[found]], j[found]
        prior = self.prior[d, :k] if d < self.num_heads else np.zeros(k)  # [k]
        den = hits[:, None] + self.strength  # [S, 1]
        q = np.broadcast_to(prior, want.shape)  # s = inf, or nothing seen at s = 0
        if not math.isinf(self.strength):
            q = np.divide(child_hits + self.strength * prior, den, out=q.copy(), where=den > 0)
        return child_ids, child_hits, values[:, None] * q

    def _root(self):
        return np.zeros(1, np.int64), np.array([self.total]), np.ones(1)  # ids, hits, values [1]

    def values(self, tree: Tree) -> np.ndarray:
        node = {(): tuple(a[0] for a in self._root())}  # path -> (id, hits, value)

        def visit(p: RankPath):
            if p not in node:
                i, h, v = visit(p[:-1])
                if len(p) > self.num_heads or p[-1] >= self.top_k:
                    node[p] = (-1, 0, 0.0)
                else:
                    ci, ch, cv = self.children(len(p) - 1, np.array([i]), np.array([h]), np.array([v]), p[-1] + 1)
                    node[p] = (int(ci[0, -1]), int(ch[0, -1]), float(cv[0, -1]))
            return node[p]

        return np.array([visit(p)[2] for p in tree.paths], dtype=np.float64)

    def greedy(self, nodes: int, max_depth: int, top_k: int) -> tuple[list[RankPath], np.ndarray]:
        heap = []  # (-value, depth, path, id, hits)

        def push(d: int, path: RankPath, i: int, h: int, v: float):
            ci, ch, cv = (a[0].tolist() for a in self.children(d, np.array([i]), np.array([h]), np.array([v]), top_k))
            for r in range(top_k):
                heapq.heappush(heap, (-cv[r], d + 1, path + (r,), ci[r], ch[r]))

        push(0, (), 0, self.total, 1.0)
        paths, values = [], []
        while heap and len(paths) < nodes:
            neg, depth, p, i, h = heapq.heappop(heap)
            if neg == 0:  # only zero-value nodes remain: they add nothing
                break
            paths.append(p)
            values.append(-neg)
            if depth < max_depth:
                push(depth, p, i, h, -neg)
        return paths, np.array(values, dtype=np.float64)

    def cartesian_step(self, state, d: int, kmax: int):
        """As Empirical's; the state is the (ids, hits, values) of the nodes that meet the constraints above."""
        ci, ch, cv = self.children(d, *(self._root() if state is None else state), kmax)  # [S, kmax] each
        mass = np.cumsum(cv.sum(0))  # [kmax]
        return mass, lambda k: (ci[:, :k].ravel(), ch[:, :k].ravel(), cv[:, :k].ravel())


def strength_scores(calibration: Calibration, folds: int = 4, seed: int = 0) -> np.ndarray:
    """[len(STRENGTHS)] each strength's held-out score: K-fold over prompts, fit on K-1 folds, greedy
    trees of `STRENGTH_SIZES` nodes replayed on the held-out fold, mean tokens/step over those sizes."""
    groups = calibration.folds(folds, seed)
    tokens = np.zeros((len(STRENGTHS), len(STRENGTH_SIZES)))
    steps = np.zeros_like(tokens)
    for held in groups:
        fit = calibration.subset(np.setdiff1d(calibration.prompts, held))
        rows = positions(calibration.subset(held))
        for j, s in enumerate(STRENGTHS):
            paths, _ = acceptance_model(fit, f"smoothed:{s:g}").greedy(max(STRENGTH_SIZES), calibration.num_heads,
                                                                        calibration.top_k)
            for m, r in enumerate(replay_prefixes(Tree(tuple(paths)), rows, STRENGTH_SIZES)):
                tokens[j, m] += r.tokens.sum()
                steps[j, m] += r.steps.sum()
    return (tokens / np.maximum(steps, 1)).mean(1)


def choose_strength(calibration: Calibration, folds: int = 4, seed: int = 0, tie: float = 0.0) -> float:
    """The smoothing strength (of `STRENGTHS`) whose trees replay best on held-out prompts
    (`strength_scores`); equal scores go to the stronger smoothing. With `tie` > 0, scores within
    that fraction of the best count as equal (benchmarks/bench_predictions.py measures 0.1 %: no
    better on held-out prompts than the plain best)."""
    k = min(folds, len(calibration.prompts))
    if k < 2:
        return FALLBACK_STRENGTH
    score = strength_scores(calibration, k, seed)
    near_best = np.flatnonzero(score >= score.max() * (1 - tie))
    return STRENGTHS[int(near_best[-1])]  # STRENGTHS ascend: the strongest smoothing among the best


def resolve_model(calibration: Calibration, model: str = DEFAULT_MODEL) -> str:
    """The model name with its strength fixed: `smoothed` becomes `smoothed:S` (S cross-validated on
    this calibration, once); other names are returned as they are. Resolve once, then fit on subsets."""
    if model != "smoothed":
        return model
    if "strength" not in calibration.memo:
        calibration.memo["strength"] = choose_strength(calibration)
    return f"smoothed:{calibration.memo['strength']:g}"


def acceptance_model(calibration: Calibration, model: str = DEFAULT_MODEL) -> Empirical | Independent | Smoothed:
    """The fitted model called `model` (see `MODELS`), cached on the calibration."""
    key = ("acceptance_model", model)
    if key not in calibration.memo:
        calibration.memo[key] = _fit(calibration, model)
    return calibration.memo[key]


def _fit(calibration: Calibration, model: str) -> Empirical | Independent | Smoothed:
    if model == "empirical":
        return Empirical(calibration.ranks, calibration.top_k)
    if model == "independent":
        return Independent(calibration.accuracy)
    if model.split(":")[0] == "smoothed":
        name = resolve_model(calibration, model)
        try:
            strength = float(name.split(":", 1)[1])
        except ValueError:
            strength = -1.0
        if not strength >= 0:
            raise TreeoptError(f"acceptance model {model!r}: write smoothed:S with a strength S >= 0 (or inf), "
                               "or plain smoothed to cross-validate it")
        if strength == 0:
            return Smoothed(calibration.ranks, calibration.top_k, 0.0)
        return acceptance_model(calibration, "smoothed:0").with_strength(strength)  # counts once per calibration
    raise TreeoptError(f"unknown acceptance model {model!r}: use --acceptance-model smoothed, empirical or independent")


def node_values(tree: Tree, calibration: Calibration, model: str = DEFAULT_MODEL) -> np.ndarray:
    """[n] acceptance probability of each node of `tree` (0 for nodes the calibration cannot see:
    depth beyond its heads, rank beyond its top-k)."""
    return acceptance_model(calibration, model).values(tree)


def expected_tokens_per_step(tree: Tree, calibration: Calibration, model: str = DEFAULT_MODEL) -> float:
    """The uniform expectation: 1 + sum of node values (see the module docstring; the headline
    prediction is the cross-validated replay, `treeopt.search.crossval`)."""
    return 1.0 + float(node_values(tree, calibration, model).sum())
