"""`treeopt calibrate`: run the base model greedily over a prompt set and record every head's ranks.

One pass per batch: treeopt.decoding.generate's batched greedy loop makes the continuations (a row that stops
takes the next prompt at once) and hands back the hidden states it computed on the way (the same
states a teacher-forced forward of prompt + continuation gives, up to float rounding), and the heads
rank the true tokens on them (calibrate/ranks.py); another drafter (`--drafter ngram` or `draft:MODEL`,
treeopt.decoding.drafters) ranks them by its own `ranks`, fed the true prefix at every depth, into the
same files (`drafter_ranks`). Prompts go in shards of `shard_size` under
DIR/shards/, each written atomically with a manifest of the run's settings, so an interrupted run
resumes where it stopped; the final files are written by treeopt.core.record.

Started by `accelerate launch -m treeopt calibrate ...` (or `torchrun`), each process takes every
P-th shard (one GPU each, or the CPU), and process 0 merges them once all are written: the same
files as one process makes. `run_shards` is that loop, shared with calibrate/teacher.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd
import torch

from treeopt.core import record as fmt
from treeopt.calibrate.ranks import head_ranks, head_targets
from treeopt.core.errors import TreeoptError
from treeopt.core.fileio import atomic_write, check_writable, locking
from treeopt.core.stage import Stage, differences
from treeopt.core.env import versions
from treeopt.core.settings import CalibrationConfig  # noqa: F401  (its home: the settings of every command)
from treeopt.decoding.generate import Continuation

log = logging.getLogger(__name__)
SHARDS = "shards"
TIMING = ("wall_time_s", "cpu_time_s", "ranks_time_s", "tokens_per_s")  # the only fields of calibration.json that differ between reruns


def run_settings(config: CalibrationConfig, name: str, dtype: str, heads, **own) -> dict:
    """The settings a calibration run resumes under (its parts' manifest, calibration.json's `settings`):
    the keys every calibrator shares, then its own (`own`). `heads`: MedusaHeads, or another drafter
    (treeopt.decoding.drafters), recorded by its spec and fingerprint."""
    from treeopt.decoding.drafters import Drafter

    if isinstance(heads, Drafter):
        drafter = {"drafter": str(config.drafter), "drafter_sha256": heads.describe()["sha256"],
                   "num_heads": config.draft_depth}
    else:
        drafter = {"heads_sha256": _fingerprint(heads), "num_heads": heads.num_heads}
    return {"model": name, "dtype": dtype, **drafter, "max_new_tokens": config.max_new_tokens, "top_k": config.top_k,
            **own}


def run_meta(config: CalibrationConfig, loaded, settings: dict, acceptance: str, prompts: str, num_prompts: int,
             device: str, **own) -> dict:
    """calibration.json of every calibrator (greedy, teacher-forced, typical): the keys they share, then
    their own (`own`), then the `settings` the run resumes under."""
    from treeopt.core.drafter import parse_drafter

    kind = parse_drafter(config.drafter).kind
    drafter = {"kind": kind, "source": (config.heads or "default") if kind == "heads" else str(parse_drafter(config.drafter)),
               "sha256": settings.get("heads_sha256") or settings.get("drafter_sha256")}
    return {"model": loaded.name, "model_source": loaded.source,
            "heads": (config.heads or "default") if kind == "heads" else None, "drafter": drafter, "acceptance": acceptance, "num_heads": settings["num_heads"], "prompts": prompts, "limit": config.limit,
            "first": config.first, "num_prompts": num_prompts, "top_k": config.top_k,
            "max_new_tokens": config.max_new_tokens, "seed": config.seed, "dtype": settings["dtype"], "device": device,
            **own, "settings": settings}


@locking("config.out")
def calibrate(config: CalibrationConfig, *, loaded=None, heads=None,
              on_shard: Callable[[int], None] | None = None) -> Path:
    """Run a calibration into `config.out` and return that directory (its files: `treeopt.core.record`).

    `loaded` (treeopt.decoding.models.LoadedModel) and `heads` (MedusaHeads) skip loading them; `on_shard(i)` is
    called after shard i is written (progress hooks, tests)."""
    from treeopt.core.drafter import parse_drafter
    from treeopt.decoding.models import chat_prompt, check_context, stop_token_ids
    from treeopt.core.prompts import default_prompts

    config.check()
    if parse_drafter(config.drafter).kind == "ngram":  # one candidate per depth: rank 0 or a miss
        config = replace(config, top_k=1)
    source = config.prompts or default_prompts()
    instructions, sources = select_prompts(source, config.limit, config.first, config.seed)
    check_writable(config.out, directory=True, fix="pass another --output-dir")
    procs = processes()
    loaded, heads = load(config, procs, loaded, heads)
    model, tokenizer = loaded.model, loaded.tokenizer
    lm_head = model.get_output_embeddings()

    B = config.batch_size
    shard_size = -(-config.shard_size // B) * B  # whole batches: shards do not change how prompts are batched
    settings = run_settings(config, loaded.name, str(lm_head.weight.dtype).removeprefix("torch."), heads,
                            instructions_sha256=_sha256(json.dumps(instructions).encode()), num_prompts=len(instructions),
                            batch_size=B, shard_size=shard_size, seed=config.seed)
    torch.manual_seed(config.seed)
    stop = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop)
    n = len(instructions)
    prompt_ids = [chat_prompt(tokenizer, s) for s in instructions]
    check_context(model, prompt_ids, config.max_new_tokens, instructions, str(source))

    def shard(ids: range) -> Iterator[list[Unit]]:
        prompts = [prompt_ids[i] for i in ids]
        hidden = getattr(heads, "needs_hidden", True)  # Medusa heads, and drafters that read them
        for batch_ids, batch in zip(_batched(ids, B), _continuations(model, prompts, config.max_new_tokens, stop, B, pad, hidden)):
            yield [Unit(pid, instructions[pid], c) for pid, c in zip(batch_ids, batch)]

    merged = run_shards(Path(config.out), settings, n, shard_size, shard, heads, lm_head, config.top_k, procs,
                        config.progress, on_shard)
    if merged is not None:  # the main process writes the final files
        merged[1]["source"] = [sources[i] for i in merged[1]["prompt_id"]]
        write_merged(config.out, merged, run_meta(config, loaded, settings, "greedy", str(source), n,
                                                  lm_head.weight.device.type, batch_size=B))
    procs.wait()  # the others return once the files are there
    return Path(config.out)


def select_prompts(source: str, limit: int | None = None, first: int | None = None,
                   seed: int = 0) -> tuple[list[str], list[str]]:
    """(instructions, sources) to calibrate on: `limit` drawn at random across the file's sources
    (`treeopt.core.prompts.stratified_sample`, seeded), or the `first` ones, or all."""
    from treeopt.core.prompts import load_prompts, stratified_sample

    instructions, sources = load_prompts(source)
    keep = stratified_sample(sources, limit, seed) if limit is not None else range(min(first or len(sources), len(sources)))
    return [instructions[i] for i in keep], [sources[i] for i in keep]


# ---- shards, split over processes, and their merge (shared with calibrate/teacher.py) --------

def load(config: CalibrationConfig, procs: "Processes", loaded=None, heads=None):
    """The model (on this process's device when `accelerate launch` started several) and the heads, checked."""
    from treeopt.core.drafter import parse_drafter
    from treeopt.decoding.drafters import HeadsDrafter
    from treeopt.decoding.heads import resolve_heads
    from treeopt.decoding.models import load_model

    if procs.count > 1 and config.device_map:
        raise TreeoptError(f"--device-map in {procs.count} processes would spread a whole model over every GPU in each: "
                           "launch one process with --device-map auto, or several without it (one GPU each)")
    device = procs.device if procs.count > 1 and config.device == "auto" else config.device
    loaded = loaded or load_model(config.model, device=device, dtype=config.dtype,
                                  device_map=config.device_map, max_memory=config.max_memory)
    if parse_drafter(config.drafter).kind != "heads":  # another drafter: in place of the heads
        from treeopt.decoding.drafters import resolve_drafter

        heads = heads if heads is not None else resolve_drafter(config.drafter, loaded.model)
    else:
        spec = parse_drafter(config.drafter).path or config.heads
        heads = heads if heads is not None else resolve_heads(spec, loaded.model)
        if isinstance(heads, HeadsDrafter):  # its Medusa heads, ranked by head_ranks
            heads = heads.heads
        heads.check_compatible(loaded.model)
    vocab = loaded.model.get_output_embeddings().weight.shape[0]
    if config.top_k > vocab:
        raise TreeoptError(f"--top-k {config.top_k} exceeds the vocabulary ({vocab}): pass a smaller one")
    return loaded, heads


@dataclass(frozen=True)
class Unit:
    """One prompt's text and tokens, and the hidden states its heads are ranked on."""

    prompt_id: int
    instruction: str
    continuation: Continuation  # prompt_ids, tokens, stopped, hidden [T, H]


@dataclass(frozen=True)
class Processes:
    """This process's place among those `accelerate launch` started (one process when not launched)."""

    index: int = 0
    count: int = 1
    wait: Callable[[], None] = lambda: None  # returns when every process has called it
    device: str | None = None  # the device accelerate gives this process (one GPU each, or the CPU)


def processes() -> Processes:
    """From the launcher's environment (`accelerate launch`, `torchrun`): gloo on CPUs, nccl on GPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes()
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return Processes(state.process_index, state.num_processes, state.wait_for_everyone, str(state.device))


def run_shards(out: Path, settings: dict, n: int, shard_size: int, shard: Callable[[range], Iterator[list[Unit]]],
               heads, lm_head, top_k: int, procs: Processes = Processes(), progress: bool = False,
               on_shard: Callable[[int], None] | None = None) -> tuple[pd.DataFrame, pd.DataFrame, list[dict]] | None:
    """Rank units 0..n-1 in shards of `shard_size` (`shard(ids)` yields their batches), shard i on process
    i mod procs.count, each written atomically and marked done under out/shards/ (a rerun skips it).
    Returns the merged (ranks, continuations, shard infos) on process 0 once every shard is done, else None."""
    stage = _claim(out, settings) if procs.index == 0 else None
    procs.wait()  # the others open the directory process 0 has claimed
    stage = stage or _claim(out, settings)
    parts = [range(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]  # unit ids of each shard
    mine = parts[procs.index::procs.count]
    for name, why in stage.broken().items():
        if name in {_name(ids.start) for ids in mine}:
            log.warning(f"calibration shard {name}: {why}: redoing it")
    todo = [ids for ids in mine if not stage.done(_name(ids.start))]
    bar = _progress(progress and procs.index == 0, sum(map(len, mine)), sum(map(len, mine)) - sum(map(len, todo)))
    done_tokens, t0 = 0, time.perf_counter()
    for ids in todo:
        t_shard, cpu_shard, ranks, conts, ranks_time = time.perf_counter(), time.process_time(), [], [], 0.0
        for batch in shard(ids):
            t_ranks = time.perf_counter()
            r = drafter_ranks(heads, lm_head, batch, top_k, settings["num_heads"])
            ranks_time += time.perf_counter() - t_ranks
            ranks += [_rank_frame(u.prompt_id, ri) for u, ri in zip(batch, r)]
            conts += [{"prompt_id": u.prompt_id, "instruction": u.instruction, "prompt_ids": u.continuation.prompt_ids,
                       "tokens": u.continuation.tokens, "stopped": u.continuation.stopped} for u in batch]
            done_tokens += sum(len(u.continuation.tokens) for u in batch)
            bar.set_postfix_str(f"{done_tokens / (time.perf_counter() - t0):.1f} tok/s", refresh=False)
        bar.update(len(ids))
        ranks = pd.concat(ranks, ignore_index=True)
        _write_shard(stage, ids.start, ranks, pd.DataFrame(conts).astype({"prompt_id": "int32"}),
                     {"prompts": [ids.start, ids.stop], "tokens": len(ranks), "process": procs.index,
                      "wall_time_s": time.perf_counter() - t_shard, "cpu_time_s": time.process_time() - cpu_shard,
                      "ranks_time_s": ranks_time})
        if on_shard is not None:
            on_shard(ids.start // shard_size)
    bar.close()
    procs.wait()  # every shard is written
    return _read_shards(stage, [ids.start for ids in parts]) if procs.index == 0 else None


def drafter_ranks(heads, lm_head, batch: list[Unit], top_k: int, depth: int) -> list[torch.Tensor]:
    """Ranks [T_i, depth] of each unit's continuation: Medusa heads on its hidden states (batch_ranks),
    another drafter (treeopt.decoding.drafters) by its own `ranks`, fed the true prefix."""
    from treeopt.decoding.drafters import Drafter

    if isinstance(heads, Drafter):
        return [heads.ranks(u.continuation.prompt_ids, u.continuation.tokens, top_k, depth, u.continuation.hidden)
                for u in batch]
    return batch_ranks(heads, lm_head, [u.continuation.hidden for u in batch], [u.continuation.tokens for u in batch], top_k)


def batch_ranks(heads, lm_head, hidden: list[torch.Tensor], tokens: list[list[int]], top_k: int) -> list[torch.Tensor]:
    """Ranks [T_i, K] of continuations i (hidden [T_i, H], tokens y_0..y_{T_i-1}), in one head_ranks call."""
    weight = lm_head.weight
    targets = torch.cat([head_targets(torch.tensor(t), heads.num_heads) for t in tokens], 1)  # [K, N]
    ranks = head_ranks(heads, lm_head, torch.cat(hidden).to(weight), targets.to(weight.device), top_k)  # [N, K]
    return list(ranks.cpu().split([len(t) for t in tokens]))


def _continuations(model, prompts, max_new_tokens, stop, batch_size, pad, with_hidden: bool = True):
    """greedy_continuations, in prompt order, in groups of `batch_size`."""
    from treeopt.decoding.generate import greedy_continuations

    it = greedy_continuations(model, prompts, max_new_tokens, stop, batch_size, pad, with_hidden=with_hidden)
    while batch := list(islice(it, batch_size)):
        yield batch


def _batched(ids: range, size: int):
    return (ids[i:i + size] for i in range(0, len(ids), size))


def _rank_frame(prompt_id: int, ranks: torch.Tensor) -> pd.DataFrame:
    T, K = ranks.shape
    df = pd.DataFrame({"prompt_id": pd.Series([prompt_id] * T, dtype="int32"),
                       "position": pd.Series(range(T), dtype="int32")})
    for k, col in enumerate(fmt.rank_columns(K)):
        df[col] = ranks[:, k].numpy()
    return df


# ---- the shards directory -------------------------------------------------------------------

def _name(start: int) -> str:
    return f"{start:06d}"


def _claim(out: Path, settings: dict) -> Stage:
    """Make `out` this run's, or find it already is: never mix two runs' shards, never overwrite a
    calibration made with other settings."""
    stage = Stage(out / SHARDS, settings, what="calibration", elsewhere="pass a new --output-dir DIR")
    if stage.recorded() is None and (out / fmt.META).is_file():  # finished, shards since deleted
        try:
            theirs = fmt.read_meta(out).get("settings") or {}
        except TreeoptError:  # damaged: the rerun's files replace it
            theirs = {}
        if theirs != stage.settings:
            raise TreeoptError(f"{out} holds a calibration made with other settings "
                               f"({differences(theirs, stage.settings)}): pass a new --output-dir DIR")
    elif stage.recorded() is None and any((out / f).exists() for f in (fmt.RANKS, fmt.ACCURACY, fmt.CONTINUATIONS)):
        raise TreeoptError(f"{out} already holds calibration files of unknown origin: pass a new --output-dir DIR")
    return stage.open()


def _write_shard(stage: Stage, start: int, ranks: pd.DataFrame, conts: pd.DataFrame, info: dict) -> None:
    files = [stage.directory / f"{_name(start)}.{kind}.parquet" for kind in ("ranks", "continuations")]
    for path, table in zip(files, (ranks, conts)):
        atomic_write(path, lambda p: table.to_parquet(p, index=False))
    stage.finish(_name(start), info, files=files)  # last: marks the shard done


def _read_shards(stage: Stage, starts) -> tuple[pd.DataFrame, pd.DataFrame, list[dict]]:
    d = stage.directory
    try:
        ranks = pd.concat([pd.read_parquet(d / f"{_name(s)}.ranks.parquet") for s in starts], ignore_index=True)
        conts = pd.concat([pd.read_parquet(d / f"{_name(s)}.continuations.parquet") for s in starts],
                          ignore_index=True)
        parts = [stage.info(_name(s)) for s in starts]
        if any(p is None for p in parts):
            raise ValueError("a shard's marker is missing")
    except Exception as e:  # pyarrow/json raise many types for a damaged shard
        raise TreeoptError(f"a shard under {d} is damaged ({type(e).__name__}): delete that shard's "
                           "files and run again to redo it") from None
    return ranks, conts, parts


def write_merged(out: str | Path, merged: tuple[pd.DataFrame, pd.DataFrame, list[dict]], meta: dict) -> Path:
    """The final files of a run from its merged shards; `meta` gains the counts, timings and versions."""
    ranks, conts, infos = merged
    wall = sum(i["wall_time_s"] for i in infos)
    return fmt.write_calibration(out, ranks, conts, {
        **meta, "num_tokens": len(ranks), "num_stopped": int(conts["stopped"].sum()),
        "wall_time_s": round(wall, 3), "cpu_time_s": round(sum(i.get("cpu_time_s", 0.0) for i in infos), 3),
        "ranks_time_s": round(sum(i["ranks_time_s"] for i in infos), 3),
        "tokens_per_s": round(len(ranks) / max(wall, 1e-9), 2), "versions": versions()})


# ---- small helpers --------------------------------------------------------------------------

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fingerprint(heads) -> str:
    """sha256 of the heads' config and weights: a resumed run must use the very same heads."""
    from treeopt.decoding.heads import heads_sha256

    return heads_sha256(heads)


def _progress(enabled: bool, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="prompt", desc="calibrate", disable=not enabled,
                dynamic_ncols=True)
