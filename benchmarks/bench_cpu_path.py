"""The decoding step on this CPU's default path vs the F.linear lm_head, against the roofline: plain and
1-16 node trees of the bundled model + shipped heads, context 160, one run (ratios within it).

    flock -x /tmp/cpu.lock python benchmarks/bench_cpu_path.py --threads 2
"""

from __future__ import annotations

import argparse
import torch

from treeopt.decoding.heads import resolve_heads
from treeopt.decoding.models import decode_path, load_model, set_threads
from treeopt.decoding.profile import profile_latency, render_profile
from treeopt.decoding.roofline import measure_machine


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="0,1,2,4,8,16")
    ap.add_argument("--context", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    set_threads(a.threads)
    lm = load_model(device="cpu", attention="decode")
    reference = load_model(device="cpu", dtype="float32", attention="eager")  # as decode loads it, with F.linear
    heads = resolve_heads(None, lm.model)
    sizes = [int(s) for s in a.sizes.split(",")]
    machine = measure_machine(torch.device("cpu"), dtypes=(lm.model.dtype,))
    default = decode_path(torch.device("cpu"))
    print(f"default path: {default.why}")
    for name, model in [("default path", lm.model), ("F.linear (reference load)", reference.model)]:
        df = profile_latency(model, heads, sizes, a.context, a.repeats, machine=machine, compiled=False)
        print(f"\n{name}\n{render_profile(df)}", flush=True)


if __name__ == "__main__":
    main()
