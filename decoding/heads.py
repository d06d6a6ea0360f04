"""Medusa heads: K small heads over the base model's last hidden state; head k predicts token t+k+1.

Each head is Medusa's stack of ResBlocks (x + SiLU(W x + b)) followed by a vocabulary projection.
The projection is either the head's own (Medusa's original layout, ``medusa_lm_head.pt`` with keys
``{h}.{l}.linear.weight/bias`` and ``{h}.{L}.weight``) or the base model's lm_head, shared
(``medusa_lm_head.safetensors`` holding ResBlocks only: small checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from treeopt.decoding.models import DEFAULT_MODEL, layer_devices
from treeopt.core.env import DATA_DIR
from treeopt.core.errors import TreeoptError
from treeopt.core.fileio import atomic_write, write_text

CONFIG = "config.json"
PT_FILE = "medusa_lm_head.pt"
ST_FILE = "medusa_lm_head.safetensors"


@dataclass(frozen=True)
class HeadsConfig:
    hidden_size: int
    vocab_size: int
    num_heads: int = 4
    num_layers: int = 1
    own_lm_head: bool = False  # False: project with the base model's lm_head (shared)
    base_model_name_or_path: str = ""


class ResBlock(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)  # starts as the identity: head k begins as the base lm_head
        self.act = nn.SiLU()

    def forward(self, x):
        return x + self.act(self.linear(x))


class MedusaHeads(nn.Module):
    def __init__(self, config: HeadsConfig):
        super().__init__()
        self.config = config
        H, V = config.hidden_size, config.vocab_size

        def head():
            blocks = [ResBlock(H) for _ in range(config.num_layers)]
            return nn.Sequential(*blocks, *([nn.Linear(H, V, bias=False)] if config.own_lm_head else []))

        self.heads = nn.ModuleList(head() for _ in range(config.num_heads))

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def features(self, hidden: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """[..., H] -> [K, ..., H]: each of the first K = `depth` heads' (default: every head's) state
        before the vocabulary projection."""
        L = self.config.num_layers
        return torch.stack([head[:L](hidden) for head in self.heads[:depth]])

    def forward(self, hidden: torch.Tensor, lm_head: nn.Module | None = None) -> torch.Tensor:
        """hidden [..., H] -> logits [K, ..., V]. `lm_head` is the base model's, used when shared."""
        if self.config.own_lm_head:
            return torch.stack([head(hidden) for head in self.heads])
        if lm_head is None:
            raise ValueError("these heads share the base model's lm_head: pass it as lm_head")
        return lm_head(self.features(hidden))

    def check_compatible(self, model) -> None:
        """One-line error when the heads were made for another model (hidden size or vocabulary)."""
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        got = (self.config.hidden_size, self.config.vocab_size)
        want = (cfg.hidden_size, model.get_output_embeddings().weight.shape[0])
        if got != want:
            raise TreeoptError(
                f"heads have hidden size {got[0]} and vocabulary {got[1]} but the model has {want[0]} and "
                f"{want[1]}: pass --heads trained for this model (base {self.config.base_model_name_or_path or '?'})"
            )

    # ---- checkpoints -------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write a Medusa-layout checkpoint (config.json + weights), atomically per file."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        c = self.config
        config = {
            "medusa_num_heads": c.num_heads,
            "medusa_num_layers": c.num_layers,
            "base_model_name_or_path": c.base_model_name_or_path,
            "hidden_size": c.hidden_size,
            "vocab_size": c.vocab_size,
            "own_lm_head": c.own_lm_head,
        }
        state = {k: v.detach().cpu().contiguous() for k, v in self.heads.state_dict().items()}
        if c.own_lm_head:
            atomic_write(directory / PT_FILE, lambda p: torch.save(state, p))
        else:
            from safetensors.torch import save_file

            atomic_write(directory / ST_FILE, lambda p: save_file(state, str(p)))
        write_text(directory / CONFIG, json.dumps(config, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, model=None) -> "MedusaHeads":
        """Read either Medusa layout. With `model`, check it matches and fill in missing sizes."""
        directory = Path(directory)
        if not directory.is_dir():
            raise TreeoptError(f"heads directory {directory} not found: pass --heads DIR holding a Medusa checkpoint")
        state = _read_state(directory)
        cfg = _read_config(directory)
        heads, layers, own, H, V = _layout(state, directory)
        if cfg.get("medusa_num_heads") not in (None, heads):
            warnings.warn(f"{directory / CONFIG} says {cfg['medusa_num_heads']} heads but the weights hold "
                          f"{heads}: using {heads}", stacklevel=2)
        if V is None:  # shared lm_head: vocabulary from config or model
            V = cfg.get("vocab_size") or (model.get_output_embeddings().weight.shape[0] if model is not None else None)
            if V is None:
                raise TreeoptError(f"{directory} shares the base lm_head: load it with its model to know the vocabulary")
        config = HeadsConfig(hidden_size=H, vocab_size=V, num_heads=heads, num_layers=layers, own_lm_head=own,
                             base_model_name_or_path=cfg.get("base_model_name_or_path") or "")
        medusa = cls(config)
        medusa.heads.load_state_dict(state)
        if model is not None:
            medusa.check_compatible(model)
        return medusa.eval().requires_grad_(False)


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TreeoptError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): fix or remove it") from None


def _read_state(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / ST_FILE).is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(directory / ST_FILE))
        except Exception as e:  # safetensors raises several types for a damaged file
            raise TreeoptError(f"{directory / ST_FILE} is unreadable ({type(e).__name__}): re-save the heads") from None
    if (directory / PT_FILE).is_file():
        try:
            return torch.load(directory / PT_FILE, map_location="cpu", weights_only=True)
        except Exception as e:
            raise TreeoptError(f"{directory / PT_FILE} is unreadable ({type(e).__name__}): re-save the heads") from None
    raise TreeoptError(f"{directory} holds neither {PT_FILE} nor {ST_FILE}: pass a Medusa heads directory")


_KEY = re.compile(r"^(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)$")


def _layout(state: dict, directory: Path):
    """(num_heads, num_layers, own_lm_head, hidden, vocab or None) read off the weights themselves."""
    index: dict[int, dict[int, str]] = {}
    for key in state:
        m = _KEY.match(key)
        if not m:
            raise TreeoptError(f"{directory}: unexpected weight {key!r}: not a Medusa heads checkpoint")
        index.setdefault(int(m[1]), {})[int(m[2])] = m[3]
    heads = len(index)
    if heads == 0 or sorted(index) != list(range(heads)):
        raise TreeoptError(f"{directory}: heads are not numbered 0..K-1: not a Medusa heads checkpoint")
    parts = index[0]
    layers = sum(1 for v in parts.values() if v.startswith("linear"))
    own = "weight" in parts.values()
    if any(index[h] != parts for h in index):
        raise TreeoptError(f"{directory}: heads have different shapes: not a Medusa heads checkpoint")
    hidden = state["0.0.linear.weight"].shape[1] if layers else state["0.0.weight"].shape[1]
    vocab = state[f"0.{layers}.weight"].shape[0] if own else None
    return heads, layers, own, hidden, vocab


def random_heads(model, num_heads: int = 4, num_layers: int = 1, own_lm_head: bool = False, seed: int = 0,
                 scale: float = 0.02) -> MedusaHeads:
    """Untrained heads with small random ResBlock weights, for tests and dry runs."""
    cfg = model.config
    config = HeadsConfig(hidden_size=cfg.hidden_size, vocab_size=model.get_output_embeddings().weight.shape[0],
                         num_heads=num_heads, num_layers=num_layers, own_lm_head=own_lm_head,
                         base_model_name_or_path=getattr(cfg, "_name_or_path", ""))
    g = torch.Generator().manual_seed(seed)
    heads = MedusaHeads(config)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
        if own_lm_head:  # start each own projection as a noisy copy of the base lm_head
            for head in heads.heads:
                head[-1].weight.add_(model.get_output_embeddings().weight.detach().float().cpu())
    return heads.eval().requires_grad_(False)


BUNDLED_HEADS = DATA_DIR / "heads" / DEFAULT_MODEL


def resolve_heads(spec: str | None, model, num_heads: int = 4) -> MedusaHeads:
    """--heads: a directory, `random` (untrained, for dry runs), or None/`default` for the heads
    shipped with treeopt for the bundled model."""
    from treeopt.decoding.models import on_path_of

    heads = _read_heads(spec, model, num_heads)
    # on the device of the model's last layer, whose output they read (with a device map, maybe not the lm_head's)
    return on_path_of(heads.to(device=layer_devices(model)[-1], dtype=model.get_output_embeddings().weight.dtype), model)


def heads_sha256(heads: MedusaHeads) -> str:
    """sha256 of the heads' config and weights (as held, in their dtype): what a calibration records
    (`heads_sha256` in its settings), so that its resume, and every command that names heads beside it,
    uses the very same heads."""
    h = hashlib.sha256(json.dumps(asdict(heads.config), sort_keys=True).encode())
    for name, t in sorted(heads.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_record_heads(meta: dict, directory, spec: str | None, model) -> None:
    """A one-line error when the calibration at `directory` (its calibration.json `meta`) was made with
    other heads than --heads `spec`: compares fingerprints of the heads in the dtype the record used."""
    from treeopt.core.record import check_heads

    settings = meta.get("settings") or {}
    if not settings.get("heads_sha256"):
        return
    dtype = getattr(torch, str(settings.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        dtype = model.get_output_embeddings().weight.dtype
    heads = _read_heads(spec, model, settings.get("num_heads") or meta.get("num_heads") or 4).to(dtype=dtype)
    check_heads(meta, directory, spec or "default", heads_sha256(heads))


def _read_heads(spec: str | None, model, num_heads: int = 4) -> MedusaHeads:
    """The heads --heads `spec` names, in float32 on the CPU."""
    if spec in (None, "", "default"):
        if not (BUNDLED_HEADS / CONFIG).is_file():
            raise TreeoptError("no trained heads ship with this install: pass --heads DIR "
                               "(train some with `treeopt train-heads`) or --heads random")
        heads = MedusaHeads.load(BUNDLED_HEADS, model)
    elif spec == "random":
        heads = random_heads(model, num_heads=num_heads)
    else:
        heads = MedusaHeads.load(spec, model)
    return heads


# ---- vLLM's Medusa checkpoint --------------------------------------------------------------------
# The layout vLLM's Medusa loader reads (vllm 0.32, `vllm/model_executor/models/medusa.py`):
# `Medusa.__init__` builds `num_heads` `ResidualBlock`s of `num_hidden_layers` Linear layers each
# (bias iff `medusa_fc_bias`), parameters `blocks.{h}.layers.{l}.weight/bias`, applied as
# x + SiLU(W x + b) like treeopt's ResBlock; with `original_lm_head` one shared `lm_head`, which
# `Medusa.load_weights` fills from the weight named `lm_heads.0.weight`, else one `lm_heads.{h}`
# per head. `vllm/transformers_utils/configs/medusa.py`, `MedusaConfig.from_pretrained`, renames any
# config key holding "num" and "heads" (or "layers") to `num_heads` (`num_hidden_layers`), so the
# config carries only those two. `SpeculativeConfig.__post_init__` (`vllm/config/speculative.py`)
# sets `num_heads` to `num_speculative_tokens`: vLLM builds and runs the first k heads only.
VLLM_WEIGHTS = "model.safetensors"


def vllm_state(heads: MedusaHeads, lm_head_weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The weights of `heads` named as vLLM's Medusa model names its parameters. Shared-lm_head heads
    need the base model's output projection `lm_head_weight` [V, H] (SmolLM2's tied embedding)."""
    c = heads.config
    state = {}
    for h, head in enumerate(heads.heads):
        for l in range(c.num_layers):
            state[f"blocks.{h}.layers.{l}.weight"] = head[l].linear.weight
            state[f"blocks.{h}.layers.{l}.bias"] = head[l].linear.bias
        if c.own_lm_head:
            state[f"lm_heads.{h}.weight"] = head[c.num_layers].weight
    if not c.own_lm_head:
        if lm_head_weight is None or tuple(lm_head_weight.shape) != (c.vocab_size, c.hidden_size):
            raise TreeoptError(f"these heads share the base model's lm_head [{c.vocab_size}, {c.hidden_size}]: "
                               "export them with the model they were trained for (--model)")
        state["lm_heads.0.weight"] = lm_head_weight
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def vllm_config(heads: MedusaHeads) -> dict:
    """config.json of vLLM's Medusa checkpoint (see the comment above `VLLM_WEIGHTS`)."""
    c = heads.config
    return {"model_type": "medusa", "architectures": ["MedusaModel"], "hidden_size": c.hidden_size,
            "vocab_size": c.vocab_size, "num_heads": c.num_heads, "num_hidden_layers": c.num_layers,
            "medusa_fc_bias": True, "original_lm_head": not c.own_lm_head, "truncated_vocab_size": c.vocab_size,
            "base_model_name_or_path": c.base_model_name_or_path}


def export_vllm(heads: MedusaHeads, directory: str | Path, lm_head_weight: torch.Tensor | None = None) -> Path:
    """Write `heads` as a checkpoint vLLM's Medusa drafter loads (`--speculative-config
    '{"method": "medusa", "model": DIRECTORY, ...}'`), atomically per file."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = vllm_state(heads, lm_head_weight)
    atomic_write(directory / VLLM_WEIGHTS, lambda p: save_file(state, str(p)))
    write_text(directory / CONFIG, json.dumps(vllm_config(heads), indent=2) + "\n")
    return directory


def vllm_logits(directory: str | Path, hidden: torch.Tensor) -> torch.Tensor:
    """hidden [..., H] -> logits [K, ..., V] computed from an exported vLLM checkpoint the way vLLM's
    `Medusa.forward` and `Medusa.compute_logits` do (each block, then its lm_head or the shared one):
    the reverse check of `export_vllm`."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg = json.loads((directory / CONFIG).read_text())
    state = load_file(str(directory / VLLM_WEIGHTS))
    out = []
    for h in range(cfg["num_heads"]):
        x = hidden.float()
        for l in range(cfg["num_hidden_layers"]):
            w, b = state[f"blocks.{h}.layers.{l}.weight"], state.get(f"blocks.{h}.layers.{l}.bias")
            x = x + torch.nn.functional.silu(torch.nn.functional.linear(x, w, b if cfg["medusa_fc_bias"] else None))
        lm = state["lm_heads.0.weight"] if cfg["original_lm_head"] else state[f"lm_heads.{h}.weight"]
        out.append(x @ lm.T)
    return torch.stack(out)


def same_top_k(heads: MedusaHeads, directory: str | Path, hidden: torch.Tensor, lm_head: nn.Module | None,
               k: int = 10) -> bool:
    """Whether the checkpoint in `directory` ranks the same top-k tokens as `heads` on `hidden` [N, H]."""
    with torch.no_grad():
        ours = heads.float()(hidden.float(), None if lm_head is None else lm_head.float())  # [K, N, V]
        theirs = vllm_logits(directory, hidden)  # [K, N, V]
    return bool(torch.equal(ours.topk(k, dim=-1).indices, theirs.topk(k, dim=-1).indices))


def export_heads(spec: str | None, out: str | Path, model: str = DEFAULT_MODEL) -> str:
    """`treeopt export-heads --heads HEADS --format vllm -o OUT`: write the heads for vLLM, then check the
    written weights give the heads' top-10 on the model's own hidden states of a prompt."""
    from treeopt.decoding.models import chat_prompt, load_model

    loaded = load_model(model, device="cpu", dtype="float32")
    heads = resolve_heads(spec, loaded.model).float()
    lm_head = loaded.model.get_output_embeddings()
    path = export_vllm(heads, out, lm_head.weight)
    ids = torch.tensor([chat_prompt(loaded.tokenizer, "Write a short poem about the sea and explain it.")])
    with torch.no_grad():
        hidden = loaded.model(ids, output_hidden_states=True).hidden_states[-1][0]  # [S, H]
    if not same_top_k(heads, path, hidden, lm_head):
        raise TreeoptError(f"{path}: the exported weights rank other tokens than the heads (a bug: report it)")
    c = heads.config
    return (f"wrote {path}: {c.num_heads} heads, {c.num_layers} ResBlock(s) each, "
            f"{'own lm_heads' if c.own_lm_head else 'the base lm_head shared'}; top-10 checked equal on "
            f"{hidden.shape[0]} hidden states\nserve with: vllm serve {loaded.source} --speculative-config "
            f"'{{\"method\": \"medusa\", \"model\": \"{path}\", \"num_speculative_tokens\": {c.num_heads}}}'")
