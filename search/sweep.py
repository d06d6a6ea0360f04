"""The tree-size sweep: the best tree's tokens/step (and tokens/s) at sizes 0..N."""

from __future__ import annotations

import pandas as pd

from search.acceptance import DEFAULT_MODEL, resolve_model
from search.crossval import cross_validated_curve, sweep_sizes
from search.budget import Latency
from search.grow import search
from treeopt.core.record import Calibration
from treeopt.core.replay import replay_prefixes


def sweep(calibration: Calibration, max_nodes: int = 256, model: str = DEFAULT_MODEL, latency: Latency | None = None,
          max_depth: int | None = None, top_k: int | None = None, replayed: bool = False) -> pd.DataFrame:
    """Tokens/step of the optimal tree at the sizes of `search.crossval.sweep_sizes` up to max_nodes
    (one greedy search: its prefixes): `tokens_per_step` is the cross-validated replay
    (`search.crossval`), `uniform_tokens_per_step` the uniform expectation 1 + sum of node values;
    plus forward_ms, tokens/s and speedup over size 0 (from the cross-validated figure) given a
    latency file, and the in-sample replay if `replayed`. Stops early when no further node has
    nonzero value."""
    model = resolve_model(calibration, model)
    result = search(calibration, max_nodes, model, max_depth, top_k)
    n = sweep_sizes(len(result.tree))
    df = pd.DataFrame({"nodes": n,
                       "tokens_per_step": cross_validated_curve(calibration, n, model, max_depth=max_depth, top_k=top_k),
                       "uniform_tokens_per_step": result.curve[n]})
    if replayed:
        df["in_sample_tokens_per_step"] = [r.tokens_per_step for r in replay_prefixes(result.tree, calibration, n)]
    if latency is not None:
        df["forward_ms"] = latency.forward(n)
        df["tokens_per_s"] = latency.tokens_per_second(df["tokens_per_step"], n)
        df["speedup"] = df["tokens_per_s"] / (1000.0 / latency.forward(0))
    return df
