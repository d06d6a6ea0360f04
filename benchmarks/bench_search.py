"""Speed of the tree optimizer as whole processes (imports included) on a synthetic calibration.

    .venv/bin/python benchmarks/bench_search.py [--positions 200000] [--heads 4] [--top-k 10] [--repeat 3]

Writes a calibration directory of --positions logged positions (ranks drawn so that heads are
correlated and deeper heads are worse, -1 past each continuation's end) with
treeopt.core.record.write_calibration, plus a synthetic latency file, then times `treeopt search
--nodes 64`, `treeopt search --nodes auto --latency`, `treeopt sweep` (N = 0..256) and `treeopt
evaluate` as separate processes (median of --repeat runs) and prints wall and CPU seconds next to
the targets (search --nodes 64 < 3 s, the 0..256 sweep < 5 s, on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]

from treeopt.core.record import rank_columns, write_calibration  # noqa: E402


def synthetic_calibration(directory: Path, positions: int, heads: int, top_k: int, seed: int = 0) -> Path:
    """About `positions` rows over continuations of 50..450 tokens."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(50, 450, positions // 250 + 1)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), positions) + 1]
    lengths[-1] -= lengths.sum() - positions
    pid = np.repeat(np.arange(len(lengths)), lengths).astype(np.int32)
    pos = np.concatenate([np.arange(T) for T in lengths]).astype(np.int32)
    easy = rng.beta(2, 2, len(pid))  # [N] shared by every head: correlated acceptance
    ranks = np.empty((len(pid), heads), np.int16)
    for k in range(heads):
        r = rng.geometric(np.clip(easy * 0.85**k, 0.02, 1)) - 1
        ranks[:, k] = np.where(pos + k + 1 >= np.repeat(lengths, lengths), -1, np.minimum(r, top_k))
    df = pd.DataFrame(ranks, columns=rank_columns(heads))
    df.insert(0, "position", pos)
    df.insert(0, "prompt_id", pid)
    continuations = pd.DataFrame({"prompt_id": np.arange(len(lengths)), "instruction": "synthetic",
                                  "prompt_ids": [[1]] * len(lengths), "tokens": [[0] * int(T) for T in lengths],
                                  "stopped": True})
    return write_calibration(directory, df, continuations, {"top_k": top_k, "model": "synthetic", "heads": heads})


def timed(args: list[str], repeat: int) -> tuple[float, float, str]:
    """Median wall and CPU (user + system) seconds of a whole process, and its output."""
    walls, cpus, out = [], [], ""
    for _ in range(repeat):
        t, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        walls.append(time.perf_counter() - t)
        cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr}")
        out = proc.stdout + proc.stderr
    return statistics.median(walls), statistics.median(cpus), out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", type=int, default=200_000)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    treeopt = [sys.executable, "-c", "import sys, atexit; atexit.register(lambda: print('torch imported:', "
               "'torch' in sys.modules, file=sys.stderr)); from treeopt.cli import main; sys.argv[0] = 'treeopt'; main()"]
    with tempfile.TemporaryDirectory() as tmp:
        cal = synthetic_calibration(Path(tmp) / "cal", a.positions, a.heads, a.top_k)
        latency = Path(tmp) / "latency.csv"
        n = np.arange(0, 257, 8)
        pd.DataFrame({"nodes": n, "forward_ms": 20 + 0.004 * n**1.5, "device": "synthetic"}).to_csv(latency, index=False)
        runs = [
            ("search --nodes 64", ["search", "-c", str(cal), "--nodes", "64", "-o", str(Path(tmp) / "t.json")], 3.0),
            ("search --nodes auto --latency", ["search", "-c", str(cal), "--nodes", "auto", "--latency", str(latency)], None),
            ("sweep N=0..256", ["sweep", "-c", str(cal), "--max-nodes", "256"], 5.0),
            ("sweep N=0..256 --latency", ["sweep", "-c", str(cal), "--latency", str(latency)], 5.0),
            ("evaluate --split 0.8", ["evaluate", str(Path(tmp) / "t.json"), "-c", str(cal), "--split", "0.8"], None),
            ("treeopt --help", ["--help"], None),
        ]
        print(f"synthetic calibration: {a.positions} positions, {a.heads} heads, top-{a.top_k}; median of "
              f"{a.repeat} whole-process runs; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
        print(f"{'command':32} {'wall s':>7} {'cpu s':>6} {'target s':>8} {'ok':>3}  torch imported")
        for name, args, target in runs:
            wall, cpu, out = timed(treeopt + args, a.repeat)
            torch = "yes" if "torch imported: True" in out else "no"
            ok = "" if target is None else ("yes" if wall < target else "NO")
            print(f"{name:32} {wall:7.2f} {cpu:6.2f} {'' if target is None else f'{target:.1f}':>8} {ok:>3}  {torch}")
        print("wall is the target (whole process, imports included); cpu s = user + system time, "
              "which other load on the machine does not inflate")


if __name__ == "__main__":
    main()
