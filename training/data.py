"""Stage 1 of heads training: prompts (a file, a hub dataset, or `magpie`) -> the base model's greedy
continuations with the hidden states the heads read, in resumable shards; and reading them back
as a corpus."""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from treeopt.training.config import HELD_OUT_EVERY, MAGPIE, SHARD, TrainConfig
from treeopt.core.errors import TreeoptError
from treeopt.core.fileio import atomic_write
from treeopt.core.stage import Stage


# ---------------------------------------------------------------------------------------------
# prompts


def refuse_calibration_set(source: str) -> None:
    if "alpaca_eval" in str(source).lower().replace("-", "_"):
        raise TreeoptError(f"--prompts {source}: AlpacaEval is the calibration/benchmark set, never train heads on "
                           "it; use --prompts magpie or another instruction file")


def magpie_prefix(tokenizer) -> list[int]:
    """Token ids of the chat template up to where a user's message begins (system turn included)."""
    mark = "\u2063MAGPIE\u2063"
    if not getattr(tokenizer, "chat_template", None):
        raise TreeoptError("--prompts magpie needs a tokenizer with a chat template: pass --prompts FILE")
    text = tokenizer.apply_chat_template([{"role": "user", "content": mark}], tokenize=False)
    if mark not in text:
        raise TreeoptError("the chat template drops the user's message: pass --prompts FILE instead of magpie")
    prefix = text[: text.index(mark)]
    return tokenizer(prefix, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def magpie_instructions(model, tokenizer, n: int, seed: int, stop_ids: set[int], temperature: float = 1.0,
                        top_p: float = 0.95, max_tokens: int = 96, min_words: int = 3) -> list[str]:
    """Sample n user turns from the model given only the template's user prefix ("Magpie"); keep the
    ones that end at a stop token and have at least `min_words` words. Deterministic given the seed."""
    prefix = torch.tensor([magpie_prefix(tokenizer)] * n, device=model.device)  # [n, P]
    torch.manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else sorted(stop_ids)[0]
    out = model.generate(input_ids=prefix, attention_mask=torch.ones_like(prefix), do_sample=True,
                         temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_tokens,
                         eos_token_id=sorted(stop_ids), pad_token_id=pad)
    found = []
    for row in out[:, prefix.shape[1]:].tolist():
        end = next((i for i, t in enumerate(row) if t in stop_ids), None)
        if end is None:  # cut off: not a whole instruction
            continue
        text = tokenizer.decode(row[:end], skip_special_tokens=True).strip()
        if len(text.split()) >= min_words:
            found.append(text)
    return found


def _key(text: str) -> str:
    return " ".join(text.lower().split())


# ---------------------------------------------------------------------------------------------
# stage 1: data shards


def _data_fingerprint(cfg: TrainConfig) -> dict:
    keys = ("model", "prompts", "max_new_tokens", "batch_size", "magpie_temperature", "magpie_top_p",
            "magpie_max_tokens", "seed")
    return {k: getattr(cfg, k) for k in keys}


def read_shard(path: Path):
    """(hidden fp16 [N, H], tokens int64 [N], offsets int64 [n+1], prompts list[str])."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        prompts = json.loads(f.metadata()["prompts"])
        return f.get_tensor("hidden"), f.get_tensor("tokens").long(), f.get_tensor("offsets"), prompts


def write_shard(path: Path, conts, prompts: list[str]) -> None:
    from safetensors.torch import save_file

    hidden = torch.cat([c.hidden for c in conts]).to(torch.float16)  # [N, H]
    tokens = torch.tensor([t for c in conts for t in c.tokens], dtype=torch.int32)  # [N]
    offsets = torch.tensor([0] + [len(c.tokens) for c in conts]).cumsum(0)  # [n+1]
    meta = {"prompts": json.dumps(prompts), "stopped": json.dumps([c.stopped for c in conts])}
    atomic_write(path, lambda p: save_file({"hidden": hidden, "tokens": tokens, "offsets": offsets}, p, meta))


def generate_data(cfg: TrainConfig, loaded=None, log=print, progress: bool = False) -> list[Path]:
    """Stage 1: write the shards that are missing under work/data/; return all of them, in order.
    `progress`: a progress bar over the shards (the log then goes through it)."""
    from tqdm.auto import tqdm

    from treeopt.decoding.generate import greedy_continuations
    from treeopt.decoding.models import chat_prompt, load_model, stop_token_ids

    refuse_calibration_set(cfg.prompts)
    data = Path(cfg.work) / "data"
    Stage(data, _data_fingerprint(cfg), what="heads-training data set", manifest_name="data.json",
          elsewhere="use a new --output-dir directory").open()
    num_shards = math.ceil(cfg.num_prompts / cfg.batch_size)
    paths = [data / SHARD.format(i) for i in range(num_shards)]
    if all(p.is_file() for p in paths):
        return paths
    source = None
    if cfg.prompts != MAGPIE:
        from treeopt.core.prompts import load_instructions

        source = load_instructions(cfg.prompts, limit=cfg.num_prompts)
    lm = loaded or load_model(cfg.model, device=cfg.device, dtype="float32")
    model, tok = lm.model, lm.tokenizer
    stops = stop_token_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else sorted(stops)[0]
    seen: set[str] = set()
    start, made, tokens = time.time(), 0, 0
    bar = tqdm(paths, desc="data", unit="shard", disable=not progress)
    if progress:
        log = bar.write
    for i, path in enumerate(bar):
        if path.is_file():
            seen.update(_key(p) for p in read_shard(path)[3])
            continue
        if cfg.max_gen_s is not None and time.time() - start > cfg.max_gen_s:
            log(f"generation stopped after {cfg.max_gen_s:.0f} s at shard {i}/{num_shards}; re-run to continue")
            return [p for p in paths if p.is_file()]
        if source is not None:
            prompts = source[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            if not prompts:
                break
        else:
            prompts = []
            for attempt in range(8):  # a batch may hold no new instruction: sample again
                for text in magpie_instructions(model, tok, cfg.batch_size, seed=cfg.seed * 1_000_003 + i + attempt * 7919,
                                                stop_ids=stops, temperature=cfg.magpie_temperature,
                                                top_p=cfg.magpie_top_p, max_tokens=cfg.magpie_max_tokens):
                    if _key(text) not in seen:
                        seen.add(_key(text))
                        prompts.append(text)
                if prompts:
                    break
            else:
                raise TreeoptError("the model samples no new instructions of 3+ words ending in a stop token: "
                                   "raise --magpie-max-tokens or pass --prompts FILE")
        ids = [chat_prompt(tok, p) for p in prompts]
        conts = list(greedy_continuations(model, ids, cfg.max_new_tokens, stops, batch_size=len(ids), pad_id=pad,
                                          with_hidden=True))
        write_shard(path, conts, prompts)
        made += 1
        tokens += sum(len(c.tokens) for c in conts)
        el = time.time() - start
        log(f"shard {i + 1}/{num_shards}: {len(prompts)} sequences, {tokens} tokens in {el:.0f} s "
            f"({tokens / el:.1f} tok/s this run)")
    return [p for p in paths if p.is_file()]


# ---------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """Shards concatenated: row r is hidden state `hidden[r]` of sequence `seq[r]`; `tokens[r]` is y_t."""
    hidden: torch.Tensor  # [N, H] fp16
    tokens: torch.Tensor  # [N] int64
    seq: torch.Tensor  # [N] int64, a global sequence number

    def __len__(self) -> int:
        return len(self.tokens)

    def targets(self, rows: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(target rows [K, B], valid [K, B]) for head k at row r: row r + k of the same sequence."""
        k = torch.arange(1, num_heads + 1)[:, None]  # [K, 1]
        t = rows[None] + k  # [K, B]
        inside = t < len(self)
        t = torch.where(inside, t, rows[None])
        return t, inside & (self.seq[t] == self.seq[rows][None])


def held_out(shard: int, index: int) -> bool:
    digest = hashlib.blake2b(f"{shard}:{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") % HELD_OUT_EVERY == 0


def load_corpus(paths: list[Path], split: str = "train") -> Corpus:
    """The shards' sequences of one split: `train`, `heldout` (~3%, by hash) or `all`."""
    hs, ts, ss, n = [], [], [], 0
    for i, path in enumerate(paths):
        hidden, tokens, offsets, _ = read_shard(path)
        for j in range(len(offsets) - 1):
            if split != "all" and held_out(i, j) != (split == "heldout"):
                continue
            a, b = offsets[j].item(), offsets[j + 1].item()
            hs.append(hidden[a:b])
            ts.append(tokens[a:b])
            ss.append(torch.full((b - a,), n, dtype=torch.long))
            n += 1
    if not hs:
        raise TreeoptError(f"no {split} sequences in {len(paths)} shard(s): generate more data (--num-prompts)")
    return Corpus(torch.cat(hs), torch.cat(ts), torch.cat(ss))
