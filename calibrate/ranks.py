"""Where the base model's true tokens rank in each Medusa head's distribution (the files: `treeopt.core.record`).

Head k at the hidden state before y_t predicts y_{t+k}. Its rank is the number of vocabulary entries
whose logit beats the true token's: no sort and no [K, N, V] tensor, only [rows, block] tiles of
logits, counted while they are still in cache (on a CPU this beats one big GEMM, then a compare).

Ranks are clipped at top_k, so a miss needs no full count: a screen first scores each row against
the few tokens the text itself holds (the likeliest to outscore a missed target); a row that already
has top_k of them above its target is a miss, exactly, and only the other rows pay for the whole
vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from treeopt.core.record import MISSING


def head_targets(tokens: torch.Tensor, num_heads: int) -> torch.Tensor:
    """tokens [T] (y_0..y_{T-1}) -> targets [K, T]: targets[k-1, t] = y_{t+k}, MISSING past the end."""
    T = tokens.shape[0]
    idx = torch.arange(T, device=tokens.device) + torch.arange(1, num_heads + 1, device=tokens.device)[:, None]  # [K, T]
    return torch.where(idx < T, tokens[idx.clamp(max=max(T - 1, 0))], MISSING)


def _target_logits(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """logits[i, target[i]] of logits = x @ weight.T + bias, without the others: [N]."""
    true = (x * weight[target]).sum(1)
    return true if bias is None else true + bias[target]


def count_above(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, target: torch.Tensor,
                block: int) -> torch.Tensor:
    """For logits = x @ weight.T + bias ([N, V], never made whole): how many entries of row i beat
    logits[i, target[i]]. weight [V, H], x [N, H], target [N] -> [N] int32."""
    true = _target_logits(weight, bias, x, target)  # [N]
    rows = torch.arange(x.shape[0], device=x.device)
    count = torch.zeros(x.shape[0], dtype=torch.int32, device=x.device)
    for start in range(0, weight.shape[0], block):
        logits = F.linear(x, weight[start:start + block], None if bias is None else bias[start:start + block])  # [N, b]
        own = (target >= start) & (target < start + block)  # the true token never beats itself
        logits[rows[own], target[own] - start] = float("-inf")
        beaten = (logits.amax(1) > true).nonzero().squeeze(1)  # [n] rows with any entry above (a hit: few blocks)
        count[beaten] += (logits[beaten] > true[beaten, None]).sum(1, dtype=torch.int32)
    return count


def count_among(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, target: torch.Tensor,
                tokens: torch.Tensor) -> torch.Tensor:
    """count_above restricted to the vocabulary entries `tokens` [C]: [N] int32."""
    true = _target_logits(weight, bias, x, target)  # [N]
    logits = F.linear(x, weight[tokens], None if bias is None else bias[tokens])  # [N, C]
    beats = (logits > true[:, None]) & (tokens[None] != target[:, None])  # [N, C]
    return beats.sum(1, dtype=torch.int32)


@torch.inference_mode()
def head_ranks(heads, lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, top_k: int,
               rows: int | None = None, block: int | None = None) -> torch.Tensor:
    """Rank of each target in its head's distribution, clipped to `top_k` (a miss); MISSING stays MISSING.

    hidden [N, H] (the states the heads read), targets [K, N] -> ranks [N, K] int16, on hidden's device
    and dtype, `rows` positions x `block` vocabulary entries of logits at a time."""
    cpu = hidden.device.type == "cpu"
    rows, block = rows or (256 if cpu else 4096), block or (2048 if cpu else 1 << 30)
    K, N = targets.shape
    features = heads.features(hidden.to(next(heads.parameters()).device)).to(hidden.device)  # [K, N, H]
    screen = torch.unique(targets[targets != MISSING])  # [C] the tokens of the text
    ranks = torch.full((K, N), MISSING, dtype=torch.int32, device=hidden.device)
    if heads.config.own_lm_head:  # each head its own projection
        groups = [(heads.heads[k][-1], features[k], targets[k], ranks[k]) for k in range(K)]
    else:  # all heads through the base lm_head at once
        groups = [(lm_head, features.reshape(K * N, -1), targets.reshape(K * N), ranks.view(K * N))]
    for project, x, target, out in groups:
        valid = (target != MISSING).nonzero().squeeze(1)  # [M]
        for start in range(0, valid.shape[0], rows):
            i = valid[start:start + rows]
            weight, bias = project.weight, getattr(project, "bias", None)
            miss = count_among(weight, bias, x[i], target[i], screen) >= top_k  # [r] exact misses
            out[i[miss]] = top_k
            i = i[~miss]
            if i.numel():
                out[i] = count_above(weight, bias, x[i], target[i], block).clamp_(max=top_k)
    return ranks.T.to(torch.int16)
