"""Eager vs compiled decoding steps, per tree size, in one process (the same load on both).

    .venv/bin/python benchmarks/bench_compile.py [--sizes 0,4,16] [--context 256] [--dtype auto] [--threads 1]

Profiles the step (`treeopt.decoding.profile.profile_latency`) eagerly, then compiled, then eagerly again (the
eager figure is the mean of the two runs, which bracket the compiled one in time), and prints
forward_ms of each beside the roofline and the one-off compile time.
"""

from __future__ import annotations

import argparse



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--heads", default=None)
    p.add_argument("--sizes", default="0,4,16")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()

    import pandas as pd

    from treeopt.decoding.heads import resolve_heads
    from treeopt.decoding.models import load_model, set_threads
    from treeopt.decoding.profile import parse_sizes, profile_latency
    from treeopt.decoding.roofline import measure_machine
    from treeopt.core.tables import render_table

    set_threads(args.threads)
    model = load_model(args.model, device="cpu", dtype=args.dtype).model
    heads = resolve_heads(args.heads, model)
    machine = measure_machine(model.device)
    sizes = parse_sizes(args.sizes)

    def run(compiled: bool) -> pd.DataFrame:
        return profile_latency(model, heads, sizes, args.context, args.repeats, compiled=compiled, machine=machine)

    before, compiled, after = run(False), run(True), run(False)
    eager = (before["forward_ms"] + after["forward_ms"]) / 2
    table = pd.DataFrame({"nodes": compiled["nodes"], "eager_ms": eager, "compiled_ms": compiled["forward_ms"],
                          "eager_over_compiled": eager / compiled["forward_ms"], "roofline_ms": compiled["roofline_ms"],
                          "compiled_ratio": compiled["roofline_ratio"], "compile_s": compiled["compile_s"]})
    print(f"{args.model}, {model.dtype}, {machine.threads} threads, context {args.context}")
    print(render_table(table))


if __name__ == "__main__":
    main()
