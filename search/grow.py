"""The greedy grower: one search to N nodes whose every prefix is the best tree of its size (greedy
acceptance: see `treeopt.search.acceptance` for why greedy is optimal; typical: the greedy tree,
`treeopt.search.typical`), and the limits a record puts on it. With a deployment target the growth
keeps that consumer's rules (`treeopt.search.targets.grow`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from treeopt.search.acceptance import DEFAULT_MODEL
from treeopt.search.source import Record, as_source
from treeopt.search.targets import Target, bounds, grow
from treeopt.core.errors import TreeoptError
from treeopt.core.tree import Tree


def limits(record: Record, max_depth: int | None, top_k: int | None) -> tuple[int, int]:
    K, k = record.num_heads, record.top_k
    if max_depth is not None and max_depth < 1:
        raise TreeoptError(f"--max-depth {max_depth} must be at least 1")
    if top_k is not None and not 1 <= top_k <= k:
        raise TreeoptError(f"--max-rank {top_k} must be between 1 and the calibration's top-k {k}: "
                           f"re-run calibrate with a larger --top-k to search wider trees")
    return min(max_depth or K, K), top_k or k


@dataclass(frozen=True)
class SearchResult:
    """A greedily grown tree: every prefix tree[:m] is the optimal m-node tree under `model`."""

    tree: Tree
    values: np.ndarray  # [n] node values, in tree order (non-increasing without a target)
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


def search(record: Record, nodes: int, model: str = DEFAULT_MODEL,
           max_depth: int | None = None, top_k: int | None = None, target: Target | None = None) -> SearchResult:
    """The `nodes`-node tree grown greedily on `record` (a `treeopt.search.source.Source`; a calibration
    under `model`), see the module docstring; with a `target`, grown within that consumer's rules
    (`treeopt.search.targets.grow`)."""
    if nodes < 0:
        raise TreeoptError(f"--nodes {nodes} must be 0 or more (or `auto` with --latency)")
    source = as_source(record, model)
    depth, k = limits(source, max_depth, top_k)
    if target is None:
        paths, values = source.greedy(nodes, depth, k)
    else:
        depth, k = bounds(target, nodes, depth, k)
        paths, values = grow(source, nodes, depth, k, target)
    return SearchResult(Tree(tuple(paths)), values, source.model, nodes,
                        {"max_depth": depth, "top_k": k, "target": target.name if target is not None else None})
