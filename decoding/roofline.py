"""The machine's limits and the least time a decoding step can take on it (the roofline).

`measure_machine` times, once, the read bandwidth (a sum over a tensor far larger than the caches)
and the peak GEMM rate per dtype (a large square matmul), each the best of several runs: the rate the
machine reaches, which other jobs on its cores can only lower. `step_cost` counts what one step must do:
read every weight it uses once (the base model without its embedding table, the lm_head, the heads)
plus the committed KV cache, and multiply each of its M = nodes + 1 rows through those weights plus
the attention over the context; `draft_cost` adds a drafter other than heads: nothing for n-gram
lookup (no model), one forward per tree level for a draft model or EAGLE-3. roofline_ms = max(bytes / bandwidth, FLOPs / peak): a step can go no
faster, whatever its kernels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Machine:
    device: str
    threads: int
    bandwidth_gbs: float  # read bandwidth, GB/s
    peak_gflops: dict  # dtype name -> GEMM GFLOP/s


@dataclass(frozen=True)
class StepCost:
    bytes: float
    flops: float

    def ms(self, machine: Machine, dtype: torch.dtype) -> float:
        peak = machine.peak_gflops[str(dtype).removeprefix("torch.")]
        return max(self.bytes / machine.bandwidth_gbs, self.flops / peak) / 1e6


def _best_s(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return min(times)


@torch.inference_mode()
def measure_machine(device: torch.device, dtypes=(torch.float32, torch.bfloat16), repeats: int = 9,
                    read_mb: int = 512, gemm: int = 2048) -> Machine:
    """Read bandwidth (sum over `read_mb` MB of fp32) and GEMM peak ([gemm, gemm] @ [gemm, gemm]) per dtype,
    each from the fastest of `repeats` runs."""
    x = torch.ones(read_mb * 2**20 // 4, dtype=torch.float32, device=device)
    bandwidth = x.numel() * 4 / _best_s(x.sum, device, repeats) / 1e9
    del x
    peaks = {}
    for dt in dtypes:
        a = torch.randn(gemm, gemm, device=device).to(dt)
        peaks[str(dt).removeprefix("torch.")] = 2 * gemm**3 / _best_s(lambda: a @ a, device, repeats) / 1e9
    return Machine(str(device), torch.get_num_threads(), bandwidth, peaks)


def step_cost(model, nodes: int, context: int, heads=None, depth: int = 0, batch: int = 1,
              fused: bool = False) -> StepCost:
    """Bytes read and FLOPs of one decoding step of `batch` sequences: a forward of `nodes` + 1 tokens
    each over `context` committed ones with the lm_head on every row, then (with `heads`) `depth`
    heads at one node each. The weights are read once for the whole batch. Heads sharing the lm_head
    read it a second time for their one node, unless `fused` (the decoder's small-tree step): then its
    one pass projects every row's `depth` head features too."""
    c = model.config.get_text_config()
    weight = model.get_output_embeddings().weight  # [V, H]
    size = weight.element_size()
    M = nodes + 1
    embed = model.get_input_embeddings().weight
    layer_params = sum(p.numel() for p in model.get_decoder().parameters()) - embed.numel()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    kv_bytes = 2 * c.num_hidden_layers * kv_heads * head_dim * context * size
    attn_flops = 2 * 2 * M * (context + M) * c.num_hidden_layers * c.num_attention_heads * head_dim
    nbytes = (layer_params + weight.numel()) * size + batch * kv_bytes
    flops = batch * (2 * M * (layer_params + weight.numel()) + attn_flops)
    if heads is not None and depth:
        block_params = sum(p.numel() for h in heads.heads[:depth] for p in h.parameters())
        shared = not heads.config.own_lm_head
        vocab = 0 if shared and fused else weight.numel()  # a head's own lm_head, or the shared one read again
        rows = M * depth if shared and fused else depth  # the head rows the vocabulary product projects
        nbytes += (block_params + vocab) * size
        flops += batch * 2 * ((M if fused else 1) * block_params + rows * weight.numel())
    return StepCost(nbytes, flops)


def draft_cost(drafter, tree, context: int) -> StepCost:
    """Bytes read and FLOPs of one drafting step of a treeopt.decoding.drafters drafter for `tree`: 0 for
    one without a model (n-gram lookup); a draft model or EAGLE-3 runs one forward per tree level (the
    root, then each level's nodes that have children, as `propose` drafts), each reading the drafter's
    weights (EAGLE-3: without the base model's embedding, shared) and its KV cache of `context` entries."""
    if tree.depth == 0 or drafter.kind not in ("draft", "eagle3"):
        return StepCost(0.0, 0.0)
    if drafter.kind == "draft":
        module, c = drafter.model, drafter.model.config.get_text_config()
        params = (sum(p.numel() for p in module.get_decoder().parameters()) - module.get_input_embeddings().weight.numel()
                  + module.get_output_embeddings().weight.numel())  # its layers and lm_head (tied or not)
        layers, heads = c.num_hidden_layers, c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    else:
        module, c = drafter.eagle, drafter.eagle.config
        params = sum(p.numel() for p in module.parameters())
        layers, heads, kv_heads, head_dim = 1, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    size = next(module.parameters()).element_size()
    parents = {p[:-1] for p in tree.paths if len(p) > 1}  # the nodes with children (the root: ())
    rows = 1 + len(parents)  # the root's row, then one per node with children
    forwards = tree.depth
    nbytes = forwards * (params + 2 * layers * kv_heads * head_dim * context) * size
    flops = 2 * rows * params + 2 * 2 * rows * context * layers * heads * head_dim
    return StepCost(nbytes, flops)
