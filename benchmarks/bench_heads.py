"""Where the heads' vocabulary projection should go: after acceptance, or inside the verification step.

    .venv/bin/python benchmarks/bench_heads.py [--sizes 0,1,4,16,64] [--dtype auto] [--threads 1]

Heads that share the base lm_head need a second product with the vocabulary matrix [V, H] per step.
`separate` (what the decoder does): the verification projects its N = nodes + 1 rows, then, once the
accepted node is known, the heads' D rows are projected (the matrix read twice, M = N and M = D).
`fused`: the verification projects its N rows and every row's D head features at once (the matrix
read once, M = N * (1 + D), most of it thrown away). Both are timed in turn (median of --repeat),
on the lm_head and heads alone, so the table shows only the difference between the two.
"""

from __future__ import annotations

import argparse
import statistics
import time



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--heads", default=None)
    p.add_argument("--sizes", default="0,1,2,4,8,16,32,64")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeat", type=int, default=21)
    args = p.parse_args()

    import torch

    from treeopt.decoding.heads import resolve_heads
    from treeopt.decoding.models import load_model, set_threads
    from treeopt.core.tables import render_table

    set_threads(args.threads)
    model = load_model(args.model, device="cpu", dtype=args.dtype).model
    heads = resolve_heads(args.heads, model)
    lm_head, D = model.get_output_embeddings(), heads.num_heads
    H = lm_head.weight.shape[1]

    def median_ms(fn) -> float:
        fn()
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    rows = []
    with torch.inference_mode():
        for n in (int(s) for s in args.sizes.split(",")):
            hidden = torch.randn(n + 1, H, dtype=lm_head.weight.dtype)  # [N, H]

            def separate():
                lm_head(hidden)  # [N, V]
                lm_head(heads.features(hidden[-1]))  # [D, V]

            def fused():
                feats = heads.features(hidden).transpose(0, 1).reshape(-1, H)  # [N * D, H]
                lm_head(torch.cat([hidden, feats]))  # [N * (1 + D), V]

            sep, fus = median_ms(separate), median_ms(fused)
            rows.append({"nodes": n, "separate_ms": sep, "fused_ms": fus, "fused_over_separate": fus / sep})
    import pandas as pd

    print(f"{args.model}, {lm_head.weight.dtype}, {torch.get_num_threads()} threads, {D} heads")
    print(render_table(pd.DataFrame(rows)))


if __name__ == "__main__":
    main()
