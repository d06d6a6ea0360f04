"""One table at batch 1, same prompts, one run: vLLM plain, vLLM with treeopt's heads at chain length K,
treeopt's own engine plain and with a searched tree. Tokens/s are end to end (prefill included) for
all four: vLLM's generated tokens ÷ wall time; treeopt's new tokens ÷ (prefill + decoding time).
vLLM runs on one core (it reserves the other for its front end), so treeopt runs on one thread.

    python benchmarks/bench_vllm.py --prompts held.json --limit 8 --max-new-tokens 48 --k 2 \\
        --tree tree.json -o benchmarks/results/vllm/batch1.csv
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from treeopt.reports.bench import run_bench
from treeopt.reports.vllm_bench import bench_vllm


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--k", type=int, nargs="+", required=True,
                    help="vLLM's chain lengths (treeopt's choice at batch 1 first; 0: plain only)")
    ap.add_argument("--tree", required=True, help="treeopt's searched tree")
    ap.add_argument("-o", "--out", type=Path, required=True, help="the table (CSV)")
    ap.add_argument("--work", type=Path, default=Path("runs/bench_vllm"), help="the runs' own files (exported heads, logs)")
    a = ap.parse_args()
    work = a.work
    vllm = bench_vllm(prompts=a.prompts, limit=a.limit, max_new_tokens=a.max_new_tokens,
                      chains=tuple(k for k in a.k if k > 0), batch_sizes=(1,), out=work / "vllm")
    ours = run_bench(trees=[a.tree], prompts=a.prompts, limit=a.limit, max_new_tokens=a.max_new_tokens, threads=1,
                     out=work / "treeopt", progress=False)
    per_prompt = pd.DataFrame(json.loads((work / "treeopt" / "bench.json").read_text())["per_prompt"])
    rows = [{"engine": "vllm", "method": "plain" if r.k == 0 else f"medusa chain k={r.k}",
             "tokens_per_step": r.tokens_per_step, "tokens_per_s": r.tokens_per_s, "new_tokens": r.new_tokens}
            for r in vllm.itertuples()]
    for method, g in per_prompt.groupby("method", sort=False):
        if method == "hf-generate":
            continue
        tokens, seconds = g["new_tokens"].sum(), (g["prefill_ms"].sum() + g["decode_ms"].sum()) / 1e3
        rows.append({"engine": "treeopt", "method": method, "tokens_per_step": tokens / g["steps"].sum(),
                     "tokens_per_s": tokens / seconds, "new_tokens": tokens})
    table = pd.DataFrame(rows)
    table["vs_vllm_plain"] = table["tokens_per_s"] / table["tokens_per_s"].iloc[0]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(a.out, index=False, float_format="%.4g")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))


if __name__ == "__main__":
    main()
