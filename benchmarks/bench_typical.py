"""Typical acceptance, predicted vs measured: trees searched for typical acceptance and for greedy, both
decoded under typical acceptance on prompts the calibrations did not see.

    nice -n 10 .venv/bin/python benchmarks/bench_typical.py [--work runs/bench-typical] [--fit 24]
        [--held-out 16] [--fit-typical N] [--max-new-tokens 64] [--nodes 16,64] [--temperature 0.7] [--seed 0] [--threads 1]
        [--part all|greedy|record|typical]

AlpacaEval prompts 0..fit-1 calibrate greedy (`treeopt calibrate`); the typical record (`treeopt calibrate
--acceptance typical` at the given temperature, default thresholds) takes those and, with --fit-typical N,
the prompts after the held-out ones up to N in all; its probe's internal nodes are the default top-4 x
top-2 x top-1 plus the greedy-searched trees' own, so every tree compared lies inside the probe. The
typical search shrinks toward the greedy calibration (`treeopt search --acceptance typical
--prior-calibration`). At each size the greedy-searched and the typical-searched tree are benched with
`treeopt bench --acceptance typical` on the held-out prompts fit..fit+held_out-1 (measured tokens/step,
with a 95 % bootstrap interval over prompts), beside the typical record's prediction: 1 + mean accepted
depth over the probe decode's logged steps, cross-validated over the record's prompts for the tree
searched on it. A second decode of the first held-out prompt with every tree checks that the same seed
gives the same tokens. Every stage resumes (run the same command again); --part greedy / record /
typical run the heavy work in separate processes, then --part all prints the table (--partial: of the
held-out prompts every tree has run so far, running nothing more).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="runs/bench-typical")
    p.add_argument("--prompts", default=None, help="prompt source (default: the local AlpacaEval copy)")
    p.add_argument("--fit", type=int, default=24, help="calibration prompts (the first ones)")
    p.add_argument("--held-out", type=int, default=16, help="bench prompts (the next ones)")
    p.add_argument("--fit-typical", type=int, default=None,
                   help="prompts of the typical record: the fit ones, then the ones after the held-out ones up to "
                        "this many in all (default: the fit ones)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--nodes", default="16,64")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--part", default="all", choices=("all", "greedy", "record", "typical"))
    p.add_argument("--partial", action="store_true", help="run nothing more: the table of the prompts every tree has run")
    args = p.parse_args()

    from treeopt.calibrate.run import CalibrationConfig, calibrate
    from treeopt.calibrate.typical import DEFAULT_INTERNAL, calibrate_typical
    from treeopt.decoding.decoder import Acceptance, TreeDecoder, compiles_by_default
    from treeopt.decoding.heads import resolve_heads
    from treeopt.decoding.models import chat_prompt, load_model, set_threads, stop_token_ids
    from treeopt.reports.bench import run_bench
    from treeopt.search import typical
    from treeopt.search.crossval import cross_validated
    from treeopt.search.grow import search
    from treeopt.core.prompts import default_prompts, load_instructions
    from treeopt.core.record import load_calibration, load_typical
    from treeopt.core.replay import ReplayResult
    from treeopt.core.tables import render_table
    import numpy as np
    import pandas as pd

    from treeopt.core.tree import Tree
    from treeopt.core.treefile import write_tree

    set_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    source = args.prompts or default_prompts()
    n_typical = max(args.fit_typical or args.fit, args.fit)
    instructions = load_instructions(source, limit=args.fit + args.held_out + n_typical - args.fit)
    held = instructions[args.fit: args.fit + args.held_out]
    files = {}
    for name, part in (("fit", instructions[: args.fit]), ("held-out", held),
                       ("typical-fit", instructions[: args.fit] + instructions[args.fit + args.held_out:])):
        files[name] = work / f"{name}.json"
        files[name].write_text(json.dumps([{"instruction": s} for s in part]))
    sizes = [int(n) for n in args.nodes.split(",")]
    rule = Acceptance("typical", args.temperature, seed=args.seed)
    loaded = load_model("smollm2-135m", device="cpu", attention="decode")  # as `treeopt bench` decodes
    heads = resolve_heads(None, loaded.model)
    config = CalibrationConfig(out=work / "greedy", prompts=str(files["fit"]), max_new_tokens=args.max_new_tokens, seed=args.seed,
                               device="cpu", progress=False)

    def log(s):
        print(s, file=sys.stderr, flush=True)

    log("greedy calibration")
    greedy_cal = load_calibration(calibrate(config, loaded=loaded, heads=heads))
    trees = {f"greedy-searched {n}": search(greedy_cal, n).tree for n in sizes}
    internal = set(Tree.cartesian(list(DEFAULT_INTERNAL[: heads.num_heads - 1])).paths)
    for tree in trees.values():
        internal |= {q[:-1] for q in tree.paths if len(q) > 1}
    probe_internal = Tree.from_choices(sorted(internal, key=lambda q: (len(q), q)))

    def bench(kind: str):
        """Measure the `kind`-searched trees under typical acceptance on the held-out prompts; a typical-searched
        tree identical to the greedy-searched one of its size takes that one's measurement (same seed, same
        tokens: rerun_same checks it). --partial: take the trees and records there are."""
        names = [f"{kind}-searched {n}" for n in sizes]
        paths = [work / f"{kind}-searched-{n}.json" for n in sizes]
        out = work / f"bench-{kind}"
        done = json.loads((out / "bench.json").read_text()) if (out / "bench.json").is_file() else {}
        manifest = out / ".bench-records" / "manifest.json"
        if args.partial and (done or manifest.is_file()):
            benched = done.get("trees") or json.loads(manifest.read_text())["trees"]
            trees.update({name: Tree(tuple(map(tuple, benched[path.stem]))) for name, path in zip(names, paths)
                          if path.stem in benched})
        twin = {name: f"greedy-searched-{n}" for name, n in zip(names, sizes)
                if kind != "greedy" and trees[name] == trees[f"greedy-searched {n}"]}
        run = [(name, path) for name, path in zip(names, paths) if name not in twin]
        for name, path in zip(names, paths):
            write_tree(trees[name], path, acceptance=kind)
        if not args.partial and run and done.get("trees") != {p.stem: trees[name].choices for name, p in run}:
            log(f"bench {kind}-searched trees")
            run_bench(trees=[str(p) for _, p in run], prompts=str(files["held-out"]), first=args.held_out,
                      max_new_tokens=args.max_new_tokens, device="cpu", out=out, repeats=1, progress=False,
                      threads=args.threads, acceptance=rule.mode, temperature=rule.temperature,
                      posterior_threshold=rule.posterior_threshold, posterior_alpha=rule.posterior_alpha, seed=rule.seed)
        return {name: per_prompt(work / "bench-greedy", twin[name]) if name in twin else per_prompt(out, path.stem)
                for name, path in zip(names, paths)}

    measured = bench("greedy") if args.part in ("all", "greedy") else {}
    if args.part == "greedy":
        return
    log("typical calibration")
    record_dir = work / ("typical" if n_typical == args.fit else f"typical-{n_typical}")
    record = load_typical(calibrate_typical(replace(config, out=record_dir, prompts=str(files["typical-fit"])), rule,
                                            probe_internal, loaded=loaded, heads=heads))
    if args.part == "record":
        return
    prior = typical.prior_values(record, work / "greedy")  # the search shrinks toward the greedy calibration
    fitted = {}  # (result, cross-validated replay), as `treeopt search --acceptance typical --prior-calibration` makes them
    for n in sizes:
        source = typical.Typical(record, prior, None).resolved([n])
        fitted[f"typical-searched {n}"] = search(source, n), cross_validated(source, [n])[0]
    trees.update({name: result.tree for name, (result, _) in fitted.items()})  # (--partial: as benched)
    measured.update(bench("typical"))
    if args.part == "typical":
        return

    common = sorted(set.intersection(*(set(m) for m in measured.values())))  # prompts every tree has run
    model, stops = loaded.model, stop_token_ids(loaded.model, loaded.tokenizer)
    first = chat_prompt(loaded.tokenizer, instructions[args.fit + common[0]])
    rows, tps = [], {}
    for name, tree in trees.items():
        new, steps = (sum(measured[name][i][j] for i in common) for j in (0, 1))
        tps[name] = new / steps
        searched_here = name in fitted and fitted[name][0].tree == tree  # searched on the record: cross-validated
        predicted = fitted[name][1].tokens_per_step if searched_here else typical.expected_tokens_per_step(record, tree)
        lo, hi = ReplayResult(np.array(common), *(np.array([measured[name][i][j] for i in common]) for j in (0, 1))).interval()
        again = TreeDecoder(model, heads, tree, rule, stops, compiled=compiles_by_default(model)).generate(
            first, args.max_new_tokens)
        rows.append({"tree": name, "nodes": tree.num_nodes, "depth": tree.depth, "predicted": predicted,
                     "measured": tps[name], "measured_ci": f"{lo:.3f}-{hi:.3f}",
                     "predicted_err_%": 100 * (predicted / tps[name] - 1), "steps": steps, "new_tokens": new,
                     "rerun_same": (len(again.tokens), again.steps) == measured[name][common[0]]})
    print(f"smollm2-135m + shipped heads, typical acceptance T = {args.temperature} (posterior_threshold "
          f"{rule.posterior_threshold}, posterior_alpha {rule.posterior_alpha}), seed {args.seed}; greedy calibration on "
          f"prompts 0-{args.fit - 1}, typical record on those" + (f" and {args.fit + args.held_out}-"
          f"{args.fit + args.held_out + n_typical - args.fit - 1}" if n_typical > args.fit else "") +
          f" ({record.num_steps} probe steps); measured on {len(common)} held-out prompts from {args.fit}, "
          f"{args.max_new_tokens} new tokens; probe {len(record.probe)} nodes ({len(probe_internal)} internal)")
    print(render_table(pd.DataFrame(rows)))
    print("typical search: gains shrunk toward the greedy calibration's node values, strength (pseudo-steps) "
          "cross-validated: " + ", ".join(f"{n} nodes {fitted[f'typical-searched {n}'][0].meta['strength']:g}" for n in sizes))
    for n in sizes:
        t, g = (measured[f"{kind}-searched {n}"] for kind in ("typical", "greedy"))
        lo, hi = margin_interval(*(np.array([m[i] for i in common]) for m in (t, g)))
        print(f"{n} nodes: typical-searched {tps[f'typical-searched {n}']:.3f} vs greedy-searched "
              f"{tps[f'greedy-searched {n}']:.3f} measured tokens/step: margin "
              f"{tps[f'typical-searched {n}'] - tps[f'greedy-searched {n}']:+.3f} "
              f"({100 * (tps[f'typical-searched {n}'] / tps[f'greedy-searched {n}'] - 1):+.1f} %), "
              f"95 % paired bootstrap interval over prompts {lo:+.3f} to {hi:+.3f}")


def margin_interval(a, b, samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of tokens/step(a) - tokens/step(b), both [P, 2] (new tokens, steps) per prompt,
    resampling the prompts together (paired)."""
    import numpy as np

    idx = np.random.default_rng(seed).integers(0, len(a), (samples, len(a)))  # [B, P]
    diff = [x[idx, 0].sum(1) / x[idx, 1].sum(1) for x in (a, b)]
    return tuple(np.percentile(diff[0] - diff[1], [2.5, 97.5]))


def per_prompt(out: Path, method: str) -> dict[int, tuple[int, int]]:
    """(new tokens, steps) per prompt of `method` in a finished bench (bench.json) or an unfinished one
    (its records so far)."""
    if (out / "bench.json").is_file():
        rows = json.loads((out / "bench.json").read_text())["per_prompt"]
        return {r["prompt"]: (r["new_tokens"], r["steps"]) for r in rows if r["method"] == method}
    records = [json.loads(f.read_text()) for f in (out / ".bench-records").glob(f"{method}.*.done.json")]
    return {r["prompt"]: (len(r["tokens"]), r["steps"]) for r in records}


if __name__ == "__main__":
    main()
