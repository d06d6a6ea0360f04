"""The base model's greedy continuations, in batches, with the hidden states the heads read.

`greedy_continuations` is the fast path (calibration, head-training data): `batch_size` rows decode
together over a preallocated SlotCache, and a row that stops takes the next prompt at once, so no
row idles as padding while the longest one finishes. `generate_continuations` does the same with
plain `model.generate` on left-padded batches: the reference the calibration benchmark compares to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from treeopt.core.errors import TreeoptError


@dataclass
class Continuation:
    prompt_ids: list[int]
    tokens: list[int]  # y_0..y_{T-1}, up to and including the first stop token
    stopped: bool  # ended at a stop token rather than at max_new_tokens
    hidden: torch.Tensor | None  # [T, H]: row t is the final (normed) hidden state of the token before y_t


@torch.inference_mode()
def greedy_continuations(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: set[int],
                         batch_size: int = 8, pad_id: int = 0, with_hidden: bool = False) -> Iterator[Continuation]:
    """Greedy-decode each prompt (a row of a `batch_size`-row batch that refills as rows stop); yield
    the continuations in prompt order."""
    from treeopt.decoding.cache import SlotCache
    from treeopt.decoding.decoder import _max_window, additive_mask
    from treeopt.decoding.models import cache_argument, layer_devices

    prompts = [list(p) for p in prompts]
    if any(not p for p in prompts):
        raise TreeoptError("empty prompt: give at least one token")
    if not prompts:
        return
    if max_new_tokens < 1:
        yield from (Continuation(p, [], False, None) for p in prompts)
        return
    base, lm_head = model.get_decoder(), model.get_output_embeddings()
    device, dtype = lm_head.weight.device, lm_head.weight.dtype
    B, L = min(batch_size, len(prompts)), max(len(p) for p in prompts) + max_new_tokens
    window = _max_window(model.config)
    if window is not None and L > window:
        raise TreeoptError(f"prompt + --max-new-tokens need {L} positions but the model's sliding window is "
                           f"{window}: lower --max-new-tokens")
    cache = SlotCache(model.config.get_text_config().num_hidden_layers, B, L, layer_devices(model))
    cache_arg = cache_argument(model)
    stops = {int(t) for t in stop_ids}
    slot = torch.arange(L, device=device)  # [L]
    every = torch.arange(B, device=device)  # [B]
    ends = [0] * B  # each row's next write position (= its tokens so far, prompt included)
    last = torch.zeros(B, dtype=torch.long, device=device)  # [B] each row's newest token (the next input)
    owner = [-1] * B  # the prompt each row holds, -1: none
    tokens: list[list[int]] = [[] for _ in range(B)]
    hidden = torch.empty(B, max_new_tokens, lm_head.weight.shape[1], dtype=dtype, device=device) if with_hidden else None
    done: dict[int, Continuation] = {}
    queue = iter(range(len(prompts)))

    def forward(rows: torch.Tensor | None, ids: torch.Tensor, slots: torch.Tensor, seen: torch.Tensor):
        """ids/slots [n, q] (slots are also the positions), seen [n, q, E] bool over positions 0..E-1
        -> hidden [n, q, H]."""
        cache.place(rows, slots, seen.shape[-1])
        return base(input_ids=ids, attention_mask=additive_mask(seen[:, None], dtype), position_ids=slots,
                    **{cache_arg: cache}, use_cache=True).last_hidden_state

    def admit(free: list[int]) -> list[int]:
        """Prefill the next prompts into the free rows (together) and take their first tokens; return
        the rows that are free again (their continuation ended at once)."""
        taken = [(r, i) for r, i in zip(free, queue)]
        if not taken:
            return []
        rows = torch.tensor([r for r, _ in taken], device=device)  # [n]
        lens = torch.tensor([len(prompts[i]) for _, i in taken], device=device)  # [n]
        P = int(lens.max())
        ids = torch.full((len(taken), P), pad_id, dtype=torch.long)  # [n, P], right padded
        for j, (r, i) in enumerate(taken):
            ids[j, : len(prompts[i])] = torch.tensor(prompts[i])
            owner[r], tokens[r] = i, []
        q = torch.arange(P, device=device)  # [P]
        h = forward(rows, ids.to(device), q.expand(len(taken), P), (slot[:P] <= q[:, None]).expand(len(taken), P, P))
        for r, i in taken:
            ends[r] = len(prompts[i])
        return record(rows, h[torch.arange(len(taken), device=device), lens - 1])  # each prompt's last token

    def record(rows: torch.Tensor, h: torch.Tensor) -> list[int]:
        """h [n, H]: the rows' newest hidden states -> their next tokens; return the rows that finished."""
        y = lm_head(h).argmax(-1)  # [n]
        last[rows] = y
        rows_ = rows.tolist()
        if hidden is not None:
            hidden[rows, torch.tensor([len(tokens[r]) for r in rows_], device=device)] = h
        free = []
        for r, t in zip(rows_, y.tolist()):
            tokens[r].append(t)
            if t in stops or len(tokens[r]) == max_new_tokens:
                i, T = owner[r], len(tokens[r])
                done[i] = Continuation(prompts[i], tokens[r], t in stops,
                                       hidden[r, :T].to("cpu", torch.float32, copy=True) if hidden is not None else None)
                owner[r] = -1
                free.append(r)
        return free

    free, emitted = list(range(B)), 0
    while emitted < len(prompts):
        while free:
            free = admit(free)
        while emitted in done:
            yield done.pop(emitted)
            emitted += 1
        live = [r for r in range(B) if owner[r] >= 0]
        if not live:
            break
        rows = None if len(live) == B else torch.tensor(live, device=device)  # [n]
        p = torch.tensor([ends[r] for r in live], device=device)[:, None]  # [n, 1] positions of the new tokens
        E = max(ends[r] for r in live) + 1  # positions in use
        h = forward(rows, (last if rows is None else last[rows])[:, None], p, (slot[:E] <= p)[:, None])  # [n, 1, H]
        for r in live:
            ends[r] += 1
        free = record(every if rows is None else rows, h[:, 0])


@torch.inference_mode()
def generate_continuations(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: set[int],
                           batch_size: int = 8, pad_id: int = 0, with_hidden: bool = False) -> Iterator[Continuation]:
    """The same continuations with plain `model.generate` (left-padded batches of `batch_size`)."""
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
