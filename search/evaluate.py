"""Comparing trees on a record (greedy or typical, `treeopt.search.source`): exact replay with
intervals, fit/held-out prompt splits."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

from treeopt.search.acceptance import DEFAULT_MODEL
from treeopt.search.baselines import baseline_trees, describe
from treeopt.search.budget import Latency
from treeopt.search.crossval import cross_validated
from treeopt.search.grow import search
from treeopt.search.source import Record, Source, as_source
from treeopt.core.errors import TreeoptError
from treeopt.core.replay import ReplayResult, intervals
from treeopt.core.tree import Tree


def compare(trees: Mapping[str, Tree], record: Record, model: str = DEFAULT_MODEL,
            fit: Record | None = None, latency: Latency | None = None,
            held_out: Mapping[str, ReplayResult] | None = None) -> pd.DataFrame:
    """One row per tree: nodes, depth; `predicted` tokens/step with a 95 % bootstrap interval over
    prompts: the held-out replay given in `held_out` for trees searched on this record (e.g. the
    cross-validated one), else the replay on `record`; `replayed`: the replay on `record`;
    `uniform_tokens_per_step`: 1 + sum of node values on `fit` (default: the same record); and
    predicted tokens/s given a latency file."""
    source = as_source(record, model)
    fit = as_source(fit, model) if fit is not None else source
    held_out = held_out or {}
    replays = {name: source.replay(tree) for name, tree in trees.items()}
    predicted = {name: held_out.get(name, r) for name, r in replays.items()}  # each over all prompts
    bounds = dict(zip(trees, intervals(list(predicted.values()))))
    rows = []
    for name, tree in trees.items():
        r, p = replays[name], predicted[name]
        lo, hi = bounds[name]
        row = {"tree": name, "nodes": tree.num_nodes, "depth": tree.depth, "predicted": p.tokens_per_step,
               "ci_low": lo, "ci_high": hi, "replayed": r.tokens_per_step,
               "uniform_tokens_per_step": 1.0 + float(fit.values(tree).sum())}
        if latency is not None:
            row["forward_ms"] = float(latency.forward(tree.num_nodes))
            row["tokens_per_s"] = float(latency.tokens_per_second(p.tokens_per_step, tree.num_nodes))
        rows.append({**row, "note": describe(tree, source)})
    return pd.DataFrame(rows)


def split_prompts(record: Record, split: float, seed: int = 0) -> tuple[Record, Record]:
    """(fit, held-out): a random `split` fraction of the prompts and the rest."""
    prompts = as_source(record).prompts
    n_fit = int(round(split * len(prompts)))
    if not 0 < split < 1 or not 0 < n_fit < len(prompts):
        raise TreeoptError(f"--split {split} leaves no prompt on one side ({len(prompts)} prompts): "
                           "use a fraction like 0.8 and a calibration with more prompts")
    perm = np.random.default_rng(seed).permutation(prompts)
    return record.subset(perm[:n_fit]), record.subset(perm[n_fit:])


def evaluate(trees: Mapping[str, Tree], record: Record, model: str = DEFAULT_MODEL,
             split: float | None = None, seed: int = 0, latency: Latency | None = None,
             baselines: bool = True) -> pd.DataFrame:
    """Compare `trees` with the baselines at the first tree's size (see `compare`). Without `split`,
    a tree searched on the calibration at each given tree's size is added with its cross-validated
    prediction; with `split`, fit on that fraction of the prompts (uniform figures, the best
    Cartesian tree and a tree searched there at each size) and replay on the held-out rest."""
    source: Source = as_source(record, model).resolved()
    fit, held = split_prompts(source, split, seed) if split is not None else (source, source)
    trees, cv = dict(trees), {}
    for n in dict.fromkeys(t.num_nodes for t in list(trees.values())):
        if split is not None:
            trees[f"searched on fit split ({n})"] = search(fit, n).tree
        else:
            name = f"searched here ({n}), cross-validated"
            trees[name] = search(source, n).tree
            cv[name] = cross_validated(source, [n], seed=seed)[0]
    if baselines and trees:
        n = next(iter(trees.values())).num_nodes
        trees.update({k: v for k, v in baseline_trees(fit, n).items() if k not in trees})
    return compare(trees, held, fit=fit, latency=latency, held_out=cv)
