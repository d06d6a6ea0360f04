"""A Tree's static buffers for tree attention, built once per tree.

Node 0 is the root (the base model's own next token); node i >= 1 is `tree.paths[i - 1]`, so every
parent comes before its children. With N = n + 1 nodes, D = tree depth, L = number of leaves:

- ``mask`` [N, N] bool: node i attends to node j iff j is i itself or one of its ancestors.
- ``depth`` [N]: position offset of each node after the committed prefix (root 0).
- ``parent`` [N]: parent node index (the root is its own parent).
- ``candidate_index`` [n]: where node i's token sits in the heads' top-k, flattened [D * top_k]:
  a node at depth d with last rank r is head d's rank-r token.
- ``paths`` [L, D + 1]: the node indices from the root to each leaf, padded with 0, and
  ``path_valid`` [L, D + 1] which entries are real (explicit: no padding token id is relied on).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from treeopt.core.tree import Tree


@dataclass(frozen=True)
class TreeBuffers:
    tree: Tree
    top_k: int  # candidates taken from each head
    mask: torch.Tensor  # [N, N] bool
    depth: torch.Tensor  # [N] long
    parent: torch.Tensor  # [N] long
    candidate_index: torch.Tensor  # [n] long
    paths: torch.Tensor  # [L, D+1] long
    path_valid: torch.Tensor  # [L, D+1] bool

    @property
    def num_nodes(self) -> int:
        """N = tree nodes + the root."""
        return self.tree.num_nodes + 1

    def to(self, device) -> "TreeBuffers":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        moved.update({k: v.to(device) for k, v in moved.items() if isinstance(v, torch.Tensor)})
        return TreeBuffers(**moved)


def tree_buffers(tree: Tree, top_k: int | None = None, device: str | torch.device = "cpu") -> TreeBuffers:
    """Build the buffers of `tree`; `top_k` defaults to the smallest that covers its ranks."""
    top_k = max(tree.max_rank, 1) if top_k is None else top_k
    tree.check(top_k=top_k)
    n, N, D = tree.num_nodes, tree.num_nodes + 1, tree.depth
    parent = [0] + [p + 1 for p in tree.parents]  # root's parent is itself
    depth = [0] + [len(p) for p in tree.paths]

    mask = torch.zeros(N, N, dtype=torch.bool)
    mask[0, 0] = True
    for i in range(1, N):
        mask[i] = mask[parent[i]]
        mask[i, i] = True

    candidate_index = [(len(p) - 1) * top_k + p[-1] for p in tree.paths]

    has_child = set(parent[1:])
    leaves = [i for i in range(N) if i not in has_child] if n else [0]
    paths = torch.zeros(len(leaves), D + 1, dtype=torch.long)
    valid = torch.zeros(len(leaves), D + 1, dtype=torch.bool)
    for row, leaf in enumerate(leaves):
        chain = [leaf]
        while chain[-1] != 0:
            chain.append(parent[chain[-1]])
        chain.reverse()
        paths[row, : len(chain)] = torch.tensor(chain)
        valid[row, : len(chain)] = True

    return TreeBuffers(
        tree=tree, top_k=top_k, mask=mask,
        depth=torch.tensor(depth, dtype=torch.long),
        parent=torch.tensor(parent, dtype=torch.long),
        candidate_index=torch.tensor(candidate_index, dtype=torch.long),
        paths=paths, path_valid=valid,
    ).to(device)

