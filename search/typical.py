"""Trees for Medusa's typical acceptance, from a typical record (calibrate/typical.py): the estimator
and the growth that `treeopt search|evaluate|sweep --acceptance typical` run.

The record's rows are the steps of a decode with a large probe tree. In a logged step, a probe node
is *open* when its token and all its ancestors' pass the typical test (`TypicalRecord.open`). A tree
S inside the probe accepts d_S(t) = the depth of its deepest open node in step t (exact: the
decoder takes the longest path of passing nodes, and which of several equally long ones it takes,
the most likely, changes the tokens, not how many). Nodes outside the probe (deeper than the heads,
rank >= its top-k, or under a probe leaf) are never open: the record cannot see them.

- predicted tokens/step = 1 + mean of d_S(t) over the logged steps (the estimate: S's own steps are
  taken to start where the probe's did; calibrate/typical.py).
- replay: the same estimate per prompt (tokens = sum of 1 + d_S, steps = the prompt's logged steps),
  for bootstrap intervals over prompts and held-out splits.
- the value of node v, added to a tree after the nodes before it: the probability (over steps) that
  it is open and no node before it at its depth or deeper is, i.e. that it lengthens the accepted
  path by one. In tree order the values sum to mean d_S, so predicted = 1 + sum of values.

Unlike greedy acceptance, where at most one node per depth can match and a node's value does not
depend on the rest of the tree, siblings can both pass here: the objective is a maximum, not a sum.
The search grows the tree greedily by the largest value (ties by depth, then path), so every
prefix tree[:m] is the greedy tree of m nodes; it is not proven optimal.

Over-fitting. A record holds a few hundred to a few thousand steps, and the search picks the nodes
that happened to pass in them (winner's curse): searched on the record, a tree replays better there
than on new prompts. Two remedies:
- the prior (`--prior-calibration`, a greedy calibration of the same model and heads, `prior_values`):
  a candidate's score is its gain shrunk toward its greedy node value by s pseudo-steps,
  (steps it lengthens + s * value) / (steps + s); s = 0 is the record alone, s = inf the greedy
  calibration's order (its greedy-searched tree, where the probe holds it). s is chosen among
  `STRENGTHS` by K-fold cross-validation over the record's prompts (`choose_strength`): the strongest
  prior within one standard error of the best score, so the tree is never worse in cross-validation
  than the greedy-searched one, and leaves it only when the record beats it by more than its noise
  (benchmarks/bench_typical_selection.py compares the rules by nested cross-validation).
- the headline prediction is cross-validated (`treeopt.search.crossval`, as for greedy): search on
  K-1 folds of prompts, replay on the held-out fold; s is chosen once on the whole record
  (`Typical.resolved`) and kept fixed in every fold (the prior calibration too is used whole).

`Typical` is this record's `treeopt.search.source.Source`: the growth, cross-validation, `--nodes
auto`, the reports and the consumer checks are the greedy rule's, applied to it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from treeopt.search.acceptance import STRENGTH_SIZES, node_values as greedy_values
from treeopt.core.errors import TreeoptError
from treeopt.core.record import TypicalRecord, load_calibration
from treeopt.core.replay import ReplayResult
from treeopt.core.tree import Path as RankPath
from treeopt.core.tree import Tree

NAME = "typical"
STRENGTHS = (0.0, 16.0, 64.0, 256.0, 1024.0, math.inf)  # the prior's strengths, in pseudo-steps


def node_index(record: TypicalRecord, tree: Tree) -> np.ndarray:
    """[m] each node's column in the record, -1 for nodes the probe does not hold."""
    return np.array([record.probe.index(p) if p in record.probe else -1 for p in tree.paths], np.int64)


def _open(record: TypicalRecord, tree: Tree) -> np.ndarray:
    """[N, m] bool: node j of `tree` is open in each step (never for nodes outside the probe)."""
    idx = node_index(record, tree)
    return np.where(idx >= 0, record.open[:, np.maximum(idx, 0)], False)


def depths(record: TypicalRecord, tree: Tree) -> np.ndarray:
    """[N] d_S(t): the depth `tree` accepts in each logged step."""
    depth = np.array([len(p) for p in tree.paths], np.int64)  # [m]
    return (_open(record, tree) * depth).max(1, initial=0)


def node_values(record: TypicalRecord, tree: Tree) -> np.ndarray:
    """[m] each node's value in tree order (module docstring); they sum to the mean of d_S."""
    depth = np.array([len(p) for p in tree.paths], np.int64)
    reached = np.zeros(record.num_steps, np.int64)  # [N] depth accepted by the nodes so far
    values = np.zeros(len(tree))
    for j, col in enumerate(_open(record, tree).T):
        values[j] = (col & (reached < depth[j])).mean() if record.num_steps else 0.0
        reached = np.where(col, np.maximum(reached, depth[j]), reached)
    return values


def expected_tokens_per_step(record: TypicalRecord, tree: Tree) -> float:
    return 1.0 + float(depths(record, tree).mean()) if record.num_steps else 1.0


def replay(record: TypicalRecord, tree: Tree) -> ReplayResult:
    """The estimate per prompt (module docstring): tokens = sum of 1 + d_S over its logged steps."""
    prompts, which = np.unique(record.prompt_ids, return_inverse=True)
    tokens = np.bincount(which, 1 + depths(record, tree), len(prompts)).astype(np.int64)
    return ReplayResult(prompts, tokens, np.bincount(which, minlength=len(prompts)))


def prior_values(record: TypicalRecord, calibration: str | Path) -> np.ndarray:
    """[n] each probe node's value under a greedy calibration of the same model and heads (its
    smoothed acceptance model; 0 for nodes it cannot see): the prior the typical search shrinks toward."""
    cal = load_calibration(calibration)
    if cal.meta.get("model") != record.meta.get("model") or cal.num_heads != record.num_heads:
        raise TreeoptError(f"--prior-calibration {calibration} is of {cal.meta.get('model')} with {cal.num_heads} heads, "
                           f"the typical record of {record.meta.get('model')} with {record.num_heads}: "
                           "pass a greedy calibration of the same model and heads")
    return greedy_values(record.probe, cal)


@dataclass(frozen=True, eq=False)
class Typical:
    """A typical record as a `treeopt.search.source.Source`: growth by the largest value (shrunk toward
    `prior` [n], each probe node's greedy value, by `strength` pseudo-steps; None: to be chosen by
    `resolved`), exact replay of the estimate per prompt. `prior_source`: the prior's calibration."""

    record: TypicalRecord
    prior: np.ndarray | None = None
    strength: float | None = 0.0
    prior_source: str | Path | None = None
    rule = model = NAME

    num_heads = property(lambda self: self.record.num_heads)
    top_k = property(lambda self: self.record.top_k)
    prompts = property(lambda self: np.unique(self.record.prompt_ids))

    def subset(self, prompts: np.ndarray) -> "Typical":
        return replace(self, record=self.record.subset(prompts))

    def source_groups(self) -> dict[str, np.ndarray]:
        return {}  # a typical record keeps no prompt sources

    def resolved(self, sizes: Sequence[int] = STRENGTH_SIZES, max_depth: int | None = None,
                 top_k: int | None = None) -> "Typical":
        return self if self.strength is not None else replace(self, strength=choose_strength(self, sizes, max_depth=max_depth,
                                                                                              top_k=top_k))

    def greedy(self, nodes: int, max_depth: int, top_k: int) -> tuple[list[RankPath], np.ndarray]:
        """The greedy growth inside the probe (module docstring): a candidate's score is its gain shrunk
        toward the prior, (steps it lengthens + strength * prior) / (steps + strength); strength inf
        orders nodes by the prior alone. The values stay the record's own."""
        record, strength = self.record, self.strength or 0.0
        probe, opened = record.probe, record.open  # [N, n]
        prior = np.zeros(len(probe)) if self.prior is None else self.prior  # [n]
        depth = np.array([len(p) for p in probe.paths], np.int64)  # [n]
        parent = np.array(probe.parents, np.int64)  # [n]
        allowed = (depth <= max_depth) & np.array([max(p) < top_k for p in probe.paths])
        priority = np.empty(len(probe), np.int64)  # rank in (depth, path) order: the tie-break
        priority[sorted(range(len(probe)), key=lambda i: (depth[i], probe.paths[i]))] = np.arange(len(probe))
        frontier = allowed & (parent < 0)
        reached = np.zeros(record.num_steps, np.int64)  # [N]
        chosen, values = [], []
        while len(chosen) < nodes:
            cand = np.flatnonzero(frontier)
            if cand.size == 0:
                break
            gain = (opened[:, cand] & (reached[:, None] < depth[cand])).sum(0)  # [c] steps it lengthens
            score = (prior[cand] if strength == np.inf
                     else (gain + strength * prior[cand]) / max(record.num_steps + strength, 1))
            if score.max() <= 0:  # no node left lengthens any accepted path (nor has prior value)
                break
            j = np.lexsort((priority[cand], -score))[0]
            best = cand[j]
            chosen.append(int(best))
            values.append(gain[j] / max(record.num_steps, 1))
            reached = np.where(opened[:, best], np.maximum(reached, depth[best]), reached)
            frontier[best] = False
            frontier |= allowed & (parent == best)
        return [probe.paths[i] for i in chosen], np.array(values)

    def values(self, tree: Tree) -> np.ndarray:
        return node_values(self.record, tree)

    def cartesian_step(self, state, d: int, kmax: int):
        """The probability over steps that the Cartesian tree accepts depth d + 1, for k_{d+1} = 1..kmax:
        some probe node at that depth with rank < k_{d+1} is open below a node of the shape above (the
        state: [N, n] bool, the open probe nodes inside the shape at depth d; None at the root)."""
        probe, opened = self.record.probe, self.record.open  # [N, n]
        at = np.array([i for i, p in enumerate(probe.paths) if len(p) == d + 1], np.int64)  # [c]
        parent = np.array(probe.parents, np.int64)[at] if at.size else np.zeros(0, np.int64)
        inside = opened[:, at] if state is None else opened[:, at] & state[:, np.maximum(parent, 0)]  # [N, c]
        rank = np.array([probe.paths[i][-1] for i in at], np.int64)  # [c]
        mass = np.array([inside[:, rank < k].any(1).sum() / max(len(opened), 1) for k in range(1, kmax + 1)])  # [kmax]

        def child(k: int) -> np.ndarray:  # [N, n] the open nodes inside the shape at depth d + 1
            out = np.zeros(opened.shape, bool)
            out[:, at[rank < k]] = inside[:, rank < k]
            return out

        return mass, child

    def sees(self, tree: Tree) -> bool:
        return bool((node_index(self.record, tree) >= 0).all())

    def replay(self, tree: Tree) -> ReplayResult:
        return replay(self.record, tree)

    def replay_prefixes(self, tree: Tree, sizes: Sequence[int]) -> list[ReplayResult]:
        return [replay(self.record, tree[:m]) for m in sizes]

    def header(self) -> str:
        record = self.record
        prior = ("no prior (pass --prior-calibration DIR, a greedy calibration, to shrink the record's gains toward it)"
                 if self.prior is None else f"gains shrunk toward {self.prior_source}'s node values, strength "
                 f"(cross-validated) {self.strength:g} pseudo-steps (0: the record alone, inf: the prior's order)")
        return (f"typical calibration {record.directory}: {record.num_steps} probe steps, {len(self.prompts)} prompts, "
                f"probe of {len(record.probe)} nodes ({record.num_heads} heads, top-{record.top_k}); "
                + ", ".join(f"{k} {v}" for k, v in record.rule.items()) + f"; {prior}")

    def in_sample(self, tree: Tree, uniform: float) -> dict:
        # the record's estimate is 1 + the sum of node values; its replay is the same figure per prompt
        return {"in_sample_tokens_per_step": uniform, "replayed_tokens_per_step": self.replay(tree).tokens_per_step}

    def tree_meta(self, fields: dict, limits: dict, extra: dict) -> dict:
        """The rule and the prior instead of a greedy calibration's counts; no chain length or latency."""
        record = self.record
        return {**fields, "acceptance": NAME, **record.rule, "acceptance_model": NAME,
                "calibration": str(record.directory), "calibration_steps": record.num_steps,
                "prior_calibration": str(self.prior_source) if self.prior_source is not None else None,
                "prior_strength": f"{self.strength or 0.0:g}", "num_heads": record.num_heads,
                **limits, "nodes_requested": str(limits["nodes_requested"]),
                **{k: extra[k] for k in ("node_values", "target") if k in extra}}


def choose_strength(source: Typical, sizes: Sequence[int] = STRENGTH_SIZES, folds: int | None = None, seed: int = 0,
                    max_depth: int | None = None, top_k: int | None = None, ses: float = 1.0) -> float:
    """The prior's strength (of `STRENGTHS`): the strongest whose cross-validated score (mean held-out
    tokens/step over `sizes`) is within `ses` standard errors of the best score (the one-standard-error
    rule; the error from the best's bootstrap interval over prompts): the record's own ranking must beat
    a stronger prior by more than its noise. `ses` 0: the best score. 0 without a prior."""
    from treeopt.search.crossval import FOLDS, cross_validated

    if source.prior is None:
        return 0.0
    runs = [cross_validated(replace(source, strength=s), sizes, folds=folds or FOLDS, seed=seed, max_depth=max_depth,
                            top_k=top_k) for s in STRENGTHS]
    score = np.array([np.mean([r.tokens_per_step for r in rs]) for rs in runs])  # [S]
    best = int(np.argmax(score))
    error = np.mean([(hi - lo) / (2 * 1.96) for lo, hi in (r.interval() for r in runs[best])])
    return STRENGTHS[int(np.flatnonzero(score >= score[best] - ses * error - 1e-12)[-1])]
