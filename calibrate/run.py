"""`treeopt calibrate`: run the base model greedily over a prompt set and record every head's ranks.

One pass per batch: decoding.generate's batched greedy loop makes the continuations (a row that stops
takes the next prompt at once) and hands back the hidden states it computed on the way (the same
states a teacher-forced forward of prompt + continuation gives, up to float rounding), and the heads
rank the true tokens on them (calibrate/ranks.py). Prompts go in shards of `shard_size` under
DIR/shards/, each written atomically with a manifest of the run's settings, so an interrupted run
resumes where it stopped; the final files are written by calibrate/format.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from treeopt.core import record as fmt
from calibrate.ranks import head_ranks, head_targets
from treeopt.core.errors import TreeoptError
from treeopt.core.fileio import atomic_write, check_writable
from treeopt.core.stage import Stage, differences
from treeopt.core.env import versions
from decoding.models import DEFAULT_MODEL

log = logging.getLogger(__name__)
SHARDS = "shards"
TIMING = ("wall_time_s", "ranks_time_s", "tokens_per_s")  # the only fields of calibration.json that differ between reruns


@dataclass(frozen=True)
class CalibrationConfig:
    out: str | Path = "calibration"
    model: str = DEFAULT_MODEL
    heads: str | None = None  # a directory, `random`, or None for the heads shipped for the bundled model
    prompts: str | None = None  # `alpaca_eval`, a .json/.jsonl path; None: the local AlpacaEval copy, else the hub's
    limit: int | None = None
    max_new_tokens: int = 256
    top_k: int = 10
    batch_size: int = 8
    shard_size: int = 32  # prompts per shard, rounded up to a multiple of batch_size
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    progress: bool = True

    def check(self) -> None:
        for name, lo in (("max_new_tokens", 1), ("top_k", 1), ("batch_size", 1), ("shard_size", 1), ("limit", 1)):
            value = getattr(self, name)
            if value is not None and value < lo:
                raise TreeoptError(f"--{name.replace('_', '-')} is {value}: pass a number >= {lo}")
        if self.top_k > 32767:
            raise TreeoptError(f"--top-k {self.top_k} is too large: ranks are stored as int16, pass at most 32767")


def calibrate(config: CalibrationConfig, *, loaded=None, heads=None,
              on_shard: Callable[[int], None] | None = None) -> Path:
    """Run a calibration into `config.out` and return that directory (see calibrate/format.py).

    `loaded` (decoding.models.LoadedModel) and `heads` (MedusaHeads) skip loading them; `on_shard(i)` is
    called after shard i is written (progress hooks, tests)."""
    from decoding.heads import resolve_heads
    from decoding.models import chat_prompt, load_model, stop_token_ids
    from treeopt.core.prompts import default_prompts, load_instructions

    config.check()
    source = config.prompts or default_prompts()
    instructions = load_instructions(source, limit=config.limit)
    check_writable(config.out, directory=True, fix="pass another --out")
    loaded = loaded or load_model(config.model, device=config.device, dtype=config.dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    heads = heads if heads is not None else resolve_heads(config.heads, model)
    heads.check_compatible(model)
    lm_head = model.get_output_embeddings()
    if config.top_k > lm_head.weight.shape[0]:
        raise TreeoptError(f"--top-k {config.top_k} exceeds the vocabulary ({lm_head.weight.shape[0]}): pass a smaller one")

    B = config.batch_size
    shard_size = -(-config.shard_size // B) * B  # whole batches: shards do not change how prompts are batched
    settings = {
        "model": loaded.name, "dtype": str(lm_head.weight.dtype).removeprefix("torch."),
        "heads_sha256": _fingerprint(heads), "num_heads": heads.num_heads,
        "instructions_sha256": _sha256(json.dumps(instructions).encode()), "num_prompts": len(instructions),
        "max_new_tokens": config.max_new_tokens, "top_k": config.top_k, "batch_size": B,
        "shard_size": shard_size, "seed": config.seed,
    }
    out = Path(config.out)
    stage = _claim(out, settings)

    torch.manual_seed(config.seed)
    stop = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop)
    n = len(instructions)
    parts = [range(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]  # prompt ids of each shard
    for name, why in stage.broken().items():
        log.warning(f"calibration shard {name}: {why}: redoing it")
    todo = [ids for ids in parts if not stage.done(_name(ids.start))]
    bar = _progress(config.progress, n, n - sum(len(ids) for ids in todo))
    done_tokens, t0 = 0, time.perf_counter()
    for ids in todo:
        t_shard = time.perf_counter()
        prompts = [chat_prompt(tokenizer, instructions[i]) for i in ids]
        ranks, conts, ranks_time = [], [], 0.0
        for batch_ids, batch in zip(_batched(ids, B), _continuations(model, prompts, config.max_new_tokens, stop, B, pad)):
            t_ranks = time.perf_counter()
            r = batch_ranks(heads, lm_head, [c.hidden for c in batch], [c.tokens for c in batch], config.top_k)
            ranks_time += time.perf_counter() - t_ranks
            ranks += [_rank_frame(pid, ri) for pid, ri in zip(batch_ids, r)]
            conts += [{"prompt_id": pid, "instruction": instructions[pid], "prompt_ids": c.prompt_ids,
                       "tokens": c.tokens, "stopped": c.stopped} for pid, c in zip(batch_ids, batch)]
            done_tokens += sum(len(c.tokens) for c in batch)
            bar.update(len(batch))
            bar.set_postfix_str(f"{done_tokens / (time.perf_counter() - t0):.1f} tok/s")
        ranks = pd.concat(ranks, ignore_index=True)
        _write_shard(stage, ids.start, ranks, pd.DataFrame(conts).astype({"prompt_id": "int32"}),
                     {"prompts": [ids.start, ids.stop], "tokens": len(ranks),
                      "wall_time_s": time.perf_counter() - t_shard, "ranks_time_s": ranks_time})
        if on_shard is not None:
            on_shard(ids.start // shard_size)
    bar.close()

    ranks, conts, infos = _read_shards(stage, [ids.start for ids in parts])
    wall = sum(i["wall_time_s"] for i in infos)
    meta = {
        "model": loaded.name, "model_source": loaded.source, "heads": config.heads or "default",
        "num_heads": heads.num_heads, "prompts": str(source), "limit": config.limit,
        "num_prompts": n, "num_tokens": len(ranks), "num_stopped": int(conts["stopped"].sum()),
        "top_k": config.top_k, "max_new_tokens": config.max_new_tokens, "batch_size": B, "seed": config.seed,
        "dtype": settings["dtype"], "device": str(lm_head.weight.device.type),
        "wall_time_s": round(wall, 3), "ranks_time_s": round(sum(i["ranks_time_s"] for i in infos), 3),
        "tokens_per_s": round(len(ranks) / max(wall, 1e-9), 2),
        "versions": versions(), "settings": settings,
    }
    return fmt.write_calibration(out, ranks, conts, meta)


def batch_ranks(heads, lm_head, hidden: list[torch.Tensor], tokens: list[list[int]], top_k: int) -> list[torch.Tensor]:
    """Ranks [T_i, K] of continuations i (hidden [T_i, H], tokens y_0..y_{T_i-1}), in one head_ranks call."""
    weight = lm_head.weight
    targets = torch.cat([head_targets(torch.tensor(t), heads.num_heads) for t in tokens], 1)  # [K, N]
    ranks = head_ranks(heads, lm_head, torch.cat(hidden).to(weight), targets.to(weight.device), top_k)  # [N, K]
    return list(ranks.cpu().split([len(t) for t in tokens]))


def _continuations(model, prompts, max_new_tokens, stop, batch_size, pad):
    """greedy_continuations, in prompt order, in groups of `batch_size`."""
    from decoding.generate import greedy_continuations

    it = greedy_continuations(model, prompts, max_new_tokens, stop, batch_size, pad, with_hidden=True)
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
    stage = Stage(out / SHARDS, settings, what="calibration", elsewhere="pass a new --out DIR")
    if stage.recorded() is None and (out / fmt.META).is_file():  # finished, shards since deleted
        try:
            theirs = json.loads((out / fmt.META).read_text()).get("settings") or {}
        except json.JSONDecodeError:
            theirs = {}
        if theirs != stage.settings:
            raise TreeoptError(f"{out} holds a calibration made with other settings "
                               f"({differences(theirs, stage.settings)}): pass a new --out DIR")
    elif stage.recorded() is None and any((out / f).exists() for f in (fmt.RANKS, fmt.ACCURACY, fmt.CONTINUATIONS)):
        raise TreeoptError(f"{out} already holds calibration files of unknown origin: pass a new --out DIR")
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


# ---- small helpers --------------------------------------------------------------------------

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fingerprint(heads) -> str:
    """sha256 of the heads' config and weights: a resumed run must use the very same heads."""
    h = hashlib.sha256(json.dumps(asdict(heads.config), sort_keys=True).encode())
    for name, t in sorted(heads.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _progress(enabled: bool, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="prompt", desc="calibrate", disable=not enabled,
                dynamic_ncols=True)
