"""A batch-size schedule: the tree to serve at each batch size, from one calibration and a latency
profile per batch size (`treeopt profile --serving-batches 1,4,16,64`).

Every entry is the prefix of one greedy search whose size maximizes B x tokens/step / step time at
that batch size (treeopt.search.budget.choose_nodes), so the trees nest: a larger batch takes a prefix of a
smaller batch's tree. The file (`treeopt search --serving-batches ... -o schedule.json`):

    {"acceptance_model": "smoothed:inf", "calibration": "cal", "latency": "latency.csv", "schedule": [
      {"batch_size": 1, "nodes": 24, "medusa_choices": [[0], [0, 0], ...], "predicted_tokens_per_step": 1.9,
       "forward_ms": 31.0, "plain_forward_ms": 25.0, "predicted_tokens_per_s": 61.3, "predicted_speedup": 1.53},
      ...]}

`predicted_speedup` is over plain decoding (nodes 0) at the same batch size; entries ascend by batch size.
"""

from __future__ import annotations

import json
from pathlib import Path

from treeopt.search.acceptance import DEFAULT_MODEL, resolve_model
from treeopt.search.budget import Latency, choose_nodes
from treeopt.search.crossval import cross_validated_curve, sweep_sizes
from treeopt.search.grow import search
from treeopt.core.fileio import write_text
from treeopt.core.record import Calibration


def batch_schedule(calibration: Calibration, latencies: dict[int, Latency], model: str = DEFAULT_MODEL,
                   max_nodes: int = 256, max_depth: int | None = None, top_k: int | None = None) -> list[dict]:
    """One entry per batch size (ascending): its best tree and predicted figures (see the module doc);
    tokens/step by cross-validated replay, as `--nodes auto` chooses."""
    model = resolve_model(calibration, model)
    largest = min(max_nodes, max(int(lat.nodes[-1]) for lat in latencies.values()))
    full = search(calibration, largest, model, max_depth, top_k)
    sizes = sweep_sizes(len(full.tree))  # [S]
    curve = cross_validated_curve(calibration, sizes, model, max_depth=max_depth, top_k=top_k)  # [S]
    entries = []
    for b, lat in sorted(latencies.items()):
        n = choose_nodes(sizes, curve, lat)
        step = float(curve[list(sizes).index(n)])
        tps, plain = float(lat.tokens_per_second(step, n)), float(lat.tokens_per_second(1.0, 0))
        entries.append({"batch_size": b, "nodes": n, "medusa_choices": full.tree[:n].choices,
                        "predicted_tokens_per_step": step, "forward_ms": float(lat.forward(n)),
                        "plain_forward_ms": float(lat.forward(0)), "predicted_tokens_per_s": tps,
                        "predicted_speedup": tps / plain})
    return entries


def write_schedule(path: str | Path, entries: list[dict], **meta) -> Path:
    """The schedule file: `meta`'s fields, then "schedule" with one entry a line."""
    fields = [json.dumps({k: v})[1:-1] for k, v in meta.items()]
    rows = ",\n".join("  " + json.dumps(e) for e in entries)
    write_text(path, "{" + ", ".join(fields + [f'"schedule": [\n{rows}\n]']) + "}\n")
    return Path(path)
