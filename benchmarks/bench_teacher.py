"""Teacher-forced calibration against generated calibration: tokens/s, and the trees each one finds.

    python benchmarks/bench_teacher.py [--limit 16] [--max-new-tokens 128]
        [--batch-size 8] [--nodes 16,64] [--threads 1] [--out runs/bench-teacher]

1. generated: `treeopt calibrate` on the first --limit AlpacaEval instructions (the base model's own
   greedy answers, generated token by token).
2. The chat data: a ShareGPT-style file (OUT/chat.json) of those instructions with those answers as
   the assistant turns (AlpacaEval instructions are used for evaluation only, never to train heads).
3. teacher-forced: `treeopt calibrate --teacher-forced OUT/chat.json`: one batched forward per
   conversation, no generation.
Both rank the same heads on the same tokens, in this process, one after the other: tokens/s counts
ranked positions over each run's wall time, tokens/CPU s over its process CPU time (with --threads 1,
the time a dedicated core would take: steadier than wall time on a shared machine). Then a tree of
each size is searched from each calibration and replayed exactly on the generated one (the base
model's own tokens: what a greedy decoding step accepts). Target: teacher-forced >= 10x the generated
tokens/s. The last row bounds any teacher-forced run on this CPU: its least work (`least_gflop`) at
the GEMM peak in the model's dtype (`gemm_peak`). Reruns reuse OUT's calibrations (delete OUT to
time again).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch



def least_gflop(model, cal) -> float:
    """The least work of teacher-forced calibration `cal`, in GFLOP: the base model's layers multiplied
    through every token forwarded (here one turn per conversation: prompt + answer) and the whole
    vocabulary projection of every rank below top_k (a miss can be settled by a screen, a hit needs
    every logit). Attention, the heads' blocks and the screen are left out: a lower bound."""
    embed, lm_head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    layer_params = sum(p.numel() for p in model.get_decoder().parameters()) - embed.numel()
    conts = cal.continuations()
    tokens = sum(len(p) + len(t) for p, t in zip(conts["prompt_ids"], conts["tokens"]))
    hits = int(((cal.ranks >= 0) & (cal.ranks < cal.top_k)).sum())
    return 2 * (layer_params * tokens + lm_head.numel() * hits) / 1e9


def gemm_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> tuple[float, float]:
    """GFLOP/s of an [n, n] @ [n, n] matmul in `dtype` on the CPU, per wall second and per CPU second."""
    a = torch.randn(n, n).to(dtype)
    a @ a  # warm-up
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        a @ a
    gflop = 2 * n**3 * repeats / 1e9
    return gflop / (time.perf_counter() - wall), gflop / (time.process_time() - cpu)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--heads", default=None, help="heads directory or `random` (default: the shipped ones)")
    p.add_argument("--prompts", default=None, help="prompt source (default: the local AlpacaEval copy)")
    p.add_argument("--limit", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--nodes", default="16,64")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/bench-teacher")
    args = p.parse_args()

    from treeopt.calibrate.run import CalibrationConfig, calibrate
    from treeopt.calibrate.teacher import calibrate_teacher_forced
    from treeopt.decoding.heads import resolve_heads
    from treeopt.decoding.models import load_model, set_threads
    from treeopt.search.grow import search
    from treeopt.core.fileio import write_text
    from treeopt.core.prompts import default_prompts
    from treeopt.core.record import load_calibration
    from treeopt.core.replay import replay
    from treeopt.core.tables import render_table

    set_threads(args.threads)
    out = Path(args.out)
    loaded = load_model(args.model, device=args.device)
    heads = resolve_heads(args.heads, loaded.model)
    common = {"model": args.model, "heads": args.heads, "limit": args.limit, "max_new_tokens": args.max_new_tokens,
              "top_k": args.top_k, "batch_size": args.batch_size, "shard_size": args.limit, "progress": False}
    gen = load_calibration(calibrate(CalibrationConfig(out=out / "generated", prompts=args.prompts or default_prompts(),
                                                       **common), loaded=loaded, heads=heads))
    conts = gen.continuations()
    chat = [{"conversations": [{"from": "human", "value": i},
                               {"from": "gpt", "value": loaded.tokenizer.decode(t, skip_special_tokens=True)}]}
            for i, t in zip(conts["instruction"], conts["tokens"])]
    write_text(out / "chat.json", json.dumps(chat, indent=1) + "\n")
    tf = load_calibration(calibrate_teacher_forced(CalibrationConfig(out=out / "teacher-forced",
                                                                     teacher_forced=str(out / "chat.json"), **common),
                                                   loaded=loaded, heads=heads))

    def timing(name: str, positions: int, wall: float, cpu: float) -> dict:
        per_s, per_cpu_s = positions / wall, positions / cpu
        return {"calibration": name, "positions": positions, "seconds": wall, "tokens/s": per_s,
                "speed": per_s / (gen.num_positions / gen.meta["wall_time_s"]), "CPU seconds": cpu,
                "tokens/CPU s": per_cpu_s, "speed per CPU s": per_cpu_s / (gen.num_positions / gen.meta["cpu_time_s"])}

    rows = []
    for name, cal in (("generated", gen), ("teacher-forced", tf)):
        rows.append(timing(name, cal.num_positions, cal.meta["wall_time_s"], cal.meta["cpu_time_s"]))
        for n in map(int, args.nodes.split(",")):
            rows[-1][f"replayed tokens/step, {n} nodes"] = replay(search(cal, n).tree, gen).tokens_per_step
    wall_peak, cpu_peak = gemm_peak(loaded.model.dtype)
    rows.append(timing(f"teacher-forced at the GEMM peak ({cpu_peak:.0f} GFLOP per CPU s)", tf.num_positions,
                       least_gflop(loaded.model, tf) / wall_peak, least_gflop(loaded.model, tf) / cpu_peak))
    print(f"{args.model} on {loaded.model.device.type}, {args.limit} AlpacaEval prompts x {args.max_new_tokens} tokens, "
          f"batch {args.batch_size}, {heads.num_heads} heads, top-{args.top_k}; trees searched on each calibration, "
          "replayed on the generated one")
    print(render_table(__import__("pandas").DataFrame(rows)))
    print(f"teacher-forced / generated tokens/s = {rows[1]['speed']:.1f}x (target >= 10x), "
          f"per CPU second {rows[1]['speed per CPU s']:.1f}x; at most {rows[2]['speed per CPU s']:.1f}x at the GEMM peak")


if __name__ == "__main__":
    main()
