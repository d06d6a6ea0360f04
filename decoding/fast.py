"""The Llama forward of a TreeCache step, written out (as gpt-fast writes it) for CPUs without native
bf16: q/k/v and gate/up as one product each, every product as (W @ x.T).T, attention over the
`length + q` slots the step can see instead of the cache's whole capacity, and no mask or cache
framework around it. It reads the transformers model's own weights (fused copies of q/k/v and
gate/up) and its rotary embedding, so it computes the same float32 function as the model's forward
up to summation order.

The AVX2 decode-time load (`models.load_model(..., decoding=True)`, `--dtype auto`, whose linears are
`WeightFirstLinear`) runs every TreeDecoder step through it; `--dtype float32` keeps transformers'
forward, the exact reference. Measured beside it: docs/speed-cpu-avx2.md.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

_BUILT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its FastLlama (one per model)


def _rotate_half(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, -1)
    return torch.cat([-b, a], -1)


class FastLlama:
    """`FastLlama(model)(ids [q], bias [q, capacity], positions [q], cache, aux_layers)` -> (the last
    hidden states [q, H], the hidden states entering `aux_layers`, concatenated [q, A * H], or None).
    Writes the step's K/V at the slots placed in `cache` (a TreeCache)."""

    def __init__(self, model):
        c = model.config
        base = model.get_decoder()
        self.num_heads, self.num_kv = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // self.num_heads
        self.eps = c.rms_norm_eps
        self.embed = base.embed_tokens.weight  # [V, H]
        self.rotary = base.rotary_emb
        self.norm = base.norm.weight
        self.layers = []
        for layer in base.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm.weight,
                torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),  # [(nH + 2 kvH) D, H]
                a.o_proj.weight,  # [H, nH D]
                layer.post_attention_layernorm.weight,
                torch.cat([m.gate_proj.weight, m.up_proj.weight]),  # [2 I, H]
                m.down_proj.weight,  # [H, I]
            ))

    @staticmethod
    def supports(model) -> bool:
        """A Llama-architecture model without biases, sliding windows or a device map."""
        c = model.config
        base = model.get_decoder()
        plain = (c.model_type == "llama" and not getattr(c, "attention_bias", False)
                 and not getattr(c, "mlp_bias", False) and getattr(c, "hidden_act", "silu") == "silu")
        devices = {p.device for p in model.parameters()}
        return plain and len(devices) == 1 and not hasattr(model, "hf_device_map") and hasattr(base, "rotary_emb")

    @staticmethod
    def of(model) -> "FastLlama":
        """The model's FastLlama (built once per model)."""
        if model not in _BUILT:
            _BUILT[model] = FastLlama(model)
        return _BUILT[model]

    def __call__(self, ids: torch.Tensor, bias: torch.Tensor, positions: torch.Tensor, cache,
                 aux_layers: tuple[int, ...] = ()):
        nH, kvH, D = self.num_heads, self.num_kv, self.head_dim
        g = nH // kvH
        x = F.embedding(ids, self.embed)  # [q, H]
        q_len = x.shape[0]
        extent = cache.length + q_len  # the slots this step can see: the committed text and its own rows
        bias = bias[:, :extent]  # [q, extent]
        cos, sin = (t[0] for t in self.rotary(x[None], positions[None]))  # [q, D]
        aux = {}
        for i, (ln1, qkv_w, o_w, ln2, gu_w, down_w) in enumerate(self.layers):
            if i in aux_layers:
                aux[i] = x
            h = F.rms_norm(x, x.shape[-1:], ln1, self.eps)
            q, k, v = (qkv_w @ h.T).T.split([nH * D, kvH * D, kvH * D], -1)  # [q, nH D], [q, kvH D] x2
            q = q.view(q_len, nH, D).transpose(0, 1)  # [nH, q, D]
            k = k.view(q_len, kvH, D).transpose(0, 1)  # [kvH, q, D]
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys, values = cache.layers[i].update(k[None], v.view(q_len, kvH, D).transpose(0, 1)[None])
            keys, values = keys[0, :, :extent], values[0, :, :extent]  # [kvH, extent, D]
            s = (q.reshape(kvH, g * q_len, D) @ keys.transpose(1, 2)).view(kvH, g, q_len, extent)
            p = (s * D ** -0.5 + bias).softmax(-1).view(kvH, g * q_len, extent)
            o = (p @ values).view(nH, q_len, D).transpose(0, 1).reshape(q_len, nH * D)  # [q, nH D]
            x = x + (o_w @ o.T).T
            h = F.rms_norm(x, x.shape[-1:], ln2, self.eps)
            gate, up = (gu_w @ h.T).T.chunk(2, -1)  # [q, I] x2
            x = x + (down_w @ (F.silu(gate) * up).T).T
        hidden = F.rms_norm(x, x.shape[-1:], self.norm, self.eps)
        return hidden, (torch.cat([aux[i] for i in aux_layers], -1) if aux_layers else None)
