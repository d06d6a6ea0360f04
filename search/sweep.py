"""The tree-size sweep: the best tree's tokens/step (and tokens/s) at every size 0..N."""

from __future__ import annotations

import numpy as np
import pandas as pd

from search.budget import Latency
from search.grow import search
from treeopt.core.record import Calibration
from treeopt.core.replay import positions, replay


def sweep(calibration: Calibration, max_nodes: int = 256, model: str = "empirical", latency: Latency | None = None,
          max_depth: int | None = None, top_k: int | None = None, replayed: bool = False) -> pd.DataFrame:
    """Predicted tokens/step of the optimal tree for every size 0..max_nodes (one greedy search: its
    prefixes), plus forward_ms, tokens/s and speedup over size 0 given a latency file, and the
    replayed tokens/step if `replayed`. Stops early when no further node has nonzero value."""
    result = search(calibration, max_nodes, model, max_depth, top_k)
    n = np.arange(len(result.curve))
    df = pd.DataFrame({"nodes": n, "tokens_per_step": result.curve})
    if replayed:
        rows = positions(calibration)
        df["replayed_tokens_per_step"] = [replay(result.tree[:m], rows).tokens_per_step for m in n]
    if latency is not None:
        df["forward_ms"] = latency.forward(n)
        df["tokens_per_s"] = latency.tokens_per_second(df["tokens_per_step"], n)
        df["speedup"] = df["tokens_per_s"] / (1000.0 / latency.forward(0))
    return df
