"""The trees every comparison sets beside a searched one: the best Cartesian tree, the top-1
chain and Medusa's published trees."""

from __future__ import annotations

from treeopt.search.acceptance import DEFAULT_MODEL
from treeopt.search.grow import limits
from treeopt.search.source import Record, as_source
from treeopt.search.targets import cartesian_shape
from treeopt.core.published import BASELINES, PUBLISHED
from treeopt.core.tree import Tree, truncate


def best_cartesian(record: Record, nodes: int, model: str = DEFAULT_MODEL, max_depth: int | None = None,
                   top_k: int | None = None) -> list[int]:
    """Sizes [k1, k2, ...] of the best Cartesian tree with at most `nodes` nodes (see
    `treeopt.search.targets.cartesian_shape`)."""
    source = as_source(record, model)
    return cartesian_shape(source, nodes, *limits(source, max_depth, top_k))


def baseline_trees(record: Record, nodes: int, model: str = DEFAULT_MODEL, max_depth: int | None = None,
                   top_k: int | None = None) -> dict[str, Tree]:
    """The trees every report compares with, for a budget of `nodes`: `best_cartesian` (chosen on this
    calibration under `model`), `top1_chain` (what vLLM/TGI draft) and Medusa's published trees
    (`treeopt.core.published.BASELINES`, as published: nodes the calibration cannot see count as misses)."""
    depth, _ = limits(record, max_depth, top_k)
    ks = best_cartesian(record, nodes, model, max_depth, top_k)
    trees = {"best_cartesian": Tree.cartesian(ks) if ks else Tree(()), "top1_chain": Tree.chain(min(nodes, depth))}
    trees.update({name: Tree(tuple(map(tuple, PUBLISHED[name]))) for name in BASELINES})
    return trees


def describe(tree: Tree, record: Record) -> str:
    """A short note: a Cartesian tree's shape, or how much of the tree the record can see."""
    seen = truncate(tree, record.num_heads, record.top_k)
    if len(seen) < len(tree):
        return (f"only {len(seen)} of its nodes fit {record.num_heads} heads x top-{record.top_k}; "
                "the rest count as misses")
    widths = [len({p[d] for p in tree.paths if len(p) > d}) for d in range(tree.depth)]
    if tree.num_nodes > 1 and tree == Tree.cartesian(widths):
        return "x".join(map(str, widths))
    return ""
