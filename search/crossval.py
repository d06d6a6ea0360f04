"""Predictions measured on prompts the tree was not fit on.

A tree searched on a calibration and replayed on the same prompts is judged on its own training
data. Here every figure is an exact replay (`treeopt.core.replay`) on held-out prompts:

- ``cross_validated``: K-fold over prompts. Search on K-1 folds, replay on the held-out fold; the
  K held-out folds together cover every prompt once, so tokens/step = their tokens / their steps,
  with a bootstrap interval over prompts. It estimates the tree searched on all prompts, replayed on
  new prompts of the same kind. This is the headline `predicted_tokens_per_step`.
- ``leave_one_source_out``: the same with one fold per prompt source (AlpacaEval's ``dataset``): each
  source is replayed with a tree searched on the others, i.e. "on other kinds of prompts".
- ``per_source``: both figures for each source's prompts.
- ``calibration_curve``: the cross-validated figure when only m prompts of each training part are
  used to search, for growing m: how much calibration is enough.

Each takes a record (a `treeopt.search.source.Source`, greedy or typical; a calibration under `model`).
The model's strength is chosen once on the whole record (`Source.resolved`), fixed in every fold.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from treeopt.search.acceptance import DEFAULT_MODEL
from treeopt.search.grow import search
from treeopt.search.source import Record, Source, as_source
from treeopt.search.targets import Target
from treeopt.core.record import prompt_folds
from treeopt.core.replay import ReplayResult, concat
from treeopt.core.tree import Tree

FOLDS = 4


def held_out(source: Source, groups: Sequence[np.ndarray], sizes: Sequence[int],
             max_depth: int | None = None, top_k: int | None = None, fit_prompts: int | None = None,
             seed: int = 0, target: Target | None = None) -> list[ReplayResult]:
    """For each group of prompt ids: search a tree of max(`sizes`) nodes on the other prompts (a seeded
    draw of `fit_prompts` of them, if given; within `target`'s rules) and replay its first m nodes, m in
    `sizes`, on the group (a Cartesian target's trees are not prefixes of each other: one search per
    size). Returns one result per size over all the groups' prompts."""
    per_size: list[list[ReplayResult]] = [[] for _ in sizes]
    rng = np.random.default_rng(seed)
    for group in groups:
        rest = np.setdiff1d(source.prompts, group)
        if fit_prompts is not None:
            rest = rng.choice(rest, min(fit_prompts, len(rest)), replace=False)
        fit, test = source.subset(rest), source.subset(group)
        results = test.replay_prefixes(search(fit, max(sizes), max_depth=max_depth, top_k=top_k, target=target).tree,
                                       sizes)
        for out, r in zip(per_size, results):
            out.append(r)
    return [concat(rs) for rs in per_size]


def cross_validated(record: Record, sizes: Sequence[int], model: str = DEFAULT_MODEL,
                    folds: int = FOLDS, seed: int = 0, max_depth: int | None = None,
                    top_k: int | None = None, target: Target | None = None) -> list[ReplayResult]:
    """K-fold held-out replay of the searched tree at each size (module docstring). With fewer than 2
    prompts there is nothing to hold out: the replay is in-sample."""
    source = as_source(record, model).resolved()
    k = min(folds, len(source.prompts))
    if k < 2:
        return [source.replay(search(source, m, max_depth=max_depth, top_k=top_k, target=target).tree) for m in sizes]
    return held_out(source, prompt_folds(source.prompts, k, seed), sizes, max_depth, top_k, target=target)


def sweep_sizes(max_nodes: int) -> np.ndarray:
    """The tree sizes a sweep (and `--nodes auto`) cross-validates: every size up to 32, then every
    8th to 128, every 16th to 256, every 32nd beyond, and `max_nodes` itself."""
    grid = np.concatenate([np.arange(33), np.arange(40, 129, 8), np.arange(144, 257, 16), np.arange(288, max_nodes, 32)])
    return np.append(grid[grid < max_nodes], max_nodes)


def cross_validated_curve(record: Record, sizes: Sequence[int], model: str = DEFAULT_MODEL,
                          folds: int = FOLDS, seed: int = 0, max_depth: int | None = None,
                          top_k: int | None = None, target: Target | None = None) -> np.ndarray:
    """[len(sizes)] cross-validated tokens/step of the searched tree of each size."""
    return np.array([r.tokens_per_step for r in cross_validated(record, sizes, model, folds, seed, max_depth,
                                                                top_k, target)])


def leave_one_source_out(record: Record, sizes: Sequence[int], model: str = DEFAULT_MODEL,
                         max_depth: int | None = None, top_k: int | None = None,
                         target: Target | None = None) -> list[ReplayResult] | None:
    """Each source's prompts replayed with a tree searched on the other sources; None without at
    least two recorded sources."""
    source = as_source(record, model)
    groups = source.source_groups()
    if len(groups) < 2:
        return None
    return held_out(source.resolved(), list(groups.values()), sizes, max_depth, top_k, target=target)


def per_source(record: Record, cv: ReplayResult, loso: ReplayResult | None = None) -> pd.DataFrame:
    """One row per source: its prompts, tokens, the cross-validated tokens/step on its prompts with a
    95 % interval, and the leave-one-source-out one (fit on the other sources)."""
    rows = []
    for source, prompts in as_source(record).source_groups().items():
        r = _only(cv, prompts)
        lo, hi = r.interval()
        row = {"source": source, "prompts": len(prompts), "tokens": int(r.tokens.sum()),
               "cross_validated": r.tokens_per_step, "ci_low": lo, "ci_high": hi}
        if loso is not None:
            row["leave_one_source_out"] = _only(loso, prompts).tokens_per_step
        rows.append(row)
    return pd.DataFrame(rows)


def calibration_curve(record: Record, nodes: int, model: str = DEFAULT_MODEL, folds: int = FOLDS,
                      seed: int = 0, counts: Sequence[int] | None = None, max_depth: int | None = None,
                      top_k: int | None = None) -> pd.DataFrame:
    """How much calibration is enough: the cross-validated tokens/step of the `nodes`-node tree (and
    its 95 % interval) when each fold's tree is searched on only m prompts of the other folds, for m
    in `counts` (default 4, 8, 16, ... up to all of them)."""
    source = as_source(record, model).resolved()
    k = min(folds, len(source.prompts))
    if k < 2:
        return pd.DataFrame(columns=["fit_prompts", "predicted", "ci_low", "ci_high"])
    groups = prompt_folds(source.prompts, k, seed)
    most = len(source.prompts) - max(len(g) for g in groups)
    if counts is None:
        counts = [m for m in 2 ** np.arange(2, 20) if m < most] + [most]
    rows = []
    for m in counts:
        r = held_out(source, groups, [nodes], max_depth, top_k, fit_prompts=int(m), seed=seed)[0]
        lo, hi = r.interval()
        rows.append({"fit_prompts": int(m), "predicted": r.tokens_per_step, "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows)


def prediction(record: Record, tree: Tree, uniform: float, cv: ReplayResult, model: str = DEFAULT_MODEL,
               folds: int = FOLDS, max_depth: int | None = None, top_k: int | None = None,
               target: Target | None = None) -> tuple[dict, pd.DataFrame]:
    """The figures a searched `tree` (grown greedily on the whole record) is reported with, as
    tree-file fields, and the per-source table (empty without sources): predicted_tokens_per_step
    (`cv`, its `cross_validated` replay) and its 95 % interval, the in-sample figures
    (`Source.in_sample`; `uniform`: 1 + the sum of node values), and with two or more sources
    leave_one_source_out_tokens_per_step."""
    source = as_source(record, model)
    loso = leave_one_source_out(source, [len(tree)], max_depth=max_depth, top_k=top_k, target=target)
    fields = {"predicted_tokens_per_step": cv.tokens_per_step, "predicted_interval": list(cv.interval()),
              "cv_folds": min(folds, len(source.prompts)), **source.in_sample(tree, uniform)}
    if loso is not None:
        fields["leave_one_source_out_tokens_per_step"] = loso[0].tokens_per_step
    return fields, per_source(source, cv, loso[0] if loso else None)


def _only(result: ReplayResult, prompts: np.ndarray) -> ReplayResult:
    keep = np.isin(result.prompt_ids, prompts)
    return ReplayResult(result.prompt_ids[keep], result.tokens[keep], result.steps[keep])
