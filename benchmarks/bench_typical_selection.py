"""How the typical search should choose its prior's strength: nested cross-validation on a typical record,
no decoding (seconds).

    .venv/bin/python benchmarks/bench_typical_selection.py --record runs/bench-typical/typical-48 \
        --prior runs/bench-typical/greedy [--nodes 16,64] [--seeds 3]

Outer loop: 4 folds of the record's prompts (for each of --seeds shuffles). On the other 3 folds, each
rule picks a strength (the inner cross-validation of `treeopt.search.typical.choose_strength`), the tree is
searched there with it and replayed on the held-out fold; the table gives the held-out tokens/step over
all folds, averaged over the shuffles, and the strengths picked. Rules: `one_se` (the default: the
strongest prior within one standard error of the best inner score), `best_score` (the best inner score),
`record_alone` (strength 0) and `prior_alone` (inf: the greedy calibration's tree). The prior
calibration is used whole (it may share prompts with the record).
"""

from __future__ import annotations

import argparse
from collections import Counter



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--record", required=True, help="a typical calibration (treeopt calibrate --acceptance typical)")
    p.add_argument("--prior", required=True, help="a greedy calibration of the same model and heads")
    p.add_argument("--nodes", default="16,64")
    p.add_argument("--seeds", type=int, default=3, help="shuffles of the outer folds")
    args = p.parse_args()

    import numpy as np
    import pandas as pd

    from treeopt.search import typical
    from treeopt.search.crossval import FOLDS
    from treeopt.search.grow import search
    from treeopt.search.typical import Typical
    from treeopt.core.record import load_typical
    from treeopt.core.replay import concat
    from treeopt.core.tables import render_table

    record = load_typical(args.record)
    prior = typical.prior_values(record, args.prior)
    prompts = np.unique(record.prompt_ids)
    rules = {"one_se": lambda fit, n: typical.choose_strength(Typical(fit, prior, None), [n]),
             "best_score": lambda fit, n: typical.choose_strength(Typical(fit, prior, None), [n], ses=0),
             "record_alone": lambda fit, n: 0.0, "prior_alone": lambda fit, n: np.inf}
    rows = []
    for n in (int(x) for x in args.nodes.split(",")):
        for name, rule in rules.items():
            scores, picked = [], Counter()
            for seed in range(args.seeds):
                perm = np.random.default_rng(100 + seed).permutation(prompts)  # not the inner folds' shuffle
                held_out = []
                for held in (np.sort(perm[i::FOLDS]) for i in range(FOLDS)):
                    fit = record.subset(np.setdiff1d(prompts, held))
                    strength = rule(fit, n)
                    picked[f"{strength:g}"] += 1
                    held_out.append(typical.replay(record.subset(held), search(Typical(fit, prior, strength), n).tree))
                scores.append(concat(held_out).tokens_per_step)
            rows.append({"nodes": n, "rule": name, "held_out": float(np.mean(scores)),
                         "per_shuffle": " ".join(f"{s:.4f}" for s in scores),
                         "strengths_picked": " ".join(f"{k}x{v}" for k, v in sorted(picked.items()))})
    print(f"typical record {args.record}: {record.num_steps} steps, {len(prompts)} prompts; prior {args.prior}; "
          f"nested {FOLDS}-fold cross-validation, {args.seeds} shuffles")
    print(render_table(pd.DataFrame(rows)))


if __name__ == "__main__":
    main()
