"""Sizing vLLM's speculation: the chain length k per batch size that maximizes vLLM's throughput, and
the `--speculative-config` JSON that tells vLLM to run it.

vLLM (0.32) drafts a top-1 chain for every method, Medusa included (each head's argmax,
`vllm/v1/spec_decode/medusa.py`, `MedusaProposer.propose`), of `num_speculative_tokens` tokens. A chain
of k tokens is the tree [[0], [0, 0], ...] (`Tree.chain(k)`), whose tokens/step the calibration
predicts by cross-validated replay (`treeopt.search.crossval.cross_validated` within the chain
target). vLLM's step time with a k-token chain at batch size B comes from `treeopt profile --engine
vllm` (a latency CSV whose `nodes` column is k). At B, k gives B x tokens/step(k) / step_ms(B, k)
tokens per ms; the best k (0: plain decoding, where speculating loses) is the schedule's entry.

The schedule is written the way vLLM's `SpeculativeConfig` takes it
(`vllm/config/speculative.py`): `num_speculative_tokens` (> 0, `SpeculativeConfig._verify_args`) and,
for several batch sizes, `num_speculative_tokens_per_batch_size`, a list of inclusive
[low, high, k] ranges that `vllm/v1/spec_decode/dynamic/utils.py`,
`validate_and_normalize_dynamic_sd_schedule`, requires positive, low <= high, k >= 0, sorted and
non-overlapping, the first starting at 1; `build_dynamic_sd_schedule_lookup` carries the last range's
k to every larger batch and caps each k at `num_speculative_tokens`, so that is the largest k.
vLLM 0.32's Medusa drafter itself keeps k fixed (`MedusaProposer.propose` asserts
`num_speculative_tokens == self.num_speculative_tokens`, and vLLM stops there on a schedule whose k
changes): with Medusa heads each batch range is served with its own k (`treeopt.search.api` says so);
EAGLE-3, a draft model and n-gram lookup take the schedule (`treeopt.core.serving.VARIABLE_K`). The
config's fields per drafter are `treeopt.core.serving.vllm_config`'s.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from treeopt.search.acceptance import DEFAULT_MODEL, resolve_model
from treeopt.search.budget import Latency
from treeopt.search.crossval import cross_validated
from treeopt.search.targets import TARGETS
from treeopt.core.errors import TreeoptError
from treeopt.core.fileio import write_text
from treeopt.core.serving import vllm_config
from treeopt.core.record import Calibration


def chain_predictions(calibration: Calibration, max_k: int, model: str = DEFAULT_MODEL) -> np.ndarray:
    """Cross-validated tokens/step of the top-1 chains of 0..max_k tokens: [max_k + 1], entry 0 = 1."""
    max_k = min(max_k, calibration.num_heads)
    sizes = list(range(1, max_k + 1))
    results = cross_validated(calibration, sizes, resolve_model(calibration, model), target=TARGETS["chain"])
    return np.array([1.0] + [r.tokens_per_step for r in results])


def best_k(tokens_per_step: np.ndarray, latency: Latency) -> tuple[int, np.ndarray]:
    """(k of the highest predicted throughput at `latency`'s batch size, throughput of every k
    [tokens/s, NaN where k was not profiled]). Ties go to the shorter chain."""
    ks = np.arange(len(tokens_per_step))
    tps = np.where(np.isin(ks, latency.nodes), latency.tokens_per_second(tokens_per_step, ks), np.nan)
    if np.isnan(tps).all():
        raise TreeoptError(f"latency file {latency.source or ''} has no chain lengths 0..{ks[-1]} for batch size "
                           f"{latency.batch_size}: profile them with `treeopt profile --engine vllm`")
    return int(np.nanargmax(tps)), tps


def vllm_schedule(calibration: Calibration, latencies: dict[int, Latency], max_k: int = 4,
                  model: str = DEFAULT_MODEL) -> list[dict]:
    """One entry per batch size (ascending): the chain length of best predicted vLLM throughput."""
    steps = chain_predictions(calibration, max_k, model)
    entries = []
    for b, lat in sorted(latencies.items()):
        k, tps = best_k(steps, lat)
        entries.append({"batch_size": b, "k": k, "predicted_tokens_per_step": float(steps[k]),
                        "step_ms": float(lat.forward(k)), "plain_step_ms": float(lat.forward(0)),
                        "predicted_tokens_per_s": float(tps[k]), "plain_tokens_per_s": float(tps[0]),
                        "predicted_speedup": float(tps[k] / tps[0]),
                        "predicted_tokens_per_s_by_k": [None if np.isnan(t) else float(t) for t in tps]})
    return entries


def batch_ranges(entries: list[dict]) -> list[list[int]]:
    """[[low, high, k], ...] for vLLM: batch size b_i's k holds from b_i (1 for the first) to
    b_(i+1) - 1, the last up to b_n (vLLM carries it on); neighbours with one k are merged."""
    sizes = [e["batch_size"] for e in entries]
    if sizes != sorted(set(sizes)) or not sizes or sizes[0] < 1:
        raise TreeoptError(f"batch sizes {sizes}: give distinct positive batch sizes, e.g. 1,4,16")
    ranges: list[list[int]] = []
    for i, e in enumerate(entries):
        low = 1 if i == 0 else e["batch_size"]
        high = entries[i + 1]["batch_size"] - 1 if i + 1 < len(entries) else e["batch_size"]
        if ranges and ranges[-1][2] == e["k"]:
            ranges[-1][1] = high
        else:
            ranges.append([low, high, e["k"]])
    return ranges


def speculative_config(entries: list[dict], drafter: str | None = "heads") -> dict | None:
    """vLLM's `--speculative-config` for the schedule with `drafter` (`--drafter`: heads[:DIR],
    eagle3:DIR, draft:MODEL, ngram[:MIN-MAX]): one k gives `num_speculative_tokens`, several add
    `num_speculative_tokens_per_batch_size`; None when k = 0 everywhere (serve plainly)."""
    kmax = max(e["k"] for e in entries)
    if kmax == 0:
        return None
    varies = len(entries) > 1 and len({e["k"] for e in entries}) > 1
    return vllm_config(drafter, kmax, batch_ranges(entries) if varies else None)


def write_vllm_config(path: str | Path, config: dict | None) -> Path:
    """The JSON to pass as `vllm serve --speculative-config` (add "model": the exported heads)."""
    write_text(Path(path), json.dumps(config if config is not None else {}, indent=None) + "\n")
    return Path(path)
