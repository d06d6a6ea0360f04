"""A preallocated KV cache that the tree decoder owns, plugged into transformers' public Cache API.

All layers share one buffer ``kv`` [layers, 2, kvH, max_len, D]. A forward of q tokens writes them at
slots length..length+q of every layer and attends over slots 0..length+q (the caller's 4D mask says
which of those each query sees). Nothing is committed until `commit`: it moves the accepted slots to
the contiguous ones after the prefix, in one indexed copy for all layers, and advances `length`.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class _Layer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False

    def __init__(self, owner: "TreeCache", index: int):
        super().__init__()
        self.owner, self.index = owner, index

    def lazy_initialization(self, key_states, value_states) -> None:
        self.owner._allocate(key_states)

    def update(self, key_states, value_states, *args, **kwargs):
        o = self.owner
        if o.kv is None:
            o._allocate(key_states)
        start, end = o.length, o.length + key_states.shape[-2]
        if end > o.max_len:
            raise ValueError(f"TreeCache holds {o.max_len} tokens, asked to write up to {end}")
        kv = o.kv[self.index]  # [2, kvH, max_len, D]
        kv[0, :, start:end] = key_states[0]
        kv[1, :, start:end] = value_states[0]
        self.keys, self.values = kv[0, None, :, :end], kv[1, None, :, :end]  # [1, kvH, end, D]
        self.is_initialized = True
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.length

    def get_max_length(self) -> int:
        return self.owner.max_len


class TreeCache(Cache):
    """Batch size 1. `length` = committed tokens; `kv` is allocated at the first write (its dtype,
    device and head shapes are the key states')."""

    def __init__(self, num_layers: int, max_len: int):
        self.length = 0
        self.max_len = max_len
        self.num_layers = num_layers
        self.kv: torch.Tensor | None = None  # [layers, 2, kvH, max_len, D]
        super().__init__(layers=[_Layer(self, i) for i in range(num_layers)])

    def _allocate(self, key_states: torch.Tensor) -> None:
        _, kvH, _, D = key_states.shape
        self.kv = torch.zeros(self.num_layers, 2, kvH, self.max_len, D, dtype=key_states.dtype,
                              device=key_states.device)

    def reset(self) -> None:
        self.length = 0

    def commit(self, slots: torch.Tensor) -> None:
        """Keep the uncommitted slots `length + slots` [m] (ascending), moved to length..length+m."""
        m = slots.shape[0]
        src = slots + self.length
        self.kv[:, :, :, self.length : self.length + m] = self.kv.index_select(3, src)
        self.length += m


class _SlotLayer(_Layer):
    def update(self, key_states, value_states, *args, **kwargs):
        o = self.owner
        if o.kv is None:
            o._allocate(key_states)
        kv = o.kv[self.index]  # [2, B, kvH, max_len, D]
        if o.rows is None:  # every row: one scatter per tensor, the index [B, kvH, q, D] made once per forward
            if o.index is None:
                o.index = o.slots[:, None, :, None].expand(key_states.shape)
            kv[0].scatter_(2, o.index, key_states)
            kv[1].scatter_(2, o.index, value_states)
            self.keys, self.values = kv[0, :, :, : o.extent], kv[1, :, :, : o.extent]  # [B, kvH, extent, D], views
        else:
            rows = o.rows[:, None]  # [n, 1]
            kv[0][rows, :, o.slots] = key_states.transpose(1, 2)  # [n, q, kvH, D] into each row's own slots
            kv[1][rows, :, o.slots] = value_states.transpose(1, 2)
            self.keys, self.values = kv[0][o.rows, :, : o.extent], kv[1][o.rows, :, : o.extent]  # [n, kvH, extent, D]
        self.is_initialized = True
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.extent, 0

    def get_seq_length(self) -> int:
        return 0


class SlotCache(Cache):
    """B independent rows ("slots") of `max_len` positions each, for batched generation in which every
    row is at its own length and a finished row takes a new prompt. Before each forward the caller
    calls `place(rows, slots, extent)`: the rows in the batch, where each row's q new tokens go, and
    how many leading positions the forward attends over (more than any of its rows has written), so
    the caller's 4D mask [n, 1, q, extent] says which of them each query sees."""

    def __init__(self, num_layers: int, batch: int, max_len: int):
        self.batch, self.max_len, self.num_layers = batch, max_len, num_layers
        self.kv: torch.Tensor | None = None  # [layers, 2, B, kvH, max_len, D]
        self.rows: torch.Tensor | None = None  # None: every row, in order
        self.slots: torch.Tensor | None = None
        self.extent = max_len
        self.index: torch.Tensor | None = None  # the every-row scatter index, made by the first layer
        super().__init__(layers=[_SlotLayer(self, i) for i in range(num_layers)])

    def _allocate(self, key_states: torch.Tensor) -> None:
        _, kvH, _, D = key_states.shape
        self.kv = torch.zeros(self.num_layers, 2, self.batch, kvH, self.max_len, D, dtype=key_states.dtype,
                              device=key_states.device)

    def place(self, rows: torch.Tensor | None, slots: torch.Tensor, extent: int) -> None:
        """The next forward's rows [n] (None: all B, in order), their write positions [n, q], and the
        positions it attends over: 0..extent-1."""
        self.rows, self.slots, self.extent, self.index = rows, slots, extent, None
