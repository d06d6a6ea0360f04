"""Medusa tree decoding (batch size 1) over a KV cache the decoder owns, via the public transformers API.

One step, with N = tree nodes + 1 and the committed prefix of `cur` tokens in the cache:

1. tokens [N] = the root (the base model's token at the last accepted position) + each tree node's
   head top-k token; positions = cur + node depth.
2. One forward of the N tokens (the verification step; with `compiled=True` one compiled graph
   serves every tree size): they are written to cache slots cur..cur+N-1 and a 4D additive mask
   [1, 1, N, capacity] over the static cache lets node i see the prefix, its ancestors and itself only.
3. Acceptance picks the longest valid root-to-leaf prefix (greedy: each node's token equals its
   parent's argmax; typical: Medusa's posterior threshold). The step emits the root + accepted nodes.
4. `TreeCache.commit` moves the accepted nodes' K/V to slots cur, cur+1, ...; the next root and the
   heads' next candidates come from the last accepted node's logits and hidden state.

Step accounting (shared with `treeopt.core.replay`): prefill is not a step; every step is one tree
forward and emits the root + the accepted nodes; output stops after EOS (kept) or max_new_tokens.
"""

from __future__ import annotations

import copy
import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from treeopt.decoding.buffers import TreeBuffers, tree_buffers
from treeopt.decoding.fast import FastLlama
from treeopt.decoding.cache import TreeCache
from treeopt.core.errors import TreeoptError
from treeopt.core.settings import DecodeConfig, RuleSettings
from treeopt.decoding.models import (DEFAULT_MODEL, cache_argument, cache_dir, cpu_flags,
                                     decode_path, layer_devices, stop_token_ids)
from treeopt.core.tree import Tree


@dataclass(frozen=True)
class Acceptance:
    """greedy: lossless w.r.t. greedy decoding. typical: Medusa's typical acceptance; the root token is
    sampled from the typical-truncated distribution at `temperature`, with `seed`."""

    mode: str = RuleSettings.acceptance  # "greedy" or "typical" (the defaults: the CLI's, treeopt.core.settings)
    temperature: float = RuleSettings.temperature
    posterior_threshold: float = RuleSettings.posterior_threshold  # epsilon
    posterior_alpha: float = RuleSettings.posterior_alpha  # delta, the entropy-scaled threshold
    seed: int = RuleSettings.seed

    def __post_init__(self):
        if self.mode not in ("greedy", "typical"):
            raise TreeoptError(f"unknown acceptance {self.mode!r}: use greedy or typical")
        if self.mode == "typical" and not self.temperature > 0:
            raise TreeoptError("typical acceptance needs --temperature > 0 (use greedy for temperature 0)")


GREEDY = Acceptance()


@dataclass
class DecodeResult:
    tokens: list[int]  # the new tokens (EOS included when it stopped there)
    steps: int  # tree forwards after prefill
    accepted: list[int] = field(default_factory=list)  # tree nodes accepted per step (root not counted)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    model_s: float = 0.0  # of decode_s, the model's own work (tree forward + heads); with time_model=True
    stopped: bool = False  # ended at a stop token

    @property
    def tokens_per_step(self) -> float:
        return len(self.tokens) / max(self.steps, 1)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool -> 0 where allowed, the dtype's most negative number elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min)


def choose_path(buf: TreeBuffers, ok: torch.Tensor, logp: torch.Tensor | None) -> torch.Tensor:
    """ok [N] (each node's token passes the rule), logp [N] (typical) or None (greedy) -> the accepted
    node indices [m+1], root first: the longest path of passing nodes (greedy: the first one;
    typical: the most likely among the longest)."""
    match = ok[buf.paths[:, 1:]] & buf.path_valid[:, 1:]  # [L, D]
    length = match.int().cumprod(1).sum(1)  # [L]
    if logp is None:
        best = length.argmax()  # the first longest path
    else:
        m = length.max()
        keep = torch.arange(buf.paths.shape[1], device=length.device) <= m  # [D+1]
        score = (logp[buf.paths] * (keep & buf.path_valid)).sum(1)  # [L]
        best = score.masked_fill(length != m, float("-inf")).argmax()
    return buf.paths[best, : int(length[best]) + 1]


def _max_window(config) -> int | None:
    """The sliding-attention window when some layer uses one (Mistral, some Qwen2), else None."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if window and (types is None or any("sliding" in t for t in types)):
        if types is None and not getattr(config, "use_sliding_window", True):
            return None
        return int(window)
    return None


def compiles_by_default(model) -> bool:
    """`--compile` unset: compile where `decode_path` says so for the model's device and the model is in
    that path's dtype (a CPU with native bf16 in bfloat16); eager elsewhere (float32 is the exact reference)."""
    weight = model.get_output_embeddings().weight
    path = decode_path(weight.device)
    return path.compiled and weight.dtype == path.dtype


def compile_cache_dir() -> Path:
    """Where torch keeps compiled steps between processes: treeopt's cache dir / compiled / one folder per
    torch version and CPU (its ISA flags), so a second run loads the kernels instead of building them.
    torch's own cache keys hold the rest (the graph: the model's layers, shapes and dtype; the compiler)."""
    cpu = hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:12]
    return cache_dir() / "compiled" / f"torch-{torch.__version__}-cpu-{cpu}"


def use_compile_cache() -> Path:
    """Point inductor's on-disk caches (FX graphs, AOT autograd graphs, built kernels) at
    `compile_cache_dir()`, unless TORCHINDUCTOR_CACHE_DIR names another place; returns the folder."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache_dir()))
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def engine_ran(decoders, asked: bool) -> dict:
    """What the decoders ran, for a run's record: {"compiled": every step compiled, "engine": "compiled"
    or "eager", "engine_reason": why eager (the compile fallback's one line, or that it was not asked)}."""
    ran = [d.engine for d in decoders]
    compiled = bool(ran) and all(e["engine"] == "compiled" for e in ran)
    reason = next((e["reason"] for e in ran if e["reason"]), "")
    if not compiled and not reason:
        reason = "compiling not asked (--eager, or --compile unset off a CPU in bfloat16)" if not asked else "not compiled"
    return {"compiled": compiled, "engine": "compiled" if compiled else "eager", "engine_reason": reason}


def compile_step(fn, device: torch.device):
    """torch.compile for a decoding step: inductor, with weight freezing and a C++ wrapper on CPU. Shapes
    are dynamic, so one graph serves every tree size and cache capacity (dynamo specializes the one-token
    plain step apart, and the heads step per tree depth)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    use_compile_cache()
    if device.type != "cpu":
        return torch.compile(fn, dynamic=True)
    # Freezing folds the weights into the graph as constants, prepacked for oneDNN (bf16 linears run
    # ~2x faster packed). Dynamo reads this global flag while tracing to take the weights as constants,
    # so `options=` (read by inductor only, after tracing) is not enough.
    torch._inductor.config.freezing = True
    # The C++ wrapper runs the graph's ~300 kernel calls from C++ instead of generated Python: measured
    # (2 threads, SmolLM2-135M, context 113) plain step 22.3 -> 19.9 ms, a 3-node tree's 25.0 -> 20.8 ms,
    # for ~50 % more compile time.
    return torch.compile(fn, dynamic=True, options={"cpp_wrapper": True})


class _Step:
    """A step function, compiled (when asked) at its first call; `compile_s` sums the calls that
    compiled. When compiling fails (no C++ compiler, an unsupported op), it runs eagerly from then on,
    after a one-line note."""

    def __init__(self, fn, device: torch.device, compiled: bool):
        self.eager = fn
        self.fn = compile_step(fn, device) if compiled else fn
        self.compile_s = 0.0
        self.fallback = ""  # why compiling failed (one line), when it did

    def warm(self, *args):
        """Call once to compile for these shapes; the time goes to `compile_s`."""
        if self.fn is self.eager:
            return self.fn(*args)
        t0 = time.perf_counter()
        try:
            out = self.fn(*args)
        except Exception as e:  # torch raises many types for a failed compile
            self.fallback = f"torch.compile failed ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]})"
            print(f"note: {self.fallback}; decoding eagerly", file=sys.stderr)
            self.fn = self.eager
            out = self.fn(*args)
        self.compile_s += time.perf_counter() - t0
        return out

    def __call__(self, *args):
        return self.fn(*args)


class TreeDecoder:
    """Decode with `heads` and `tree` on `model` (a transformers causal LM). Holds no state on the model.
    An empty tree is plain greedy decoding through the same engine.

    >>> dec = TreeDecoder(model, heads, Tree.cartesian([2, 2]), stop_ids={eos})
    >>> dec.generate(prompt_ids, max_new_tokens=64).tokens

    The verification step (tree forward + lm_head) and the heads' step have fixed shapes per tree size
    (the static TreeCache holds `capacity` slots, grown in multiples of `CAPACITY_STEP`); with
    `compiled=True` each is compiled at its first call, before any timing starts (`compile_s`), with
    dynamic shapes: one graph for all tree sizes and capacities (a second for plain decoding).
    """

    CAPACITY_STEP = 256
    FUSED_ROWS = 12  # project the heads inside the verification step when they add at most this many rows

    def __init__(self, model, heads, tree: Tree, acceptance: Acceptance = GREEDY, stop_ids=None,
                 top_k: int | None = None, time_model: bool = False, compiled: bool = False):
        """stop_ids: tokens that end the output (kept); None = the model's EOS ids, () = never stop.
        time_model: also time the model's work inside each step (adds a synchronize on CUDA).
        compiled: torch.compile the verification and heads steps.
        heads: MedusaHeads, or any treeopt.decoding.drafters.Drafter (heads run on the fast paths below;
        another drafter proposes every node's token itself, between the tree forwards)."""
        from treeopt.decoding.drafters import Drafter

        self.drafter = None  # a drafter other than heads
        self.aux_layers: tuple[int, ...] = ()  # the base model's layers whose entering hidden states it reads
        if isinstance(heads, Drafter):
            if heads.kind == "heads":
                heads = heads.heads
            else:
                heads.check(model, tree)
                self.drafter, heads = heads, None
                self.aux_layers = tuple(self.drafter.aux_layers)
        self.model = model
        self.base = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        weight = self.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.layer_devices = layer_devices(model)  # the cache's, one per layer (several with a device map)
        self.cache_argument = cache_argument(model)
        if heads is None and self.drafter is None and tree.num_nodes:
            raise TreeoptError("a tree needs Medusa heads: pass --heads DIR or --heads random")
        if heads is not None:
            heads.check_compatible(model)
            tree.check(num_heads=heads.num_heads)
            p, last = next(heads.parameters()), self.layer_devices[-1]  # the heads read the last layer's output
            if (p.device, p.dtype) != (last, self.dtype):
                heads = copy.deepcopy(heads).to(device=last, dtype=self.dtype)
        self.heads = heads
        self.tree = tree
        self.depth = tree.depth  # a plain int: the compiled heads step reads it (dynamo breaks on Tree.depth's generator)
        self.buf: TreeBuffers = tree_buffers(tree, top_k, self.device)
        self.tree_bias = additive_mask(self.buf.mask, self.dtype)  # [N, N]
        self.acceptance = acceptance
        stop_ids = stop_token_ids(model) if stop_ids is None else stop_ids
        self.stop_set = {int(t) for t in stop_ids}
        self.window = _max_window(model.config)
        self.cache: TreeCache | None = None
        self.bias: torch.Tensor | None = None  # [N, capacity] the mask rows of a step
        self.generator = torch.Generator(device=self.device)
        self.time_model = time_model
        # The heads' candidates need a second pass over the vocabulary matrix after acceptance; for small
        # trees it is cheaper to project every tree row's head features inside the verification product
        # (one pass, N x (1 + D) rows: the extra rows cost less than a pass while the product is
        # memory-bound). `benchmarks/bench_heads.py` measures both.
        self.fused = (heads is not None and not heads.config.own_lm_head and self.depth > 0
                      and self.buf.num_nodes * self.depth <= self.FUSED_ROWS)
        self.row_topk: torch.Tensor | None = None  # [N, D, top_k] fused: each row's candidates, last step
        # The AVX2 decode-time load (PackedLinear linears, `--dtype auto`) runs its steps through the
        # written-out forward of decoding/fast.py; the float32 reference load keeps transformers' forward.
        self.fast = FastLlama.of(model) if not compiled and FastLlama.applies(model) else None
        self.verify = _Step(self._verify, self.device, compiled)
        self.propose = _Step(self._propose, self.device, compiled)

    @property
    def compile_s(self) -> float:
        """Seconds spent compiling (the calls that compiled a graph)."""
        return self.verify.compile_s + self.propose.compile_s

    @property
    def engine(self) -> dict:
        """What ran: {"engine": "compiled" or "eager", "reason": the compile fallback's one line, or ""}."""
        steps = (self.verify, self.propose)
        reason = next((s.fallback for s in steps if s.fallback), "")
        compiled = any(s.fn is not s.eager for s in steps)
        return {"engine": "compiled" if compiled else "eager", "reason": reason}

    # ---- the pieces of a step ---------------------------------------------------------------------

    def forward(self, ids: torch.Tensor, bias: torch.Tensor, positions: torch.Tensor):
        """ids [q], bias [q, capacity], positions [q] -> (last hidden states [q, H], the drafter's state
        [q, S]: those, or with a drafter's `aux_layers` the hidden states entering them [q, A * H]);
        writes K/V at the slots placed in the cache."""
        if self.fast is not None:  # the written-out forward of decoding/fast.py
            hidden, aux = self.fast(ids, bias, positions, self.cache, self.aux_layers)
            return hidden, (hidden if aux is None else aux)
        out = self.base(input_ids=ids[None], attention_mask=bias[None, None], position_ids=positions[None],
                        **{self.cache_argument: self.cache}, use_cache=True, output_hidden_states=bool(self.aux_layers))
        hidden = out.last_hidden_state[0]
        if not self.aux_layers:
            return hidden, hidden
        return hidden, torch.cat([out.hidden_states[i][0] for i in self.aux_layers], -1)

    def _verify(self, tokens: torch.Tensor, bias: torch.Tensor, positions: torch.Tensor):
        """The tree forward: tokens [N] -> (logits [N, V], hidden [N, H], each row's argmax [N], fused: the
        heads' top-k at every row [N, D, top_k], else None). The argmax is taken here, inside the compiled
        graph: eager bf16 argmax over the vocabulary costs ~0.2 ms a row on a CPU."""
        hidden, state = self.forward(tokens, bias, positions)  # [N, H], [N, S]
        if not self.fused:
            logits = self.lm_head(hidden)  # [N, V]
            return logits, state, logits.argmax(-1), None
        rows = torch.cat([hidden[None], self.heads.features(hidden, self.depth)])  # [1 + D, N, H]
        logits = self.lm_head(rows)  # [1 + D, N, V]: one pass over the vocabulary matrix
        topk = torch.topk(logits[1:], self.buf.top_k, dim=-1).indices  # [D, N, top_k]
        return logits[0], hidden, logits[0].argmax(-1), topk.transpose(0, 1)

    def _propose(self, hidden: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """hidden [H] at the last accepted node -> the first D heads' top-k tokens [D, top_k], D = `depth`
        (default: the tree's)."""
        D = self.depth if depth is None else depth
        hidden = hidden[None]  # [1, H]: inductor's freezing passes fail on a linear of a 1-D input
        if self.heads.config.own_lm_head:
            logits = self.heads(hidden)[:D, 0]  # [D, V]
        else:
            logits = self.lm_head(self.heads.features(hidden, D)[:, 0])  # [D, V]
        return torch.topk(logits, self.buf.top_k, dim=-1).indices.to(self.device)

    def candidates(self, hidden: torch.Tensor, depth: int | None = None, row: int | None = None) -> torch.Tensor:
        """hidden [H] at the last accepted node (`row` of the last tree forward) -> the first D heads' top-k
        tokens [D, top_k], D = `depth` (default: the tree's; another depth runs eagerly). Fused, the
        verification step made them already."""
        if depth is not None and depth != self.tree.depth:
            return self._propose(hidden, depth)
        if self.tree.depth == 0 or self.drafter is not None:
            return torch.empty(0, self.buf.top_k, dtype=torch.long, device=self.device)
        if self.fused and row is not None:
            return self.row_topk[row]
        return self.propose(hidden)

    def _typical(self, logits: torch.Tensor):
        """logits [N, V] -> (probs [N, V] fp32, threshold [N]) of Medusa's typical acceptance."""
        a = self.acceptance
        probs = torch.softmax(logits.float() / a.temperature, dim=-1)
        entropy = -(probs * torch.log(probs + 1e-5)).sum(-1)
        threshold = torch.clamp(torch.exp(-entropy) * a.posterior_alpha, max=a.posterior_threshold)
        return probs, threshold

    def next_root(self, logits: torch.Tensor, argmax: torch.Tensor | None = None) -> torch.Tensor:
        """logits [V] at the last accepted node (and their argmax, when known) -> the next root token (0-dim)."""
        if self.acceptance.mode == "greedy":
            return logits.argmax(-1) if argmax is None else argmax
        probs, threshold = self._typical(logits[None])
        probs = probs[0].masked_fill(probs[0] < threshold[0].clamp(max=probs[0].max()), 0.0)  # the likeliest stays
        return torch.multinomial(probs, 1, generator=self.generator)[0]

    def flags(self, tokens: torch.Tensor, logits: torch.Tensor, parent: torch.Tensor | None = None,
              argmax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tokens [M] whose parents are the rows `parent` [M] of logits [N, V] (default: this tree's
        nodes, M = N; the root's entry means nothing; `argmax` [N]: the logits' argmax, when known) ->
        (ok [M]: the token passes the rule under its parent's distribution, logp [M]: its log-probability
        there, typical only)."""
        parent = self.buf.parent if parent is None else parent
        if self.acceptance.mode == "greedy":
            argmax = logits.argmax(-1) if argmax is None else argmax  # [N]
            return tokens == argmax[parent], None  # node's token is its parent's argmax
        probs, threshold = self._typical(logits)
        p = probs[parent, tokens]  # [M] node's token under its parent's distribution
        return p > threshold[parent], torch.log(p)

    def accept(self, tokens: torch.Tensor, logits: torch.Tensor, argmax: torch.Tensor | None = None,
               valid: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [N], logits [N, V] (argmax [N], when known; valid [N]: the nodes that hold a candidate)
        -> accepted node indices [m+1], root first."""
        if self.buf.num_nodes == 1:
            return self.buf.paths[0, :1]
        ok, logp = self.flags(tokens, logits, argmax=argmax)
        return choose_path(self.buf, ok if valid is None else ok & valid, logp)

    # ---- a whole generation -----------------------------------------------------------------------

    def _prepare(self, length: int) -> None:
        """Make room for `length` positions (capacity grows in steps, each a new shape to compile) and
        start an empty text; compile the steps for a new shape here, outside any timing."""
        if self.window is not None and length > self.window:
            raise TreeoptError(f"prompt + --max-new-tokens + tree need {length} positions but the model's "
                               f"sliding window is {self.window}: lower --max-new-tokens")
        if self.cache is None or self.cache.max_len < length:
            capacity = -(-length // self.CAPACITY_STEP) * self.CAPACITY_STEP
            self.cache = TreeCache(len(self.layer_devices), capacity)
            self.bias = torch.empty(self.buf.num_nodes, capacity, dtype=self.dtype, device=self.device)
            self._warm()
        self.cache.reset()
        self.bias.fill_(torch.finfo(self.dtype).min)

    def _warm(self) -> None:
        """Run each step once on an empty text: eagerly (the cache allocates its buffers at its first
        write), then as it will run (which compiles it for this shape when compiled)."""
        N = self.buf.num_nodes
        self.bias.fill_(torch.finfo(self.dtype).min)
        self.bias[:, :N] = self.tree_bias
        self.cache.reset()
        self.cache.place(torch.arange(N, device=self.device))
        tokens = torch.zeros(N, dtype=torch.long, device=self.device)
        with torch.inference_mode():  # as generate() runs: an inference tensor for positions, as the real calls pass
            positions = self.buf.depth + 0  # (a guard on its dispatch keys would otherwise recompile at the first call)
            self.verify.eager(tokens, self.bias, positions)
            _, hidden, _, _ = self.verify.warm(tokens, self.bias, positions)
            if self.tree.depth and self.heads is not None:
                self.propose.warm(hidden[0])  # the step after prefill, and after a fused tree forward

    @torch.inference_mode()
    def generate(self, prompt_ids, max_new_tokens: int = 128) -> DecodeResult:
        prompt = torch.as_tensor(list(prompt_ids), dtype=torch.long, device=self.device)  # [P]
        P, N = prompt.shape[0], self.buf.num_nodes
        if P == 0:
            raise TreeoptError("empty prompt: give at least one token")
        if max_new_tokens < 1:
            return DecodeResult(tokens=[], steps=0)
        self._prepare(P + max_new_tokens + N)
        if self.acceptance.mode == "typical":
            self.generator.manual_seed(self.acceptance.seed)
        cache, bias, buf = self.cache, self.bias, self.buf
        if self.drafter is not None:
            self.drafter.start(list(prompt_ids), cache.max_len)
            context = [int(t) for t in prompt_ids]  # the accepted text, for the drafter

        synchronize(self.device)
        t0 = time.perf_counter()
        hidden, state = self.prefill(prompt)  # [H], the drafter's state of the prompt's rows [P, S]
        root = self.next_root(self.lm_head(hidden))
        topk = self.candidates(hidden)  # [D, top_k]
        synchronize(self.device)
        t1 = time.perf_counter()

        out: list[int] = []
        accepted: list[int] = []
        steps, stopped, model_s = 0, False, 0.0
        clock = self._clock if self.time_model else (lambda: 0.0)
        while True:
            steps += 1
            cur = cache.length
            valid = None
            if self.drafter is None:
                tokens = torch.cat([root.view(1), topk.flatten()[buf.candidate_index]])  # [N]
            else:
                ta = clock()
                tokens, valid = self.drafter.propose(context, root, buf, state)  # [N], [N] or None
                model_s += clock() - ta
            ta = clock()
            logits, hidden, argmax = self.tree_forward(tokens)  # [N, V], [N, H], [N]
            model_s += clock() - ta
            nodes = self.accept(tokens, logits, argmax, valid)  # [m+1]
            cache.commit(nodes)
            bias[:, cur : cur + nodes.shape[0]] = 0  # the rest of cur..cur+N: the next step's tree_bias
            last = nodes[-1]
            new = tokens[nodes].tolist()
            accepted.append(len(new) - 1)
            hit = next((i for i, t in enumerate(new) if t in self.stop_set), None)
            if hit is not None:
                new, stopped = new[: hit + 1], True
            out.extend(new)
            if self.drafter is not None:
                context += new
            if stopped or len(out) >= max_new_tokens:
                break
            root = self.next_root(logits[last], argmax[last])
            ta = clock()
            topk = self.candidates(hidden[last], row=int(last))
            state = hidden[nodes]  # [m+1, S] the accepted rows, for a drafter
            model_s += clock() - ta
        synchronize(self.device)
        t2 = time.perf_counter()
        return DecodeResult(tokens=out[:max_new_tokens], steps=steps, accepted=accepted,
                            prefill_s=t1 - t0, decode_s=t2 - t1, model_s=model_s, stopped=stopped)

    def tree_forward(self, tokens: torch.Tensor):
        """The verification step of tokens [N] (node order) after the committed text, left uncommitted
        -> (logits [N, V], hidden [N, H], each row's argmax [N])."""
        cur, N = self.cache.length, self.buf.num_nodes
        self.bias[:, cur : cur + N] = self.tree_bias
        self.cache.place(torch.arange(cur, cur + N, device=self.device))
        logits, hidden, argmax, self.row_topk = self.verify(tokens, self.bias, self.buf.depth + cur)
        return logits, hidden, argmax

    def prefill(self, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Commit the prompt [P] (eagerly: its length varies) -> (the hidden state of its last token [H],
        the drafter's state of every prompt row [P, S])."""
        P = prompt.shape[0]
        positions = torch.arange(P, device=self.device)
        slots = torch.arange(self.cache.max_len, device=self.device)
        mask = additive_mask(slots[None, :] <= positions[:, None], self.dtype)  # [P, capacity] causal
        self.cache.place(positions)
        hidden, state = self.forward(prompt, mask, positions)
        self.cache.commit(positions)
        self.bias[:, :P] = 0
        return hidden[-1], state

    def _clock(self) -> float:
        synchronize(self.device)
        return time.perf_counter()


def decode(model, heads, tree: Tree, prompt_ids, max_new_tokens: int = 128, acceptance: Acceptance = GREEDY,
           stop_ids=None, compiled: bool = False) -> DecodeResult:
    """One-call twin of `TreeDecoder(...).generate(...)`."""
    return TreeDecoder(model, heads, tree, acceptance, stop_ids, compiled=compiled).generate(prompt_ids, max_new_tokens)


class _FirstTokenClock:
    """A generate() streamer that notes when the first new token arrives (the end of prefill)."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self):
        pass


def greedy_reference(model, prompt_ids, max_new_tokens: int, stop_ids=None) -> DecodeResult:
    """Plain `model.generate(do_sample=False)` under the same stop rules, timed like the decoder:
    prefill_s until the first new token, decode_s for the rest (steps = its forwards after prefill).
    stop_ids: None = the model's EOS ids (generate always stops at those)."""
    device = model.get_output_embeddings().weight.device
    ids = torch.as_tensor([list(prompt_ids)], dtype=torch.long, device=device)
    stops = sorted(stop_token_ids(model) if stop_ids is None else stop_ids)
    if not stops:
        raise ValueError("model.generate always stops at an EOS id: pass stop_ids")
    clock = _FirstTokenClock()
    synchronize(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        seq = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=stops[0],
                             streamer=clock)
    synchronize(device)
    t2 = time.perf_counter()
    new = seq[0, ids.shape[1]:].tolist()
    t1 = clock.first or t2
    stopped = bool(new) and new[-1] in set(stops)
    return DecodeResult(tokens=new, steps=max(len(new) - 1, 0), accepted=[], prefill_s=t1 - t0,
                        decode_s=t2 - t1, stopped=stopped)


def run_decode(instruction: str, tree: str | None = None, model: str = DEFAULT_MODEL, heads: str | None = None,
               max_new_tokens: int = DecodeConfig.max_new_tokens, acceptance: Acceptance = GREEDY, device: str = "auto",
               dtype: str = "auto", compiled: bool | None = None, device_map: str | None = None,
               max_memory: str | None = None, drafter: str = "heads") -> tuple[str, DecodeResult]:
    """The CLI's twin: decode one instruction (as a chat turn) with a tree spec (file, published name
    or list string; None = plain decoding) drafted by `drafter` (treeopt.decoding.drafters: heads, by
    --heads `heads`, ngram[:MIN-MAX], draft:MODEL or eagle3[:DIR]) and return the reply text and the result."""
    from treeopt.decoding.heads import resolve_heads
    from treeopt.decoding.models import chat_prompt, check_context, load_model
    from treeopt.core.treefile import checked, read_tree

    shape = read_tree(tree) if tree else Tree(())
    loaded = load_model(model, device=device, dtype=dtype, device_map=device_map, max_memory=max_memory,
                        attention="decode")
    from treeopt.decoding.drafters import parse_drafter, resolve_drafter

    spec = parse_drafter(drafter)
    if spec.kind == "heads":
        medusa = resolve_heads(spec.path or heads, loaded.model) if shape.num_nodes else None
        if medusa is not None:
            checked(shape, tree, num_heads=medusa.num_heads)
    else:
        medusa = resolve_drafter(spec, loaded.model) if shape.num_nodes else None
    stops = stop_token_ids(loaded.model, loaded.tokenizer)
    ids = chat_prompt(loaded.tokenizer, instruction)
    check_context(loaded.model, [ids], max_new_tokens, [instruction])
    compiled = compiles_by_default(loaded.model) if compiled is None else compiled
    result = TreeDecoder(loaded.model, medusa, shape, acceptance, stops, compiled=compiled).generate(ids, max_new_tokens)
    return loaded.tokenizer.decode(result.tokens, skip_special_tokens=True), result
