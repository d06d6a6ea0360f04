"""The Llama forward of a TreeCache step, written out (as gpt-fast writes it) for CPUs without native
bf16: q/k/v and gate/up as one product each, q and k rotated together, attention by
`scaled_dot_product_attention` over the `length + q` slots the step can see instead of the cache's
whole capacity, and no mask or cache framework around it. Its products are the load's own
`models.PackedLinear`s (oneDNN over weights prepacked once), plus two over fused copies of q/k/v
and gate/up. It reads the transformers model's own weights and its rotary embedding, so it computes
the same float32 function as the model's forward up to summation order.

The AVX2 decode-time load (`models.load_model(..., attention="decode")`, `--dtype auto`, whose linears
are `PackedLinear`) runs every TreeDecoder step through it (`FastLlama.applies`); `--dtype
float32` keeps transformers' forward, the exact reference. Measured beside it: docs/speed-cpu-avx2.md.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from treeopt.decoding.models import PackedLinear

_BUILT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its FastLlama (one per model)


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
        half = torch.ones(self.head_dim // 2, dtype=self.embed.dtype, device=self.embed.device)
        self.signs = torch.cat([-half, half])  # [D]: rotate_half's signs
        self.norm = base.norm.weight
        self.lm_head = model.get_output_embeddings()  # a PackedLinear [V, H]
        self.layers = []
        for layer in base.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm.weight,
                PackedLinear(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])),  # [(nH + 2 kvH) D, H]
                a.o_proj,  # [H, nH D]
                layer.post_attention_layernorm.weight,
                PackedLinear(torch.cat([m.gate_proj.weight, m.up_proj.weight])),  # [2 I, H]
                m.down_proj,  # [H, I]
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
    def applies(model) -> bool:
        """Whether `model` decodes through a FastLlama: the AVX2 decode-time load of a supported model."""
        return isinstance(model.get_output_embeddings(), PackedLinear) and FastLlama.supports(model)

    @staticmethod
    def of(model) -> "FastLlama":
        """The model's FastLlama (built once per model)."""
        if model not in _BUILT:
            _BUILT[model] = FastLlama(model)
        return _BUILT[model]

    def __call__(self, ids: torch.Tensor, bias: torch.Tensor, positions: torch.Tensor, cache,
                 aux_layers: tuple[int, ...] = ()):
        nH, kvH, D, eps = self.num_heads, self.num_kv, self.head_dim, self.eps
        x = F.embedding(ids, self.embed)  # [q, H]
        q_len = x.shape[0]
        extent = cache.length + q_len  # the slots this step can see: the committed text and its own rows
        bias = bias[:, :extent]  # [q, extent]
        cos, sin = (t[0, :, None] for t in self.rotary(x[None], positions[None]))  # [q, 1, D]
        sin = sin * self.signs  # rotate_half(t) * sin == roll(t, D / 2) * (signs * sin)
        aux = {}
        for i, (ln1, qkv, o_proj, ln2, gate_up, down) in enumerate(self.layers):
            if i in aux_layers:
                aux[i] = x
            qk, v = qkv(_rms_norm(x, ln1, eps)).reshape(q_len, nH + 2 * kvH, D).split([nH + kvH, kvH], 1)
            qk = torch.addcmul(qk * cos, qk.roll(D // 2, -1), sin)  # q and k rotated at once [q, nH + kvH, D]
            q, k = qk.transpose(0, 1).split([nH, kvH])  # [nH, q, D], [kvH, q, D]
            keys, values = cache.layers[i].update(k[None], v.transpose(0, 1)[None])  # [1, kvH, capacity, D] x2
            o = F.scaled_dot_product_attention(q[None], keys[:, :, :extent], values[:, :, :extent], attn_mask=bias,
                                               enable_gqa=True)  # [1, nH, q, D]
            x = x + o_proj(o[0].transpose(0, 1).reshape(q_len, nH * D))
            gate, up = gate_up(_rms_norm(x, ln2, eps)).chunk(2, -1)  # [q, I] x2
            x = x + down(F.silu(gate).mul_(up))
        hidden = _rms_norm(x, self.norm, eps)
        return hidden, (torch.cat([aux[i] for i in aux_layers], -1) if aux_layers else None)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [q, H] -> weight * x / rms(x), in transformers' LlamaRMSNorm's order of operations"""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
