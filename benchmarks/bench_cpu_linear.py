"""The few-row products of a CPU decoding step, per kernel: the bundled model's vocabulary projection
(49152 x 576) and one decoder layer's linears, at M = 1..17 rows, median ms.

    flock -x /tmp/cpu.lock python benchmarks/bench_cpu_linear.py --threads 2

Kernels: F.linear (MKL's small-M sgemm), numpy's OpenBLAS (here beside torch's two threads, so above
one row its threads contend with them), x @ W.T, (W @ x.T).T, oneDNN over the weight prepacked once
(`models.PackedLinear`, what the AVX2 decode-time load runs), oneDNN unpacked (mkldnn_linear), MKL prepacked
(`torch.ops.mkl._mkl_linear`, the weight packed for one row), bf16 weights computed in
float32 (upcast per call), bf16 x bf16 (F.linear), int8 weights (`torch.ops.aten._weight_int8pack_mm`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def kernels(W: torch.Tensor) -> dict:
    """name -> fn(x [M, H]) -> [M, V], for the weight W [V, H]."""
    from treeopt.decoding.models import PackedLinear

    packed = torch.ops.mkl._mkl_reorder_linear_weight(W, 1)
    prepacked = PackedLinear(W)
    dnn = W.to_mkldnn()
    bf = W.to(torch.bfloat16)
    scale = W.abs().amax(1) / 127  # [V]
    q = torch.round(W / scale[:, None]).to(torch.int8)  # [V, H]
    Wn = W.numpy()
    return {
        "F.linear": lambda x: F.linear(x, W),
        "numpy (OpenBLAS) W @ x.T": lambda x: torch.from_numpy(Wn @ x.numpy().T).T,
        "x @ W.T": lambda x: x @ W.T,
        "(W @ x.T).T": lambda x: (W @ x.T).T,
        "oneDNN prepacked": prepacked,
        "mkldnn_linear": lambda x: torch.ops.aten.mkldnn_linear(x.to_mkldnn(), dnn).to_dense(),
        "MKL packed for 1 row": lambda x: torch.ops.mkl._mkl_linear(x, packed, W, None, 1),
        "bf16 W, fp32 math": lambda x: F.linear(x, bf.float()),
        "bf16 x bf16": lambda x: F.linear(x.bfloat16(), bf),
        "int8 W (bf16 x)": lambda x: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q, scale.bfloat16()),
    }


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,2,5,9,17")
    ap.add_argument("--repeats", type=int, default=9)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = [int(r) for r in a.rows.split(",")]
    shapes = {"lm_head 49152x576": (49152, 576), "layer: q+k+v+o+gate+up+down": None}
    g = torch.Generator().manual_seed(0)
    layer = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    from treeopt.decoding.models import cpu_flags
    from treeopt.demo import machine

    simd = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma")))
    print(f"{machine()['cpu']} ({' '.join(simd)}), {a.threads} threads, torch {torch.__version__}; median ms at M = {rows}")
    for title in shapes:
        mats = [torch.randn(*shapes[title], generator=g) * 0.02] if shapes[title] else \
               [torch.randn(o, i, generator=g) * 0.02 for o, i in layer]
        ks = [kernels(W) for W in mats]
        print(title)
        for name in ks[0]:
            cells = []
            for M in rows:
                xs = [torch.randn(M, W.shape[1], generator=g) for W in mats]
                try:
                    cells.append(f"{median_ms(lambda: [k[name](x) for k, x in zip(ks, xs)], a.repeats):8.2f}")
                except RuntimeError as e:
                    cells.append(f"{'n/a':>8s}")
            print(f"  {name:20s}" + "".join(cells), flush=True)
    stream(rows, a.repeats, g)


def stream(rows, repeats: int, g) -> None:
    """The products of a whole step, as decoding/fast.py runs them: 30 layers' fused weights (q/k/v,
    o, gate/up, down; 425 MB, more than the caches hold), each kernel in turn, GB/s of weights read."""
    from treeopt.decoding.models import PackedLinear

    mats = [torch.randn(o, i, generator=g) * 0.02 for _ in range(30)
            for o, i in [(960, 576), (576, 576), (3072, 576), (576, 1536)]]
    arrays = [W.numpy() for W in mats]
    mb = sum(W.numel() * 4 for W in mats) / 1e6
    print(f"a step's products: 30 layers, {mb:.0f} MB of weights; median ms (GB/s)")
    linears = [PackedLinear(W) for W in mats]
    runs = {
        "oneDNN prepacked": lambda xs: [f(x) for f, x in zip(linears, xs)],
        "torch (W @ x.T).T": lambda xs: [(W @ x.T).T for W, x in zip(mats, xs)],
        "torch F.linear": lambda xs: [F.linear(x, W) for W, x in zip(mats, xs)],
        "numpy (OpenBLAS)": lambda xs: [A @ x.numpy().T for A, x in zip(arrays, xs)],
    }
    for name, run in runs.items():
        cells = []
        for M in rows:
            xs = [torch.randn(M, W.shape[1], generator=g) for W in mats]
            ms = median_ms(lambda: run(xs), repeats)
            cells.append(f"{ms:8.2f} ({mb / ms:4.1f})")
        print(f"  {name:20s}" + "".join(cells), flush=True)


if __name__ == "__main__":
    main()
