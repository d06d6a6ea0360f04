"""Throughput of `treeopt calibrate` against plain batched greedy `model.generate`, same prompts, same batch size.

    nice -n 10 .venv/bin/python benchmarks/bench_calibrate.py [--prompts 16] [--max-new-tokens 128]
        [--batch-size 8] [--heads DIR|random] [--repeat 2] [--threads N] [--device auto]

plain: `model.generate` on the left-padded batches (treeopt.decoding.generate.generate_continuations without
hidden states). calibrate: the whole `treeopt.calibrate.run.calibrate` pass (its own batched greedy loop
with hidden states, every head's ranks, shard and final files) into a fresh directory. The two
alternate --repeat times after a warm-up, so load on a shared machine falls on both; tokens/s counts
the continuation tokens (up to EOS) over the summed wall time. Target: calibrate >= 0.9 x plain.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--heads", default=None, help="heads directory or `random` (default: the shipped ones)")
    p.add_argument("--prompts", default=None, help="prompt source (default: the local AlpacaEval copy)")
    p.add_argument("--limit", type=int, default=16, help="prompts to run")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    args = p.parse_args()

    import torch

    from treeopt.core.record import load_calibration
    from treeopt.calibrate.run import CalibrationConfig, calibrate
    from treeopt.decoding.generate import generate_continuations
    from treeopt.decoding.heads import resolve_heads
    from treeopt.decoding.models import chat_prompt, load_model, stop_token_ids
    from treeopt.core.prompts import default_prompts, load_instructions

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    model, tok = loaded.model, loaded.tokenizer
    heads = resolve_heads(args.heads, model)
    dataset = args.prompts or default_prompts()
    prompts = [chat_prompt(tok, s) for s in load_instructions(dataset, limit=args.limit)]
    stop, B = stop_token_ids(model, tok), args.batch_size

    def plain():
        return [c.tokens for c in generate_continuations(model, prompts, args.max_new_tokens, stop, B, tok.pad_token_id)]

    def calibration(out):
        cfg = CalibrationConfig(out=out, model=args.model, heads=args.heads, prompts=dataset, limit=args.limit,
                                max_new_tokens=args.max_new_tokens, top_k=args.top_k, batch_size=B,
                                shard_size=args.limit, progress=False)
        cal = load_calibration(calibrate(cfg, loaded=loaded, heads=heads))
        ranks_seconds.append(cal.meta["ranks_time_s"])
        return [t.tolist() for t in cal.continuations()["tokens"]]

    def sync():
        if model.device.type == "cuda":
            torch.cuda.synchronize()

    with tempfile.TemporaryDirectory() as tmp:
        generate_continuations(model, prompts[:B], 4, stop, B, tok.pad_token_id).__next__()  # warm-up
        seconds = {"plain generate": 0.0, "calibrate": 0.0}
        tokens, ranks_seconds = {}, []
        for r in range(args.repeat):
            for name in seconds:
                sync()
                t = time.perf_counter()
                out = plain() if name == "plain generate" else calibration(Path(tmp) / f"run{r}")
                sync()
                seconds[name] += time.perf_counter() - t
                tokens[name] = out
                print(f"  repeat {r + 1} {name}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)

    n = sum(len(t) for t in tokens["plain generate"])
    same = tokens["plain generate"] == tokens["calibrate"]
    rate = {k: args.repeat * n / s for k, s in seconds.items()}
    print(f"\n{args.model} on {model.device.type} ({torch.get_num_threads()} threads), {len(prompts)} prompts x "
          f"{args.max_new_tokens} tokens, batch {B}, {heads.num_heads} heads, top-k {args.top_k}, {args.repeat} repeats")
    print(f"{'mode':<16}{'tokens':>8}{'seconds':>10}{'tokens/s':>10}")
    for k in seconds:
        print(f"{k:<16}{n * args.repeat:>8}{seconds[k]:>10.1f}{rate[k]:>10.1f}")
    print(f"{'  of which ranks':<16}{n * args.repeat:>8}{sum(ranks_seconds):>10.1f}"
          f"{'':>10}  (heads' vocabulary projections: {heads.num_heads} x {model.config.vocab_size} x "
          f"{model.config.hidden_size} MACs a token)")
    print(f"ratio calibrate / plain = {rate['calibrate'] / rate['plain generate']:.3f} (target >= 0.9); "
          f"same continuations: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
