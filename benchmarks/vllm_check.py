"""Checks treeopt's figures against vLLM's measured ones, from the files the commands wrote:

- tokens/step: each chain's measured tokens/step (`treeopt bench --engine vllm` CSVs) beside the
  calibration's cross-validated chain prediction (`treeopt.search.vllm.chain_predictions`);
- throughput (with --latency): at each batch size, treeopt's chosen k (from the predictions and
  `treeopt profile --engine vllm`'s step times) beside the best k measured (the bench CSVs' tokens/s,
  or with --bench omitted the profile's own tokens/s, measured on `--prompts` instructions), and the
  share of the best throughput the chosen k reaches.

    python benchmarks/vllm_check.py -c cal48 --bench bench-vllm/bench-vllm.csv [--latency latency-vllm.csv] \\
        -o benchmarks/results/vllm/
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from treeopt.core.record import load_calibration
from treeopt.search.budget import read_latencies
from treeopt.search.vllm import chain_predictions, vllm_schedule


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--calibration", required=True)
    ap.add_argument("--bench", nargs="*", default=[], help="bench-vllm.csv files")
    ap.add_argument("--latency")
    ap.add_argument("-o", "--out", type=Path, required=True, help="directory for the check CSVs")
    a = ap.parse_args()
    cal = load_calibration(a.calibration)
    if not a.bench and not a.latency:
        ap.error("pass --bench and/or --latency")
    if a.bench:
        bench = pd.concat([pd.read_csv(p) for p in a.bench]).drop_duplicates(["k", "batch_size"], keep="last")
    else:  # the profile's own measured throughput
        bench = pd.read_csv(a.latency).rename(columns={"nodes": "k"})
    predicted = chain_predictions(cal, int(bench["k"].max()))
    a.out.mkdir(parents=True, exist_ok=True)

    if a.bench:
        steps = bench[bench["k"] > 0].copy()
        steps["predicted_tokens_per_step"] = predicted[steps["k"].to_numpy()]
        steps["error"] = steps["tokens_per_step"] / steps["predicted_tokens_per_step"] - 1
        steps = steps[["batch_size", "k", "tokens_per_step", "predicted_tokens_per_step", "error",
                       "accepted_per_position", "drafts", "new_tokens"]]
        steps.to_csv(a.out / "tokens_per_step.csv", index=False, float_format="%.4f")
        print(steps.to_string(index=False, float_format=lambda x: f"{x:.4f}"))

    if a.latency:
        lats = {b: lat for b, lat in read_latencies(a.latency).items() if b in set(bench["batch_size"])}
        rows = []
        for e in vllm_schedule(cal, lats, int(bench["k"].max())):
            measured = bench[bench["batch_size"] == e["batch_size"]].set_index("k")["tokens_per_s"]
            best = int(measured.idxmax())
            rows.append({"batch_size": e["batch_size"], "chosen_k": e["k"], "best_measured_k": best,
                         "chosen_tokens_per_s": measured[e["k"]], "best_tokens_per_s": measured[best],
                         "share_of_best": measured[e["k"]] / measured[best],
                         **{f"tokens_per_s_k{k}": v for k, v in measured.items()}})
        table = pd.DataFrame(rows)
        table.to_csv(a.out / "throughput.csv", index=False, float_format="%.4f")
        print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))


if __name__ == "__main__":
    main()
