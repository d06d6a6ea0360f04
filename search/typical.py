"""Trees for Medusa's typical acceptance, from a typical record (calibrate/typical.py): the estimator,
the search and the reports of `treeopt search|evaluate|sweep --acceptance typical`.

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
- the headline prediction is cross-validated (`cross_validated`): search on K-1 folds of prompts,
  replay on the held-out fold, as search/crossval.py does for greedy; s is chosen once on the whole
  record and kept fixed in every fold (the prior calibration too is used whole).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from treeopt.search.budget import Latency, read_latency
from treeopt.search.grow import SearchResult
from treeopt.core.errors import TreeoptError
from treeopt.core.fileio import atomic_write
from treeopt.core.record import TypicalRecord, load_typical, prompt_folds
from treeopt.core.replay import ReplayResult, concat
from treeopt.core.tables import render_table
from treeopt.core.tree import Tree
from treeopt.core.treefile import read_tree, write_tree

NAME = "typical"
FOLDS = 4
STRENGTHS = (0.0, 16.0, 64.0, 256.0, 1024.0, math.inf)  # the prior's strengths, in pseudo-steps
STRENGTH_SIZES = (16, 64)  # tree sizes whose mean held-out replay chooses the strength (sweep, --nodes auto)


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


def search(record: TypicalRecord, nodes: int, max_depth: int | None = None, top_k: int | None = None,
           prior: np.ndarray | None = None, strength: float = 0.0) -> SearchResult:
    """The greedy tree of `nodes` nodes inside the probe (module docstring). With a `prior` [n] (each
    probe node's value under a greedy calibration, `prior_values`), a candidate's score is its gain
    shrunk toward the prior by `strength` pseudo-steps: (steps it lengthens + strength * prior) /
    (steps + strength); strength inf orders nodes by the prior alone. `values` stay the record's own."""
    if nodes < 0:
        raise TreeoptError(f"--nodes {nodes} must be 0 or more")
    probe, opened = record.probe, record.open  # [N, n]
    prior = np.zeros(len(probe)) if prior is None else prior  # [n]
    depth_limit = min(max_depth or record.num_heads, record.num_heads)
    k = min(top_k or record.top_k, record.top_k)
    depth = np.array([len(p) for p in probe.paths], np.int64)  # [n]
    parent = np.array(probe.parents, np.int64)  # [n]
    allowed = (depth <= depth_limit) & np.array([max(p) < k for p in probe.paths])
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
        score = prior[cand] if strength == np.inf else (gain + strength * prior[cand]) / max(record.num_steps + strength, 1)
        if score.max() <= 0:  # no node left lengthens any accepted path (nor has prior value)
            break
        j = np.lexsort((priority[cand], -score))[0]
        best = cand[j]
        chosen.append(int(best))
        values.append(gain[j] / max(record.num_steps, 1))
        reached = np.where(opened[:, best], np.maximum(reached, depth[best]), reached)
        frontier[best] = False
        frontier |= allowed & (parent == best)
    tree = Tree(tuple(probe.paths[i] for i in chosen))
    return SearchResult(tree, np.array(values), NAME, nodes,
                        {"max_depth": depth_limit, "top_k": k, "steps": record.num_steps, "strength": strength})


def prior_values(record: TypicalRecord, calibration: str | Path) -> np.ndarray:
    """[n] each probe node's value under a greedy calibration of the same model and heads (its
    smoothed acceptance model; 0 for nodes it cannot see): the prior the typical search shrinks toward."""
    from treeopt.search.acceptance import node_values
    from treeopt.core.record import load_calibration

    cal = load_calibration(calibration)
    if cal.meta.get("model") != record.meta.get("model") or cal.num_heads != record.num_heads:
        raise TreeoptError(f"--prior-calibration {calibration} is of {cal.meta.get('model')} with {cal.num_heads} heads, "
                           f"the typical record of {record.meta.get('model')} with {record.num_heads}: "
                           "pass a greedy calibration of the same model and heads")
    return node_values(record.probe, cal)


def cross_validated(record: TypicalRecord, sizes: Sequence[int], prior: np.ndarray | None = None,
                    strength: float = 0.0, folds: int = FOLDS, seed: int = 0, max_depth: int | None = None,
                    top_k: int | None = None) -> list[ReplayResult]:
    """K-fold over the record's prompts: the tree of max(`sizes`) nodes searched on K-1 folds, its first
    m nodes replayed on the held-out fold; one result per size over all the folds' prompts. With
    fewer than 2 prompts there is nothing to hold out: the replay is in-sample."""
    prompts = np.unique(record.prompt_ids)
    k = min(folds, len(prompts))
    groups = prompt_folds(prompts, k, seed) if k >= 2 else [prompts]
    per_size: list[list[ReplayResult]] = [[] for _ in sizes]
    for held in groups:
        train = record.subset(np.setdiff1d(prompts, held)) if k >= 2 else record
        tree = search(train, max(sizes), max_depth, top_k, prior, strength).tree
        for out, m in zip(per_size, sizes):
            out.append(replay(record.subset(held), tree[:m]))
    return [concat(rs) for rs in per_size]


def choose_strength(record: TypicalRecord, prior: np.ndarray | None, sizes: Sequence[int] = STRENGTH_SIZES,
                    folds: int = FOLDS, seed: int = 0, max_depth: int | None = None, top_k: int | None = None,
                    ses: float = 1.0) -> float:
    """The prior's strength (of `STRENGTHS`): the strongest whose cross-validated score (mean held-out
    tokens/step over `sizes`) is within `ses` standard errors of the best score (the one-standard-error
    rule; the error from the best's bootstrap interval over prompts): the record's own ranking must beat
    a stronger prior by more than its noise. `ses` 0: the best score. 0 without a prior."""
    if prior is None:
        return 0.0
    runs = [cross_validated(record, sizes, prior, s, folds, seed, max_depth, top_k) for s in STRENGTHS]
    score = np.array([np.mean([r.tokens_per_step for r in rs]) for rs in runs])  # [S]
    best = int(np.argmax(score))
    error = np.mean([(hi - lo) / (2 * 1.96) for lo, hi in (r.interval() for r in runs[best])])
    return STRENGTHS[int(np.flatnonzero(score >= score[best] - ses * error - 1e-12)[-1])]


def best_cartesian(record: TypicalRecord, nodes: int) -> Tree:
    """The Cartesian tree (top-k1 x top-k2 x ...) of at most `nodes` nodes inside the probe with the
    highest predicted tokens/step, by trying every shape."""
    best, shapes = (Tree(()), 1.0), [[]]
    while shapes:
        ks = shapes.pop()
        width, size = int(np.prod(ks)) if ks else 1, sum(int(np.prod(ks[:d + 1])) for d in range(len(ks)))
        for kd in range(1, record.top_k + 1):
            if len(ks) >= record.num_heads or size + width * kd > nodes:
                break
            tree = Tree.cartesian(ks + [kd])
            value = expected_tokens_per_step(record, tree)
            if value > best[1] + 1e-12:
                best = (tree, value)
            shapes.append(ks + [kd])
    return best[0]


def compare(trees: dict[str, Tree], record: TypicalRecord, fit: TypicalRecord | None = None,
            latency: Latency | None = None) -> pd.DataFrame:
    """One row per tree: predicted on `fit` (default: the same record), the estimate on `record` with a
    95 % bootstrap interval over prompts, and tokens/s from that figure given a latency file."""
    fit = fit if fit is not None else record
    rows = []
    for name, tree in trees.items():
        r = replay(record, tree)
        lo, hi = r.interval()
        outside = int((node_index(record, tree) < 0).sum())
        row = {"tree": name, "nodes": tree.num_nodes, "depth": tree.depth,
               "predicted": expected_tokens_per_step(fit, tree), "replayed": r.tokens_per_step,
               "ci_low": lo, "ci_high": hi}
        if latency is not None:
            row["forward_ms"] = float(latency.forward(tree.num_nodes))
            row["tokens_per_s"] = float(latency.tokens_per_second(r.tokens_per_step, tree.num_nodes))
        rows.append({**row, "note": f"{outside} nodes outside the probe count as rejected" if outside else ""})
    return pd.DataFrame(rows)


def baselines(record: TypicalRecord, nodes: int) -> dict[str, Tree]:
    return {"best_cartesian": best_cartesian(record, nodes), "top1_chain": Tree.chain(min(nodes, record.num_heads))}


def rule_meta(record: TypicalRecord) -> dict:
    """What a tree file says about the rule it was made for."""
    return {"acceptance": NAME, **record.rule}


def _header(record: TypicalRecord) -> str:
    r = record.rule
    return (f"typical calibration {record.directory}: {record.num_steps} probe steps, "
            f"{len(np.unique(record.prompt_ids))} prompts, probe of {len(record.probe)} nodes "
            f"({record.num_heads} heads, top-{record.top_k}); temperature {r['temperature']}, "
            f"posterior_threshold {r['posterior_threshold']}, posterior_alpha {r['posterior_alpha']}, seed {r['seed']}")


NOTE = ("predicted: 1 + mean accepted depth over the probe decode's logged steps; replayed: the same on "
        "the record's (or the held-out) prompts, with a 95 % bootstrap interval over prompts")


def fit(record: TypicalRecord, nodes: int, prior: np.ndarray | None = None, max_depth: int | None = None,
        top_k: int | None = None, sizes: Sequence[int] | None = None) -> tuple[SearchResult, ReplayResult]:
    """`treeopt search --acceptance typical`'s tree: the prior's strength chosen by cross-validation at
    `sizes` (default: [nodes]), the search of `nodes` nodes with it, and that search's cross-validated
    replay at the tree's size (the headline prediction)."""
    strength = choose_strength(record, prior, sizes or [nodes], max_depth=max_depth, top_k=top_k)
    result = search(record, nodes, max_depth, top_k, prior, strength)
    return result, cross_validated(record, [len(result.tree)], prior, strength, max_depth=max_depth, top_k=top_k)[0]


def search_report(calibration: str | Path, nodes: int | str = 64, max_depth: int | None = None,
                  top_k: int | None = None, latency: str | Path | None = None, max_nodes: int = 256,
                  out: str | Path | None = None, format: str | None = None,
                  prior: str | Path | None = None) -> tuple[SearchResult, pd.DataFrame, str]:
    """`treeopt search --acceptance typical [--prior-calibration DIR]`."""
    from treeopt.search.budget import choose_nodes
    from treeopt.search.crossval import sweep_sizes

    record = load_typical(calibration)
    lat = read_latency(latency) if latency is not None else None
    prior_v = prior_values(record, prior) if prior is not None else None
    if str(nodes) == "auto":
        if lat is None:
            raise TreeoptError("--nodes auto needs --latency FILE (forward time vs tree size, from `treeopt profile`)")
        full, _ = fit(record, min(max_nodes, int(lat.nodes[-1])), prior_v, max_depth, top_k, STRENGTH_SIZES)
        sizes = sweep_sizes(len(full.tree))
        cv = cross_validated(record, sizes, prior_v, full.meta["strength"], max_depth=max_depth, top_k=top_k)
        m = choose_nodes(sizes, np.array([r.tokens_per_step for r in cv]), lat)
        result, held = full[:m], cv[list(sizes).index(m)]
    else:
        if not str(nodes).isdigit():
            raise TreeoptError(f"--nodes {nodes!r} is not a number: pass e.g. --nodes 64, or --nodes auto")
        result, held = fit(record, int(nodes), prior_v, max_depth, top_k)
    tree, strength = result.tree, result.meta["strength"]
    table = compare({"searched (typical)": tree, **baselines(record, tree.num_nodes)}, record, latency=lat)
    meta = {"predicted_tokens_per_step": held.tokens_per_step, "predicted_interval": list(held.interval()),
            "cv_folds": min(FOLDS, len(np.unique(record.prompt_ids))),
            "in_sample_tokens_per_step": result.tokens_per_step, "replayed_tokens_per_step": float(table["replayed"][0]),
            **rule_meta(record), "acceptance_model": NAME, "calibration": str(record.directory),
            "calibration_steps": record.num_steps, "prior_calibration": str(prior) if prior is not None else None,
            "prior_strength": f"{strength:g}", "num_heads": record.num_heads,
            "max_depth": result.meta["max_depth"], "top_k": result.meta["top_k"],
            "nodes_requested": str(nodes), "node_values": result.values.round(6).tolist()}
    lo, hi = meta["predicted_interval"]
    lines = [_header(record), f"searched tree: {tree.num_nodes} nodes, depth {tree.depth}, "
             f"max rank {tree.max_rank - 1}, typical acceptance; {_prior_note(prior, strength)}",
             f"predicted tokens/step: {held.tokens_per_step:.3f} ({lo:.3f}-{hi:.3f}), {meta['cv_folds']}-fold "
             f"cross-validated over prompts (in-sample: {result.tokens_per_step:.3f})", "", render_table(table), "", NOTE]
    if tree.num_nodes < result.requested:
        lines.append(f"note: only {tree.num_nodes} nodes of the probe lengthen an accepted path; the tree stops there")
    if out is not None:
        lines.append(f"wrote {write_tree(tree, out, format, **meta)}")
    return result, table, "\n".join(lines)


def _prior_note(prior: str | Path | None, strength: float) -> str:
    if prior is None:
        return "no prior (pass --prior-calibration DIR, a greedy calibration, to shrink the record's gains toward it)"
    how = {math.inf: "inf (the prior's order alone)", 0.0: "0 (the record alone)"}.get(strength, f"{strength:g} pseudo-steps")
    return f"gains shrunk toward {prior}'s node values, strength (cross-validated) {how}"


def evaluate_report(trees: list[str], calibration: str | Path, split: float | None = None, seed: int = 0,
                    latency: str | Path | None = None, prior: str | Path | None = None) -> tuple[pd.DataFrame, str]:
    """`treeopt evaluate --acceptance typical`: trees, the typical-searched tree of the first one's size
    (with `prior`, as `treeopt search` makes it) and the baselines, predicted on the fit prompts and
    replayed on the others (with `split`)."""
    from treeopt.search.evaluate import split_prompts

    record = load_typical(calibration)
    fit_part, held = split_prompts(record, split, seed) if split is not None else (record, record)
    prior_v = prior_values(record, prior) if prior is not None else None
    named = {spec: read_tree(spec) for spec in trees}
    n = next(iter(named.values())).num_nodes
    searched = fit(fit_part, n, prior_v)[0].tree
    named.update({k: v for k, v in {f"searched (typical, {n})": searched, **baselines(fit_part, n)}.items()
                  if k not in named})
    lat = read_latency(latency) if latency is not None else None
    table = compare(named, held, fit_part, lat)
    how = (f"predicted on a {split:.0%} fit split, replayed on the other {1 - split:.0%} of prompts (seed {seed})"
           if split is not None else "predicted and replayed on the whole record")
    return table, "\n".join([_header(record), how, "", render_table(table), "", NOTE])


def sweep_report(calibration: str | Path, max_nodes: int = 256, latency: str | Path | None = None,
                 max_depth: int | None = None, top_k: int | None = None, replayed: bool = False,
                 out: str | Path | None = None, prior: str | Path | None = None) -> tuple[pd.DataFrame, str]:
    """`treeopt sweep --acceptance typical`: for every size 0..max_nodes, the greedy tree's in-sample
    and cross-validated tokens/step (the prior's strength cross-validated at `STRENGTH_SIZES`)."""
    record = load_typical(calibration)
    prior_v = prior_values(record, prior) if prior is not None else None
    strength = choose_strength(record, prior_v, STRENGTH_SIZES, max_depth=max_depth, top_k=top_k)
    result = search(record, max_nodes, max_depth, top_k, prior_v, strength)
    n = np.arange(len(result.curve))
    df = pd.DataFrame({"nodes": n, "tokens_per_step": result.curve})
    df["cross_validated"] = [r.tokens_per_step for r in cross_validated(record, n, prior_v, strength, max_depth=max_depth,
                                                                        top_k=top_k)]
    if replayed:
        df["replayed_tokens_per_step"] = [replay(record, result.tree[:m]).tokens_per_step for m in n]
    lat = read_latency(latency) if latency is not None else None
    if lat is not None:
        df["forward_ms"] = lat.forward(n)
        df["tokens_per_s"] = lat.tokens_per_second(df["cross_validated"], n)
    lines = [_header(record), "typical acceptance; row N = the first N nodes of one greedy search; "
             f"{_prior_note(prior, strength)}; cross_validated: {FOLDS}-fold over prompts", "", render_table(df)]
    if out is not None:
        atomic_write(out, lambda p: df.to_csv(p, index=False))
        lines.append(f"wrote {out}")
    return df, "\n".join(lines)
