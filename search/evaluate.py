"""Comparing trees on a calibration: exact replay with intervals, fit/held-out prompt splits."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

from treeopt.search.acceptance import DEFAULT_MODEL, expected_tokens_per_step, resolve_model
from treeopt.search.baselines import baseline_trees, describe
from treeopt.search.budget import Latency
from treeopt.search.crossval import cross_validated
from treeopt.search.grow import search
from treeopt.core.errors import TreeoptError
from treeopt.core.record import Calibration
from treeopt.core.replay import ReplayResult, intervals, positions, replay
from treeopt.core.tree import Tree


def compare(trees: Mapping[str, Tree], calibration: Calibration, model: str = DEFAULT_MODEL,
            fit: Calibration | None = None, latency: Latency | None = None,
            held_out: Mapping[str, ReplayResult] | None = None) -> pd.DataFrame:
    """One row per tree: nodes, depth; `predicted` tokens/step with a 95 % bootstrap interval over
    prompts: the held-out replay given in `held_out` for trees searched on this calibration (e.g. the
    cross-validated one), else the replay on `calibration`; `replayed`: the replay on `calibration`;
    `uniform_tokens_per_step`: 1 + sum of node values under `model` on `fit` (default: the same
    calibration); and predicted tokens/s given a latency file."""
    fit = fit if fit is not None else calibration
    held_out = held_out or {}
    replays = {name: replay(tree, positions(calibration)) for name, tree in trees.items()}
    predicted = {name: held_out.get(name, r) for name, r in replays.items()}  # each over all prompts
    bounds = dict(zip(trees, intervals(list(predicted.values()))))
    rows = []
    for name, tree in trees.items():
        r, p = replays[name], predicted[name]
        lo, hi = bounds[name]
        row = {"tree": name, "nodes": tree.num_nodes, "depth": tree.depth, "predicted": p.tokens_per_step,
               "ci_low": lo, "ci_high": hi, "replayed": r.tokens_per_step,
               "uniform_tokens_per_step": expected_tokens_per_step(tree, fit, model)}
        if latency is not None:
            row["forward_ms"] = float(latency.forward(tree.num_nodes))
            row["tokens_per_s"] = float(latency.tokens_per_second(p.tokens_per_step, tree.num_nodes))
        rows.append({**row, "note": describe(tree, calibration)})
    return pd.DataFrame(rows)


def split_prompts(calibration: Calibration, split: float, seed: int = 0) -> tuple[Calibration, Calibration]:
    """(fit, held-out): a random `split` fraction of the prompts and the rest."""
    prompts = np.unique(calibration.prompt_ids)
    n_fit = int(round(split * len(prompts)))
    if not 0 < split < 1 or not 0 < n_fit < len(prompts):
        raise TreeoptError(f"--split {split} leaves no prompt on one side ({len(prompts)} prompts): "
                           "use a fraction like 0.8 and a calibration with more prompts")
    perm = np.random.default_rng(seed).permutation(prompts)
    return calibration.subset(perm[:n_fit]), calibration.subset(perm[n_fit:])


def evaluate(trees: Mapping[str, Tree], calibration: Calibration, model: str = DEFAULT_MODEL,
             split: float | None = None, seed: int = 0, latency: Latency | None = None,
             baselines: bool = True) -> pd.DataFrame:
    """Compare `trees` with the baselines at the first tree's size (see `compare`). Without `split`,
    a tree searched on the calibration at each given tree's size is added with its cross-validated
    prediction; with `split`, fit on that fraction of the prompts (uniform figures, the best
    Cartesian tree and a tree searched there at each size) and replay on the held-out rest."""
    model = resolve_model(calibration, model)
    fit, held = split_prompts(calibration, split, seed) if split is not None else (calibration, calibration)
    trees, cv = dict(trees), {}
    for n in dict.fromkeys(t.num_nodes for t in list(trees.values())):
        if split is not None:
            trees[f"searched on fit split ({n})"] = search(fit, n, model).tree
        else:
            name = f"searched here ({n}), cross-validated"
            trees[name] = search(calibration, n, model).tree
            cv[name] = cross_validated(calibration, [n], model, seed=seed)[0]
    if baselines and trees:
        n = next(iter(trees.values())).num_nodes
        trees.update({k: v for k, v in baseline_trees(fit, n, model).items() if k not in trees})
    return compare(trees, held, model, fit=fit, latency=latency, held_out=cv)
