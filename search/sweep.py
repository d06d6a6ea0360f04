"""The tree-size sweep: the best tree's tokens/step (and tokens/s) at sizes 0..N."""

from __future__ import annotations

from typing import Sequence

import pandas as pd

from treeopt.search.acceptance import DEFAULT_MODEL, STRENGTH_SIZES
from treeopt.search.crossval import cross_validated_curve, sweep_sizes
from treeopt.search.budget import Latency
from treeopt.search.grow import search
from treeopt.search.source import Record, as_source


def sweep(record: Record, max_nodes: int = 256, model: str = DEFAULT_MODEL,
          latency: Latency | Sequence[Latency] | None = None, max_depth: int | None = None, top_k: int | None = None,
          replayed: bool = False) -> pd.DataFrame:
    """Tokens/step of the optimal tree at the sizes of `treeopt.search.crossval.sweep_sizes` up to max_nodes
    (one greedy search: its prefixes): `tokens_per_step` is the cross-validated replay
    (`treeopt.search.crossval`), `uniform_tokens_per_step` the uniform expectation 1 + sum of node values, and
    the in-sample replay if `replayed`. Stops early when no further node has nonzero value. Given
    latencies (one per batch size), one block of rows per batch size (column batch_size) adds
    forward_ms, tokens/s (all the batch's sequences, from the cross-validated figure) and speedup over
    plain decoding at that batch size."""
    source = as_source(record, model).resolved(STRENGTH_SIZES, max_depth, top_k)
    result = search(source, max_nodes, max_depth=max_depth, top_k=top_k)
    n = sweep_sizes(len(result.tree))
    df = pd.DataFrame({"nodes": n,
                       "tokens_per_step": cross_validated_curve(source, n, max_depth=max_depth, top_k=top_k),
                       "uniform_tokens_per_step": result.curve[n]})
    if replayed:
        df["in_sample_tokens_per_step"] = [r.tokens_per_step for r in source.replay_prefixes(result.tree, n)]
    if latency is None:
        return df
    blocks = []
    for lat in [latency] if isinstance(latency, Latency) else latency:
        block = df.assign(batch_size=lat.batch_size, forward_ms=lat.forward(n))
        block["tokens_per_s"] = lat.tokens_per_second(block["tokens_per_step"], n)
        block["speedup"] = block["tokens_per_s"] / lat.tokens_per_second(1.0, 0)
        blocks.append(block)
    return pd.concat(blocks, ignore_index=True)
