"""The Llama forward of a TreeCache step, written out (as gpt-fast writes it) for CPUs without native
bf16: q/k/v and gate/up as one product each, attention over the `length + q` slots the step can see
instead of the cache's whole capacity, and no mask or cache framework around it. A one-row step (plain
decoding) runs its products as OpenBLAS's sgemv through numpy (about 2x torch's MKL one-row product on
the AMD AVX2 CPU measured, benchmarks/bench_cpu_linear.py) with torch on one thread meanwhile, so the
two thread pools never spin against each other; steps of more rows run (W @ x.T).T through torch.
It reads the transformers model's own weights (fused copies of q/k/v and gate/up) and its rotary
embedding, so it computes the same float32 function as the model's forward up to summation order.

The AVX2 decode-time load (`models.load_model(..., attention="decode")`, `--dtype auto`, whose linears
are `WeightFirstLinear`) runs every TreeDecoder step through it (`FastLlama.applies`); `--dtype
float32` keeps transformers' forward, the exact reference. Measured beside it: docs/speed-cpu-avx2.md.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F

from treeopt.decoding.models import WeightFirstLinear

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
        self.lm_head_weight = model.get_output_embeddings().weight  # [V, H]
        self.openblas = _openblas_threads(torch.get_num_threads())
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
    def applies(model) -> bool:
        """Whether `model` decodes through a FastLlama: the AVX2 decode-time load of a supported model."""
        return isinstance(model.get_output_embeddings(), WeightFirstLinear) and FastLlama.supports(model)

    @staticmethod
    def of(model) -> "FastLlama":
        """The model's FastLlama (built once per model)."""
        if model not in _BUILT:
            _BUILT[model] = FastLlama(model)
        return _BUILT[model]

    def one_row(self, rows: int):
        """The context a step of `rows` rows runs in: torch on one thread (its ops are then tiny) while
        OpenBLAS runs the one-row products, else nothing."""
        return _torch_threads(1) if rows == 1 and self.openblas else contextlib.nullcontext()

    def _product(self, W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """W [out, in], x [M, in] -> x W^T [M, out]"""
        if x.shape[0] == 1 and self.openblas:
            return torch.from_numpy(W.numpy() @ x.numpy()[0])[None]  # OpenBLAS sgemv
        return (W @ x.T).T

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [q, H] -> logits [q, V] (one row: inside `one_row`, as the decoder's verification step runs it)"""
        return self._product(self.lm_head_weight, hidden)

    def __call__(self, ids: torch.Tensor, bias: torch.Tensor, positions: torch.Tensor, cache,
                 aux_layers: tuple[int, ...] = ()):
        with self.one_row(ids.shape[0]):
            return self._forward(ids, bias, positions, cache, aux_layers)

    def _forward(self, ids, bias, positions, cache, aux_layers):
        nH, kvH, D, mm = self.num_heads, self.num_kv, self.head_dim, self._product
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
            q, k, v = mm(qkv_w, h).split([nH * D, kvH * D, kvH * D], -1)  # [q, nH D], [q, kvH D] x2
            q = q.view(q_len, nH, D).transpose(0, 1)  # [nH, q, D]
            k = k.view(q_len, kvH, D).transpose(0, 1)  # [kvH, q, D]
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys, values = cache.layers[i].update(k[None], v.view(q_len, kvH, D).transpose(0, 1)[None])
            keys, values = keys[0, :, :extent], values[0, :, :extent]  # [kvH, extent, D]
            s = (q.reshape(kvH, g * q_len, D) @ keys.transpose(1, 2)).view(kvH, g, q_len, extent)
            p = (s * D ** -0.5 + bias).softmax(-1).view(kvH, g * q_len, extent)
            o = (p @ values).view(nH, q_len, D).transpose(0, 1).reshape(q_len, nH * D)  # [q, nH D]
            x = x + mm(o_w, o)
            h = F.rms_norm(x, x.shape[-1:], ln2, self.eps)
            gate, up = mm(gu_w, h).chunk(2, -1)  # [q, I] x2
            x = x + mm(down_w, F.silu(gate) * up)
        hidden = F.rms_norm(x, x.shape[-1:], self.norm, self.eps)
        return hidden, (torch.cat([aux[i] for i in aux_layers], -1) if aux_layers else None)


def _openblas_threads(threads: int) -> bool:
    """Whether numpy computes with OpenBLAS (then limited to `threads` threads, as torch is)."""
    from threadpoolctl import ThreadpoolController

    blas = ThreadpoolController().select(internal_api="openblas")
    if not blas.lib_controllers:
        return False
    blas.limit(limits=threads)
    return True


@contextlib.contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
