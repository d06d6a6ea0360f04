"""How far the predictions are from the truth: fit on random AlpacaEval prompts, replay on others.

    .venv/bin/python benchmarks/bench_predictions.py [--prompts 48] [--parts 4] [--max-new-tokens 64] [--out runs/bench-predictions]

Draws 2 x --prompts distinct AlpacaEval prompts at random (seeded), writes them as prompt files
(fit-I.json and test-I.json, each set in --parts files, keeping AlpacaEval's `dataset` field) and
calibrates the shipped heads on each with the bundled model (`treeopt calibrate`, resumable: run the
calibrations beforehand, in parallel single-threaded processes, with the commands this script
prints, or let it run them); each set's parts are merged into one calibration.
Then it prints:

1. the searched tree's figures at 16 and 64 nodes, all from the fit calibration (cross-validated
   replay = the headline, its interval, leave-one-source-out, in-sample replay, uniform expectation)
   beside the truth: its exact replay on the test prompts;
2. each acceptance model's tree replayed on the test prompts at 16 and 64 nodes;
3. small calibrations (the first 4 and 8 fit prompts): nodes returned for --nodes 64 and held-out replay;
4. the fit calibration's per-source figures and how the cross-validated figure grows with prompts.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from search.acceptance import resolve_model  # noqa: E402
from search.crossval import calibration_curve, cross_validated, per_source, prediction  # noqa: E402
from search.grow import search  # noqa: E402
from treeopt.core.prompts import default_prompts, load_prompts  # noqa: E402
from treeopt.core.record import Calibration, load_calibration  # noqa: E402
from treeopt.core.replay import replay  # noqa: E402
from treeopt.core.tables import render_table  # noqa: E402

SIZES = (16, 64)


def prompt_files(out: Path, n: int, parts: int, seed: int) -> dict[str, Path]:
    """fit-0.json.. and test-0.json..: 2n distinct prompts drawn at random from AlpacaEval, n of
    each set in `parts` files."""
    instructions, sources = load_prompts(default_prompts())
    ids = random.Random(seed).sample(range(len(instructions)), 2 * n)
    split = {f"{name}-{i}": part.tolist() for name, half in (("fit", ids[:n]), ("test", ids[n:]))
             for i, part in enumerate(np.array_split(half, parts))}
    files = {}
    for name, part in split.items():
        files[name] = out / f"{name}.json"
        if not files[name].is_file():
            out.mkdir(parents=True, exist_ok=True)
            files[name].write_text(json.dumps([{"instruction": instructions[i], "dataset": sources[i]} for i in part],
                                              indent=1))
    return files


def merged(cals: list[Calibration]) -> Calibration:
    """One calibration of several (prompt ids renumbered after each other)."""
    offsets = np.cumsum([0] + [int(c.prompt_ids.max()) + 1 for c in cals[:-1]])
    return Calibration(np.concatenate([c.ranks for c in cals]),
                       np.concatenate([c.prompt_ids + o for c, o in zip(cals, offsets)]).astype(np.int32),
                       np.concatenate([c.positions for c in cals]), cals[0].top_k,
                       sources=np.concatenate([c.sources for c in cals]) if all(c.sources is not None for c in cals) else None)


def calibrated(prompts: Path, out: Path, max_new_tokens: int, batch_size: int):
    """A finished calibration in `out` is read as it is (delete the directory to redo it)."""
    from calibrate.run import CalibrationConfig, calibrate

    if not (out / "calibration.json").is_file():
        calibrate(CalibrationConfig(out=out, prompts=str(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size,
                                    shard_size=batch_size, progress=False))
    return load_calibration(out)


def pct(x: float, truth: float) -> str:
    return f"{(x / truth - 1) * 100:+.1f} %"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--parts", type=int, default=4, help="calibrations the test prompts are split into")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-predictions")
    a = ap.parse_args()
    files = prompt_files(a.out, a.prompts, a.parts, a.seed)
    batch = -(-a.prompts // a.parts)  # each part in one batch
    for name, f in files.items():
        print(f"OMP_NUM_THREADS=1 python -m treeopt calibrate -p {f} --max-new-tokens {a.max_new_tokens} "
              f"--batch-size {batch} --shard-size {batch} -o {a.out / f'cal-{name}'} &")
    cals = {k: calibrated(f, a.out / f"cal-{k}", a.max_new_tokens, batch) for k, f in files.items()}
    fit, test = (merged([c for k, c in cals.items() if k.startswith(name)]) for name in ("fit", "test"))
    model = resolve_model(fit)
    print(f"\nfit: {len(fit.prompts)} prompts, {fit.num_positions} positions; test: {len(test.prompts)} other "
          f"prompts, {test.num_positions} positions; {a.max_new_tokens} new tokens; default model {model}")

    rows, sources = [], None
    cvs = cross_validated(fit, SIZES, model)
    for n, cv in zip(SIZES, cvs):
        result = search(fit, n, model)
        fields, sources = prediction(fit, result.tree, result.tokens_per_step, cv, model)
        truth = replay(result.tree, test).tokens_per_step
        lo, hi = fields["predicted_interval"]
        rows.append({"nodes": len(result.tree), "truth (test replay)": truth,
                     "predicted (cross-validated)": fields["predicted_tokens_per_step"], "error": pct(cv.tokens_per_step, truth),
                     "interval": f"{lo:.3f}-{hi:.3f}",
                     "leave one source out": fields.get("leave_one_source_out_tokens_per_step", np.nan),
                     "in-sample replay": fields["in_sample_tokens_per_step"],
                     "error in-sample": pct(fields["in_sample_tokens_per_step"], truth),
                     "uniform": fields["uniform_tokens_per_step"], "error uniform": pct(fields["uniform_tokens_per_step"], truth)})
    print("\n1. the searched tree's figures from the fit calibration vs its replay on the test prompts\n"
          + render_table(pd.DataFrame(rows)))

    models = [model, "empirical", "independent"]
    rows = []
    for n in SIZES:
        held = {m: replay(search(fit, n, m).tree, test).tokens_per_step for m in models}
        best = max(held["empirical"], held["independent"])
        rows.append({"nodes": n, **held, "smoothed vs best other": pct(held[model], best)})
    print(f"\n2. held-out replay on the test prompts of each model's tree (fit on all {len(fit.prompts)} fit prompts)\n"
          + render_table(pd.DataFrame(rows)))

    rows = []
    for m in (4, 8):
        small = fit.subset(fit.prompts[:m])
        small_model = resolve_model(small)
        for name in (small_model, "empirical", "independent"):
            tree = search(small, 64, name).tree
            rows.append({"fit prompts": m, "positions": small.num_positions, "model": name, "nodes (--nodes 64)": len(tree),
                         "held-out replay": replay(tree, test).tokens_per_step})
    print("\n3. small calibrations (the first fit prompts), --nodes 64, replayed on the test prompts\n"
          + render_table(pd.DataFrame(rows)))

    print(f"\n4. per source of the fit prompts (64 nodes)\n{render_table(sources)}")
    test_truth = per_source(test, replay(search(fit, 64, model).tree, test)).rename(columns={"cross_validated": "replay"})
    print(f"   the fit tree replayed on the test prompts, per source\n{render_table(test_truth)}")
    curve = calibration_curve(fit, 64, model)
    print(f"\n   how much calibration is enough (64 nodes, {model})\n{render_table(curve)}")


if __name__ == "__main__":
    main()
