"""The library twins of `treeopt search`, `evaluate` and `sweep`: load the files, run, return the
tables and the text the CLI prints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from search.baselines import baseline_trees
from search.budget import best_chain_length, read_latencies, read_latency, search_auto
from search.evaluate import compare, evaluate
from search.grow import SearchResult, search
from search.schedule import batch_schedule, write_schedule
from search.sweep import sweep
from treeopt.core.errors import TreeoptError
from treeopt.core.fileio import atomic_write, check_writable
from treeopt.core.published import BASELINES, PUBLISHED
from treeopt.core.record import Calibration, load_calibration
from treeopt.core.tables import render_table
from treeopt.core.treefile import read_tree, write_tree


def _header(calibration: Calibration) -> str:
    prompts = len(np.unique(calibration.prompt_ids))
    return (f"calibration {calibration.directory}: {calibration.num_positions} positions, {prompts} prompts, "
            f"{calibration.num_heads} heads, top-{calibration.top_k}")


def search_report(calibration: str | Path, nodes: int | str = 64, model: str = "empirical",
                  max_depth: int | None = None, top_k: int | None = None, latency: str | Path | None = None,
                  max_nodes: int = 256, out: str | Path | None = None, format: str | None = None,
                  batch_size: int = 1) -> tuple[SearchResult, pd.DataFrame, str]:
    """`treeopt search`: search, compare with the baselines, write the tree file; returns the result,
    the comparison table and the text to print. `batch_size` picks the latency file's rows (tokens/s
    of that many sequences decoded together)."""
    cal = load_calibration(calibration)
    lat = read_latency(latency, batch_size) if latency is not None else None
    if out is not None:
        check_writable(out, fix="pass another --out")
    if str(nodes) == "auto":
        if lat is None:
            raise TreeoptError("--nodes auto needs --latency FILE (forward time vs tree size, from `treeopt profile`)")
        result = search_auto(cal, lat, model, max_nodes, max_depth, top_k)
    else:
        try:
            n = int(nodes)
        except ValueError:
            raise TreeoptError(f"--nodes {nodes!r} is not a number: pass e.g. --nodes 64, or --nodes auto") from None
        result = search(cal, n, model, max_depth, top_k)
    tree = result.tree
    chain = best_chain_length(cal, model, lat)
    trees = {f"searched ({model})": tree}
    published = len(PUBLISHED[BASELINES[0]])
    if tree.num_nodes != published:  # the searched tree at the published trees' size, for a like-for-like row
        trees[f"searched, {published} nodes"] = search(cal, published, model, max_depth, top_k).tree
    trees.update(baseline_trees(cal, tree.num_nodes, model, max_depth, top_k))
    table = compare(trees, cal, model, latency=lat)
    meta = {"predicted_tokens_per_step": result.tokens_per_step, "replayed_tokens_per_step": float(table["replayed"][0]),
            "acceptance_model": model, "calibration": str(cal.directory), "calibration_positions": cal.num_positions,
            "num_heads": cal.num_heads, "calibration_top_k": cal.top_k, "max_depth": result.meta["max_depth"],
            "top_k": result.meta["top_k"], "nodes_requested": str(nodes) if str(nodes) == "auto" else result.requested,
            "best_chain_length": chain, "node_values": result.values.round(6).tolist()}
    if lat is not None:
        meta.update({"latency": lat.source, "batch_size": lat.batch_size, "forward_ms": float(table["forward_ms"][0]),
                     "predicted_tokens_per_s": float(lat.tokens_per_second(result.tokens_per_step, tree.num_nodes))})
    lines = [_header(cal),
             f"searched tree: {tree.num_nodes} nodes, depth {tree.depth}, max rank {tree.max_rank - 1}, "
             f"{model} model" + (f" (--nodes auto: best predicted tokens/s of sizes 1..{min(max_nodes, int(lat.nodes[-1]))}"
                                 f" at batch size {lat.batch_size})" if str(nodes) == "auto" else "")]
    if tree.num_nodes < result.requested:
        lines.append(f"note: only {tree.num_nodes} nodes have a nonzero acceptance probability; the tree stops there")
    lines += ["", render_table(table), "",
              "predicted: 1 + sum of node values under the model; replayed: exact greedy decoding replayed on the "
              "logged continuations (95 % bootstrap interval over prompts)",
              f"best top-1 chain length for vLLM num_speculative_tokens / TGI --speculate: {chain}"
              + ("" if lat is not None else " (pass --latency for the length with the best tokens/s)")]
    if out is not None:
        path = write_tree(tree, out, format, **meta)
        lines.append(f"wrote {path}")
    return result, table, "\n".join(lines)


def evaluate_report(trees: list[str], calibration: str | Path, model: str = "empirical", split: float | None = None,
                    seed: int = 0, latency: str | Path | None = None) -> tuple[pd.DataFrame, str]:
    """`treeopt evaluate`: replay tree files (and the baselines) on a calibration."""
    cal = load_calibration(calibration)
    lat = read_latency(latency) if latency is not None else None
    named = {spec: read_tree(spec) for spec in trees}
    table = evaluate(named, cal, model, split, seed, lat)
    how = (f"predicted on a {split:.0%} fit split, replayed on the other {1 - split:.0%} of prompts (seed {seed})"
           if split is not None else "predicted and replayed on the whole calibration")
    return table, "\n".join([_header(cal), how, "", render_table(table)])


def sweep_report(calibration: str | Path, max_nodes: int = 256, model: str = "empirical",
                 latency: str | Path | None = None, max_depth: int | None = None, top_k: int | None = None,
                 replayed: bool = False, out: str | Path | None = None) -> tuple[pd.DataFrame, str]:
    """`treeopt sweep`: the optimal tree's tokens/step (and tokens/s) for every size 0..max_nodes."""
    cal = load_calibration(calibration)
    lats = list(read_latencies(latency).values()) if latency is not None else []
    lat = lats[0] if lats else None  # the smallest batch size's, for the baselines
    if out is not None:
        check_writable(out, fix="pass another --out")
    df = sweep(cal, max_nodes, model, lats or None, max_depth, top_k, replayed)
    lines = [_header(cal), f"{model} model; row N = the first N nodes of one greedy search"
             + ("; one block of rows per batch size of the latency file" if len(lats) > 1 else ""), "", render_table(df)]
    for size, rows in (df[df["nodes"] > 0].groupby("batch_size") if lats else []):
        if rows["tokens_per_s"].notna().any():
            best = rows["tokens_per_s"].idxmax()
            speedup = df["speedup"][best]
            lines.append(f"best predicted tokens/s at batch size {size}: N = {int(df['nodes'][best])}, "
                         f"{df['tokens_per_s'][best]:.1f}" + ("" if np.isnan(speedup) else f" ({speedup:.2f}x plain decoding)"))
    base = compare(baseline_trees(cal, int(df["nodes"].iloc[-1]), model, max_depth, top_k), cal, model, latency=lat)
    lines += ["", f"baselines (best Cartesian tree within N = {int(df['nodes'].iloc[-1])} nodes):", render_table(base),
              f"best top-1 chain length for vLLM num_speculative_tokens / TGI --speculate: "
              f"{best_chain_length(cal, model, lat)}"]
    if out is not None:
        atomic_write(out, lambda p: df.to_csv(p, index=False))
        lines.append(f"wrote {out}")
    return df, "\n".join(lines)


def schedule_report(calibration: str | Path, latency: str | Path, batch_sizes: list[int] | None = None,
                    model: str = "empirical", max_depth: int | None = None, top_k: int | None = None,
                    max_nodes: int = 256, out: str | Path | None = None) -> tuple[list[dict], str]:
    """`treeopt search --batch-sizes 1,4,16 --latency FILE`: the best tree at each batch size (all of the
    latency file's when `batch_sizes` is None), written as one schedule file (search/schedule.py)."""
    cal = load_calibration(calibration)
    lats = read_latencies(latency)
    if batch_sizes:
        lats = {b: read_latency(latency, b) for b in batch_sizes}
    if out is not None:
        check_writable(out, fix="pass another --out")
    entries = batch_schedule(cal, lats, model, max_nodes, max_depth, top_k)
    table = pd.DataFrame([{k: e[k] for k in ("batch_size", "nodes", "predicted_tokens_per_step", "forward_ms",
                                             "predicted_tokens_per_s", "predicted_speedup")} for e in entries])
    lines = [_header(cal), f"the tree of best predicted tokens/s at each batch size of {latency} ({model} model); "
             "speedup over plain decoding at the same batch size", "", render_table(table)]
    if out is not None:
        path = write_schedule(out, entries, acceptance_model=model, calibration=str(cal.directory),
                              latency=str(latency))
        lines.append(f"wrote {path}")
    return entries, "\n".join(lines)
