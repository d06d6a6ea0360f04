"""EAGLE-3: one decoder layer that drafts from the base model's own hidden states.

The layout is the one vLLM (vllm/model_executor/models/llama_eagle3.py, `Eagle3LlamaForCausalLM`) and the
`speculators` library read: `fc` maps the base model's hidden states entering three of its layers
(`aux_layers`, concatenated [A * Ht]) to the drafter's width H; one Llama layer whose attention reads
[input_layernorm(embed(token)), hidden_norm(hidden)] (2H wide); `norm` and an `lm_head` over a draft
vocabulary of Vd tokens (`d2t[i]`: target id = i + d2t[i]; `t2d` [V] bool: the target tokens it holds).
The token embedding is the base model's, shared (vLLM shares it when the checkpoint has none).

Drafting, as vLLM's EAGLE proposer does it: the entry at position i is (hidden, embed(x_{i+1})). The
committed entries take `fc` of the base model's hidden states (the text is verified); an entry inside a
step's draft takes the previous entry's output (`out`, before `norm`). Every entry's output gives the
logits of the token after x_{i+1}. One step of the unroll (`unroll`, training-time test) feeds every
position its own previous output: depth d's query at row i attends to step 0's keys at rows <= i and
to its own path's keys at steps 1..d-1 (row i), exactly the draft of depth d rooted at x_{i+1}.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from treeopt.core.errors import TreeoptError

ARCHITECTURE = "LlamaForCausalLMEagle3"
WEIGHTS = "model.safetensors"


def default_aux_layers(num_layers: int) -> tuple[int, int, int]:
    """vLLM's default (vllm/model_executor/models/interfaces.py, get_eagle3_default_aux_hidden_state_layers),
    kept inside the model for models of fewer than 6 layers."""
    return tuple(min(max(i, 0), num_layers - 1) for i in (2, num_layers // 2, num_layers - 3))


@dataclass(frozen=True)
class Eagle3Config:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int  # the base model's
    draft_vocab_size: int
    target_hidden_size: int
    aux_layers: tuple[int, ...] = field(default=(2, 15, 27))
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192

    @classmethod
    def for_target(cls, config, draft_vocab_size: int | None = None, aux_layers=None) -> "Eagle3Config":
        """The drafter's shape for a base model's HF `config`: its width, heads and rope."""
        heads = config.num_attention_heads
        return cls(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                   num_attention_heads=heads, num_key_value_heads=getattr(config, "num_key_value_heads", heads),
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                   vocab_size=config.vocab_size, draft_vocab_size=draft_vocab_size or config.vocab_size,
                   target_hidden_size=config.hidden_size,
                   aux_layers=tuple(aux_layers or default_aux_layers(config.num_hidden_layers)),
                   rms_norm_eps=config.rms_norm_eps, rope_theta=_rope_theta(config),
                   max_position_embeddings=config.max_position_embeddings)

    def to_hf(self) -> dict:
        """config.json as vLLM and speculators read an EAGLE-3 checkpoint (a one-layer Llama)."""
        d = asdict(self)
        layers = list(d.pop("aux_layers"))
        return {"architectures": [ARCHITECTURE], "model_type": "llama", "num_hidden_layers": 1,
                "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False,
                **d, "eagle_config": {"eagle_aux_hidden_state_layer_ids": layers, "use_aux_hidden_state": True}}

    @classmethod
    def from_hf(cls, d: dict, where: str = "config.json") -> "Eagle3Config":
        if ARCHITECTURE not in (d.get("architectures") or []) and "draft_vocab_size" not in d:
            raise TreeoptError(f"{where} is not an EAGLE-3 checkpoint (architectures {d.get('architectures')}): "
                               "pass a directory written by `treeopt train-drafter --kind eagle3`")
        for key in ("norm_before_fc", "fc_norm", "norm_output", "norm_before_residual"):
            if d.get(key) or (d.get("eagle_config") or {}).get(key):
                raise TreeoptError(f"{where}: the EAGLE-3 variant with {key} is not supported: "
                                   "pass a checkpoint in the plain EAGLE-3 layout")
        if d.get("num_hidden_layers", 1) != 1:
            raise TreeoptError(f"{where}: {d['num_hidden_layers']} drafter layers; treeopt runs one-layer EAGLE-3 drafters")
        layers = (d.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids") or d.get("eagle_aux_hidden_state_layer_ids")
        heads = d["num_attention_heads"]
        try:
            return cls(hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"], num_attention_heads=heads,
                       num_key_value_heads=d.get("num_key_value_heads", heads),
                       head_dim=d.get("head_dim") or d["hidden_size"] // heads, vocab_size=d["vocab_size"],
                       draft_vocab_size=d.get("draft_vocab_size") or d["vocab_size"],
                       target_hidden_size=d.get("target_hidden_size") or d["hidden_size"],
                       aux_layers=tuple(layers or (2, 15, 27)), rms_norm_eps=d.get("rms_norm_eps", 1e-5),
                       rope_theta=_rope_theta(d), max_position_embeddings=d.get("max_position_embeddings", 8192))
        except KeyError as e:
            raise TreeoptError(f"{where} lacks {e.args[0]!r}: pass a complete EAGLE-3 config.json") from None


def _rope_theta(config) -> float:
    get = config.get if isinstance(config, dict) else (lambda k, v=None: getattr(config, k, v))
    params = get("rope_parameters") or get("rope_scaling") or {}
    if params.get("rope_type", "default") not in ("default", None):
        raise TreeoptError(f"rope type {params['rope_type']!r}: treeopt's EAGLE-3 drafter supports the default rope only")
    return float(params.get("rope_theta") or get("rope_theta") or 10000.0)


class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(n)), eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class _Attention(nn.Module):
    def __init__(self, c: Eagle3Config):
        super().__init__()
        H, d = c.hidden_size, c.head_dim
        self.q_proj = nn.Linear(2 * H, c.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(2 * H, c.num_key_value_heads * d, bias=False)
        self.v_proj = nn.Linear(2 * H, c.num_key_value_heads * d, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * d, H, bias=False)


class _MLP(nn.Module):
    def __init__(self, c: Eagle3Config):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Layer(nn.Module):
    def __init__(self, c: Eagle3Config):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = _Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = _MLP(c)


class Eagle3(nn.Module):
    """The drafter's weights (state_dict keys = the checkpoint's) and its pure pieces. `embed`: the base
    model's token embedding, shared, not saved."""

    def __init__(self, config: Eagle3Config, embed: nn.Embedding):
        super().__init__()
        c = self.config = config
        self.fc = nn.Linear(len(c.aux_layers) * c.target_hidden_size, c.hidden_size, bias=False)
        self.midlayer = _Layer(c)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.ones(c.vocab_size, dtype=torch.bool) if c.draft_vocab_size == c.vocab_size
                             else torch.zeros(c.vocab_size, dtype=torch.bool))
        self._embed = [embed]  # a list: not a submodule, so not in state_dict
        inv = 1.0 / c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim)
        self.register_buffer("inv_freq", inv, persistent=False)

    @property
    def embed(self) -> nn.Embedding:
        return self._embed[0]

    def set_vocab(self, keep: torch.Tensor) -> None:
        """The draft vocabulary: target ids `keep` [Vd], ascending -> d2t, t2d."""
        keep = keep.sort().values.to(self.d2t.device)
        self.d2t.copy_(keep - torch.arange(len(keep), device=keep.device))
        self.t2d.zero_()[keep] = True

    def target_ids(self) -> torch.Tensor:
        """[Vd] the target id of each draft token."""
        return torch.arange(self.config.draft_vocab_size, device=self.d2t.device) + self.d2t

    def draft_index(self) -> torch.Tensor:
        """[V] each target token's draft index, -1 where the draft vocabulary lacks it."""
        index = torch.full((self.config.vocab_size,), -1, dtype=torch.long, device=self.d2t.device)
        index[self.target_ids()] = torch.arange(self.config.draft_vocab_size, device=index.device)
        return index

    # ---- the pieces -------------------------------------------------------------------------------

    def combine(self, aux: torch.Tensor) -> torch.Tensor:
        """aux [T, A * Ht] (the base model's hidden states entering `aux_layers`) -> hidden [T, H]."""
        return self.fc(aux)

    def project(self, ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor):
        """ids [T], hidden [T, H], positions [T] -> q [T, nh, d], k, v [T, nkv, d] (rope applied), residual [T, H]."""
        c, layer = self.config, self.midlayer
        x = torch.cat([layer.input_layernorm(self.embed(ids).to(hidden.dtype)), layer.hidden_norm(hidden)], -1)  # [T, 2H]
        q = layer.self_attn.q_proj(x).view(-1, c.num_attention_heads, c.head_dim)
        k = layer.self_attn.k_proj(x).view(-1, c.num_key_value_heads, c.head_dim)
        v = layer.self_attn.v_proj(x).view(-1, c.num_key_value_heads, c.head_dim)
        angles = positions.float()[:, None] * self.inv_freq[None, :]  # [T, d/2]
        cos, sin = (torch.cat([f(angles)] * 2, -1)[:, None].to(q.dtype) for f in (torch.cos, torch.sin))  # [T, 1, d]
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v, hidden

    def finish(self, attn: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """attn [T, nh, d] -> out [T, H] (before `norm`: the next entry's hidden)."""
        layer = self.midlayer
        h = layer.self_attn.o_proj(attn.flatten(1)) + residual
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        """out [T, H] -> draft-vocabulary logits [T, Vd]."""
        return self.lm_head(self.norm(out))

    def attend(self, q, k, v, mask) -> torch.Tensor:
        """q [T, nh, d], k/v [S, nkv, d], mask [T, S] bool (True: visible) -> [T, nh, d]."""
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
                                             enable_gqa=True)  # each group of nh / nkv query heads on its K/V head
        return out.transpose(0, 1)

    def unroll(self, aux: torch.Tensor, ids: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """Training-time test over one text. aux [T, A * Ht] at positions 0..T-1, ids [T + steps - 1]: the
        token after each position (ids[i] = x_{i+1}; the tail past the text: any valid id) -> outs, one
        [T, H] per depth d = 1..steps: row i's output drafting x_{i+d+1} along the true path from x_{i+1}."""
        T = aux.shape[0]
        rep = self.config.num_attention_heads // self.config.num_key_value_heads
        scale = self.config.head_dim ** -0.5
        positions = torch.arange(T, device=aux.device)
        hidden = self.combine(aux)
        causal = torch.ones(T, T, dtype=torch.bool, device=aux.device).tril()  # [T, T]
        outs, keys, values = [], [], []
        for s in range(steps):
            q, k, v, residual = self.project(ids[s : s + T], hidden, positions + s)
            if s == 0:
                k0, v0 = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # [T, nh, d]
                attn = self.attend(q, k, v, causal)
            else:
                keys.append(k.repeat_interleave(rep, 1))
                values.append(v.repeat_interleave(rep, 1))
                s0 = torch.einsum("ihd,jhd->hij", q, k0) * scale  # [nh, T, T]
                s0 = s0.masked_fill(~causal, float("-inf"))
                diag = torch.stack([(q * kk).sum(-1) for kk in keys], -1).transpose(0, 1) * scale  # [nh, T, s]
                p = torch.cat([s0, diag], -1).softmax(-1)
                attn = torch.einsum("hij,jhd->ihd", p[..., :T], v0)
                attn = attn + torch.einsum("hik,kihd->ihd", p[..., T:], torch.stack(values))
            hidden = self.finish(attn, residual)
            outs.append(hidden)
        return outs


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


# ---- checkpoints -------------------------------------------------------------------------------------

def for_model(model, draft_vocab_size: int | None = None, aux_layers=None, seed: int = 0) -> Eagle3:
    """A fresh drafter for base `model` (an HF causal LM), random weights (seeded), the base model's dtype."""
    torch.manual_seed(seed)
    config = Eagle3Config.for_target(model.config, draft_vocab_size, aux_layers)
    eagle = Eagle3(config, model.get_input_embeddings())
    weight = model.get_output_embeddings().weight
    return eagle.to(device=weight.device, dtype=weight.dtype)


def save_eagle3(eagle: Eagle3, directory: str | Path) -> Path:
    """config.json + model.safetensors, as vLLM's `method: eagle3` loads them (atomically, per file)."""
    from safetensors.torch import save_file

    from treeopt.core.fileio import atomic_write

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in eagle.state_dict().items()}
    atomic_write(d / WEIGHTS, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    atomic_write(d / "config.json", lambda p: Path(p).write_text(json.dumps(eagle.config.to_hf(), indent=1) + "\n"))
    return d


def is_eagle3_dir(path: str | Path) -> bool:
    try:
        d = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return ARCHITECTURE in (d.get("architectures") or []) or "draft_vocab_size" in d


def load_eagle3(directory: str | Path, model) -> Eagle3:
    """An EAGLE-3 checkpoint for base `model`: checked against it, on its device and dtype."""
    from safetensors.torch import load_file

    d = Path(directory)
    try:
        raw = json.loads((d / "config.json").read_text())
    except FileNotFoundError:
        raise TreeoptError(f"{d} has no config.json: pass an EAGLE-3 checkpoint directory (treeopt train-drafter --kind eagle3)") from None
    except ValueError as e:
        raise TreeoptError(f"{d / 'config.json'} is not valid JSON ({e}): pass an intact EAGLE-3 checkpoint") from None
    config = Eagle3Config.from_hf(raw, str(d / "config.json"))
    base = model.config
    if config.vocab_size != base.vocab_size or config.target_hidden_size != base.hidden_size:
        raise TreeoptError(f"{d} drafts for a model of vocabulary {config.vocab_size} and width {config.target_hidden_size}, "
                           f"not this one ({base.vocab_size}, {base.hidden_size}): pass the drafter trained for this model")
    if max(config.aux_layers) >= base.num_hidden_layers:
        raise TreeoptError(f"{d} reads layer {max(config.aux_layers)} of a {base.num_hidden_layers}-layer model: "
                           "pass the drafter trained for this model")
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise TreeoptError(f"{d} has no *.safetensors weights: pass a complete EAGLE-3 checkpoint")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    state = {k.removeprefix("model.").replace("layers.0.", "midlayer."): v for k, v in state.items()
             if "embed_tokens" not in k}
    eagle = Eagle3(config, model.get_input_embeddings())
    missing, unexpected = eagle.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "t2d" or config.draft_vocab_size != config.vocab_size]
    if missing or unexpected:
        raise TreeoptError(f"{d}: weights {'missing ' + ', '.join(missing) if missing else ''}"
                           f"{' unexpected ' + ', '.join(unexpected) if unexpected else ''}: pass a checkpoint in the EAGLE-3 layout")
    if config.draft_vocab_size == config.vocab_size:
        eagle.t2d.fill_(True)
    weight = model.get_output_embeddings().weight
    return eagle.to(device=weight.device, dtype=weight.dtype).eval()


def shipped_eagle3(model) -> Path:
    """The EAGLE-3 drafter shipped for the bundled model (`--drafter eagle3` without a directory)."""
    from treeopt.core.env import DATA_DIR
    from treeopt.core.settings import DEFAULT_MODEL

    d = DATA_DIR / "eagle3" / DEFAULT_MODEL
    if not (d / "config.json").is_file():
        raise TreeoptError("no EAGLE-3 drafter is shipped for this model: pass --drafter eagle3:DIR "
                           "(treeopt train-drafter --kind eagle3 -o DIR makes one)")
    return d
