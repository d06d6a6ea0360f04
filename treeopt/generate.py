"""The base model's greedy continuations, in batches, with the hidden states the heads read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch


@dataclass
class Continuation:
    prompt_ids: list[int]
    tokens: list[int]  # y_0..y_{T-1}, up to and including the first stop token
    stopped: bool  # ended at a stop token rather than at max_new_tokens
    hidden: torch.Tensor | None  # [T, H]: row t is the final (normed) hidden state of the token before y_t


@torch.inference_mode()
def greedy_continuations(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: set[int],
                         batch_size: int = 8, pad_id: int = 0, with_hidden: bool = False) -> Iterator[Continuation]:
    """Greedy-decode each prompt with `model.generate` (left-padded batches); yield in prompt order."""
    device = model.device
    for start in range(0, len(prompts), batch_size):
        batch = [list(p) for p in prompts[start:start + batch_size]]
        P = max(len(p) for p in batch)
        ids = torch.full((len(batch), P), pad_id, dtype=torch.long)  # [B, P], left padded
        mask = torch.zeros_like(ids)
        for b, p in enumerate(batch):
            ids[b, P - len(p):] = torch.tensor(p)
            mask[b, P - len(p):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=sorted(stop_ids), pad_token_id=pad_id,
                             output_hidden_states=with_hidden, return_dict_in_generate=True)
        new = out.sequences[:, P:].cpu()  # [B, T_max]
        if with_hidden:
            # step 0 holds the prompt ([B, P, H]); step s > 0 holds the token y_{s-1} ([B, 1, H])
            hidden = torch.cat([out.hidden_states[0][-1][:, -1:]] + [s[-1] for s in out.hidden_states[1:]], dim=1)
        for b, p in enumerate(batch):
            row = new[b].tolist()
            T = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
            yield Continuation(prompt_ids=p, tokens=row[:T], stopped=T < len(row) or row[T - 1] in stop_ids,
                               hidden=hidden[b, :T].float().cpu() if with_hidden else None)
