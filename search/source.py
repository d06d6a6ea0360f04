"""What the search reads of a record: one interface for every acceptance rule, two implementations.

Growth, cross-validation, `--nodes auto`, the sweep, the comparisons and the consumer checks are
written once over a `Source`; the rules differ only in the record it reads: `Greedy`, a calibration
(ranks.parquet) under an acceptance model of `treeopt.search.acceptance`, replayed by exact greedy
decoding (`treeopt.core.replay`); `treeopt.search.typical.Typical`, a typical record (typical.parquet)
and the greedy prior its growth may shrink toward. `treeopt.search.api.open_source` opens a directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from treeopt.search.acceptance import DEFAULT_MODEL, STRENGTH_SIZES, acceptance_model, resolve_model
from treeopt.core.drafter import drafter_of
from treeopt.core.record import Calibration
from treeopt.core.replay import ReplayResult, replay, replay_prefixes
from treeopt.core.tree import Path as RankPath
from treeopt.core.tree import Tree, truncate



class Source(Protocol):
    """The interface; the greedy growth, `values` and `cartesian_step` are an acceptance model's."""

    rule: str  # the acceptance rule: greedy or typical
    model: str  # the acceptance model's name (typical: "typical")
    num_heads: int
    top_k: int  # ranks the record holds
    prompts: np.ndarray  # [P] distinct prompt ids, sorted

    def subset(self, prompts: np.ndarray) -> "Source": ...  # the rows of these prompts, the same model
    def source_groups(self) -> dict[str, np.ndarray]: ...  # prompt source -> its prompt ids ({}: none kept)
    # The model's strength fixed by cross-validation on the whole record (at `sizes`): then fit on subsets.
    def resolved(self, sizes: Sequence[int] = STRENGTH_SIZES, max_depth: int | None = None,
                 top_k: int | None = None) -> "Source": ...
    # The greedy growth: paths in insertion order (every parent first) and their values [n].
    def greedy(self, nodes: int, max_depth: int, top_k: int) -> tuple[list[RankPath], np.ndarray]: ...
    def values(self, tree: Tree) -> np.ndarray: ...  # [m] node values in tree order; 1 + sum: the estimate
    def cartesian_step(self, state, d: int, kmax: int): ...  # `treeopt.search.targets.cartesian_shape`'s step
    def sees(self, tree: Tree) -> bool: ...  # the record holds every node (else the rest count as misses)
    def replay(self, tree: Tree) -> ReplayResult: ...  # exact replay on the record's prompts
    def replay_prefixes(self, tree: Tree, sizes: Sequence[int]) -> list[ReplayResult]: ...  # of tree[:m], m in sizes
    def header(self) -> str: ...  # the record in one line, the reports' first
    def in_sample(self, tree: Tree, uniform: float) -> dict: ...  # figures on the record (uniform: 1 + sum of values)
    # A tree file's metadata: prediction `fields`, the record, `limits` (max_depth, top_k, nodes_requested), `extra`.
    def tree_meta(self, fields: dict, limits: dict, extra: dict) -> dict: ...


@dataclass(frozen=True, eq=False)
class Greedy:
    """A calibration under an acceptance model (`treeopt.search.acceptance`)."""

    calibration: Calibration
    model: str = DEFAULT_MODEL
    rule = "greedy"

    num_heads = property(lambda self: self.calibration.num_heads)
    top_k = property(lambda self: self.calibration.top_k)
    prompts = property(lambda self: self.calibration.prompts)
    fitted = property(lambda self: acceptance_model(self.calibration, self.model))  # the model, cached on it

    def subset(self, prompts: np.ndarray) -> "Greedy":
        return Greedy(self.calibration.subset(prompts), self.model)

    def source_groups(self) -> dict[str, np.ndarray]:
        return self.calibration.source_groups()

    def resolved(self, sizes=STRENGTH_SIZES, max_depth=None, top_k=None) -> "Greedy":
        return Greedy(self.calibration, resolve_model(self.calibration, self.model))

    def greedy(self, nodes: int, max_depth: int, top_k: int) -> tuple[list[RankPath], np.ndarray]:
        return self.fitted.greedy(nodes, max_depth, top_k)

    def values(self, tree: Tree) -> np.ndarray:
        return self.fitted.values(tree)

    def cartesian_step(self, state, d: int, kmax: int):
        return self.fitted.cartesian_step(state, d, kmax)

    def sees(self, tree: Tree) -> bool:
        return truncate(tree, self.num_heads, self.top_k).num_nodes == tree.num_nodes

    def replay(self, tree: Tree) -> ReplayResult:
        return replay(tree, self.calibration)

    def replay_prefixes(self, tree: Tree, sizes: Sequence[int]) -> list[ReplayResult]:
        return replay_prefixes(tree, self.calibration, sizes)

    def header(self) -> str:
        c, drafter = self.calibration, drafter_of(self.calibration.meta)
        depths = f"{c.num_heads} heads" if drafter == "heads" else f"drafter {drafter}, {c.num_heads} depths"
        return f"calibration {c.directory}: {c.num_positions} positions, {len(c.prompts)} prompts, {depths}, top-{c.top_k}"

    def in_sample(self, tree: Tree, uniform: float) -> dict:
        return {"in_sample_tokens_per_step": self.replay(tree).tokens_per_step, "uniform_tokens_per_step": uniform}

    def tree_meta(self, fields: dict, limits: dict, extra: dict) -> dict:
        c = self.calibration
        return {**fields, "acceptance": "greedy", "acceptance_model": self.model, "calibration": str(c.directory),
                "calibration_positions": c.num_positions, "calibration_prompts": len(c.prompts),
                "num_heads": c.num_heads, "calibration_top_k": c.top_k, **limits, **extra,
                **({} if drafter_of(c.meta) == "heads" else {"drafter": drafter_of(c.meta)})}


Record = Source | Calibration  # what the search functions take (a calibration: under `model`)


def as_source(record: Record, model: str = DEFAULT_MODEL) -> Source:
    """A calibration as a source under `model`; a source as it is (a typical record is one as
    `treeopt.search.typical.Typical`)."""
    return Greedy(record, model) if isinstance(record, Calibration) else record
