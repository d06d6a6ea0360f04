"""`treeopt calibrate --acceptance typical`: a record to replay Medusa's typical acceptance on.

Under typical acceptance (temperature T > 0) a step accepts a tree node when its token's probability
under its parent's distribution exceeds min(posterior_threshold, posterior_alpha * exp(-entropy)),
takes the longest path of accepted nodes (the most likely among the longest), and samples the next
root from the typical-truncated distribution. The text itself depends on the tree, so no single
continuation fixes every tree's steps, as the greedy record's does.

The probe walk. Each prompt's text y is sampled under the rule, seeded, one token per forward, as
decoding with no tree samples it: every token is a root drawn from the typical-truncated distribution
at temperature T. At every position t the walk forwards the root y_t with the heads' candidates there
and logs, for every node of a large *probe* tree P, whether its token passes the typical test (the
``a{i}`` columns of typical.parquet, treeopt.core.record). A node's test needs only its parent's
distribution, so the walk forwards only P's internal nodes (`probe_internal`) and reads the tests of
all their top-k children from those: P = the internal tree plus every child, of rank < top_k, of the
root and of each internal node, down to the heads' depth.

Exact: at every logged position, the nodes any subtree S of P accepts in a step with root y_t after
y_<t (the longest path of S whose nodes and ancestors all pass); tests/test_typical.py checks this
against the decoder, and that the walk's text is the no-tree decoder's.
Estimated: S's own decode's text and its steps. Replay (search/typical.py) walks y as greedy replay
walks its continuation, t -> t + 1 + d_S(t): every step's root there is a sampled token, as the
decoder's roots are (Medusa heads do not see the root they predict after, so a root drawn at T > 0
matters), but the tokens S accepts are the heads' candidates that pass, where y holds samples; when
they differ, S's real decode continues from another text, which replay assumes accepts alike.
Measured (benchmarks/bench_typical.py, README): replay over-predicts the decoder's tokens/step by
10-13 %, on the calibration prompts themselves too, so the gap is in this estimate, not a prompt shift.
A first design logged the probe decode's own text (roots after accepted head tokens are then likely
tokens, not samples) and over-predicted about as much; the cause is open.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import torch

from calibrate.run import CalibrationConfig, _fingerprint, _progress, _sha256, select_prompts
from decoding.decoder import Acceptance, TreeDecoder
from treeopt.core import record as fmt
from treeopt.core.env import versions
from treeopt.core.errors import TreeoptError
from treeopt.core.fileio import atomic_write, write_text
from treeopt.core.stage import Stage
from treeopt.core.tree import Tree

DEFAULT_INTERNAL = (4, 2, 1)  # the probe's internal nodes: top-4 x top-2 x top-1 (20 nodes)
PARTS = "parts"


def probe_tree(internal: Tree, top_k: int, num_heads: int) -> Tree:
    """The internal tree's nodes plus every child of rank < top_k of the root and of each internal
    node, at depth <= num_heads, by depth (children of earlier parents first)."""
    internal.check(num_heads=max(num_heads - 1, 0), top_k=top_k)
    parents = [()] + list(internal.paths)
    return Tree(tuple(p + (r,) for d in range(num_heads) for p in parents if len(p) == d for r in range(top_k)))


@torch.inference_mode()
def probe_walk(dec: TreeDecoder, probe: Tree, prompt_ids, max_new_tokens: int) -> pd.DataFrame:
    """Walk one prompt (module docstring). `dec` decodes the internal tree under the typical rule, with
    top_k covering the probe. Returns position, token and a0..a{n-1} per position."""
    internal, top_k = dec.tree, dec.buf.top_k
    row = {p: i + 1 for i, p in enumerate(internal.paths)} | {(): 0}  # internal node -> its row in the forward
    parent = torch.tensor([row[p[:-1]] for p in probe.paths], device=dec.device)  # [n]
    candidate = torch.tensor([(len(p) - 1) * top_k + p[-1] for p in probe.paths], device=dec.device)  # [n]
    prompt = torch.as_tensor(list(prompt_ids), dtype=torch.long, device=dec.device)
    dec._prepare(prompt.shape[0] + max_new_tokens + dec.buf.num_nodes)  # as TreeDecoder.generate starts
    dec.generator.manual_seed(dec.acceptance.seed)
    hidden = dec.prefill(prompt)  # [H]
    root = dec.next_root(dec.lm_head(hidden))
    topk = dec.candidates(hidden, probe.depth)  # [D, top_k]
    tokens, flags = [], []
    while True:
        internal_tokens = torch.cat([root.view(1), topk.flatten()[dec.buf.candidate_index]])  # [I+1]
        logits, hidden = dec.tree_forward(internal_tokens)  # [I+1, V], [I+1, H]: root + internal nodes
        ok, _ = dec.flags(topk.flatten()[candidate], logits, parent)  # [n] each probe node's test
        dec.cache.commit(torch.zeros(1, dtype=torch.long, device=dec.device))  # keep the root only
        dec.bias[:, dec.cache.length - 1] = 0
        tokens.append(int(root))
        flags.append(ok.cpu())
        if tokens[-1] in dec.stop_set or len(tokens) >= max_new_tokens:
            break
        root = dec.next_root(logits[0])  # every position's token is a sampled root
        topk = dec.candidates(hidden[0], probe.depth)
    table = pd.DataFrame(torch.stack(flags).numpy(), columns=fmt.flag_columns(len(probe)))  # [T, n]
    table.insert(0, "token", pd.Series(tokens, dtype="int32"))
    table.insert(0, "position", pd.Series(range(len(tokens)), dtype="int32"))
    return table


def calibrate_typical(config: CalibrationConfig, rule: Acceptance, internal: Tree | None = None, *,
                      loaded=None, heads=None) -> Path:
    """Walk every prompt with the probe tree (module docstring) into `config.out`; resumable by prompt.
    `internal`: the probe's internal nodes (default top-4 x top-2 x top-1); its children go to top_k."""
    from decoding.heads import resolve_heads
    from decoding.models import chat_prompt, load_model, stop_token_ids
    from treeopt.core.prompts import default_prompts

    config.check()
    if rule.mode != "typical":
        raise TreeoptError("calibrate_typical needs --acceptance typical")
    source = config.prompts or default_prompts()
    instructions, _ = select_prompts(source, config.limit, config.first, config.seed)
    loaded = loaded or load_model(config.model, device=config.device, dtype=config.dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    heads = heads if heads is not None else resolve_heads(config.heads, model)
    if internal is None:
        ks = DEFAULT_INTERNAL[: heads.num_heads - 1]
        internal = Tree.cartesian(ks) if ks else Tree(())
    probe = probe_tree(internal, config.top_k, heads.num_heads)
    dec = TreeDecoder(model, heads, internal, rule, stop_token_ids(model, tokenizer), top_k=config.top_k)
    rules = {"temperature": rule.temperature, "posterior_threshold": rule.posterior_threshold,
             "posterior_alpha": rule.posterior_alpha, "seed": rule.seed}
    settings = {"model": loaded.name, "dtype": str(dec.dtype).removeprefix("torch."),
                "heads_sha256": _fingerprint(heads), "instructions_sha256": _sha256(json.dumps(instructions).encode()),
                "num_prompts": len(instructions), "max_new_tokens": config.max_new_tokens, "top_k": config.top_k,
                "acceptance": "typical", **rules, "probe_internal": internal.choices}
    stage = Stage(Path(config.out) / PARTS, settings, what="typical calibration", elsewhere="pass a new --out DIR").open()
    todo = [i for i in range(len(instructions)) if not stage.done(f"{i:06d}")]
    bar = _progress(config.progress, len(instructions), len(instructions) - len(todo))
    for i in todo:
        t0 = time.perf_counter()
        table = probe_walk(dec, probe, chat_prompt(tokenizer, instructions[i]), config.max_new_tokens)
        table.insert(0, "prompt_id", pd.Series([i] * len(table), dtype="int32"))
        atomic_write(stage.directory / f"{i:06d}.parquet", lambda p: table.to_parquet(p, index=False))
        stage.finish(f"{i:06d}", {"tokens": len(table), "wall_time_s": time.perf_counter() - t0})
        bar.update(1)
    bar.close()

    names = [f"{i:06d}" for i in range(len(instructions))]
    table = pd.concat([pd.read_parquet(stage.directory / f"{n}.parquet") for n in names], ignore_index=True)
    wall = sum(stage.info(n)["wall_time_s"] for n in names)
    meta = {"model": loaded.name, "model_source": loaded.source, "heads": config.heads or "default",
            "acceptance": "typical", **rules, "num_heads": heads.num_heads, "prompts": str(source),
            "limit": config.limit, "first": config.first, "num_prompts": len(instructions), "num_tokens": len(table),
            "top_k": config.top_k,
            "max_new_tokens": config.max_new_tokens, "dtype": settings["dtype"], "device": dec.device.type,
            "probe_nodes": len(probe), "probe_internal": internal.choices, "probe": probe.choices,
            "wall_time_s": round(wall, 3), "tokens_per_s": round(len(table) / max(wall, 1e-9), 2),
            "versions": versions(), "settings": stage.settings}
    atomic_write(Path(config.out) / fmt.TYPICAL, lambda p: table.to_parquet(p, index=False))
    write_text(Path(config.out) / fmt.META, json.dumps(meta, indent=2) + "\n")
    return Path(config.out)
