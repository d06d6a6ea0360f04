"""Sizing a tree for a machine: latency profiles (forward time vs tree size, per batch size) and the
size, or chain length, of best predicted tokens/s. At batch size B a step of n nodes verifies B x (n+1)
tokens and emits B x tokens/step, so the best size maximizes B x tokens/step / step time: as B grows
the step time climbs sooner and the best tree shrinks."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from treeopt.search.acceptance import DEFAULT_MODEL, STRENGTH_SIZES
from treeopt.search.crossval import cross_validated_curve, sweep_sizes
from treeopt.search.grow import SearchResult, search
from treeopt.search.source import Record, as_source
from treeopt.search.targets import Target
from treeopt.core.errors import TreeoptError
from treeopt.core.tree import Tree
from treeopt.core.validate import cut_short

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Latency:
    """Forward time of one decoding step vs tree size, from `treeopt profile` (nodes 0 = plain decoding),
    for `batch_size` sequences decoded together."""

    nodes: np.ndarray  # [M] sorted, distinct
    forward_ms: np.ndarray  # [M]
    source: str = ""
    meta: dict = field(default_factory=dict)
    batch_size: int = 1

    def forward(self, nodes) -> np.ndarray:
        """Forward ms at the given tree sizes, interpolated linearly; NaN outside the profiled range."""
        n = np.asarray(nodes, dtype=np.float64)
        ms = np.interp(n, self.nodes, self.forward_ms)
        return np.where((n >= self.nodes[0]) & (n <= self.nodes[-1]), ms, np.nan)

    def tokens_per_second(self, tokens_per_step, nodes) -> np.ndarray:
        """All `batch_size` sequences' tokens per second."""
        return self.batch_size * np.asarray(tokens_per_step, dtype=np.float64) / self.forward(nodes) * 1000.0


def read_latency(path: str | Path, batch_size: int = 1) -> Latency:
    """The rows of one batch size of a latency CSV (see read_latencies)."""
    latencies = read_latencies(path)
    if batch_size not in latencies:
        raise TreeoptError(f"latency file {path} has no rows for batch size {batch_size} (it has "
                           f"{', '.join(map(str, latencies))}): run `treeopt profile --serving-batches {batch_size}`")
    return latencies[batch_size]


def read_latencies(path: str | Path) -> dict[int, Latency]:
    """Read a latency CSV: columns `nodes` (tree size, root excluded) and `forward_ms`, optionally
    `batch_size` (absent: every row is batch 1), plus descriptive columns (device, dtype, model).
    One Latency per batch size, ascending; repeated sizes are combined by their median."""
    path = Path(path)
    if not path.is_file():
        raise TreeoptError(f"latency file {path} not found: write one with `treeopt profile -o {path}`")
    try:
        df = pd.read_csv(path)
    except Exception as e:  # pandas raises many types for damaged files
        raise TreeoptError(f"latency file {path} is not a readable CSV ({type(e).__name__}): "
                           "re-run `treeopt profile`") from None
    if cut_short(path):
        raise TreeoptError(f"latency file {path} is cut short (no newline at its end): re-run `treeopt profile`")
    if not {"nodes", "forward_ms"} <= set(df.columns):
        raise TreeoptError(f"latency file {path} lacks the columns nodes,forward_ms: re-run `treeopt profile`")
    nodes = pd.to_numeric(df["nodes"], errors="coerce")
    ms = pd.to_numeric(df["forward_ms"], errors="coerce")
    if df.empty or nodes.isna().any() or ms.isna().any() or (nodes < 0).any() or (nodes % 1 != 0).any() or (ms <= 0).any():
        raise TreeoptError(f"latency file {path} needs integer nodes >= 0 and positive forward_ms on every row: "
                           "re-run `treeopt profile`")
    batch = pd.to_numeric(df["batch_size"], errors="coerce") if "batch_size" in df.columns else pd.Series(1, index=df.index)
    if batch.isna().any() or (batch < 1).any() or (batch % 1 != 0).any():
        raise TreeoptError(f"latency file {path} needs an integer batch_size >= 1 on every row: re-run `treeopt profile`")
    meta = {c: str(df[c].iloc[0]) for c in df.columns if c not in ("nodes", "forward_ms", "batch_size")}
    table = pd.DataFrame({"batch": batch.astype(np.int64), "nodes": nodes.astype(np.int64), "ms": ms})
    return {int(b): Latency(t.index.to_numpy(), t.to_numpy(np.float64), str(path), meta, int(b))
            for b, t in ((b, g.groupby("nodes")["ms"].median()) for b, g in table.groupby("batch"))}


def choose_nodes(sizes: np.ndarray, tokens_per_step: np.ndarray, latency: Latency) -> int:
    """The size of `sizes` that maximizes predicted tokens/s, given tokens/step at those sizes: the best
    size >= 1, or 0 (plain decoding, with a warning) where `sizes` and the profile hold 0 and no tree
    beats it on the profiled machine."""
    sizes = np.asarray(sizes)
    tps = latency.tokens_per_second(tokens_per_step, sizes)  # [S]
    trees = np.where(sizes >= 1, tps, np.nan)  # [S]
    if not np.isfinite(trees).any():
        raise TreeoptError(f"latency file {latency.source} covers no tree size from 1 to {sizes.max()}: "
                           "profile the sizes you search (`treeopt profile`)")
    best = int(np.nanargmax(trees))
    plain = tps[sizes == 0]
    if plain.size and np.isfinite(plain[0]) and trees[best] <= plain[0]:
        log.warning(f"no tree beats plain decoding on the machine {latency.source} profiled (best: "
                    f"{int(sizes[best])} nodes, {trees[best] / plain[0]:.2f}x): choosing plain decoding (0 nodes)")
        return 0
    return int(sizes[best])


def search_auto(record: Record, latency: Latency, model: str = DEFAULT_MODEL, max_nodes: int = 256,
                max_depth: int | None = None, top_k: int | None = None, target: Target | None = None) -> SearchResult:
    """`--nodes auto`: the greedy tree whose size (of `treeopt.search.crossval.sweep_sizes`, as far as the
    latency file, `max_nodes` and the target's node cap go) maximizes predicted tokens/s, tokens/step
    by cross-validated replay."""
    source = as_source(record, model).resolved(STRENGTH_SIZES, max_depth, top_k)
    caps = [max_nodes, int(latency.nodes[-1])] + ([target.max_nodes] if target is not None and target.max_nodes else [])
    full = search(source, min(caps), max_depth=max_depth, top_k=top_k, target=target)
    sizes = sweep_sizes(len(full.tree))
    curve = cross_validated_curve(source, sizes, max_depth=max_depth, top_k=top_k, target=target)
    n = choose_nodes(sizes, curve, latency)
    return SearchResult(full.tree[:n], full.values[:n], source.model, n,
                        {**full.meta, "nodes": "auto", "auto_max": min(caps)})


def best_chain_length(record: Record, model: str = DEFAULT_MODEL, latency: Latency | None = None,
                      max_length: int | None = None) -> int:
    """Chain length to give servers that draft a top-1 chain (vLLM `num_speculative_tokens`, TGI
    `--speculate`). With a latency file: the length that maximizes predicted tokens/s. Without one:
    the longest chain (up to `max_length` and the number of heads) whose last node still has a
    nonzero acceptance probability, i.e. the most tokens/step a chain can reach."""
    source = as_source(record, model)
    K = min(source.num_heads, max_length if max_length is not None else source.num_heads)
    values = source.values(Tree.chain(K))  # [K]
    if latency is not None:
        tps = latency.tokens_per_second(1.0 + np.concatenate([[0.0], np.cumsum(values)]), np.arange(K + 1))
        if np.isfinite(tps[1:]).any():
            return int(np.nanargmax(tps[1:])) + 1
    return int(np.flatnonzero(values > 0)[-1]) + 1 if (values > 0).any() else 0
