"""Replay: greedy Medusa decoding simulated exactly on the calibration's logged continuations.

For each prompt, with T its continuation length: t = 0, steps = 0; while t < T: d = depth of the
deepest tree path whose ranks equal r1..rd at position t; t += 1 + d; steps += 1. A step emits the
root token y_t plus the d accepted ones, so tokens/step = sum T / sum steps over prompts (the
decoder counts a verification forward the same way; the prefill is not a step). Rank -1 (past the
end of the continuation) never matches, so acceptance never runs past the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from treeopt.core.record import Calibration
from treeopt.core.errors import TreeoptError
from treeopt.core.tree import Tree


def walk(tree: Tree, ranks: np.ndarray, top_k: int):
    """Yield, for depth d = 1.., the tree node each position reaches at depth d: [N] node index
    into `tree.paths`, or len(tree) where the position's rank prefix r1..rd is not a tree path.
    Rank top_k (a miss: the token was not in the head's top-k) and -1 match no node; depths beyond
    the rank matrix's K heads are not walked (nothing can match there)."""
    n, width, cols = len(tree), max(min(tree.max_rank, top_k), 0), top_k + 1
    dead = n + 1
    # child[(node + 1) * cols + rank] -> child's node + 1; node + 1 = 0 is the root; ranks >= width
    # (misses, rank top_k, and -1, which `% cols` maps to top_k) and the row `dead` lead to `dead`
    child = np.full((n + 2) * cols, dead, np.int64)  # [(n+2) * cols]
    for i, (p, parent) in enumerate(zip(tree.paths, tree.parents)):
        if p[-1] < width:
            child[(parent + 1) * cols + p[-1]] = i + 1
    node = np.append(np.arange(-1, n), n)  # [n+2] child's node + 1 -> node index, `dead` -> n
    cur = np.zeros(len(ranks), np.int64)  # [N]
    for d in range(min(tree.depth, ranks.shape[1])):
        cur = child[cur * cols + ranks[:, d] % cols]
        yield node[cur]


def accepted_depths(tree: Tree, ranks: np.ndarray, top_k: int) -> np.ndarray:
    """[N] depth of the deepest tree path equal to each position's rank prefix (0 = root only)."""
    depth = np.zeros(len(ranks), np.int64)
    for node in walk(tree, ranks, top_k):
        depth += node < len(tree)
    return depth


def node_hits(tree: Tree, ranks: np.ndarray, top_k: int) -> np.ndarray:
    """[n] number of positions whose rank vector starts with each tree path."""
    hits = np.zeros(len(tree) + 1, np.int64)
    for node in walk(tree, ranks, top_k):
        hits += np.bincount(node, minlength=len(tree) + 1)
    return hits[: len(tree)]


@dataclass(frozen=True)
class ReplayResult:
    """Per-prompt outcome of replaying one tree: tokens (= T) and decoding steps."""

    prompt_ids: np.ndarray  # [P]
    tokens: np.ndarray  # [P]
    steps: np.ndarray  # [P]

    @property
    def tokens_per_step(self) -> float:
        return float(self.tokens.sum() / max(self.steps.sum(), 1))

    @property
    def per_prompt(self) -> pd.DataFrame:
        return pd.DataFrame({"prompt_id": self.prompt_ids, "tokens": self.tokens, "steps": self.steps,
                             "tokens_per_step": self.tokens / np.maximum(self.steps, 1)})

    def interval(self, level: float = 0.95, samples: int = 2000, seed: int = 0) -> tuple[float, float]:
        """Bootstrap interval of tokens/step, resampling prompts (each keeps its tokens and steps)."""
        return intervals([self], level, samples, seed)[0]


def intervals(results: list[ReplayResult], level: float = 0.95, samples: int = 2000,
              seed: int = 0) -> list[tuple[float, float]]:
    """`ReplayResult.interval` of several results over the same number of prompts, from one set of
    resamples (each result is resampled on its own; sharing the draws changes none of the intervals)."""
    P = len(results[0].tokens) if results else 0
    if P == 0:
        return [(float("nan"), float("nan"))] * len(results)
    draw = np.random.default_rng(seed).integers(0, P, size=(samples, P))  # [B, P] prompts drawn
    counts = np.bincount((np.arange(samples)[:, None] * P + draw).ravel(), minlength=samples * P)
    counts = counts.reshape(samples, P).astype(np.float64)  # [B, P] times each prompt is drawn
    tokens = counts @ np.stack([r.tokens for r in results], 1)  # [B, R]
    steps = counts @ np.stack([r.steps for r in results], 1)  # [B, R]
    lo, hi = np.quantile(tokens / np.maximum(steps, 1), [(1 - level) / 2, (1 + level) / 2], axis=0)  # [R] each
    return [(float(a), float(b)) for a, b in zip(lo, hi)]


@dataclass(frozen=True)
class Positions:
    """A calibration's rows ordered by (prompt, position), with each prompt's [start, end) rows."""

    ranks: np.ndarray  # [N, K]
    top_k: int
    prompt_ids: np.ndarray  # [P]
    starts: np.ndarray  # [P]
    ends: np.ndarray  # [P]


def positions(calibration: Calibration) -> Positions:
    """The calibration's rows by (prompt, position), computed once per calibration."""
    if "positions" not in calibration.memo:
        calibration.memo["positions"] = _positions(calibration)
    return calibration.memo["positions"]


def _positions(calibration: Calibration) -> Positions:
    order = np.lexsort((calibration.positions, calibration.prompt_ids))
    pid, pos = calibration.prompt_ids[order], calibration.positions[order]
    prompts, starts = np.unique(pid, return_index=True)
    ends = np.append(starts[1:], len(pid))
    expected = np.arange(len(pid)) - np.repeat(starts, ends - starts)
    if not np.array_equal(pos, expected):
        bad = int(pid[np.flatnonzero(pos != expected)[0]])
        raise TreeoptError(f"calibration rows of prompt {bad} are not positions 0..T-1 without gaps: "
                           "re-run `treeopt calibrate` for this directory")
    return Positions(calibration.ranks[order], calibration.top_k, prompts, starts, ends)


def replay(tree: Tree, calibration: Calibration | Positions) -> ReplayResult:
    """Simulate greedy Medusa decoding with `tree` on every logged continuation (module docstring)."""
    rows = calibration if isinstance(calibration, Positions) else positions(calibration)
    steps = _steps(rows, accepted_depths(tree, rows.ranks, rows.top_k)[None])[0]
    return ReplayResult(rows.prompt_ids, rows.ends - rows.starts, steps)



def replay_prefixes(tree: Tree, calibration: Calibration | Positions, sizes) -> list[ReplayResult]:
    """`replay(tree[:m])` for every m in `sizes`, walking the tree once. A greedily grown tree lists
    every node after its parent, so a position reaches depth d of tree[:m] exactly when the node it
    reaches at depth d of the whole tree has an index below m."""
    rows = calibration if isinstance(calibration, Positions) else positions(calibration)
    N, sizes = len(rows.ranks), np.minimum(np.asarray(sizes, np.int64), len(tree))
    reached = np.zeros((0, N), np.int64)  # [D, N] node reached at depth d, or len(tree)
    reached = np.concatenate([reached, *(node[None] for node in walk(tree, rows.ranks, rows.top_k))])
    chunk = max(1, (1 << 22) // max(N, 1))  # sizes replayed together: [chunk, N] arrays of at most 4M entries
    steps = [_steps(rows, (reached[None] < sizes[i:i + chunk, None, None]).sum(1))
             for i in range(0, len(sizes), chunk)]
    steps = np.concatenate(steps) if steps else np.zeros((0, len(rows.starts)), np.int64)  # [S, P]
    return [ReplayResult(rows.prompt_ids, rows.ends - rows.starts, s) for s in steps]


def concat(results: list[ReplayResult]) -> ReplayResult:
    """One result over the prompts of several (e.g. the held-out folds of a cross-validation)."""
    return ReplayResult(*(np.concatenate([getattr(r, f) for r in results]) for f in ("prompt_ids", "tokens", "steps")))


def _steps(rows: Positions, depths: np.ndarray) -> np.ndarray:
    """Steps [S, P] of each prompt's walk through its continuation, a step going 1 + the accepted
    depth at its root, for S trees at once (depths [S, N]). Walks that reach their end drop out."""
    S, N = depths.shape
    P = len(rows.starts)
    nxt = np.arange(N) + 1 + depths  # [S, N] row after one step
    nxt = np.minimum(nxt, np.repeat(rows.ends, rows.ends - rows.starts))  # no-op when -1 marks the end
    offset = np.arange(S)[:, None] * N  # [S, 1]
    flat = (nxt + offset).ravel()  # [S * N] the next row of tree s, as an index into flat
    cur = (rows.starts[None] + offset).ravel()  # [S * P] each walk's row
    ends = (rows.ends[None] + offset).ravel()  # [S * P]
    steps = np.zeros(S * P, np.int64)
    walking = np.flatnonzero(cur < ends)  # [A] walks not at their end
    while walking.size:
        steps[walking] += 1
        cur[walking] = flat[cur[walking]]
        walking = walking[cur[walking] < ends[walking]]
    return steps.reshape(S, P)
