"""The Medusa tree: one immutable value holding `medusa_choices`, validated on construction.

A node is a rank path: (i1, ..., id) means head 1's rank-i1 token, then head 2's rank-i2 token, ...
The implicit root (the base model's own next token) is not a path. Paths keep insertion order, so
a greedily grown tree's every prefix `tree[:n]` is itself a valid tree.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from itertools import product
from typing import Iterable, Sequence

from treeopt.core.errors import TreeoptError

Path = tuple[int, ...]


@dataclass(frozen=True)
class Tree:
    paths: tuple[Path, ...]

    def __post_init__(self):
        paths = tuple(tuple(int(i) for i in p) for p in self.paths)
        object.__setattr__(self, "paths", paths)
        seen: set[Path] = set()
        for p in paths:
            if len(p) == 0:
                raise TreeoptError("tree has an empty path: the root is implicit, list only non-empty rank paths")
            if any(i < 0 for i in p):
                raise TreeoptError(f"tree path {list(p)} has a negative rank: ranks start at 0")
            if p in seen:
                raise TreeoptError(f"tree path {list(p)} appears twice: remove the duplicate")
            if len(p) > 1 and p[:-1] not in seen:
                raise TreeoptError(f"tree path {list(p)} comes before (or without) its parent {list(p[:-1])}: "
                                   "list every parent before its children")
            seen.add(p)

    # ---- construction --------------------------------------------------------------------------

    @classmethod
    def from_choices(cls, choices: Iterable[Sequence[int]], complete: bool = False) -> "Tree":
        """From rank paths in any order (e.g. TensorRT-LLM's lexicographic one): a list whose
        children come before their parents is reordered by depth, stably. `complete=True` also adds
        missing ancestors, for leaf-only lists."""
        paths = [tuple(int(i) for i in p) for p in choices]
        if complete:
            have = set(paths)
            for p in list(paths):
                for d in range(1, len(p)):
                    if p[:d] not in have:
                        have.add(p[:d])
                        paths.append(p[:d])
        present, seen, parents_first = set(paths), set(), True
        for p in paths:
            parents_first &= len(p) == 1 or p[:-1] in seen
            seen.add(p)
        if not parents_first and all(len(p) == 1 or p[:-1] in present for p in paths):
            paths.sort(key=len)
        return cls(tuple(paths))

    @classmethod
    def chain(cls, length: int) -> "Tree":
        """The top-1 chain (0,), (0, 0), ...: what vLLM and TGI draft."""
        return cls(tuple((0,) * d for d in range(1, length + 1)))

    @classmethod
    def cartesian(cls, ks: Sequence[int]) -> "Tree":
        """All paths of the top-k1 x top-k2 x ... product, by depth: Medusa's dense tree."""
        if not ks or any(k < 1 for k in ks):
            raise TreeoptError(f"cartesian sizes {list(ks)} must be positive, e.g. 2x3")
        return cls(tuple(p for d in range(1, len(ks) + 1) for p in product(*(range(k) for k in ks[:d]))))

    # ---- views ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self):
        return iter(self.paths)

    def __contains__(self, path) -> bool:
        return tuple(path) in self._index

    def __getitem__(self, item):
        if isinstance(item, slice):
            return Tree(self.paths[item])
        return self.paths[item]

    @property
    def num_nodes(self) -> int:
        """Candidate tokens verified per step, not counting the root."""
        return len(self.paths)

    @cached_property
    def _index(self) -> dict[Path, int]:
        return {p: n for n, p in enumerate(self.paths)}

    @property
    def depth(self) -> int:
        return max((len(p) for p in self.paths), default=0)

    @property
    def max_rank(self) -> int:
        """Smallest top-k that covers every rank in the tree."""
        return max((max(p) for p in self.paths), default=-1) + 1

    @cached_property
    def parents(self) -> tuple[int, ...]:
        """Index of each node's parent in `paths`; -1 for children of the root."""
        return tuple(self._index[p[:-1]] if len(p) > 1 else -1 for p in self.paths)

    def index(self, path: Sequence[int]) -> int:
        return self._index[tuple(path)]

    @property
    def choices(self) -> list[list[int]]:
        """`medusa_choices` as a list of lists, in this tree's order."""
        return [list(p) for p in self.paths]

    def sorted(self) -> "Tree":
        """The same tree in Medusa's buffer order: by (length, path)."""
        return Tree(tuple(sorted(self.paths, key=lambda p: (len(p), p))))

    def check(self, num_heads: int | None = None, top_k: int | None = None) -> "Tree":
        """One-line error unless the tree fits `num_heads` heads and `top_k` candidates per head."""
        if num_heads is not None and self.depth > num_heads:
            raise TreeoptError(f"tree is {self.depth} deep but there are only {num_heads} heads: "
                               f"use a tree of depth <= {num_heads} or more heads")
        if top_k is not None and self.max_rank > top_k:
            raise TreeoptError(f"tree uses rank {self.max_rank - 1} but top-k is {top_k}: "
                               f"raise --top-k to {self.max_rank} or use a narrower tree")
        return self

    def __repr__(self) -> str:
        return f"Tree(nodes={self.num_nodes}, depth={self.depth}, max_rank={self.max_rank})"


def truncate(tree: Tree, num_heads: int, top_k: int) -> Tree:
    """The subtree a calibration of `num_heads` heads and top-`top_k` ranks can evaluate."""
    return Tree(tuple(p for p in tree.paths if len(p) <= num_heads and max(p) < top_k))
