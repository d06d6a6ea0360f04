"""`treeopt profile`: the model's work in one decoding step vs tree size (and batch size), on this device.

forward_ms(n) = base_ms + heads_ms, where base_ms is the decoder's verification step (one forward of
the root + n tree nodes over a KV cache holding `context` tokens, with the lm_head on all n+1
positions) and heads_ms is the drafting step (0 for n = 0: plain decoding): the Medusa heads' top-k at
one node, or with another drafter (`--drafter`, treeopt.decoding.drafters) its `propose` for the
n-node tree, its own cache holding the `context` tokens (fed through one `propose`, as the decoder
feeds it the prompt), one accepted token per timed step: ~0 model time for n-gram lookup, one
forward per tree level for a draft model or EAGLE-3. Both run on the path the decoder runs (compiled
or eager; compile_s is the one-off compile time, apart). `search --nodes auto` prices a step at
forward_ms, so the drafting cost is in the size it chooses.
roofline_ms is the step's bytes / read bandwidth or FLOPs / peak GEMM rate, whichever is larger
(`treeopt.decoding.roofline`, the machine measured once per profile), and roofline_ratio = forward_ms /
roofline_ms (1 = as fast as the machine allows). Everything else a decoding step does (acceptance,
KV compaction, Python) is the loop, which `treeopt bench` measures against this figure
(loop_efficiency).

With batch sizes B > 1 (`--serving-batches 1,4,16`), a row times the same step for B sequences at once,
as a batched server runs it: one forward of B x (n+1) tokens over B cached contexts (a transformers
DynamicCache, cut back after each forward) and the heads at B nodes. treeopt's own decoder is batch
1, so B = 1 stays its exact call; drafters other than heads are timed at B = 1 only. The CSV's `batch_size` column tells the rows apart (files without
one are batch 1).
"""

from __future__ import annotations

import statistics
import time

import pandas as pd
import torch

from treeopt.decoding.decoder import TreeDecoder, additive_mask, compiles_by_default, synchronize
from treeopt.decoding.drafters import Drafter
from treeopt.decoding.roofline import Machine, StepCost, draft_cost, measure_machine, step_cost
from treeopt.core.errors import TreeoptError
from treeopt.core.fileio import atomic_write, check_writable
from treeopt.core.settings import CalibrationConfig, ProfileConfig
from treeopt.core.tree import Tree

DEFAULT_SIZES = (0, 1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
COLUMNS = ["batch_size", "nodes", "depth", "forward_ms", "base_ms", "heads_ms", "roofline_ms", "roofline_ratio", "compile_s",
           "context", "device", "dtype", "compiled", "model", "engine_reason", "drafter"]
DRAFT_DEPTH = CalibrationConfig.draft_depth  # the depth of the balanced trees timed for a tree drafter


def profile_tree(n: int, num_heads: int, shape: Tree | None = None) -> Tree:
    """The n-node tree a profile row times: the first n nodes of `shape` (e.g. a searched tree, whose
    prefixes are the trees `search --nodes auto` chooses among), else a balanced tree of depth <=
    num_heads: the first n nodes of the smallest k^depth Cartesian tree that holds them."""
    if n == 0:
        return Tree(())
    if shape is not None:
        if n > len(shape):
            raise TreeoptError(f"--sizes asks for {n} nodes but the --tree has {len(shape)}: "
                               f"pass sizes up to {len(shape)}, or a larger tree")
        return shape[:n]
    k = 1
    while sum(k ** d for d in range(1, num_heads + 1)) < n:
        k += 1
    return Tree.cartesian([k] * num_heads)[:n]


@torch.inference_mode()
def time_step_forward(decoder: TreeDecoder, context: int, repeats: int = 5, warmup: int = 2,
                      seed: int = 0) -> tuple[float, float]:
    """Median (base_ms, heads_ms) of the decoder's verification and drafting steps over a `context`-token
    prefix: the heads' top-k at one node, or the decoder's drafter's `propose` for its tree (the
    drafter fed the prefix through one `propose` first, as the decoder feeds it the prompt; each timed
    call one accepted token further)."""
    N, dev, drafter = decoder.buf.num_nodes, decoder.device, decoder.drafter
    vocab = decoder.lm_head.weight.shape[0]
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, vocab, (context,), generator=g).to(dev)
    tokens = torch.randint(0, vocab, (N,), generator=g).to(dev)
    roots = torch.randint(0, vocab, (warmup + repeats + 1,), generator=g).to(dev)  # the drafter's root at each step
    decoder._prepare(context + N)
    _, state = decoder.prefill(prefix)  # state [context, S]: the drafter's rows of the prefix
    if drafter is not None:
        text = prefix.tolist()
        step = decoder.CAPACITY_STEP
        drafter.start(text, -(-(context + N + len(roots) + 1) // step) * step)
        drafter.propose(text, roots[0], decoder.buf, state)  # commits the prefix
    base, heads = [], []
    for i in range(warmup + repeats):
        synchronize(dev)
        t0 = time.perf_counter()
        _, hidden, _ = decoder.tree_forward(tokens)  # writes slots context.., uncommitted
        synchronize(dev)
        t1 = time.perf_counter()
        if drafter is None:
            decoder.candidates(hidden[0], row=0)  # fused (small trees): made by the tree forward already
        else:
            text.append(int(roots[i]))  # the last step accepted its root; state: that root's row
            drafter.propose(text, roots[i + 1], decoder.buf, state[-1:])
        synchronize(dev)
        t2 = time.perf_counter()
        if i >= warmup:
            base.append((t1 - t0) * 1e3)
            heads.append((t2 - t1) * 1e3 if decoder.tree.depth else 0.0)
    return statistics.median(base), statistics.median(heads)


def batch_tree_forward(decoder: TreeDecoder, cache, tokens: torch.Tensor, context: int) -> torch.Tensor:
    """The decoder's tree forward for B sequences at once: tokens [B, N] (root + nodes) after the
    `context` tokens each row holds in `cache` (a DynamicCache) -> last hidden states [B, N, H]."""
    B, N = tokens.shape
    allowed = torch.cat([torch.ones(N, context, dtype=torch.bool, device=decoder.device), decoder.buf.mask], 1)
    mask = additive_mask(allowed, decoder.dtype).expand(B, 1, N, context + N)  # [B, 1, N, context + N]
    positions = (decoder.buf.depth + context).expand(B, N)  # [B, N]
    return decoder.base(input_ids=tokens, attention_mask=mask, position_ids=positions,
                        **{decoder.cache_argument: cache}, use_cache=True).last_hidden_state


@torch.inference_mode()
def time_batch_forward(decoder: TreeDecoder, batch: int, context: int, repeats: int = 5, warmup: int = 2,
                       seed: int = 0) -> tuple[float, float]:
    """Median (base_ms, heads_ms) of `batch_tree_forward` (+ the lm_head) and of the heads at B nodes."""
    from transformers import DynamicCache

    N, dev = decoder.buf.num_nodes, decoder.device
    vocab = decoder.lm_head.weight.shape[0]
    g = torch.Generator().manual_seed(seed)
    cache = DynamicCache()
    decoder.base(input_ids=torch.randint(0, vocab, (batch, context), generator=g).to(dev),
                 **{decoder.cache_argument: cache}, use_cache=True)
    tokens = torch.randint(0, vocab, (batch, N), generator=g).to(dev)  # [B, N]
    base, heads = [], []
    for i in range(warmup + repeats):
        synchronize(dev)
        t0 = time.perf_counter()
        hidden = batch_tree_forward(decoder, cache, tokens, context)  # [B, N, H]
        decoder.lm_head(hidden)
        synchronize(dev)
        t1 = time.perf_counter()
        if decoder.tree.num_nodes:
            decoder.candidates(hidden[:, 0])  # [D, B, top_k]
        synchronize(dev)
        t2 = time.perf_counter()
        cache.crop(-N)  # back to the `context` prefix
        if i >= warmup:
            base.append((t1 - t0) * 1e3)
            heads.append((t2 - t1) * 1e3 if decoder.tree.num_nodes else 0.0)
    return statistics.median(base), statistics.median(heads)


def profile_latency(model, heads, sizes=DEFAULT_SIZES, context: int = 256, repeats: int = 5,
                    model_name: str = "", progress: bool = False, batch_sizes=(1,), compiled: bool = False,
                    machine: Machine | None = None, shape: Tree | None = None) -> pd.DataFrame:
    """One row per batch size and tree size (see the module docstring). `heads`: Medusa heads, or any
    treeopt.decoding.drafters drafter (batch 1 only; its default trees: chains for n-gram lookup, else
    balanced trees of depth DRAFT_DEPTH); `machine`: measured here when None; `shape`: time its
    prefixes (`profile_tree`)."""
    sizes, batch_sizes = checked_sizes(sizes, context), checked_batch_sizes(batch_sizes)
    drafter = heads if isinstance(heads, Drafter) and heads.kind != "heads" else None
    heads = heads.heads if isinstance(heads, Drafter) and drafter is None else heads
    if drafter is not None and batch_sizes != [1]:
        raise TreeoptError(f"--drafter {drafter.kind} drafts one sequence at a time: drop --serving-batches")
    if drafter is not None and drafter.kind == "ngram" and shape is None:
        shape = Tree.chain(max(sizes))  # it drafts chains only
    depth = (drafter.depth or DRAFT_DEPTH) if drafter is not None else heads.num_heads
    name = "heads" if drafter is None else drafter.describe()["source"]
    name = name if drafter is None or drafter.kind == "ngram" else f"{drafter.kind}:{name}"  # e.g. eagle3:default
    weight = model.get_output_embeddings().weight
    machine = machine or measure_machine(weight.device, dtypes=tuple(dict.fromkeys((torch.float32, weight.dtype))))
    rows = []
    bar = _progress([(b, n) for b in batch_sizes for n in sizes], progress, "profile")
    for b, n in bar:
        tree = profile_tree(n, depth, shape)
        decoder = TreeDecoder(model, (drafter or heads) if n else None, tree, compiled=compiled and b == 1)
        base_ms, heads_ms = (time_step_forward(decoder, context, repeats) if b == 1 else
                             time_batch_forward(decoder, b, context, repeats))
        cost = step_cost(model, n, context, heads if drafter is None else None, tree.depth, batch=b,
                         fused=decoder.fused)
        if drafter is not None:
            extra = draft_cost(drafter, tree, context)
            cost = StepCost(cost.bytes + extra.bytes, cost.flops + extra.flops)
        roofline = cost.ms(machine, weight.dtype)
        rows.append({"batch_size": b, "nodes": n, "depth": tree.depth, "forward_ms": base_ms + heads_ms, "base_ms": base_ms,
                     "heads_ms": heads_ms, "roofline_ms": roofline, "roofline_ratio": (base_ms + heads_ms) / roofline,
                     "compile_s": decoder.compile_s, "context": context, "device": str(weight.device),
                     "dtype": str(weight.dtype).removeprefix("torch."),
                     "compiled": decoder.engine["engine"] == "compiled", "model": model_name,
                     "engine_reason": ("batched steps run eagerly" if b > 1 else decoder.engine["reason"]
                                       or ("" if compiled else "compiling not asked")), "drafter": name})
    df = pd.DataFrame(rows, columns=COLUMNS)
    df.attrs["machine"] = machine
    return df


def engine(df: pd.DataFrame) -> str:
    """What ran, from the rows: compiled, or eager and why (at which rows, when only some)."""
    eager = df[~df["compiled"].astype(bool)]
    if eager.empty:
        return "compiled"
    why = "; ".join(sorted({str(r) for r in eager["engine_reason"].fillna("") if str(r)}))
    where = "eager" if len(eager) == len(df) else f"compiled, eager at {len(eager)} of {len(df)} rows"
    return where + (f" ({why})" if why else "")


def render_profile(df: pd.DataFrame) -> str:
    """The machine's limits, then the table."""
    from treeopt.core.tables import render_table

    m = df.attrs["machine"]
    peaks = ", ".join(f"{k} {v:.0f}" for k, v in m.peak_gflops.items())
    head = (f"{m.device}, {m.threads} threads: read {m.bandwidth_gbs:.1f} GB/s, GEMM peak GFLOP/s {peaks}; "
            f"{df['dtype'].iloc[0]}, {engine(df)}, context {df['context'].iloc[0]}"
            + (f"; drafter {df['drafter'].iloc[0]} (heads_ms: its drafting step)"
               if "drafter" in df.columns and df["drafter"].iloc[0] != "heads" else ""))
    cols = ["nodes", "depth", "forward_ms", "base_ms", "heads_ms", "roofline_ms", "roofline_ratio", "compile_s"]
    return head + "\n" + render_table(df[(["batch_size"] if df["batch_size"].nunique() > 1 else []) + cols])


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


def checked_sizes(sizes, context: int) -> list[int]:
    """The distinct tree sizes, sorted, after checking them and the context length."""
    sizes = sorted(set(int(s) for s in sizes))
    if not sizes or sizes[0] < 0:
        raise TreeoptError(f"--sizes {sizes}: give tree sizes >= 0, e.g. 0,1,2,4,8")
    if context < 1:
        raise TreeoptError("--context must be at least 1 token")
    return sizes


def checked_batch_sizes(batch_sizes) -> list[int]:
    batch_sizes = sorted(set(int(b) for b in batch_sizes))
    if not batch_sizes or batch_sizes[0] < 1:
        raise TreeoptError(f"--serving-batches {batch_sizes}: give batch sizes >= 1, e.g. 1,4,16")
    return batch_sizes


def parse_sizes(text: str | None, default=DEFAULT_SIZES, option: str = "--sizes") -> tuple[int, ...]:
    """'0,1,2' -> (0, 1, 2); None -> `default`; '' -> () (none: checked_sizes refuses it)."""
    if text is None:
        return tuple(default)
    try:
        return tuple(int(s) for s in text.replace(" ", "").split(",") if s)
    except ValueError:
        raise TreeoptError(f"{option} {text!r}: give comma-separated integers, e.g. 0,1,2,4,8,16") from None


def run_profile(config: ProfileConfig | None = None, progress: bool = True, **settings) -> pd.DataFrame:
    """The CLI's twin: load the model and its drafter (heads, or `config.drafter`), profile (the prefixes of `config.tree`, a tree spec,
    when given), write the CSV atomically (`settings`: ProfileConfig's fields, instead of `config`)."""
    from treeopt.core.treefile import read_tree

    from treeopt.decoding.drafters import NgramDrafter, parse_drafter, resolve_drafter
    from treeopt.decoding.models import load_model, set_threads

    cfg = config or ProfileConfig(**settings)
    model, heads, sizes, context, repeats, out, tree = (cfg.model, cfg.heads, cfg.sizes, cfg.context, cfg.repeats,
                                                        cfg.out, cfg.tree)
    device, dtype, device_map, max_memory, compiled = cfg.device, cfg.dtype, cfg.device_map, cfg.max_memory, cfg.compiled
    tree_sizes = checked_sizes(parse_sizes(sizes), context)
    batches = checked_batch_sizes(parse_sizes(cfg.serving_batches, (1,), "--serving-batches"))
    check_writable(out, fix="pass another --output")
    shape = read_tree(tree) if tree is not None else None
    if shape is not None:
        tree_sizes = [n for n in tree_sizes if n <= len(shape)] if sizes is None else tree_sizes
        for n in tree_sizes:
            profile_tree(n, shape.depth, shape)  # a size the tree lacks fails here, before loading
        if parse_drafter(cfg.drafter).kind == "ngram":
            NgramDrafter().check(None, shape)  # and a tree for a chain drafter
    set_threads(cfg.threads)
    loaded = load_model(model, device=device, dtype=dtype, device_map=device_map, max_memory=max_memory,
                        attention="decode")
    drafter = resolve_drafter(cfg.drafter, loaded.model, heads=heads)  # heads: the Medusa heads, on their fast paths
    compiled = compiles_by_default(loaded.model) if compiled is None else compiled
    df = profile_latency(loaded.model, drafter, tree_sizes, context, repeats, model_name=model, progress=progress,
                         batch_sizes=batches, compiled=compiled, shape=shape)
    atomic_write(out, lambda p: df.to_csv(p, index=False, float_format="%.4f"))
    return df
