"""`treeopt info`: what treeopt would run with, as text."""

from __future__ import annotations

from treeopt.core.env import versions
from treeopt.core.errors import TreeoptError
from treeopt.core.settings import DEFAULT_MODEL


def describe(model: str = DEFAULT_MODEL, heads: str | None = None, device: str = "auto", dtype: str = "auto") -> str:
    import torch

    from treeopt.decoding.heads import resolve_heads
    from treeopt.decoding.models import load_model

    lm = load_model(model, device=device, dtype=dtype)
    cfg = lm.model.config
    params = sum(p.numel() for p in lm.model.parameters())
    lines = [
        f"model        {lm.name}  ({cfg.model_type}, {params / 1e6:.1f}M parameters, {cfg.num_hidden_layers} layers, "
        f"hidden {cfg.hidden_size}, vocab {lm.model.get_output_embeddings().weight.shape[0]})",
        f"  weights    {lm.source}",
        f"device       {lm.model.device}  dtype {lm.model.dtype}"
        + (f"  ({torch.cuda.get_device_name()})" if lm.model.device.type == "cuda" else f"  ({torch.get_num_threads()} threads)"),
    ]
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
