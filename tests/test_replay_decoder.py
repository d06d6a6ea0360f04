"""Replay predicts exactly the steps the real tree decoder takes on the same prompts.

Ranks are computed here from scratch (one full forward over prompt + greedy continuation), as the
calibration format defines them, then `replay` is compared with `treeopt.decoding.decoder.decode`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from treeopt.core.record import Calibration
from treeopt.decoding.heads import random_heads
from treeopt.core.replay import replay
from treeopt.core.tree import Tree

decoder = pytest.importorskip("treeopt.decoding.decoder")


def logged_ranks(model, heads, prompt: list[int], continuation: list[int], top_k: int) -> np.ndarray:
    """[T, K]: r_k at t = rank of y_{t+k} in head k's logits at the hidden state of the token before
    y_t, clipped to top_k, -1 past the end of the continuation."""
    ids = torch.tensor([prompt + continuation])
    with torch.inference_mode():
        hidden = model(ids, output_hidden_states=True).hidden_states[-1][0]  # [P+T, H]
        logits = heads(hidden[len(prompt) - 1 : -1], model.get_output_embeddings())  # [K, T, V]
    K, T = logits.shape[0], len(continuation)
    ranks = np.full((T, K), -1, np.int16)
    for t in range(T):
        for k in range(1, K + 1):
            if t + k < T:
                row = logits[k - 1, t]
                ranks[t, k - 1] = min(int((row > row[continuation[t + k]]).sum()), top_k)
    return ranks


@pytest.mark.slow
def test_replay_equals_decoder_steps(tiny_llama):
    # A small random Llama repeats itself a lot, so heads close to the base lm_head accept often.
    heads = random_heads(tiny_llama, num_heads=3, seed=0, scale=0.02)
    # untrained heads rank the true token about uniformly: a wide tree still accepts ~1 in 5
    tree = Tree(Tree.cartesian([20, 3]).paths + ((0, 0, 0), (1, 0, 0), (0, 1, 0)))
    top_k = 20
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 97, size=n).tolist() for n in (3, 5, 8)]
    ranks, steps, accepted = [], [], 0
    for prompt in prompts:
        result = decoder.decode(tiny_llama, heads, tree, prompt, max_new_tokens=30)
        reference = decoder.greedy_reference(tiny_llama, prompt, 30)
        assert result.tokens == reference.tokens  # greedy tree decoding is lossless
        ranks.append(logged_ranks(tiny_llama, heads, prompt, reference.tokens, top_k))
        steps.append(result.steps)
        accepted += sum(result.accepted)
    assert accepted > 10  # the case is not trivial: the tree accepts tokens
    lengths = [len(r) for r in ranks]
    cal = Calibration(np.concatenate(ranks), np.repeat(np.arange(len(ranks)), lengths).astype(np.int32),
                      np.concatenate([np.arange(T) for T in lengths]).astype(np.int32), top_k)
    result = replay(tree, cal)
    assert result.steps.tolist() == steps
    assert result.tokens_per_step == pytest.approx(sum(lengths) / sum(steps))
