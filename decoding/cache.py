"""Preallocated KV caches that the decoders own, plugged into transformers' public Cache API.

`TreeCache` (tree decoding, batch 1) is static: every layer has its own key and value tensors
[1, kvH, max_len, D], allocated at its first write (dtype, device of the key states). Before a forward
the caller `place`s its q tokens at slots [q] (a tensor); every layer writes them there and attends over
all `max_len` slots (the caller's 4D mask [1, 1, q, max_len] says which of them each query sees), so
every shape is fixed per tree size and a compiled verification step runs without recompiling as the
text grows. (Separate tensors, not views of one buffer: a compiled graph then writes each in place,
where a write into a view makes it copy the whole buffer per layer.) Nothing is committed until
`commit`: it moves the accepted slots to the contiguous ones after the prefix and advances `length`.

`SlotCache` (batched generation) keeps the layers on one device in one buffer [layers, 2, B, kvH,
max_len, D] (one buffer per device with a device map).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class _PerDevice:
    """The K/V buffers of a cache: the layers on one device (`devices`, one entry per layer; None: all
    on one) share one buffer, allocated at their first write like the key states (dtype, device)."""

    def __init__(self, num_layers: int, devices=None):
        devices = [None] * num_layers if devices is None else [str(d) for d in devices]
        if len(devices) != num_layers:
            raise ValueError(f"{len(devices)} layer devices for {num_layers} layers")
        names = list(dict.fromkeys(devices))
        self.group = [names.index(d) for d in devices]  # layer -> its buffer
        self.row = [self.group[:i].count(g) for i, g in enumerate(self.group)]  # layer -> its row in the buffer
        self.buffers: list[torch.Tensor | None] = [None] * len(names)

    def layer(self, index: int, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Layer `index`'s [2, *shape] of its device's buffer [layers there, 2, *shape]."""
        g = self.group[index]
        if self.buffers[g] is None:
            self.buffers[g] = torch.zeros(self.group.count(g), 2, *shape, dtype=like.dtype, device=like.device)
        return self.buffers[g][self.row[index]]

    def allocated(self) -> list[torch.Tensor]:
        return [b for b in self.buffers if b is not None]


class _Layer(CacheLayerMixin):
    is_sliding = False
    is_compileable = True

    def __init__(self, owner, index: int):
        super().__init__()
        self.owner, self.index = owner, index

    def lazy_initialization(self, key_states, value_states) -> None:
        pass  # the owner allocates at the first update

    def update(self, key_states, value_states, *args, **kwargs):
        """key/value_states [1, kvH, q, D] -> this layer's whole keys, values [1, kvH, max_len, D]."""
        if self.keys is None:
            _, kvH, _, D = key_states.shape
            self.keys = key_states.new_zeros(1, kvH, self.owner.max_len, D)
            self.values = value_states.new_zeros(1, kvH, self.owner.max_len, D)
        slots = self.owner.slots.to(self.keys.device)  # [q]
        self.keys.index_copy_(2, slots, key_states)
        self.values.index_copy_(2, slots, value_states)
        self.is_initialized = True
        return self.keys, self.values

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.owner.max_len, 0

    def get_seq_length(self) -> int:
        return self.owner.length

    def get_max_length(self) -> int:
        return self.owner.max_len


class TreeCache(Cache):
    """Batch size 1. `length` = committed tokens."""

    def __init__(self, num_layers: int, max_len: int):
        self.length = 0
        self.max_len = max_len
        self.num_layers = num_layers
        self.slots: torch.Tensor | None = None  # [q] where the next forward writes
        super().__init__(layers=[_Layer(self, i) for i in range(num_layers)])

    def tensors(self) -> list[torch.Tensor]:
        """Every allocated key and value tensor [1, kvH, max_len, D]."""
        return [t for layer in self.layers for t in (layer.keys, layer.values) if t is not None]

    def place(self, slots: torch.Tensor) -> None:
        """The next forward writes its q tokens at `slots` [q]."""
        self.slots = slots

    def reset(self) -> None:
        self.length = 0

    def commit(self, slots: torch.Tensor) -> None:
        """Keep the uncommitted slots `length + slots` [m] (ascending), moved to length..length+m. Slots
        already in place (a leading 0, 1, ..., as a plain step's or a first-child path's) are not copied."""
        m, src = slots.shape[0], {}
        keep = slots.tolist()
        k = next((i for i, s in enumerate(keep) if s != i), m)  # slots[:k] are in place
        if k < m:
            start = self.length + k
            for t in self.tensors():  # [1, kvH, max_len, D]
                if t.device not in src:
                    src[t.device] = slots[k:].to(t.device) + self.length
                t[:, :, start : self.length + m] = t.index_select(2, src[t.device])
        self.length += m


class _SlotLayer(_Layer):
    def update(self, key_states, value_states, *args, **kwargs):
        o = self.owner
        _, kvH, _, D = key_states.shape
        kv = o.kv.layer(self.index, key_states, (o.batch, kvH, o.max_len, D))  # [2, B, kvH, max_len, D]
        rows, slots, index = o.placed(key_states)
        if rows is None:  # every row: one scatter per tensor, the index [B, kvH, q, D] made once per forward
            kv[0].scatter_(2, index, key_states)
            kv[1].scatter_(2, index, value_states)
            self.keys, self.values = kv[0, :, :, : o.extent], kv[1, :, :, : o.extent]  # [B, kvH, extent, D], views
        else:
            kv[0][rows[:, None], :, slots] = key_states.transpose(1, 2)  # [n, q, kvH, D] into each row's own slots
            kv[1][rows[:, None], :, slots] = value_states.transpose(1, 2)
            self.keys, self.values = kv[0][rows, :, : o.extent], kv[1][rows, :, : o.extent]  # [n, kvH, extent, D]
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

    def __init__(self, num_layers: int, batch: int, max_len: int, devices=None):
        self.batch, self.max_len, self.num_layers = batch, max_len, num_layers
        self.kv = _PerDevice(num_layers, devices)  # per device: [layers, 2, B, kvH, max_len, D]
        self.rows: torch.Tensor | None = None  # None: every row, in order
        self.slots: torch.Tensor | None = None
        self.extent = max_len
        self.on: dict[torch.device, tuple] = {}  # (rows, slots, scatter index) on each device, made by its first layer
        super().__init__(layers=[_SlotLayer(self, i) for i in range(num_layers)])

    def place(self, rows: torch.Tensor | None, slots: torch.Tensor, extent: int) -> None:
        """The next forward's rows [n] (None: all B, in order), their write positions [n, q], and the
        positions it attends over: 0..extent-1."""
        self.rows, self.slots, self.extent, self.on = rows, slots, extent, {}

    def placed(self, key_states: torch.Tensor) -> tuple:
        """(rows, slots, every-row scatter index [B, kvH, q, D] or None) on the key states' device."""
        dev = key_states.device
        if dev not in self.on:
            rows = None if self.rows is None else self.rows.to(dev)
            slots = self.slots.to(dev)
            index = slots[:, None, :, None].expand(key_states.shape) if rows is None else None
            self.on[dev] = rows, slots, index
        return self.on[dev]
