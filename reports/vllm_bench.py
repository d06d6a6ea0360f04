"""`treeopt bench --engine vllm`: vLLM with treeopt's heads (exported for its Medusa drafter) on the
prompts, at each chain length k and batch size asked, beside plain vLLM and treeopt's prediction.

One vLLM engine per k (vLLM fixes `num_speculative_tokens` when it starts), each running every batch
size: the prompts go `batch_size` requests at a time, greedy, up to `max_new_tokens` or EOS, after a
warm-up on the first prompt. vLLM's own counters give the measured figures.

Columns (one row per k and batch size; k = 0 is plain vLLM): k, batch_size, tokens_per_step
(1 + accepted ÷ drafts), predicted_tokens_per_step (with --calibration: the cross-validated replay of
the k-token chain, `treeopt.search.vllm.chain_predictions`), error (measured ÷ predicted - 1),
accepted_per_position (accepted tokens at draft positions 1..k), acceptance_rate (accepted ÷ draft
tokens), tokens_per_s (generated tokens ÷ wall time, prefill included), plain_tokens_per_s (k = 0 at
the same batch size), speedup, match_rate (prompts whose tokens equal plain vLLM's at that batch
size), drafts, new_tokens, wall_s.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from treeopt.decoding.vllm_engine import engine_dtype, parse_runs, prepare, run_job, vllm_python
from treeopt.core.settings import DEFAULT_MODEL
from treeopt.core.errors import TreeoptError
from treeopt.core.fileio import check_writable, write_text

CSV = "bench-vllm.csv"
COLUMNS = ["k", "batch_size", "tokens_per_step", "predicted_tokens_per_step", "error", "accepted_per_position",
           "acceptance_rate", "tokens_per_s", "plain_tokens_per_s", "speedup", "match_rate", "drafts",
           "new_tokens", "wall_s"]


def bench_vllm(model: str = DEFAULT_MODEL, heads: str | None = None, prompts: str | None = None,
               limit: int | None = 20, max_new_tokens: int = 96, chains=(1, 2, 3, 4), batch_sizes=(1,),
               calibration: str | Path | None = None, out: str | Path = Path("bench-vllm"),
               python: str | Path | None = None, dtype: str = "auto", eager: bool = True,
               drafter: str | None = None, log=lambda s: None) -> pd.DataFrame:
    """The CLI's twin: export the heads (or take --drafter's checkpoint), run vLLM plain and with each
    chain, write `out`/bench-vllm.csv."""
    from treeopt.decoding.models import chat_prompt
    from treeopt.core.prompts import default_prompts, load_instructions

    if max_new_tokens < 1:
        raise TreeoptError("--max-new-tokens must be at least 1")
    if not chains or any(k < 1 for k in chains):
        raise TreeoptError(f"--chains {list(chains)}: chain lengths are positive (plain vLLM always runs as k = 0)")
    python = vllm_python(python)
    dtype = engine_dtype(dtype)
    out = check_writable(out, directory=True, fix="pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    predicted = {}
    if calibration is not None:
        from treeopt.core.record import load_calibration
        from treeopt.search.vllm import chain_predictions

        cal = load_calibration(calibration)
        if max(chains) > cal.num_heads:
            raise TreeoptError(f"--chains up to {max(chains)} but {calibration} records {cal.num_heads} depths")
        predicted = dict(enumerate(chain_predictions(cal, max(chains))))
    model_dir, drafting, tokenizer, lm = prepare(model, heads, out, drafter)
    if drafting.max_k is not None and max(chains) > drafting.max_k:
        raise TreeoptError(f"--chains up to {max(chains)}: the heads have {drafting.max_k}; vLLM drafts one token per head")
    ids = [chat_prompt(tokenizer, s) for s in load_instructions(prompts or default_prompts(), limit)]
    longest = max(map(len, ids)) + max_new_tokens + 8
    runs = [{"name": f"batch-{b}", "prompts": ids, "max_new_tokens": max_new_tokens, "batch_size": b}
            for b in batch_sizes]
    warm = [{"name": "warmup", "prompts": ids[:1], "max_new_tokens": 16, "batch_size": 1}]
    measured = {}
    for k in (0, *chains):
        log(f"vLLM: {'plain' if k == 0 else f'{k}-token chain'}, batch sizes {', '.join(map(str, batch_sizes))}")
        result = run_job({"model": model_dir, "dtype": dtype, "enforce_eager": eager, "max_model_len": longest,
                          "max_num_seqs": max(batch_sizes), "speculative_config": drafting.config(k),
                          "warmup": warm, "runs": runs}, python, log=out / f"vllm-k{k}.log")
        measured[k] = {r.batch_size: r for r in parse_runs(result)}
        version = result["vllm"]
    rows = []
    for k, by_batch in measured.items():
        for b, r in by_batch.items():
            plain = measured[0][b]
            pred = predicted.get(k)
            rows.append({"k": k, "batch_size": b, "tokens_per_step": r.tokens_per_step,
                         "predicted_tokens_per_step": pred,
                         "error": None if pred is None else r.tokens_per_step / pred - 1,
                         "accepted_per_position": " ".join(map(str, r.accepted_per_position)),
                         "acceptance_rate": r.accepted / r.draft_tokens if r.draft_tokens else None,
                         "tokens_per_s": r.tokens_per_s, "plain_tokens_per_s": plain.tokens_per_s,
                         "speedup": r.tokens_per_s / plain.tokens_per_s,
                         "match_rate": sum(a == p for a, p in zip(r.tokens, plain.tokens)) / len(r.tokens),
                         "drafts": r.drafts, "new_tokens": r.generated, "wall_s": r.wall_s})
    df = pd.DataFrame(rows, columns=COLUMNS).sort_values(["batch_size", "k"], kind="stable").reset_index(drop=True)
    write_text(out / CSV, df.to_csv(index=False, float_format="%.6g"))
    write_text(out / "bench-vllm.json", json.dumps({"vllm": version, "model": model, "model_source": model_dir,
                                                    "heads": heads or "default", "drafter": drafter or "heads",
                                                    "method": drafting.method, "dtype": dtype, "eager": eager,
                                                    "prompts": str(prompts or default_prompts()), "limit": limit,
                                                    "max_new_tokens": max_new_tokens,
                                                    "calibration": str(calibration or "")}, indent=1) + "\n")
    return df


def render_vllm_bench(df: pd.DataFrame) -> str:
    from treeopt.core.tables import render_table

    t = df.drop(columns=["wall_s"])
    if t["predicted_tokens_per_step"].isna().all():
        t = t.drop(columns=["predicted_tokens_per_step", "error"])
    return render_table(t)
