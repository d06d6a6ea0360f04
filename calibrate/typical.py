"""`treeopt calibrate --acceptance typical`: a record to replay Medusa's typical acceptance on.

Under typical acceptance (temperature T > 0) a step accepts a tree node when its token's probability
under its parent's distribution exceeds min(posterior_threshold, posterior_alpha * exp(-entropy)),
takes the longest path of accepted nodes (the most likely among the longest), and samples the next
root from the typical-truncated distribution. The text itself depends on the tree, so no single
continuation fixes every tree's steps, as the greedy record's does.

The probe decode. Each prompt is decoded by the real decoder under the rule, seeded, with a large
*probe* tree P, and every step logs, for every node of P, whether its token passes the typical test
(one row per step: its start position, root and the ``a{i}`` columns of typical.parquet,
treeopt.core.record). P = the internal tree (`probe_internal`, default top-4 x top-2 x top-1) plus
every child, of rank < top_k, of the root and of each internal node, down to the heads' depth.

Exact: at every logged step, the nodes any subtree S of P accepts from that step's prefix and root
(the longest path of S whose nodes and ancestors all pass), so the depth d_S it accepts there;
tests/test_typical.py checks this against the decoder at logged steps.
Estimated: S's tokens/step = 1 + mean of d_S over the logged steps, i.e. S's own steps are taken to
start where P's did. They do not: S accepts less, so its steps start inside P's runs, after text S
chose. Measured (benchmarks/bench_typical.py, docs/typical.md) on held-out prompts, for
trees not searched on the record; a tree searched on it is predicted by cross-validation over the
record's prompts (search/typical.py), as its in-sample figure is biased up (selection).
A record of a sampled walk (a step with a sampled root at every position of a sampled text) replayed
with S over-predicts more: its test agrees with the decoder's at the decoder's own step starts, but the
sampled text is not the decoder's (docs/typical.md).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import torch

from treeopt.calibrate.run import CalibrationConfig, _progress, _sha256, run_meta, run_settings, select_prompts
from treeopt.decoding.decoder import Acceptance, DecodeResult, TreeDecoder, choose_path
from treeopt.core import record as fmt
from treeopt.core.env import versions
from treeopt.core.errors import TreeoptError
from treeopt.core.fileio import atomic_write, check_writable, locking, write_text
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


class ProbeDecoder(TreeDecoder):
    """The decoder with the probe tree, keeping every step's flags: `steps` [S, n] after `generate`."""

    def accept(self, tokens: torch.Tensor, logits: torch.Tensor, argmax: torch.Tensor | None = None,
               valid: torch.Tensor | None = None) -> torch.Tensor:
        # valid is None: the probe drafts with Medusa heads, every node holds a candidate
        ok, logp = self.flags(tokens, logits, argmax=argmax)  # [N]: the root's entry means nothing
        self.steps.append(ok[1:].cpu())
        return choose_path(self.buf, ok, logp)

    def probe_decode(self, prompt_ids, max_new_tokens: int) -> tuple[pd.DataFrame, DecodeResult]:
        """Decode one prompt (module docstring) -> (step, position and token of its root, a0..a{n-1}
        per step; the decode)."""
        self.steps = []
        result = self.generate(prompt_ids, max_new_tokens)
        accepted = torch.tensor(result.accepted, dtype=torch.long)  # [S]
        start = torch.cumsum(1 + accepted, 0) - 1 - accepted  # [S] each step's root position (in the output)
        table = pd.DataFrame(torch.stack(self.steps).numpy(), columns=fmt.flag_columns(len(self.tree)))  # [S, n]
        table.insert(0, "token", torch.tensor(result.tokens)[start].numpy().astype("int32"))
        table.insert(0, "position", start.numpy().astype("int32"))
        table.insert(0, "step", pd.Series(range(len(table)), dtype="int32"))
        return table, result


@locking("config.out")
def calibrate_typical(config: CalibrationConfig, rule: Acceptance, internal: Tree | None = None, *,
                      loaded=None, heads=None) -> Path:
    """Decode every prompt with the probe tree (module docstring) into `config.out`; resumable by prompt.
    `internal`: the probe's internal nodes (default top-4 x top-2 x top-1); its children go to top_k."""
    from treeopt.decoding.heads import resolve_heads
    from treeopt.decoding.models import chat_prompt, check_context, load_model, stop_token_ids
    from treeopt.core.prompts import default_prompts

    config.check()
    if rule.mode != "typical":
        raise TreeoptError("calibrate_typical needs --acceptance typical")
    source = config.prompts or default_prompts()
    instructions, _ = select_prompts(source, config.limit, config.first, config.seed)
    check_writable(config.out, directory=True, fix="pass another --output-dir")
    loaded = loaded or load_model(config.model, device=config.device, dtype=config.dtype, attention="decode")
    model, tokenizer = loaded.model, loaded.tokenizer
    heads = heads if heads is not None else resolve_heads(config.heads, model)
    prompt_ids = [chat_prompt(tokenizer, s) for s in instructions]
    check_context(model, prompt_ids, config.max_new_tokens, instructions, str(source))
    if internal is None:
        ks = DEFAULT_INTERNAL[: heads.num_heads - 1]
        internal = Tree.cartesian(ks) if ks else Tree(())
    probe = probe_tree(internal, config.top_k, heads.num_heads)
    dec = ProbeDecoder(model, heads, probe, rule, stop_token_ids(model, tokenizer), top_k=config.top_k)
    rules = {"temperature": rule.temperature, "posterior_threshold": rule.posterior_threshold,
             "posterior_alpha": rule.posterior_alpha, "seed": rule.seed}
    settings = run_settings(config, loaded.name, str(dec.dtype).removeprefix("torch."), heads,
                            instructions_sha256=_sha256(json.dumps(instructions).encode()), num_prompts=len(instructions),
                            acceptance="typical", record="probe decode", **rules, probe_internal=internal.choices)
    stage = Stage(Path(config.out) / PARTS, settings, what="typical calibration", elsewhere="pass a new --output-dir DIR").open()
    todo = [i for i in range(len(instructions)) if not stage.done(f"{i:06d}")]
    bar = _progress(config.progress, len(instructions), len(instructions) - len(todo))
    for i in todo:
        t0 = time.perf_counter()
        table, result = dec.probe_decode(prompt_ids[i], config.max_new_tokens)
        table.insert(0, "prompt_id", pd.Series([i] * len(table), dtype="int32"))
        atomic_write(stage.directory / f"{i:06d}.parquet", lambda p: table.to_parquet(p, index=False))
        stage.finish(f"{i:06d}", {"tokens": len(result.tokens), "steps": result.steps,
                                  "wall_time_s": time.perf_counter() - t0})
        bar.update(1)
    bar.close()

    names = [f"{i:06d}" for i in range(len(instructions))]
    table = pd.concat([pd.read_parquet(stage.directory / f"{n}.parquet") for n in names], ignore_index=True)
    wall, tokens = (sum(stage.info(n)[k] for n in names) for k in ("wall_time_s", "tokens"))
    meta = run_meta(config, loaded, stage.settings, "typical", str(source), len(instructions), dec.device.type,
                    **rules, num_tokens=tokens, num_steps=len(table),
                    probe_tokens_per_step=round(tokens / max(len(table), 1), 4), probe_nodes=len(probe),
                    probe_internal=internal.choices, probe=probe.choices, wall_time_s=round(wall, 3),
                    tokens_per_s=round(tokens / max(wall, 1e-9), 2), versions=versions())
    atomic_write(Path(config.out) / fmt.TYPICAL, lambda p: table.to_parquet(p, index=False))
    write_text(Path(config.out) / fmt.META, json.dumps(meta, indent=2) + "\n")
    return Path(config.out)
