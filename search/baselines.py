"""The trees every comparison sets beside a searched one: the best Cartesian tree, the top-1
chain and Medusa's published trees."""

from __future__ import annotations

from search.acceptance import DEFAULT_MODEL, acceptance_model
from search.grow import limits
from treeopt.core.published import BASELINES, PUBLISHED
from treeopt.core.record import Calibration
from treeopt.core.tree import Tree, truncate


def best_cartesian(calibration: Calibration, nodes: int, model: str = DEFAULT_MODEL, max_depth: int | None = None,
                   top_k: int | None = None) -> list[int]:
    """Sizes [k1, k2, ...] of the best Cartesian tree (top-k1 x top-k2 x ...) with at most `nodes`
    nodes, by exhaustive search; its value is sum_d P(r_1 < k_1, ..., r_d < k_d)."""
    depth, k = limits(calibration, max_depth, top_k)
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


def baseline_trees(calibration: Calibration, nodes: int, model: str = DEFAULT_MODEL, max_depth: int | None = None,
                   top_k: int | None = None) -> dict[str, Tree]:
    """The trees every report compares with, for a budget of `nodes`: `best_cartesian` (chosen on this
    calibration under `model`), `top1_chain` (what vLLM/TGI draft) and Medusa's published trees
    (`treeopt.core.published.BASELINES`, as published: nodes the calibration cannot see count as misses)."""
    depth, _ = limits(calibration, max_depth, top_k)
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
