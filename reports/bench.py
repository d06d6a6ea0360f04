"""`treeopt bench`: plain greedy vs tree decoding on the same prompts, in the Medusa paper's terms.

The baseline, `plain`, is greedy decoding through the same engine as the trees (the decoder with an
empty tree: same dtype, same static cache, same compiled step), so the speedup is the tree's alone;
`hf-generate` (plain `model.generate`) is a second reference. Per prompt, every method runs in turn
(interleaved, so machine load drifts hit all alike), after a warm-up (which also compiles), under the
same stop rules (max new tokens, the model's EOS ids). Prefill is timed apart; decoding time is
everything after the first new token is known.

Columns (one row per method; plain first): method, nodes, depth, tokens_per_step (new tokens ÷ steps;
1 for plain), step_ms (decoding time ÷ forwards after prefill), overhead (step_ms ÷ plain step_ms),
tokens_per_s (new tokens ÷ decoding time), speedup (tokens_per_s ÷ plain's), prefill_ms (mean per
prompt), match_rate (fraction of prompts whose output equals plain's token for token: 1 in float32;
in bfloat16 a tree's wider GEMMs round differently, so a near-tie between two tokens can flip),
first_divergence (the earliest token index at which some prompt's output differs from plain's; empty
when all match), predicted_tokens_per_step (with --calibration: the tree's exact greedy replay on the
calibration's continuations; a tree searched on that calibration gets its cross-validated figure from
`treeopt search`, this one is in-sample), forward_ms (the
model's work per step — tree forward + heads — timed inside the decoding steps; for plain, as
profiled), loop_efficiency (tokens_per_s ÷ (tokens_per_step ÷ forward_ms) = forward_ms ÷ step_ms:
the share of a step spent in the model), profiled_forward_ms (median of separate forwards at this
tree size and the run's median context, as `treeopt profile` times them), prompts, new_tokens, steps.
bench.json's `first_token_s`: seconds from the process's start to its first decoded token (model load,
any compiling, the first prefill), where the system says when the process started.
"""

from __future__ import annotations

import json
import logging
import shutil
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from treeopt.decoding.models import set_threads
from treeopt.decoding.decoder import GREEDY, Acceptance, DecodeResult, TreeDecoder, compiles_by_default, engine_ran, greedy_reference
from treeopt.decoding.profile import time_step_forward
from treeopt.core.env import process_age_s, versions
from treeopt.core.errors import TreeoptError
from treeopt.core.fileio import check_writable, locking, write_text
from treeopt.core.settings import BenchConfig
from treeopt.core.stage import Stage
from treeopt.core.tree import Tree

log = logging.getLogger(__name__)
PLAIN = "plain"
HF = "hf-generate"
CSV = "bench.csv"
JSON = "bench.json"
RECORDS = ".bench-records"  # the resumable stage of an unfinished run
COLUMNS = ["method", "nodes", "depth", "tokens_per_step", "step_ms", "overhead", "speedup", "tokens_per_s",
           "prefill_ms", "match_rate", "first_divergence", "predicted_tokens_per_step", "forward_ms",
           "loop_efficiency", "profiled_forward_ms", "prompts", "new_tokens", "steps"]


def parse_cartesian(spec: str) -> tuple[str, Tree]:
    """'2x3' -> ('cartesian-2x3', Tree.cartesian([2, 3]))."""
    if not re.fullmatch(r"\d+(x\d+)*", spec.strip()):
        raise TreeoptError(f"--cartesian {spec!r}: write top-k per depth joined by x, e.g. 2x3 or 3x2x2")
    ks = [int(k) for k in spec.strip().split("x")]
    return f"cartesian-{spec.strip()}", Tree.cartesian(ks)


def tree_methods(trees=(), cartesian=()) -> dict[str, Tree]:
    """Method name -> Tree, from tree specs (files: their stem) and Cartesian specs ('2x3,3x2x2')."""
    from treeopt.core.treefile import read_tree

    methods: dict[str, Tree] = {}
    for spec in trees:
        name = Path(str(spec).partition(":")[0]).stem if Path(str(spec).partition(":")[0]).suffix else str(spec)
        if name in methods or name == PLAIN:
            name = f"{name}-{len(methods)}"
        methods[name] = read_tree(spec)
    for group in cartesian:
        for part in str(group).split(","):
            if part.strip():
                name, tree = parse_cartesian(part)
                methods[name] = tree
    return methods


@dataclass
class Record:
    """One method on one prompt."""

    method: str
    prompt: int
    tokens: list[int]
    steps: int
    prefill_s: float
    decode_s: float
    model_s: float = 0.0

    @classmethod
    def of(cls, method: str, prompt: int, r: DecodeResult) -> "Record":
        return cls(method, prompt, r.tokens, r.steps, r.prefill_s, r.decode_s, r.model_s)


@dataclass
class BenchResult:
    table: pd.DataFrame
    settings: dict
    records: list[Record] = field(default_factory=list)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="bench", disable=not enabled, leave=False)


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """The first index at which two token lists differ (a length if one is a prefix of the other), None if equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def bench_decoding(model, heads, trees: dict[str, Tree], prompts: list[list[int]], max_new_tokens: int = 128,
                   stop_ids=None, calibration=None, warmup_tokens: int = 16, repeats: int = 5,
                   progress: bool = False, done: list[Record] | None = None, on_record=None,
                   compiled: bool = False, acceptance: Acceptance = GREEDY) -> BenchResult:
    """Run plain greedy (the engine's and HF generate's) and every tree on every prompt; return the
    table (see the module docstring). `done` holds records of an earlier, interrupted run (skipped);
    `on_record(record)` is called after each new one (to save progress). Trees decode under `acceptance`:
    with typical acceptance (seeded, so reruns give the same tokens) outputs are samples, not plain greedy's."""
    if not prompts:
        raise TreeoptError("no prompts to benchmark: check --prompts and --first")
    for name, tree in trees.items():
        if tree.num_nodes and heads is None:
            raise TreeoptError("bench needs Medusa heads for its trees: pass --heads DIR or --heads random")
    decoders = {name: TreeDecoder(model, heads, tree, acceptance if tree.num_nodes else GREEDY, stop_ids=stop_ids,
                                   time_model=True, compiled=compiled)
                for name, tree in {PLAIN: Tree(()), **trees}.items()}
    methods = [PLAIN, HF, *trees]

    def run(method: str, prompt, limit: int) -> DecodeResult:
        if method == HF:
            return greedy_reference(model, prompt, limit, stop_ids)
        return decoders[method].generate(prompt, limit)

    started = process_age_s()  # the process's age before its first decoded token
    for i, method in enumerate(methods):  # warm-up: allocate caches, settle kernels
        first = run(method, prompts[0], min(warmup_tokens, max_new_tokens))
        if i == 0 and started is not None:
            started += first.prefill_s  # the prefill ends with the first decoded token

    records = {(r.method, r.prompt): r for r in (done or []) if r.method in methods and r.prompt < len(prompts)}
    bar = _progress(len(prompts) * len(methods), progress)
    bar.update(len(records))
    for p, prompt in enumerate(prompts):
        for method in methods:
            if (method, p) in records:
                continue
            rec = Record.of(method, p, run(method, prompt, max_new_tokens))
            records[(method, p)] = rec
            if on_record is not None:
                on_record(rec)
            bar.update(1)
    bar.close()

    # the model's work per step at each tree size, at a typical context length of this run
    plain = [records[(PLAIN, p)] for p in range(len(prompts))]
    context = int(statistics.median(len(prompts[p]) + len(r.tokens) // 2 for p, r in enumerate(plain)))
    profiled = {name: sum(time_step_forward(dec, context, repeats)) for name, dec in decoders.items()}
    profiled[HF] = float("nan")

    rows = []
    for method in methods:
        recs = [records[(method, p)] for p in range(len(prompts))]
        tree = trees.get(method, Tree(()))
        new = sum(len(r.tokens) for r in recs)
        steps = sum(r.steps for r in recs)
        decode_s = sum(r.decode_s for r in recs)
        step_ms = decode_s / max(steps, 1) * 1e3
        diverge = [d for r in recs if (d := first_divergence(r.tokens, plain[r.prompt].tokens)) is not None]
        # the model's work per step: timed inside the decoder's steps (not inside HF generate)
        forward = sum(r.model_s for r in recs) / max(steps, 1) * 1e3 if method != HF else float("nan")
        row = {"method": method, "nodes": tree.num_nodes, "depth": tree.depth,
               "tokens_per_step": new / max(steps, 1) if tree.num_nodes else 1.0,
               "step_ms": step_ms, "tokens_per_s": new / decode_s if decode_s > 0 else float("nan"),
               "prefill_ms": sum(r.prefill_s for r in recs) / len(recs) * 1e3,
               "match_rate": 1 - len(diverge) / len(recs), "first_divergence": min(diverge, default=float("nan")),
               "predicted_tokens_per_step": float("nan"),
               "forward_ms": forward, "loop_efficiency": forward / step_ms if steps else float("nan"),
               "profiled_forward_ms": profiled[method],
               "prompts": len(recs), "new_tokens": new, "steps": steps}
        if calibration is not None:
            row.update(_predicted(tree, calibration))
        rows.append(row)
    table = pd.DataFrame(rows)
    table["overhead"] = table["step_ms"] / table["step_ms"].iloc[0]
    table["speedup"] = table["tokens_per_s"] / table["tokens_per_s"].iloc[0]
    settings = {"max_new_tokens": max_new_tokens, "context_for_forward_ms": context, "warmup_tokens": warmup_tokens,
                "first_token_s": started,
                **engine_ran(decoders.values(), compiled),
                "compile_s": {name: dec.compile_s for name, dec in decoders.items()}}
    return BenchResult(table[COLUMNS], settings, [records[k] for k in sorted(records, key=lambda k: (k[1], methods.index(k[0])))])


def _predicted(tree: Tree, calibration) -> dict:
    """The tree's tokens/step replayed on the calibration (greedy or typical), for trees whose every node
    it sees (else no honest prediction)."""
    from treeopt.core.record import TypicalRecord
    from treeopt.search.source import as_source
    from treeopt.search.typical import Typical

    source = Typical(calibration) if isinstance(calibration, TypicalRecord) else as_source(calibration)
    return {"predicted_tokens_per_step": source.replay(tree).tokens_per_step} if source.sees(tree) else {}


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def run_bench(config: BenchConfig | None = None, progress: bool = True, **settings) -> BenchResult:
    """The CLI's twin: load everything, benchmark, write bench.csv and bench.json into `config.out`
    (`settings`: BenchConfig's fields, instead of `config`). An interrupted run with the same settings
    resumes from `out`/.bench-records/. A calibration must record the same acceptance rule (typical:
    the same temperature and thresholds)."""
    return _run_bench(config or BenchConfig(**settings), progress)


@locking("cfg.out")
def _run_bench(cfg: BenchConfig, progress: bool) -> BenchResult:
    """run_bench's work, holding the lock on `cfg.out`."""
    from treeopt.decoding.heads import resolve_heads
    from treeopt.decoding.models import chat_prompt, check_context, load_model, stop_token_ids
    from treeopt.core.prompts import default_prompts, load_instructions
    from treeopt.core.treefile import checked

    model, heads, prompts, calibration, out = cfg.model, cfg.heads, cfg.prompts, cfg.calibration, cfg.out
    limit, max_new_tokens, repeats, compiled = cfg.first, cfg.max_new_tokens, cfg.repeats, cfg.compiled
    device, dtype, device_map, max_memory = cfg.device, cfg.dtype, cfg.device_map, cfg.max_memory
    acceptance = Acceptance(cfg.acceptance, cfg.temperature, cfg.posterior_threshold, cfg.posterior_alpha, cfg.seed)
    methods = tree_methods(cfg.trees, cfg.cartesian)
    cal = None
    if calibration is not None:
        from treeopt.core.record import check_rule, load_record

        meta = check_rule(calibration, acceptance.mode)
        differ = [k for k in ("temperature", "posterior_threshold", "posterior_alpha")
                  if acceptance.mode == "typical" and meta[k] != getattr(acceptance, k)]
        if differ:
            raise TreeoptError(f"{calibration} was made with {', '.join(f'{k} {meta[k]}' for k in differ)}: "
                               "bench with the same values, or calibrate with these")
        cal = load_record(calibration)
    source = prompts or default_prompts()
    instructions = load_instructions(source, limit)
    if out is not None:
        check_writable(out, directory=True, fix="pass another --output-dir")
    set_threads(cfg.threads)
    loaded = load_model(model, device=device, dtype=dtype, device_map=device_map, max_memory=max_memory,
                        attention="decode")
    from treeopt.decoding.drafters import parse_drafter, resolve_drafter

    spec = parse_drafter(cfg.drafter)
    if spec.kind == "heads":
        medusa = resolve_heads(spec.path or heads, loaded.model)
        if cal is not None:
            from treeopt.decoding.heads import check_record_heads

            from treeopt.core.record import check_drafter

            check_drafter(cal.meta, calibration, "heads", None)
            check_record_heads(cal.meta, calibration, spec.path or heads, loaded.model)
    else:
        medusa = resolve_drafter(spec, loaded.model)  # any other drafter (treeopt.decoding.drafters)
        if cal is not None:
            from treeopt.core.record import check_drafter

            check_drafter(cal.meta, calibration, str(spec), medusa.describe()["sha256"])
    compiled = compiles_by_default(loaded.model) if compiled is None else compiled
    for name, tree in methods.items():
        checked(tree, name, num_heads=getattr(medusa, "num_heads", None))
    ids = [chat_prompt(loaded.tokenizer, s) for s in instructions]
    check_context(loaded.model, ids, max_new_tokens, instructions, str(source))
    stops = stop_token_ids(loaded.model, loaded.tokenizer)
    weight = loaded.model.get_output_embeddings().weight
    settings = {"model": model, "model_source": loaded.source, "heads": heads or "default", "drafter": str(spec),
                "device": str(weight.device), "dtype": str(weight.dtype).removeprefix("torch."),
                "prompts_source": str(source), "limit": limit, "max_new_tokens": max_new_tokens,
                "calibration": str(calibration) if calibration else "", "stop_ids": sorted(stops),
                "threads": torch_threads(), "compiled": compiled, "acceptance": asdict(acceptance),
                "trees": {k: v.choices for k, v in methods.items()}}

    # each (method, prompt) record is a part of a resumable stage
    stage = Stage(Path(out) / RECORDS, settings, what="bench").open(restart=True) if out is not None else None
    save = None if stage is None else (
        lambda rec: stage.finish(f"{rec.method.replace('/', '_')}.{rec.prompt:05d}", asdict(rec)))
    result = bench_decoding(loaded.model, medusa, methods, ids, max_new_tokens, stops, cal, repeats=repeats,
                            progress=progress, done=_saved_records(stage) if stage else [], on_record=save,
                            compiled=compiled,
                            acceptance=acceptance)
    result.settings = {**settings, **result.settings, "versions": versions()}
    if cal is not None and acceptance.mode == "greedy":  # (a typical record keeps no instructions)
        from treeopt.core.prompts import overlap

        result.settings["calibration_overlap"] = overlap(instructions, cal.continuations()["instruction"].tolist())
    if stage is not None:
        write_bench(result, out)
        shutil.rmtree(stage.directory)  # the records are in bench.json now
    return result


def _saved_records(stage: Stage) -> list[Record]:
    """The records an interrupted run saved; a damaged one is said, and redone."""
    records = []
    for part in stage.parts():
        try:
            records.append(Record(**stage.info(part)))
        except TypeError:  # a marker that parses but does not hold a record
            log.warning(f"bench record {part} in {stage.directory} is damaged: redoing it")
    for part, why in stage.broken().items():
        log.warning(f"bench record {part}: {why}: redoing it")
    return records


def write_bench(result: BenchResult, out: str | Path) -> tuple[Path, Path]:
    out = Path(out)
    table = result.table
    csv = write_text(out / CSV, table.to_csv(index=False, float_format="%.6g"))
    per_prompt = [{"method": r.method, "prompt": r.prompt, "new_tokens": len(r.tokens), "steps": r.steps,
                   "prefill_ms": r.prefill_s * 1e3, "decode_ms": r.decode_s * 1e3} for r in result.records]
    rows = json.loads(table.to_json(orient="records"))
    doc = {**result.settings, "rows": rows, "per_prompt": per_prompt}
    js = write_text(out / JSON, json.dumps(doc, indent=1) + "\n")
    return csv, js


def render(result: BenchResult) -> str:
    from treeopt.core.prompts import overlap_warning
    from treeopt.core.tables import render_table

    cols = ["method", "nodes", "tokens_per_step", "step_ms", "overhead", "speedup", "tokens_per_s", "prefill_ms",
            "match_rate", "first_divergence", "predicted_tokens_per_step", "forward_ms", "loop_efficiency", "profiled_forward_ms"]
    t = result.table[cols].copy()
    if t["predicted_tokens_per_step"].isna().all():
        t = t.drop(columns="predicted_tokens_per_step")
    s = result.settings
    compile_s = sum(s.get("compile_s", {}).values())
    head = (f"{s.get('model', '')} on {s.get('device', '')} {s.get('dtype', '')}"
            f"{f', compiled ({compile_s:.0f} s compiling)' if s.get('compiled') else ', eager'}"
            f"{f' ({reason})' if (reason := s.get('engine_reason')) and not s.get('compiled') else ''}: "
            f"{result.table['prompts'].iloc[0]} prompts, up to {s.get('max_new_tokens')} new tokens, "
            + (f"heads {s.get('heads', '')}" if s.get("drafter", "heads") == "heads" else f"drafter {s['drafter']}")
            + (f"; first decoded token {first:.1f} s after the process started" if (first := s.get("first_token_s")) else ""))
    rule = s.get("acceptance") or {}
    if rule.get("mode") == "typical":
        head += (f"; trees under typical acceptance (temperature {rule['temperature']}, posterior_threshold "
                 f"{rule['posterior_threshold']}, posterior_alpha {rule['posterior_alpha']}, seed {rule['seed']})")
    lines = [head, render_table(t)]
    if s.get("calibration_overlap"):
        lines.append(overlap_warning(s["calibration_overlap"], int(result.table["prompts"].iloc[0]), "bench"))
    return "\n".join(lines)
