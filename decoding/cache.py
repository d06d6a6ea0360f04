"""Preallocated KV caches that the decoders own, plugged into transformers' public Cache API.

`TreeCache` (tree decoding, batch 1) is static: one buffer ``kv`` [layers, 2, kvH, capacity, D] for
all layers, allocated up front. Before a forward the caller `place`s its q tokens at slots [q] (a
tensor); every layer writes them there and attends over all `capacity` slots (the caller's 4D mask
[1, 1, q, capacity] says which of them each query sees). Every shape is fixed per tree size, so a
compiled verification step runs without recompiling as the text grows. Nothing is committed until
`commit`: it moves the accepted slots to the contiguous ones after the prefix, in one indexed copy for
all layers, and advances `length`.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, kvH, head_dim) of a transformers text config."""
    c = config.get_text_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers, getattr(c, "num_key_value_heads", None) or c.num_attention_heads, head_dim


class _Layer(CacheLayerMixin):
    is_sliding = False
    is_compileable = True

    def __init__(self, owner, index: int):
        super().__init__()
        self.owner, self.index = owner, index
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        """key/value_states [1, kvH, q, D] -> the whole buffer's keys, values [1, kvH, capacity, D]."""
        kv = self.owner.kv[self.index]  # [2, kvH, capacity, D]
        slots = self.owner.slots  # [q]
        kv[0].index_copy_(1, slots, key_states[0])
        kv[1].index_copy_(1, slots, value_states[0])
        return kv[0, None], kv[1, None]

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.owner.capacity, 0

    def get_seq_length(self) -> int:
        return self.owner.length

    def get_max_length(self) -> int:
        return self.owner.capacity


class TreeCache(Cache):
    """Batch size 1, `capacity` slots; `length` = committed tokens."""

    def __init__(self, config, capacity: int, dtype: torch.dtype, device: torch.device):
        layers, kvH, D = kv_shape(config)
        self.length = 0
        self.capacity = capacity
        self.kv = torch.zeros(layers, 2, kvH, capacity, D, dtype=dtype, device=device)
        self.slots = torch.arange(1, device=device)  # [q] where the next forward writes
        super().__init__(layers=[_Layer(self, i) for i in range(layers)])

    def place(self, slots: torch.Tensor) -> None:
        """The next forward writes its q tokens at `slots` [q]."""
        self.slots = slots

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
