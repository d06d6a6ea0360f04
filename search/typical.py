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
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from search.budget import Latency, read_latency
from search.grow import SearchResult
from treeopt.core.errors import TreeoptError
from treeopt.core.fileio import atomic_write
from treeopt.core.record import TypicalRecord, load_typical
from treeopt.core.replay import ReplayResult
from treeopt.core.tables import render_table
from treeopt.core.tree import Tree
from treeopt.core.treefile import read_tree, write_tree

NAME = "typical"


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


def search(record: TypicalRecord, nodes: int, max_depth: int | None = None, top_k: int | None = None) -> SearchResult:
    """The greedy tree of `nodes` nodes inside the probe (module docstring)."""
    if nodes < 0:
        raise TreeoptError(f"--nodes {nodes} must be 0 or more")
    probe, opened = record.probe, record.open  # [N, n]
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
        if gain.max() == 0:  # no node left lengthens any accepted path
            break
        best = cand[np.lexsort((priority[cand], -gain))[0]]
        chosen.append(int(best))
        values.append(gain.max() / record.num_steps)
        reached = np.where(opened[:, best], np.maximum(reached, depth[best]), reached)
        frontier[best] = False
        frontier |= allowed & (parent == best)
    tree = Tree(tuple(probe.paths[i] for i in chosen))
    return SearchResult(tree, np.array(values), NAME, nodes,
                        {"max_depth": depth_limit, "top_k": k, "steps": record.num_steps})


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


def search_report(calibration: str | Path, nodes: int | str = 64, max_depth: int | None = None,
                  top_k: int | None = None, latency: str | Path | None = None, max_nodes: int = 256,
                  out: str | Path | None = None, format: str | None = None) -> tuple[SearchResult, pd.DataFrame, str]:
    """`treeopt search --acceptance typical`."""
    from search.budget import choose_nodes

    record = load_typical(calibration)
    lat = read_latency(latency) if latency is not None else None
    if str(nodes) == "auto":
        if lat is None:
            raise TreeoptError("--nodes auto needs --latency FILE (forward time vs tree size, from `treeopt profile`)")
        full = search(record, min(max_nodes, int(lat.nodes[-1])), max_depth, top_k)
        result = full[: choose_nodes(full, lat)]
    else:
        if not str(nodes).isdigit():
            raise TreeoptError(f"--nodes {nodes!r} is not a number: pass e.g. --nodes 64, or --nodes auto")
        result = search(record, int(nodes), max_depth, top_k)
    tree = result.tree
    table = compare({"searched (typical)": tree, **baselines(record, tree.num_nodes)}, record, latency=lat)
    meta = {"predicted_tokens_per_step": result.tokens_per_step, "replayed_tokens_per_step": float(table["replayed"][0]),
            **rule_meta(record), "acceptance_model": NAME, "calibration": str(record.directory),
            "calibration_steps": record.num_steps, "num_heads": record.num_heads,
            "max_depth": result.meta["max_depth"], "top_k": result.meta["top_k"],
            "nodes_requested": str(nodes), "node_values": result.values.round(6).tolist()}
    lines = [_header(record), f"searched tree: {tree.num_nodes} nodes, depth {tree.depth}, "
             f"max rank {tree.max_rank - 1}, typical acceptance", "", render_table(table), "", NOTE]
    if tree.num_nodes < result.requested:
        lines.append(f"note: only {tree.num_nodes} nodes of the probe lengthen an accepted path; the tree stops there")
    if out is not None:
        lines.append(f"wrote {write_tree(tree, out, format, **meta)}")
    return result, table, "\n".join(lines)


def evaluate_report(trees: list[str], calibration: str | Path, split: float | None = None, seed: int = 0,
                    latency: str | Path | None = None) -> tuple[pd.DataFrame, str]:
    """`treeopt evaluate --acceptance typical`: trees, the typical-searched tree of the first one's size
    and the baselines, predicted on the fit prompts and replayed on the others (with `split`)."""
    from search.evaluate import split_prompts

    record = load_typical(calibration)
    fit, held = split_prompts(record, split, seed) if split is not None else (record, record)
    named = {spec: read_tree(spec) for spec in trees}
    n = next(iter(named.values())).num_nodes
    named.update({k: v for k, v in {f"searched (typical, {n})": search(fit, n).tree, **baselines(fit, n)}.items()
                  if k not in named})
    lat = read_latency(latency) if latency is not None else None
    table = compare(named, held, fit, lat)
    how = (f"predicted on a {split:.0%} fit split, replayed on the other {1 - split:.0%} of prompts (seed {seed})"
           if split is not None else "predicted and replayed on the whole record")
    return table, "\n".join([_header(record), how, "", render_table(table), "", NOTE])


def sweep_report(calibration: str | Path, max_nodes: int = 256, latency: str | Path | None = None,
                 max_depth: int | None = None, top_k: int | None = None, replayed: bool = False,
                 out: str | Path | None = None) -> tuple[pd.DataFrame, str]:
    """`treeopt sweep --acceptance typical`: the greedy tree's tokens/step for every size 0..max_nodes."""
    record = load_typical(calibration)
    result = search(record, max_nodes, max_depth, top_k)
    n = np.arange(len(result.curve))
    df = pd.DataFrame({"nodes": n, "tokens_per_step": result.curve})
    if replayed:
        df["replayed_tokens_per_step"] = [replay(record, result.tree[:m]).tokens_per_step for m in n]
    lat = read_latency(latency) if latency is not None else None
    if lat is not None:
        df["forward_ms"] = lat.forward(n)
        df["tokens_per_s"] = lat.tokens_per_second(df["tokens_per_step"], n)
    lines = [_header(record), "typical acceptance; row N = the first N nodes of one greedy search", "", render_table(df)]
    if out is not None:
        atomic_write(out, lambda p: df.to_csv(p, index=False))
        lines.append(f"wrote {out}")
    return df, "\n".join(lines)
