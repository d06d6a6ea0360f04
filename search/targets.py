"""Deployment targets: each consumer's rules for a tree, the check that names the rule a tree breaks,
and the search within those rules.

A target is a small frozen record of one consumer's limits, as its own code enforces them (the code
is re-implemented, with file and function cited, in `treeopt.search.consumers`; tests round-trip exports
through it):

- ``medusa`` (FasterDecoding/Medusa): ranks <= 9, since `medusa/model/utils.py` hard-codes
  ``TOPK = 10`` and reads node (depth d, rank r) at candidate index r + 10 (d - 1) + 1, so rank 15 at
  depth 1 silently reads head 2's rank-5 token; depth <= the number of heads (deeper indices overrun
  the candidates).
- ``trtllm`` (TensorRT-LLM's TensorRT-engine Medusa path, `--medusa_choices`, in the releases before
  that backend's removal, NVIDIA/TensorRT-LLM#15918; current TensorRT-LLM reads no tree): at most 63 nodes (the engine's
  ``max_draft_len``, `examples/medusa/convert_checkpoint.py` ``--max_medusa_token_len 63``); ranks
  <= 15 (the C++ runtime packs each rank into 4 bits of a prefix key); depth <= the number of heads;
  the first level holds ranks 0..m-1 without gaps (the Python runtime numbers first-level nodes by
  their rank). A node whose parent is missing is attached to the root by the C++ runtime; treeopt's
  trees always hold every parent.
- ``vllm`` (vLLM >= 0.32, ``--speculative-config`` ``num_speculative_tokens``): a top-1 chain, whatever
  the method; for Medusa each head's argmax (`vllm/v1/spec_decode/medusa.py`, `MedusaProposer.propose`),
  and at most one token per head (`SpeculativeConfig.__post_init__` sets the drafter's `num_heads` to
  ``num_speculative_tokens``; the loader then finds no weights for a head the checkpoint lacks).
- ``chain`` (TGI ``--speculate``, llama.cpp ``--draft-max``): a top-1 chain; only its length is passed.
  SGLang (``--speculative-eagle-topk 1``) and TensorRT-LLM's EAGLE-3 (``max_draft_len``) exports keep the
  same rule (`FORMAT_TARGET`; their configs are `treeopt.core.serving`'s).

Every target also keeps the depth within the calibrated heads (a calibration sees no deeper).

The search applies a target inside the growth, never by cutting a finished tree: the node cap bounds
the growth, the rank cap and chain-only bound the candidates (top-k), first-level contiguity makes
rank r at depth 1 wait for rank r - 1 (`grow`: every prefix of the result keeps the rule).
`cartesian_shape` is the exhaustive search of the best Cartesian tree (the Cartesian baseline).
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from treeopt.core.errors import TreeoptError
from treeopt.core.tree import Path, Tree


@dataclass(frozen=True)
class Target:
    """One consumer's rules (None: no limit of its own). `format` is the file format it reads."""

    name: str
    consumer: str
    format: str
    max_nodes: int | None = None
    max_rank: int | None = None  # highest rank allowed
    max_depth: int | None = None  # beyond the number of heads
    first_level_contiguous: bool = False
    chain: bool = False


TARGETS = {
    "medusa": Target("medusa", "Medusa", "python", max_rank=9),
    "trtllm": Target("trtllm", "TensorRT-LLM", "trtllm", max_nodes=63, max_rank=15, max_depth=16,
                     first_level_contiguous=True),
    "vllm": Target("vllm", "vLLM", "vllm", max_rank=0, chain=True),
    "chain": Target("chain", "TGI/llama.cpp", "chain", max_rank=0, chain=True),
}
# the consumer each export format is for; SGLang and TensorRT-LLM's EAGLE-3 serve a chain (any chain: --target chain)
FORMAT_TARGET = {**{t.format: t for t in TARGETS.values()},
                 "sglang": Target("chain", "SGLang", "sglang", max_rank=0, chain=True),
                 "trtllm-eagle3": Target("chain", "TensorRT-LLM EAGLE-3", "trtllm-eagle3", max_rank=0, chain=True)}


def export_targets(format: str, target: Target | None = None) -> list[Target]:
    """The targets whose rules a file in `format` must keep: the format's consumer and `target`."""
    return list(dict.fromkeys(t for t in (target, FORMAT_TARGET.get(format)) if t is not None))


def get_target(name: str | None) -> Target | None:
    if name is None:
        return None
    if name not in TARGETS:
        raise TreeoptError(f"unknown target {name!r}: use --target {', '.join(TARGETS)}")
    return TARGETS[name]


def check(tree: Tree, target: Target, num_heads: int | None = None) -> str | None:
    """The first rule of `target` that `tree` breaks, as a phrase naming the rule; None if none
    (the depth rule needs `num_heads`)."""
    t = target
    if tree.num_nodes == 0:
        return f"{t.consumer} needs at least one node"
    if t.max_nodes is not None and tree.num_nodes > t.max_nodes:
        return f"{t.consumer} takes at most {t.max_nodes} nodes, the tree has {tree.num_nodes}"
    caps = [x for x in (num_heads, t.max_depth) if x is not None]
    if caps and tree.depth > min(caps):
        return f"{t.consumer} reads one head per level, so depth <= {min(caps)}, the tree is {tree.depth} deep"
    if t.chain and tree != Tree.chain(tree.num_nodes):
        return f"{t.consumer} drafts a top-1 chain only, the tree branches"
    if t.max_rank is not None and tree.max_rank - 1 > t.max_rank:
        path = next(p for p in tree.paths if max(p) > t.max_rank)
        return f"{t.consumer} allows ranks <= {t.max_rank}, the tree has {list(path)}"
    if t.first_level_contiguous:
        first = sorted(p[0] for p in tree.paths if len(p) == 1)
        if first != list(range(len(first))):
            return f"{t.consumer} needs first-level ranks 0..m-1 without gaps, the tree has {first}"
    return None


def require(tree: Tree, target: Target, num_heads: int | None = None, where: str = "the tree") -> Tree:
    """`tree`, or a one-line error naming the broken rule and the fix."""
    broken = check(tree, target, num_heads)
    if broken is not None:
        raise TreeoptError(f"{where} does not deploy on {target.consumer}: {broken}; "
                           f"search it with --target {target.name}")
    return tree


def bounds(target: Target, nodes: int, depth: int, top_k: int) -> tuple[int, int]:
    """(depth, top_k) of the search space under `target`; an error if `nodes` is over its cap."""
    if target.max_nodes is not None and nodes > target.max_nodes:
        raise TreeoptError(f"--nodes {nodes} is more than {target.consumer} takes: pass --nodes {target.max_nodes} or fewer")
    depth = min(depth, target.max_depth or depth)
    return depth, min(top_k, target.max_rank + 1) if target.max_rank is not None else top_k


def grow(model, nodes: int, depth: int, top_k: int, target: Target) -> tuple[list[Path], np.ndarray]:
    """The greedy growth of `model` (an acceptance model of `treeopt.search.acceptance`) within `target`'s
    rules, `depth` and `top_k` already within its `bounds`: paths in insertion order, values [n]."""
    if not target.first_level_contiguous:
        return model.greedy(nodes, depth, top_k)
    pool = max(nodes, 1)
    while True:  # widen the candidate pool until the walk fills the tree or every nonzero node is in it
        paths, values = model.greedy(pool, depth, top_k)
        exhausted = len(paths) < pool
        if exhausted:  # zero-valued first-level ranks come last: taken only to unlock a later rank
            have = set(paths)
            zeros = [(r,) for r in range(top_k) if (r,) not in have]
            paths, values = paths + zeros, np.append(values, np.zeros(len(zeros)))
        picked = contiguous_walk(paths, nodes)
        if len(picked) == nodes or exhausted:
            while picked and values[picked[-1]] == 0:  # a zero-valued node that unlocks nothing adds nothing
                picked.pop()
            return [paths[i] for i in picked], values[picked]
        pool *= 4


def contiguous_walk(paths: list[Path], nodes: int) -> list[int]:
    """Indices into `paths` (candidates in greedy order: best first, parents before children) of the
    first `nodes` taken when first-level rank r may only follow rank r - 1: a candidate whose
    blocker (its parent, or its left first-level sibling) is not taken waits for it, then competes
    again by its place in the order. Without waits this is the greedy order itself."""
    taken, picked = set(), []
    waiting: dict[Path, list[int]] = defaultdict(list)
    released: list[int] = []  # heap of indices: released candidates, best first
    nxt = 0
    while len(picked) < nodes and (released or nxt < len(paths)):
        if released and (nxt >= len(paths) or released[0] < nxt):
            i = heapq.heappop(released)
        else:
            i, nxt = nxt, nxt + 1
        p = paths[i]
        blocker = p[:-1] if len(p) > 1 else (p[0] - 1,) if p[0] > 0 else None
        if blocker is not None and blocker not in taken:
            waiting[blocker].append(i)
            continue
        taken.add(p)
        picked.append(i)
        for j in waiting.pop(p, []):
            heapq.heappush(released, j)
    return picked


def cartesian_shape(model, nodes: int, depth: int, top_k: int) -> list[int]:
    """Sizes [k1, k2, ...] of the best Cartesian tree (top-k1 x top-k2 x ...) with at most `nodes`
    nodes under `model`, by exhaustive search; its value is sum_d P(r_1 < k_1, ..., r_d < k_d)."""
    best: list = [-1.0, 0, []]  # value, nodes, ks

    def dfs(d: int, state, ks: list[int], size: int, width: int, value: float):
        mass, child = model.cartesian_step(state, d, top_k)  # [top_k]
        for kd in range(1, top_k + 1):
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
