"""The tree-size sweep: the best tree's tokens/step (and tokens/s) at every size 0..N."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from search.budget import Latency
from search.grow import search
from treeopt.core.record import Calibration
from treeopt.core.replay import positions, replay


def sweep(calibration: Calibration, max_nodes: int = 256, model: str = "empirical",
          latency: Latency | Sequence[Latency] | None = None, max_depth: int | None = None, top_k: int | None = None,
          replayed: bool = False) -> pd.DataFrame:
    """Predicted tokens/step of the optimal tree for every size 0..max_nodes (one greedy search: its
    prefixes), and the replayed tokens/step if `replayed`. Stops early when no further node has nonzero
    value. Given latencies (one per batch size), one block of rows per batch size (column batch_size)
    adds forward_ms, tokens/s (all the batch's sequences) and speedup over plain decoding at that batch size."""
    result = search(calibration, max_nodes, model, max_depth, top_k)
    n = np.arange(len(result.curve))
    df = pd.DataFrame({"nodes": n, "tokens_per_step": result.curve})
    if replayed:
        rows = positions(calibration)
        df["replayed_tokens_per_step"] = [replay(result.tree[:m], rows).tokens_per_step for m in n]
    if latency is None:
        return df
    blocks = []
    for lat in [latency] if isinstance(latency, Latency) else latency:
        block = df.assign(batch_size=lat.batch_size, forward_ms=lat.forward(n))
        block["tokens_per_s"] = lat.tokens_per_second(block["tokens_per_step"], n)
        block["speedup"] = block["tokens_per_s"] / lat.tokens_per_second(1.0, 0)
        blocks.append(block)
    return pd.concat(blocks, ignore_index=True)
