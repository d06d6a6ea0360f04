"""Where the base model's true tokens rank in each Medusa head's distribution (see calibrate/format.py).

Head k at the hidden state before y_t predicts y_{t+k}. Its rank is the number of vocabulary entries
whose logit beats the true token's: no sort, no [K, N, V] tensor, one [rows, V] chunk at a time.
"""

from __future__ import annotations

import torch

from calibrate.format import MISSING


def head_targets(tokens: torch.Tensor, num_heads: int) -> torch.Tensor:
    """tokens [T] (y_0..y_{T-1}) -> targets [K, T]: targets[k-1, t] = y_{t+k}, MISSING past the end."""
    T = tokens.shape[0]
    idx = torch.arange(T, device=tokens.device) + torch.arange(1, num_heads + 1, device=tokens.device)[:, None]  # [K, T]
    return torch.where(idx < T, tokens[idx.clamp(max=max(T - 1, 0))], MISSING)


@torch.inference_mode()
def head_ranks(heads, lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, top_k: int,
               chunk_elements: int = 1 << 23) -> torch.Tensor:
    """Rank of each target in its head's distribution, clipped to `top_k` (a miss); MISSING stays MISSING.

    hidden [N, H] (the states the heads read), targets [K, N] -> ranks [N, K] int16. Ties count for the
    true token. Logits are made `chunk_elements // V` rows at a time, on hidden's device and dtype."""
    K, N = targets.shape
    features = heads.features(hidden)  # [K, N, H]
    ranks = torch.full((K, N), MISSING, dtype=torch.int32, device=hidden.device)
    for k in range(K):
        project = heads.heads[k][-1] if heads.config.own_lm_head else lm_head  # H -> V
        rows = max(1, chunk_elements // project.weight.shape[0])
        valid = (targets[k] != MISSING).nonzero().squeeze(1)  # [M]
        for start in range(0, valid.shape[0], rows):
            i = valid[start:start + rows]  # [c]
            logits = project(features[k, i])  # [c, V]
            true = logits.gather(1, targets[k, i, None])  # [c, 1]
            ranks[k, i] = (logits > true).sum(1, dtype=torch.int32).clamp_(max=top_k)
    return ranks.T.to(torch.int16)
