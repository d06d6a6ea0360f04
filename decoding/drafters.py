"""Drafters: what proposes the tokens of a tree's nodes, for the decoder and for calibration.

Under greedy verification a node on rank path (r1, ..., rd) is accepted only if every token on its
path is the base model's greedy token, so at depth i the drafter has been fed exactly the true prefix.
The rank of the true token y_{t+d} at depth d, the drafter fed y_{t+1..t+d-1}, therefore replays any
static tree exactly: a calibration record (`ranks.parquet`, r1..rK) is that rank for every drafter.

Every drafter answers the two questions of the method:

- decoding: `start(prompt_ids, capacity)` once per text, then per step `propose(context, root, buf)`:
  context = the accepted token ids (prompt included), root = the base model's next token (the tree's
  node 0) -> (tokens [N] of every node of the tree `buf`, valid [N] bool or None: a node whose candidate
  does not exist is never accepted);
- calibration: `ranks(prompt_ids, tokens, top_k, depth)` -> [T, depth] int16, r_d at t the rank of
  y_{t+d} at depth d when the root is y_t (clipped to top_k, MISSING past the text's end).

Kinds:

- `heads`: Medusa heads (treeopt.decoding.heads), all depths at once from the base model's hidden
  state. The decoder keeps its own fast paths for them (heads fused into the verification product for
  small trees), so `HeadsDrafter` only carries them; their calibration ranks are
  treeopt.calibrate.ranks.head_ranks (tiled over the vocabulary).
- `ngram`: vLLM's prompt lookup, model-free, one candidate per depth (chains only); see `ngram_propose`.
- `draft`: a causal LM sharing the base model's vocabulary, with its own static KV cache; it drafts
  a tree level by level, one forward per level (level 1 also feeds the tokens accepted since its last
  step).
- `eagle3`: an EAGLE-3 drafter (treeopt.decoding.eagle3) over the base model's hidden states entering
  its `aux_layers`, which the decoder hands it (`state`); level by level like a draft model, each node
  fed its parent's output.

`resolve_drafter("heads" | "ngram[:MIN-MAX]" | "draft:MODEL" | "eagle3:DIR", heads=..., model=...)` builds one.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from treeopt.core.drafter import NGRAM_DEFAULT, DrafterSpec, parse_drafter
from treeopt.core.errors import TreeoptError
from treeopt.core.record import MISSING
from treeopt.core.tree import Tree


class Drafter:
    """The interface (see the module's docstring). `depth`: the deepest node it drafts (None: any);
    `needs_hidden`: it reads the base model's last hidden states (calibration keeps them for it);
    `aux_layers`: the base model's layers whose entering hidden states it reads as its `state` (the
    decoder then hands it those, concatenated, instead of the last hidden states)."""

    kind: str = ""
    depth: int | None = None
    needs_hidden: bool = False
    aux_layers: tuple[int, ...] = ()

    def describe(self) -> dict:
        """{"kind", "source", "sha256"}: what a calibration records (the checkpoint's fingerprint)."""
        raise NotImplementedError

    def check(self, model, tree: Tree) -> None:
        """A one-line error when this drafter cannot draft `tree` for `model`."""

    def start(self, prompt_ids: list[int], capacity: int) -> None:
        """A new text: forget the last one; `capacity` positions at most (prompt + output + tree)."""

    def propose(self, context: list[int], root: torch.Tensor, buf, state: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """context: the accepted token ids (prompt included), root (0-dim): the base model's next token,
        state [m, S]: the base model's rows of the tokens accepted since the last call (the prompt's
        after prefill; the last one chose root): its last hidden states [m, H], or with `aux_layers`
        those layers' entering hidden states [m, A * H]; buf: the tree (treeopt.decoding.buffers) ->
        (tokens [N] of every node, node 0 the root; valid [N] bool or None: the nodes that hold a
        candidate; the others are never accepted)."""
        raise NotImplementedError

    def ranks(self, prompt_ids: list[int], tokens: list[int], top_k: int, depth: int,
              hidden: torch.Tensor | None = None) -> torch.Tensor:
        """tokens y_0..y_{T-1} after prompt_ids (hidden [T, H]: the base model's state before each y_t,
        when `needs_hidden`) -> ranks [T, depth] int16: r_d at t the rank of y_{t+d} at depth d with the
        drafter fed y_t..y_{t+d-1} (y_t the root), clipped to top_k, MISSING past the end."""
        raise NotImplementedError


def state_sha256(module: torch.nn.Module) -> str:
    """A checkpoint's fingerprint: every tensor of its state_dict, names, dtypes and shapes included."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _depth_targets(T: int, depth: int) -> np.ndarray:
    """[T, depth] index t + d of the true token at depth d (1-based), -1 past the end."""
    idx = np.arange(T)[:, None] + np.arange(1, depth + 1)[None, :]
    return np.where(idx < T, idx, -1)


def draft_levels(buf, root, out, top, advance, L: int, slots: torch.Tensor) -> torch.Tensor:
    """The tokens [N] of tree `buf` drafted level by level by a model drafter (a draft model, EAGLE-3).
    out [1, ...]: the root entry's output; top(out [q, ...]) -> each row's candidates [q, k] (token ids,
    best first); advance(nodes [q], rows [q]: each node's parent's row of `out`, out, tokens, seen
    [q, capacity] bool, positions [q], slots [q]) -> those nodes' outputs. The root's entry is at slot
    L - 1, node j >= 1 at scratch slot L + j - 1; a node sees the committed slots and its ancestors."""
    N = buf.num_nodes
    tokens = torch.empty(N, dtype=torch.long, device=slots.device)
    tokens[0] = root
    parent, depth = buf.parent.tolist(), buf.depth.tolist()
    ranks = [0] + [p[-1] for p in buf.tree.paths]
    has_child = set(parent[1:])
    scored = [0]  # the nodes whose outputs are `out`, in order
    for d in range(buf.tree.depth):
        candidates = top(out)  # [q, k]
        row = {node: i for i, node in enumerate(scored)}
        level = [i for i in range(1, N) if depth[i] == d + 1]
        for i in level:
            tokens[i] = candidates[row[parent[i]], ranks[i]]
        nxt = [i for i in level if i in has_child]
        if not nxt:
            break
        nodes = torch.tensor(nxt, device=slots.device)
        rows = torch.tensor([row[parent[i]] for i in nxt], device=slots.device)
        seen = (slots < L).expand(len(nxt), -1).clone()  # [q, capacity]: the committed entries
        seen[:, L : L + N - 1] = buf.mask[nodes, 1:]  # and the node's ancestors and itself
        out = advance(nodes, rows, out, tokens, seen, L - 1 + buf.depth[nodes], L - 1 + nodes)
        scored = nxt
    return tokens


# ---- Medusa heads ------------------------------------------------------------------------------

class HeadsDrafter(Drafter):
    """Medusa heads behind the interface; the decoder runs them on its own fast paths."""

    kind = "heads"
    needs_hidden = True

    def __init__(self, heads, source: str | None = None):
        self.heads, self.source = heads, source or "default"
        self.depth = heads.num_heads

    def describe(self) -> dict:
        from treeopt.decoding.heads import heads_sha256

        return {"kind": "heads", "source": self.source, "sha256": heads_sha256(self.heads)}


# ---- n-gram prompt lookup (vLLM's rule) --------------------------------------------------------

def ngram_propose(context, min_n: int, max_n: int, k: int) -> list[int]:
    """vLLM's prompt lookup (vllm/v1/spec_decode/ngram_proposer.py,
    `_find_longest_matched_ngram_and_propose_tokens`): the longest n in [min_n, max_n] whose last n
    tokens of `context` occur earlier (an occurrence ending before the last token; it may overlap the
    suffix); among the occurrences of that n, the earliest; propose the up to k tokens after it.
    vLLM finds it with a KMP scan of the reversed text; here each n is checked directly, longest first."""
    ctx = np.asarray(context, dtype=np.int64)
    L = ctx.shape[0]
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(ctx[: L - 1], n)  # [L - n, n]: starts 0..L-1-n
        hits = np.flatnonzero((windows == ctx[L - n:]).all(1))
        if hits.size:
            start = int(hits[0]) + n
            return ctx[start : start + k].tolist()
    return []


class NgramDrafter(Drafter):
    """Model-free: one candidate per depth, so it drafts chains (every node rank 0) only."""

    kind = "ngram"

    def __init__(self, min_n: int = NGRAM_DEFAULT[0], max_n: int = NGRAM_DEFAULT[1]):
        self.min_n, self.max_n = min_n, max_n

    def describe(self) -> dict:
        text = json.dumps({"kind": "ngram", "min_n": self.min_n, "max_n": self.max_n}, sort_keys=True)
        return {"kind": "ngram", "source": f"ngram:{self.min_n}-{self.max_n}",
                "sha256": hashlib.sha256(text.encode()).hexdigest()}

    def check(self, model, tree: Tree) -> None:
        if any(any(r != 0 for r in p) for p in tree.paths) or len(tree.paths) != tree.depth:
            raise TreeoptError("n-gram lookup proposes one token per depth: pass a chain (e.g. --tree chain:3 "
                               "or [[0],[0,0],[0,0,0]]), not a tree")

    def propose(self, context, root, buf, state=None):
        N, D = buf.num_nodes, buf.tree.depth
        found = ngram_propose(list(context) + [int(root)], self.min_n, self.max_n, D)  # chain: node d = depth d
        tokens = torch.zeros(N, dtype=torch.long, device=buf.depth.device)
        tokens[0] = root
        tokens[1 : 1 + len(found)] = torch.tensor(found, dtype=torch.long)
        valid = torch.arange(N, device=tokens.device) <= len(found)  # [N] nodes past the proposal never accept
        return tokens, valid

    def ranks(self, prompt_ids, tokens, top_k, depth, hidden=None):
        """r_d at t: 0 when the proposal from prompt + y_0..y_t holds y_{t+d} at depth d, else top_k
        (a miss: no candidate of rank < top_k), MISSING past the end."""
        text, P, T = list(prompt_ids) + list(tokens), len(prompt_ids), len(tokens)
        idx = _depth_targets(T, depth)
        out = np.where(idx < 0, MISSING, top_k).astype(np.int16)  # [T, depth]
        for t in range(T - 1):
            found = ngram_propose(text[: P + t + 1], self.min_n, self.max_n, depth)
            for d, tok in enumerate(found, 1):
                if t + d < T and tok == tokens[t + d]:
                    out[t, d - 1] = 0
        return torch.from_numpy(out)


# ---- a draft model -------------------------------------------------------------------------------

class DraftModelDrafter(Drafter):
    """A causal LM with the base model's vocabulary, with its own TreeCache. Per step: level 1 feeds the
    tokens accepted since its last step and the root (committed: they are the true text), level d > 1
    the tree's depth-(d-1) nodes that have children (scratch slots after the text, a tree mask); each
    level's top-k at a node gives its children's tokens (a child of rank r: the parent's rank-r token)."""

    kind = "draft"

    def __init__(self, model, source: str = ""):
        from treeopt.decoding.models import cache_argument

        self.model, self.source = model, source
        self.base = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self.cache_argument = cache_argument(model)
        self.cache = None

    def describe(self) -> dict:
        return {"kind": "draft", "source": self.source, "sha256": state_sha256(self.model)}

    def check(self, model, tree: Tree) -> None:
        mine, theirs = self.lm_head.weight.shape[0], model.get_output_embeddings().weight.shape[0]
        if mine != theirs:
            raise TreeoptError(f"the draft model's vocabulary ({mine}) is not the base model's ({theirs}): "
                               "pass --drafter draft:MODEL sharing the base model's tokenizer")

    def start(self, prompt_ids, capacity):
        from treeopt.decoding.cache import TreeCache
        from treeopt.decoding.models import layer_devices

        if self.cache is None or self.cache.max_len < capacity:
            self.cache = TreeCache(len(layer_devices(self.model)), capacity)
        self.cache.reset()
        self.fed: list[int] = []  # the tokens committed to the cache, in order

    def _forward(self, ids: torch.Tensor, seen: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor):
        """ids/positions/slots [q], seen [q, capacity] bool -> logits [q, V]; K/V written at `slots`."""
        dtype = self.lm_head.weight.dtype
        bias = torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill_(~seen, torch.finfo(dtype).min)
        self.cache.place(slots)
        out = self.base(input_ids=ids[None], attention_mask=bias[None, None], position_ids=positions[None],
                        **{self.cache_argument: self.cache}, use_cache=True)
        return self.lm_head(out.last_hidden_state[0])

    def propose(self, context, root, buf, state=None):
        device = self.lm_head.weight.device
        text = list(context) + [int(root)]
        c, cache = self.cache.length, self.cache
        if text[:c] != self.fed:
            raise RuntimeError("the draft cache does not hold the accepted text")  # a decoder bug, not bad input
        new = torch.tensor(text[c:], dtype=torch.long, device=device)  # [q] accepted since the last step + root
        slots = torch.arange(cache.max_len, device=device)
        pos = torch.arange(c, len(text), device=device)
        logits = self._forward(new, slots[None, :] <= pos[:, None], pos, pos)[-1:]  # [1, V] at the root
        cache.commit(pos - c)  # in place: slots relative to the committed length
        self.fed = text
        top_k = buf.top_k
        tokens = draft_levels(buf, root, logits, lambda lg: torch.topk(lg, top_k, dim=-1).indices,
                              lambda nodes, rows, out, tokens, seen, pos, sl: self._forward(tokens[nodes], seen, pos, sl),
                              cache.length, slots)
        return tokens, None

    @torch.inference_mode()
    def ranks(self, prompt_ids, tokens, top_k, depth, hidden=None):
        """One teacher-forced forward of prompt + y: q[j], the rank of y_j after y_{<j}; r_d at t = q[t + d]."""
        P, T = len(prompt_ids), len(tokens)
        device = self.lm_head.weight.device
        ids = torch.tensor([list(prompt_ids) + list(tokens)], device=device)
        hidden = self.base(input_ids=ids).last_hidden_state[0, P - 1 : P - 1 + T]  # [T, H]: the state before y_j
        target = torch.tensor(tokens, device=device)
        q = torch.empty(T, dtype=torch.int64)
        for s in range(0, T, 256):
            logits = self.lm_head(hidden[s : s + 256]).float()  # [b, V]
            true = logits.gather(1, target[s : s + 256, None])
            q[s : s + 256] = (logits > true).sum(1).clamp_(max=top_k).cpu()
        idx = _depth_targets(T, depth)
        return torch.from_numpy(np.where(idx < 0, MISSING, q.numpy()[np.maximum(idx, 0)]).astype(np.int16))


# ---- EAGLE-3 -----------------------------------------------------------------------------------------

class Eagle3Drafter(Drafter):
    """An EAGLE-3 drafter (treeopt.decoding.eagle3) with its own KV buffers [capacity, nkv, d]. Per step:
    the entries of the tokens accepted since its last step (the base model's `state` rows through `fc`,
    each beside the token after it, the last beside the root) are committed; then level by level, as a
    draft model does, each node that has children is fed its parent's output (scratch slots after the
    text, a tree mask) and its top-k gives its children's tokens."""

    kind = "eagle3"

    def __init__(self, eagle, model, source: str = ""):
        self.eagle, self.model, self.source = eagle, model, source
        self.base = model.get_decoder()
        self.aux_layers = tuple(eagle.config.aux_layers)
        self.keys = self.values = None

    def describe(self) -> dict:
        return {"kind": "eagle3", "source": self.source, "sha256": state_sha256(self.eagle)}

    def check(self, model, tree: Tree) -> None:
        c = self.eagle.config
        if c.vocab_size != model.config.vocab_size:
            raise TreeoptError(f"the EAGLE-3 drafter's vocabulary ({c.vocab_size}) is not the base model's "
                               f"({model.config.vocab_size}): pass the drafter trained for this model")
        widest = max((p[-1] for p in tree.paths), default=-1)
        if widest >= c.draft_vocab_size:
            raise TreeoptError(f"the tree asks for rank {widest} of a {c.draft_vocab_size}-token draft vocabulary: "
                               "pass a narrower tree")

    def start(self, prompt_ids, capacity):
        c, p = self.eagle.config, self.eagle.fc.weight
        if self.keys is None or self.keys.shape[0] < capacity:
            self.keys = torch.zeros(capacity, c.num_key_value_heads, c.head_dim, dtype=p.dtype, device=p.device)
            self.values = torch.zeros_like(self.keys)
        self.length = 0  # committed entries: positions 0..length-1

    def _run(self, ids, hidden, positions, slots, seen):
        """Entries ids/positions/slots [q], hidden [q, H], seen [q, capacity] bool -> outputs [q, H]; K/V at `slots`."""
        q, k, v, residual = self.eagle.project(ids, hidden, positions)
        self.keys[slots], self.values[slots] = k, v
        return self.eagle.finish(self.eagle.attend(q, self.keys, self.values, seen), residual)

    def propose(self, context, root, buf, state=None):
        e, device = self.eagle, self.eagle.fc.weight.device
        text = list(context) + [int(root)]
        c = self.length
        m = len(text) - 1 - c  # entries to commit: positions c..c+m-1, each with the token after it
        if state is None or state.shape[0] != m:
            raise RuntimeError("the EAGLE-3 drafter was not handed the accepted rows")  # a decoder bug, not bad input
        slots = torch.arange(self.keys.shape[0], device=device)
        pos = torch.arange(c, c + m, device=device)
        ids = torch.tensor(text[c + 1 :], dtype=torch.long, device=device)
        out = self._run(ids, e.combine(state.to(e.fc.weight.dtype)), pos, pos, slots[None, :] <= pos[:, None])[-1:]
        self.length = c + m
        target, k = e.target_ids(), min(buf.top_k, e.config.draft_vocab_size)
        tokens = draft_levels(buf, root, out, lambda o: target[torch.topk(e.logits(o), k, dim=-1).indices],
                              lambda nodes, rows, out, tokens, seen, pos, sl: self._run(tokens[nodes], out[rows], pos, sl, seen),
                              self.length, slots)
        return tokens, None

    @torch.inference_mode()
    def ranks(self, prompt_ids, tokens, top_k, depth, hidden=None):
        """One teacher-forced forward of prompt + y for the base model's aux hidden states, then the
        drafter unrolled `depth` steps over every position (Eagle3.unroll): r_d at t from row P - 1 + t."""
        e = self.eagle
        P, T = len(prompt_ids), len(tokens)
        device = e.fc.weight.device
        text = torch.tensor(list(prompt_ids) + list(tokens), dtype=torch.long, device=device)
        out = self.base(input_ids=text[None], output_hidden_states=True)
        aux = torch.cat([out.hidden_states[l][0] for l in self.aux_layers], -1)  # [P + T, A * H]
        n = P + T - 1  # entries 0..n-1: (aux_i, text_{i+1})
        ids = torch.cat([text[1:], text.new_zeros(depth - 1)])  # [n + depth - 1]
        outs = e.unroll(aux[:n].to(e.fc.weight.dtype), ids, depth)
        index = e.draft_index()
        y = torch.tensor(tokens, dtype=torch.long, device=device)
        result = torch.full((T, depth), MISSING, dtype=torch.int16)
        for d in range(1, depth + 1):
            live = T - d  # roots t < T - d have a true token at depth d
            if live <= 0:
                break
            for s in range(0, live, 256):
                t = torch.arange(s, min(s + 256, live), device=device)
                logits = e.logits(outs[d - 1][P - 1 + t]).float()  # [b, Vd]
                j = index[y[t + d]]  # [b] the true token's draft index, -1: not in the draft vocabulary
                true = logits.gather(1, j.clamp(min=0)[:, None])
                r = (logits > true).sum(1).clamp_(max=top_k)
                result[s : s + len(t), d - 1] = torch.where(j < 0, top_k, r).to(torch.int16).cpu()
        return result


# ---- building one ----------------------------------------------------------------------------------

def resolve_drafter(spec: str | DrafterSpec | None, model, heads: str | None = None, heads_obj=None,
                    dtype: str | None = None) -> Drafter:
    """--drafter `spec` for base `model`: heads (the directory after `heads:`, else --heads `heads`;
    `heads_obj`: already loaded), ngram, or draft (loaded on the base model's device, in its dtype)."""
    from treeopt.decoding.heads import resolve_heads
    from treeopt.decoding.models import load_model, on_path_of

    spec = spec if isinstance(spec, DrafterSpec) else parse_drafter(spec)
    if spec.kind == "heads":
        source = spec.path or heads
        return HeadsDrafter(heads_obj if heads_obj is not None else resolve_heads(source, model), source)
    if spec.kind == "ngram":
        return NgramDrafter(spec.min_n, spec.max_n)
    if spec.kind == "eagle3":
        from treeopt.decoding.eagle3 import load_eagle3, shipped_eagle3

        path = spec.path or shipped_eagle3(model)
        return Eagle3Drafter(on_path_of(load_eagle3(path, model), model), model, spec.path or "default")
    weight = model.get_output_embeddings().weight
    loaded = load_model(spec.path, device=str(weight.device), dtype=dtype or str(weight.dtype).removeprefix("torch."),
                        attention="decode")
    drafter = DraftModelDrafter(on_path_of(loaded.model, model), spec.path)
    drafter.check(model, Tree(()))
    return drafter
