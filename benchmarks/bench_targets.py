"""What each consumer's rules cost: the tree searched within a target's rules beside the unconstrained
one, both replayed exactly on a calibration's logged continuations (tokens/step, 95 % bootstrap
interval over prompts).

    .venv/bin/python benchmarks/bench_targets.py -c runs/cal48 [--nodes 16,63] [--acceptance-model empirical]

For each target (medusa, trtllm, vllm, chain) and tree size: the unconstrained searched tree, the
constrained one (its nodes: a chain or a Cartesian tree may use fewer), the ratio of their replayed
tokens/step, and whether the consumer's re-implemented code (treeopt.search.consumers) builds the constrained
export unchanged (it must) and the unconstrained one (often not).
"""

from __future__ import annotations

import argparse

import pandas as pd


from treeopt.search.consumers import deploys  # noqa: E402
from treeopt.search.grow import search  # noqa: E402
from treeopt.search.targets import TARGETS, check  # noqa: E402
from treeopt.core.record import load_calibration  # noqa: E402
from treeopt.core.replay import positions, replay  # noqa: E402
from treeopt.core.tables import render_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--calibration", required=True)
    ap.add_argument("--nodes", default="16,63")
    ap.add_argument("--acceptance-model", default="empirical")
    args = ap.parse_args()
    cal = load_calibration(args.calibration)
    rows_at = positions(cal)
    print(f"calibration {args.calibration}: {cal.num_positions} positions, {cal.num_heads} heads, top-{cal.top_k}; "
          f"{args.acceptance_model} model\n")
    rows, notes = [], []
    for n in map(int, args.nodes.split(",")):
        free = search(cal, n, args.acceptance_model).tree
        r_free = replay(free, rows_at)
        for name, target in TARGETS.items():
            tree = search(cal, n, args.acceptance_model, target=target).tree
            r = replay(tree, rows_at)
            lo, hi = r.interval()
            rows.append({"target": name, "nodes asked": n, "unconstrained": r_free.tokens_per_step,
                         "constrained": r.tokens_per_step, "ci_low": lo, "ci_high": hi,
                         "ratio": r.tokens_per_step / r_free.tokens_per_step, "nodes": tree.num_nodes,
                         "depth": tree.depth, "max rank": tree.max_rank - 1,
                         "unconstrained deploys": "yes" if deploys(free, name, cal.num_heads) else "no",
                         "constrained deploys": "yes" if deploys(tree, name, cal.num_heads) else "NO"})
            if (broken := check(free, target, cal.num_heads)) is not None:
                notes.append(f"{n} nodes, {name}: the unconstrained tree breaks a rule: {broken}")
    print(render_table(pd.DataFrame(rows)))
    print("\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
