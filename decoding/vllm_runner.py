"""Run one vLLM engine on a job and write what it measured: the half of `treeopt.decoding.vllm_engine`
that lives in vLLM's own environment.

    VLLM_PYTHON -P vllm_runner.py JOB.json RESULT.json   (-P: not this folder on sys.path, whose
                                                        profile.py would shadow the standard one)

It imports only the standard library and vLLM (treeopt's environment never imports vLLM: vLLM pins
its own torch), so it is run by path with vLLM's interpreter. The job (built and read by
`treeopt.decoding.vllm_engine`, which documents the fields) names one engine configuration (model,
dtype, speculative config) and a list of runs; each run generates greedily for its prompts (token ids,
chat template already applied), `batch_size` requests at a time, and records its wall time, the
tokens of every request and the change of vLLM's speculative-decoding counters over the run:
drafts, draft tokens, accepted tokens, accepted tokens per position (`vllm/v1/metrics/reader.py`,
the `vllm:spec_decode_*` metrics of `LLM.get_metrics`).
"""

import json
import os
import sys
import time

COUNTERS = {
    "vllm:spec_decode_num_drafts": "drafts",
    "vllm:spec_decode_num_draft_tokens": "draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "accepted",
}
PER_POSITION = "vllm:spec_decode_num_accepted_tokens_per_pos"


def counters(llm) -> dict:
    """vLLM's speculative-decoding counters so far (zeros without speculation)."""
    out = {"drafts": 0, "draft_tokens": 0, "accepted": 0, "accepted_per_position": []}
    for m in llm.get_metrics():
        if m.name in COUNTERS:
            out[COUNTERS[m.name]] += int(m.value)
        elif m.name == PER_POSITION:
            values = [int(v) for v in m.values]
            acc = out["accepted_per_position"] + [0] * (len(values) - len(out["accepted_per_position"]))
            out["accepted_per_position"] = [a + v for a, v in zip(acc, values + [0] * (len(acc) - len(values)))]
    return out


def delta(after: dict, before: dict) -> dict:
    pos_b = before["accepted_per_position"] + [0] * len(after["accepted_per_position"])
    return {**{k: after[k] - before[k] for k in ("drafts", "draft_tokens", "accepted")},
            "accepted_per_position": [a - b for a, b in zip(after["accepted_per_position"], pos_b)]}


def run(llm, spec: dict) -> dict:
    """One run of the job: its prompts `batch_size` at a time; wall time, tokens, counters."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=spec["max_new_tokens"], ignore_eos=spec.get("ignore_eos", False))
    prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]
    b = spec["batch_size"]
    before = counters(llm)
    tokens, start = [], time.perf_counter()
    for i in range(0, len(prompts), b):
        outputs = llm.generate(prompts[i:i + b], params, use_tqdm=False)
        tokens += [list(o.outputs[0].token_ids) for o in outputs]
    wall = time.perf_counter() - start
    return {"name": spec.get("name", ""), "batch_size": b, "wall_s": wall, "tokens": tokens,
            "generated": sum(map(len, tokens)), **delta(counters(llm), before)}


def main(job_path: str, result_path: str) -> None:
    from vllm import LLM

    with open(job_path) as f:
        job = json.load(f)
    engine = dict(model=job["model"], dtype=job["dtype"], seed=0, gpu_memory_utilization=job["gpu_memory_utilization"],
                  max_model_len=job["max_model_len"], max_num_seqs=job["max_num_seqs"],
                  enforce_eager=job["enforce_eager"],
                  enable_prefix_caching=False,  # every run pays its own prefill
                  disable_log_stats=False)  # the counters `LLM.get_metrics` reads
    if job.get("speculative_config"):
        engine["speculative_config"] = job["speculative_config"]
    start = time.perf_counter()
    llm = LLM(**engine)
    load_s = time.perf_counter() - start
    for warm in job.get("warmup", []):
        run(llm, warm)
    results = [run(llm, spec) for spec in job["runs"]]
    import vllm

    out = {"vllm": vllm.__version__, "load_s": load_s, "engine": {k: v for k, v in engine.items()},
           "ld_preload": os.environ.get("LD_PRELOAD", ""), "runs": results}
    tmp = result_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, result_path)


if __name__ == "__main__":  # vLLM spawns its engine process: the guard keeps it from re-running main
    if len(sys.argv) != 3:
        sys.exit("usage: vllm_runner.py JOB.json RESULT.json")
    main(sys.argv[1], sys.argv[2])
