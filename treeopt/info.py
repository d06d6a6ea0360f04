"""`treeopt info`: what treeopt would run with, as text."""

from __future__ import annotations

from treeopt.core.env import versions
from treeopt.core.errors import TreeoptError
from treeopt.core.settings import DEFAULT_MODEL


def describe(model: str = DEFAULT_MODEL, heads: str | None = None, device: str = "auto", dtype: str = "auto") -> str:
    import torch

    from treeopt.decoding.decoder import compile_cache_dir, compiles_by_default
    from treeopt.decoding.heads import resolve_heads
    from treeopt.decoding.fast import FastLlama
    from treeopt.decoding.models import PackedLinear, decode_path, load_model

    lm = load_model(model, device=device, dtype=dtype, attention="decode")  # as decode, profile and bench load it
    cfg = lm.model.config
    params = sum(p.numel() for p in lm.model.parameters())
    lines = [
        f"model        {lm.name}  ({cfg.model_type}, {params / 1e6:.1f}M parameters, {cfg.num_hidden_layers} layers, "
        f"hidden {cfg.hidden_size}, vocab {lm.model.get_output_embeddings().weight.shape[0]})",
        f"  weights    {lm.source}",
        f"device       {lm.model.device}  dtype {lm.model.dtype}"
        + (f"  ({torch.cuda.get_device_name()})" if lm.model.device.type == "cuda" else f"  ({torch.get_num_threads()} threads)"),
    ]
    path = decode_path(lm.model.device)
    compiled = compiles_by_default(lm.model)
    packed_linears = isinstance(lm.model.get_output_embeddings(), PackedLinear)
    forward = "decoding/fast.py's written-out forward, " if FastLlama.applies(lm.model) else "transformers' forward, "
    lines += [f"path         {'compiled' if compiled else 'eager'}, {forward}"
              f"{'oneDNN prepacked' if packed_linears else 'F.linear'} linears (--dtype auto, --compile unset): {path.why}",
              "  reference  --dtype float32 --eager: float32 arithmetic throughout (outputs equal plain greedy decoding)",
              f"  compiled   steps cached in {compile_cache_dir()} (TORCHINDUCTOR_CACHE_DIR overrides)"]
    try:
        h = resolve_heads(heads, lm.model)
        c = h.config
        lines.append(f"heads        {heads or 'default'}  ({c.num_heads} heads x {c.num_layers} ResBlock(s), "
                     f"{'own' if c.own_lm_head else 'shared'} lm_head, "
                     f"{sum(p.numel() for p in h.parameters()) / 1e6:.2f}M parameters)")
    except TreeoptError as e:
        lines.append(f"heads        none: {e}")
    lines.append("versions     " + "  ".join(f"{k} {v}" for k, v in versions().items()))
    return "\n".join(lines)
