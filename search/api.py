"""The library twins of `treeopt search`, `evaluate` and `sweep`: load the files, run, return the
tables and the text the CLI prints. One stack for every acceptance rule: the record is opened as a
`treeopt.search.source.Source` (greedy: a calibration; typical: a typical record and its prior)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from treeopt.search.acceptance import DEFAULT_MODEL, STRENGTH_SIZES, resolve_model
from treeopt.search.baselines import baseline_trees
from treeopt.search.budget import best_chain_length, read_latencies, read_latency, search_auto
from treeopt.search.crossval import FOLDS, calibration_curve, cross_validated, prediction
from treeopt.search.evaluate import compare, evaluate
from treeopt.search.grow import SearchResult, search
from treeopt.search.schedule import batch_schedule, write_schedule
from treeopt.search.source import Greedy, Source
from treeopt.search.sweep import sweep
from treeopt.search.targets import Target, export_targets, get_target, require
from treeopt.search.typical import Typical, prior_values
from treeopt.core.errors import TreeoptError
from treeopt.core.fileio import atomic_write, check_writable
from treeopt.core.prompts import overlap, overlap_warning
from treeopt.core.published import BASELINES, PUBLISHED
from treeopt.core.drafter import drafter_of, parse_drafter
from treeopt.core.record import Calibration, check_rule, load_calibration, load_typical
from treeopt.core.serving import ENGINE, SERVING_FORMATS, VARIABLE_K, check_serving
from treeopt.core.settings import SearchConfig, SweepConfig
from treeopt.core.tables import render_table
from treeopt.core.tree import Tree
from treeopt.core.treefile import file_format, read_tree_meta, write_tree


def open_source(directory: str | Path, acceptance: str = "greedy", model: str = DEFAULT_MODEL,
                prior: str | Path | None = None) -> Source:
    """The record in `directory` as the source of `--acceptance` (the record must say the same rule):
    greedy, a calibration under `model` (its strength resolved); typical, a typical record with `prior`,
    a greedy calibration its growth shrinks toward."""
    if acceptance not in ("greedy", "typical"):
        raise TreeoptError(f"unknown --acceptance {acceptance!r}: use greedy or typical")
    if prior is not None and acceptance != "typical":
        raise TreeoptError("--prior-calibration is for --acceptance typical (a typical record searched with a greedy prior)")
    check_rule(directory, acceptance)
    if acceptance == "typical":
        record = load_typical(directory)
        if prior is None:
            return Typical(record)
        return Typical(record, prior_values(record, prior), strength=None, prior_source=prior)
    calibration = load_calibration(directory)
    return Greedy(calibration, resolve_model(calibration, model))


def search_report(calibration: str | Path, nodes: int | str = SearchConfig.nodes, model: str = DEFAULT_MODEL,
                  max_depth: int | None = None, top_k: int | None = None, latency: str | Path | None = None,
                  max_nodes: int = SearchConfig.max_nodes, out: str | Path | None = None, format: str | None = None,
                  batch_size: int = 1, target: str | None = None, acceptance: str = "greedy",
                  prior: str | Path | None = None) -> tuple[SearchResult, pd.DataFrame, str]:
    """`treeopt search`: search (within `target`'s rules, see `treeopt.search.targets`), compare with the
    baselines, write the tree file; returns the result, the comparison table and the text to print.
    The headline prediction is the cross-validated replay (`treeopt.search.crossval`); `batch_size` picks the
    latency file's rows (tokens/s of that many sequences decoded together). `acceptance`: the rule the
    record was made under (`prior`, typical: a greedy calibration its growth shrinks toward)."""
    lat = read_latency(latency, batch_size) if latency is not None else None
    tgt = get_target(target)
    if out is not None:
        check_writable(out, fix="pass another --output")
    auto = str(nodes) == "auto"
    if auto and lat is None:
        raise TreeoptError("--nodes auto needs --latency FILE (forward time vs tree size, from `treeopt profile`)")
    if not auto and not str(nodes).lstrip("-").isdigit():
        raise TreeoptError(f"--nodes {nodes!r} is not a number: pass e.g. --nodes 64, or --nodes auto")
    source = open_source(calibration, acceptance, model, prior).resolved(STRENGTH_SIZES if auto else [int(nodes)],
                                                                          max_depth, top_k)
    result = (search_auto(source, lat, max_nodes=max_nodes, max_depth=max_depth, top_k=top_k, target=tgt) if auto
              else search(source, int(nodes), max_depth=max_depth, top_k=top_k, target=tgt))
    tree, model = result.tree, source.model
    chain = best_chain_length(source, latency=lat)
    name = f"searched ({model})"
    trees = {name: tree}
    published = len(PUBLISHED[BASELINES[0]])
    if tree.num_nodes != published:  # the searched tree at the published trees' size, for a like-for-like row
        trees[f"searched, {published} nodes"] = search(source, published, max_depth=max_depth, top_k=top_k,
                                                       target=tgt).tree
    cv = dict(zip(trees, cross_validated(source, [t.num_nodes for t in trees.values()], max_depth=max_depth,
                                         top_k=top_k, target=tgt)))
    trees.update(baseline_trees(source, tree.num_nodes, max_depth=max_depth, top_k=top_k))
    table = compare(trees, source, latency=lat, held_out=cv)
    fields, sources = prediction(source, tree, result.tokens_per_step, cv[name], max_depth=max_depth,
                                 top_k=top_k, target=tgt)
    extra = {"best_chain_length": chain, "node_values": result.values.round(6).tolist(),
             **({"target": tgt.name} if tgt is not None else {})}
    if len(sources):
        extra["per_source"] = sources.round(4).to_dict("records")
    if lat is not None:
        extra.update({"latency": lat.source, "batch_size": lat.batch_size, "forward_ms": float(table["forward_ms"][0]),
                      "predicted_tokens_per_s": float(table["tokens_per_s"][0])})
    meta = source.tree_meta(fields, {"max_depth": result.meta["max_depth"], "top_k": result.meta["top_k"],
                                     "nodes_requested": str(nodes) if str(nodes) == "auto" else result.requested},
                            extra)
    lines = [source.header(),
             f"searched tree: {tree.num_nodes} nodes, depth {tree.depth}, max rank {tree.max_rank - 1}, "
             f"{model} model, {source.rule} acceptance"
             + (f", within {tgt.consumer}'s rules (--target {tgt.name})" if tgt is not None else "")
             + (f" (--nodes auto: best predicted tokens/s of sizes 1..{result.meta['auto_max']}"
                f" at batch size {lat.batch_size})" if str(nodes) == "auto" else ""),
             predicted_line(fields)]
    if tree.num_nodes < result.requested:
        lines.append(f"note: only {tree.num_nodes} nodes have a nonzero acceptance probability; the tree stops there")
    lines += ["", render_table(table), "", explain(source)]
    if len(sources):
        lines += ["", "per source of the calibration's prompts (cross-validated; leave_one_source_out: the tree "
                      "searched on the other sources):", render_table(sources)]
    lines.append(f"best top-1 chain length for vLLM num_speculative_tokens / TGI --speculate: {chain}"
                 + ("" if lat is not None else " (pass --latency for the length with the best tokens/s)"))
    if out is not None:
        path = export(tree, out, format, source.num_heads, tgt, meta)
        lines.append(f"wrote {path}")
    return result, table, "\n".join(lines)


def explain(source: Source) -> str:  # what the comparison table's columns mean
    typical = source.rule == "typical"
    rule = "1 + the mean accepted depth over the logged steps" if typical else "tokens/step of exact greedy decoding replayed"
    uniform = "the same over all logged steps" if typical else ("the expectation at a uniformly drawn position, which "
                                                                 "runs above what decoding gives")
    return (f"predicted: {rule} on prompts the tree was not searched on ({FOLDS}-fold cross-validation over the "
            "calibration's prompts; fixed trees: replayed on all of them), 95 % bootstrap interval over prompts "
            "(ci_low..ci_high); replayed: the replay on the calibration's own prompts (in-sample); "
            f"uniform_tokens_per_step: 1 + the sum of node values, {uniform}")


def predicted_line(fields: dict) -> str:
    """The headline sentence of a searched tree's figures (`treeopt.search.crossval.prediction`)."""
    lo, hi = fields["predicted_interval"]
    line = (f"predicted {fields['predicted_tokens_per_step']:.3f} tokens/step (95 % interval {lo:.3f}-{hi:.3f}; "
            f"{fields['cv_folds']}-fold cross-validated replay over prompts); in-sample replay "
            f"{fields['in_sample_tokens_per_step']:.3f}"
            + (f", uniform expectation {fields['uniform_tokens_per_step']:.3f}" if "uniform_tokens_per_step" in fields
               else ""))
    if "leave_one_source_out_tokens_per_step" in fields:
        line += (f"; on other kinds of prompts (leave one source out) "
                 f"{fields['leave_one_source_out_tokens_per_step']:.3f}: calibrate on your own traffic")
    return line


def export(tree: Tree, out: str | Path, format: str | None = None, num_heads: int | None = None,
           target: Target | None = None, meta: dict | None = None) -> Path:
    """Write `tree` for the consumer of `format` (and `target`), or a one-line error naming the rule
    of theirs that it breaks (`treeopt.search.targets.require`)."""
    for t in export_targets(file_format(out, format), target):
        require(tree, t, num_heads, where=f"the tree for {out}")
    return write_tree(tree, out, format, **(meta or {}))


def export_report(tree: str | Path, out: str | Path, format: str | None = None, target: str | None = None,
                  drafter: str | None = None) -> str:
    """`treeopt export`: write a tree (file, published name or list string) in a consumer's format,
    after that consumer's check (and `target`'s); the depth rule uses the heads the tree file records.
    `drafter` (serving formats: vllm, sglang, trtllm-eagle3): what the engine drafts with, default the
    drafter the tree file records (its calibration's), else heads; see `treeopt.core.serving`."""
    t, meta = read_tree_meta(tree)
    tgt = get_target(target)
    fmt = file_format(out, format)
    if drafter is not None and fmt not in SERVING_FORMATS:
        raise TreeoptError(f"--drafter is for --format {', '.join(SERVING_FORMATS)} (the engine's config names it): "
                           f"drop --drafter for --format {fmt}")
    drafter = drafter or meta.get("drafter")
    if fmt in SERVING_FORMATS:
        check_serving(fmt, drafter)
        recorded = meta.get("drafter") or ("heads" if "num_heads" in meta else None)
        if recorded and drafter:
            same_drafter(recorded, drafter, f"{tree} was searched on a calibration")
    check_writable(out, fix="pass another --output")
    path = export(t, out, format, meta.get("num_heads"), tgt,
                  {**meta, **({"target": tgt.name} if tgt else {}), **({"drafter": drafter} if drafter else {})})
    checked = " and ".join(t.consumer for t in export_targets(fmt, tgt))
    drafts = ""
    if fmt in SERVING_FORMATS:
        spec = parse_drafter(drafter)
        drafts = f"; {ENGINE[fmt]} drafts a top-1 chain of {t.num_nodes} tokens with {spec}"
        if fmt == "vllm" and spec.kind == "heads" and not spec.path:
            drafts += (" (add \"model\": the heads from `treeopt export-heads --format vllm`, or pass "
                       "--drafter heads:DIR)")
    return f"wrote {path}" + (f" (checked against {checked}'s rules)" if checked else "") + drafts


def vllm_drafter(cal: Calibration, drafter: str | None) -> str:
    """`--drafter` for vLLM's config of a schedule predicted on `cal`: the calibration's own drafter
    unless another location of it is given."""
    theirs = drafter_of(cal.meta)
    if drafter is not None:
        same_drafter(theirs, drafter, f"{cal.directory} was calibrated")
    return drafter or theirs


def same_drafter(recorded: str, given: str, what: str) -> None:
    """A one-line error unless `given` is the drafter the predictions were made with (same kind, for
    n-gram lookup the same lengths; a drafter with weights may be named by another path)."""
    spec, own = parse_drafter(given), parse_drafter(recorded)
    if spec.kind != own.kind or (spec.kind == "ngram" and spec != own):
        fix = recorded if own.kind == "ngram" else f"{own.kind}[:PATH]"
        raise TreeoptError(f"{what} with --drafter {recorded}: its predictions are not --drafter {spec}'s; "
                           f"pass --drafter {fix}")


def evaluate_report(trees: list[str], calibration: str | Path, model: str = DEFAULT_MODEL, split: float | None = None,
                    seed: int = 0, latency: str | Path | None = None, acceptance: str = "greedy",
                    prior: str | Path | None = None) -> tuple[pd.DataFrame, str]:
    """`treeopt evaluate`: replay tree files (and the baselines) on a calibration, with how the
    cross-validated prediction grows with the number of calibration prompts."""
    source = open_source(calibration, acceptance, model, prior).resolved()
    lat = read_latency(latency) if latency is not None else None
    named = {spec: read_tree_meta(spec) for spec in trees}
    table = evaluate({k: t for k, (t, _) in named.items()}, source, split=split, seed=seed, latency=lat)
    how = (f"predicted on a {split:.0%} fit split, replayed on the other {1 - split:.0%} of prompts (seed {seed})"
           if split is not None else "given trees replayed on the whole calibration; the tree searched here "
                                     f"predicted by {FOLDS}-fold cross-validation")
    lines = [source.header(), how]
    if isinstance(source, Greedy):  # (a typical record keeps no instructions)
        lines += [w for spec, (_, meta) in named.items() if (w := _overlap(spec, meta, source.calibration))]
    lines += ["", render_table(table), "", explain(source)]
    if table["nodes"].iloc[0] > 0:
        curve = calibration_curve(source, int(table["nodes"].iloc[0]), seed=seed)
        lines += ["", f"how much calibration is enough: the {int(table['nodes'].iloc[0])}-node tree searched on "
                      f"fit_prompts prompts, replayed on held-out folds ({source.model} model)", render_table(curve)]
    return table, "\n".join(lines)


def _overlap(spec: str, meta: dict, cal: Calibration) -> str:
    """A warning when a tree file's own calibration shares prompts with the one it is evaluated on."""
    own = meta.get("calibration")
    if not own or cal.directory is None or Path(own).resolve() == cal.directory.resolve() or not Path(own).is_dir():
        return ""
    try:
        theirs = load_calibration(own).continuations()["instruction"].tolist()
    except TreeoptError:
        return ""
    measured = cal.continuations()["instruction"].tolist()
    return overlap_warning(overlap(measured, theirs), len(measured), f"evaluation (tree {spec} was searched on {own})")


def sweep_report(calibration: str | Path, max_nodes: int = SweepConfig.max_nodes, model: str = DEFAULT_MODEL,
                 latency: str | Path | None = None, max_depth: int | None = None, top_k: int | None = None,
                 replayed: bool = False, out: str | Path | None = None, acceptance: str = "greedy",
                 prior: str | Path | None = None) -> tuple[pd.DataFrame, str]:
    """`treeopt sweep`: the optimal tree's tokens/step (and tokens/s) for every size 0..max_nodes."""
    source = open_source(calibration, acceptance, model, prior).resolved(STRENGTH_SIZES, max_depth, top_k)
    lats = list(read_latencies(latency).values()) if latency is not None else []
    lat = lats[0] if lats else None  # the smallest batch size's, for the baselines
    if out is not None:
        check_writable(out, fix="pass another --output")
    df = sweep(source, max_nodes, latency=lats or None, max_depth=max_depth, top_k=top_k, replayed=replayed)
    lines = [source.header(), f"{source.model} model; row N = the first N nodes of one greedy search; tokens_per_step: "
                           f"{FOLDS}-fold cross-validated replay over prompts (uniform_tokens_per_step: 1 + sum of "
                           "node values)" + ("; one block of rows per batch size of the latency file" if len(lats) > 1 else ""),
             "", render_table(df)]
    for size, rows in (df[df["nodes"] > 0].groupby("batch_size") if lats else []):
        if rows["tokens_per_s"].notna().any():
            best = rows["tokens_per_s"].idxmax()
            speedup = df["speedup"][best]
            lines.append(f"best predicted tokens/s at batch size {size}: N = {int(df['nodes'][best])}, "
                         f"{df['tokens_per_s'][best]:.1f}" + ("" if np.isnan(speedup) else f" ({speedup:.2f}x plain decoding)"))
    base = compare(baseline_trees(source, int(df["nodes"].iloc[-1]), max_depth=max_depth, top_k=top_k), source,
                   latency=lat)
    lines += ["", f"baselines (best Cartesian tree within N = {int(df['nodes'].iloc[-1])} nodes):", render_table(base),
              f"best top-1 chain length for vLLM num_speculative_tokens / TGI --speculate: "
              f"{best_chain_length(source, latency=lat)}"]
    if out is not None:
        atomic_write(out, lambda p: df.to_csv(p, index=False))
        lines.append(f"wrote {out}")
    return df, "\n".join(lines)


def schedule_report(calibration: str | Path, latency: str | Path, batch_sizes: list[int] | None = None,
                    model: str = DEFAULT_MODEL, max_depth: int | None = None, top_k: int | None = None,
                    max_nodes: int = SearchConfig.max_nodes, out: str | Path | None = None) -> tuple[list[dict], str]:
    """`treeopt search --serving-batches 1,4,16 --latency FILE`: the best tree at each batch size (all of the
    latency file's when `batch_sizes` is None), written as one schedule file (search/schedule.py)."""
    source = open_source(calibration, "greedy", model)
    cal, model = source.calibration, source.model
    lats = read_latencies(latency)
    if batch_sizes:
        lats = {b: read_latency(latency, b) for b in batch_sizes}
    if out is not None:
        check_writable(out, fix="pass another --output")
    entries = batch_schedule(cal, lats, model, max_nodes, max_depth, top_k)
    table = pd.DataFrame([{k: e[k] for k in ("batch_size", "nodes", "predicted_tokens_per_step", "forward_ms",
                                             "predicted_tokens_per_s", "predicted_speedup")} for e in entries])
    lines = [source.header(), f"the tree of best predicted tokens/s at each batch size of {latency} ({model} model); "
             "speedup over plain decoding at the same batch size", "", render_table(table)]
    if out is not None:
        path = write_schedule(out, entries, acceptance_model=model, calibration=str(cal.directory),
                              latency=str(latency))
        lines.append(f"wrote {path}")
    return entries, "\n".join(lines)


MEDUSA_FIXED_K = ("note: vLLM 0.32's Medusa drafter keeps k fixed (`vllm/v1/spec_decode/medusa.py`, MedusaProposer.propose "
                  "asserts num_speculative_tokens == the configured one) and stops on a schedule whose k changes: "
                  "for Medusa heads serve each batch range with its own k (the table); EAGLE-3, a draft model "
                  "and n-gram lookup take the ranges")


def vllm_schedule_report(calibration: str | Path, latency: str | Path, batch_sizes: list[int] | None = None,
                         model: str = DEFAULT_MODEL, out: str | Path | None = None,
                         sweep: bool = False, drafter: str | None = None) -> tuple[list[dict], str]:
    """`treeopt search --engine vllm` (and `sweep --engine vllm`): the chain length of best predicted
    vLLM throughput at each batch size of `latency` (`treeopt profile --engine vllm`), from the
    calibration's cross-validated chain predictions; -o writes vLLM's --speculative-config JSON
    (search) or the table as CSV (sweep). `drafter`: what vLLM loads (e.g. heads:DIR, eagle3:DIR), the
    calibration's own kind; default the calibration's drafter. See `treeopt.search.vllm`."""
    from treeopt.search.vllm import speculative_config, vllm_schedule, write_vllm_config

    cal = load_calibration(calibration)
    drafter = vllm_drafter(cal, drafter)
    model = resolve_model(cal, model)
    lats = read_latencies(latency)
    if batch_sizes:
        lats = {b: read_latency(latency, b) for b in batch_sizes}
    if out is not None:
        check_writable(out, fix="pass another --output")
    max_k = min(cal.num_heads, max(int(lat.nodes[-1]) for lat in lats.values()))
    entries = vllm_schedule(cal, lats, max_k, model)
    lines = [Greedy(cal, model).header(), f"vLLM's top-1 chain of best predicted tokens/s at each batch size of {latency} "
             f"({model} model, cross-validated chain tokens/step); k = 0: plain decoding", ""]
    if sweep:
        rows = [{"batch_size": e["batch_size"], "k": k, "predicted_tokens_per_s": t,
                 "chosen": "*" if k == e["k"] else ""}
                for e in entries for k, t in enumerate(e["predicted_tokens_per_s_by_k"])]
        table = pd.DataFrame(rows)
        lines.append(render_table(table))
        if out is not None:
            atomic_write(out, lambda p: table.to_csv(p, index=False))
            lines.append(f"wrote {out}")
        return entries, "\n".join(lines)
    table = pd.DataFrame([{k: e[k] for k in ("batch_size", "k", "predicted_tokens_per_step", "step_ms", "plain_step_ms",
                                             "predicted_tokens_per_s", "predicted_speedup")} for e in entries])
    lines.append(render_table(table))
    config = speculative_config(entries, drafter)
    if config is not None and "num_speculative_tokens_per_batch_size" in config and config["method"] not in VARIABLE_K:
        lines.append(MEDUSA_FIXED_K)
    if config is None:
        lines.append("speculation loses at every batch size: serve vLLM without --speculative-config")
    else:
        hint = ("" if config["method"] != "medusa" or "model" in config else
                " (add \"model\": the heads from `treeopt export-heads --format vllm`, or pass --drafter heads:DIR)")
        lines.append(f"--speculative-config{hint}: " + json.dumps(config))
    if out is not None:
        lines.append(f"wrote {write_vllm_config(out, config)}")
    return entries, "\n".join(lines)
