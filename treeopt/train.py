"""Medusa-1 head training by self-distillation, backbone frozen: `treeopt train-heads`.

Two resumable stages under one work directory:

1. data: prompts (a file, a hub dataset, or `magpie`: user turns sampled from the model itself) ->
   chat template -> the base model's greedy continuations, with the hidden states the heads read.
   Written as shards ``data/shard-00000.safetensors`` (hidden fp16 [N, H], tokens int32 [N],
   offsets int64 [n+1] over the n sequences), each atomically: an interrupted run resumes at the
   next shard, and shards are deterministic given the seed.
2. train: only the heads, on the cached hidden states (the backbone never runs again). For hidden
   row t of a sequence (the state of the token before y_t), head k's target is y_{t+k}, k = 1..K.
   Loss = sum_k 0.8^k * [(1 - a) CE(head_k, y_{t+k}) + a KL(base(t+k) || head_k)], where base(t+k)
   = softmax(lm_head(hidden row t+k)) is the base model's own distribution, read off the cache.
   Checkpoints (atomic) every few minutes; re-running the same command resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from treeopt.errors import TreeoptError
from treeopt.fileio import atomic_write, write_text

MAGPIE = "magpie"
SHARD = "shard-{:05d}.safetensors"
HELD_OUT_EVERY = 33  # ~3% of the sequences, picked by a hash of (shard, index)


@dataclass
class TrainConfig:
    work: str  # holds data/ shards, checkpoints and the log
    heads_out: str | None = None  # where the final heads are saved (Medusa layout)
    model: str = "smollm2-135m"
    prompts: str = MAGPIE  # `magpie`, a .json/.jsonl file, or a Hugging Face dataset id
    num_prompts: int = 2000  # sequences to generate (an upper bound with magpie: duplicates are dropped)
    max_new_tokens: int = 192
    batch_size: int = 48  # sequences per generation batch (one shard)
    magpie_temperature: float = 1.0
    magpie_top_p: float = 0.95
    magpie_max_tokens: int = 64
    num_heads: int = 4
    num_layers: int = 1
    epochs: float = 2.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_tokens: int = 2048  # hidden rows per optimizer step
    full_vocab: bool = False  # softmax over the whole vocabulary; False: over the tokens the training data holds
    distill: float = 0.5  # weight a of the KL to the base model's distribution (0: hard targets only)
    decay: float = 0.8  # head k's loss weight is decay**k
    seed: int = 0
    device: str = "cpu"
    checkpoint_every_s: float = 180.0
    max_train_s: float | None = None  # stop training (and checkpoint) after this long; resume later
    max_gen_s: float | None = None  # stop generating after this long; the shards so far are the data
    eval_prompts: int = 40  # AlpacaEval prompts x eval_tokens for the report's metric (0: skip); never trained on
    eval_tokens: int = 128
    max_steps: int | None = None  # stop training after this many steps in this run (checkpointed); resume later


def loss_weights(num_heads: int, decay: float = 0.8) -> torch.Tensor:
    """[K]: head k (1-based) weighs decay**k, as in the Medusa paper."""
    return torch.tensor([decay ** k for k in range(1, num_heads + 1)])


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


def _check_fingerprint(path: Path, want: dict, what: str) -> None:
    if path.is_file():
        got = json.loads(path.read_text())
        diff = [k for k in want if got.get(k) != want[k]]
        if diff:
            raise TreeoptError(f"{path.parent} was made with other {what} settings ({', '.join(diff)}): "
                               f"use a new --work directory or the same settings")
    else:
        write_text(path, json.dumps(want, indent=2) + "\n")


def read_shard(path: Path):
    """(hidden fp16 [N, H], tokens int64 [N], offsets int64 [n+1], prompts list[str])."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        prompts = json.loads(f.metadata()["prompts"])
        return f.get_tensor("hidden"), f.get_tensor("tokens").long(), f.get_tensor("offsets"), prompts


def _write_shard(path: Path, conts, prompts: list[str]) -> None:
    from safetensors.torch import save_file

    hidden = torch.cat([c.hidden for c in conts]).to(torch.float16)  # [N, H]
    tokens = torch.tensor([t for c in conts for t in c.tokens], dtype=torch.int32)  # [N]
    offsets = torch.tensor([0] + [len(c.tokens) for c in conts]).cumsum(0)  # [n+1]
    meta = {"prompts": json.dumps(prompts), "stopped": json.dumps([c.stopped for c in conts])}
    atomic_write(path, lambda p: save_file({"hidden": hidden, "tokens": tokens, "offsets": offsets}, p, meta))


def generate_data(cfg: TrainConfig, loaded=None, log=print) -> list[Path]:
    """Stage 1: write the shards that are missing under work/data/; return all of them, in order."""
    from treeopt.generate import greedy_continuations
    from treeopt.models import chat_prompt, load_model, stop_token_ids

    refuse_calibration_set(cfg.prompts)
    data = Path(cfg.work) / "data"
    data.mkdir(parents=True, exist_ok=True)
    _check_fingerprint(data / "data.json", _data_fingerprint(cfg), "data")
    num_shards = math.ceil(cfg.num_prompts / cfg.batch_size)
    paths = [data / SHARD.format(i) for i in range(num_shards)]
    if all(p.is_file() for p in paths):
        return paths
    source = None
    if cfg.prompts != MAGPIE:
        from treeopt.prompts import load_instructions

        source = load_instructions(cfg.prompts, limit=cfg.num_prompts)
    lm = loaded or load_model(cfg.model, device=cfg.device)
    model, tok = lm.model, lm.tokenizer
    stops = stop_token_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else sorted(stops)[0]
    seen: set[str] = set()
    start, made, tokens = time.time(), 0, 0
    for i, path in enumerate(paths):
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
        _write_shard(path, conts, prompts)
        made += 1
        tokens += sum(len(c.tokens) for c in conts)
        el = time.time() - start
        log(f"shard {i + 1}/{num_shards}: {len(prompts)} sequences, {tokens} tokens in {el:.0f} s "
            f"({tokens / el:.1f} tok/s this run)")
    return [p for p in paths if p.is_file()]


# ---------------------------------------------------------------------------------------------
# stage 2: training on the cached hidden states


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


def head_loss(logits: torch.Tensor, target_tokens: torch.Tensor, valid: torch.Tensor, weights: torch.Tensor,
              base_logits: torch.Tensor | None = None, distill: float = 0.0):
    """logits [K, B, V], target_tokens/valid [K, B], weights [K], base_logits [K, B, V] (the base model's
    logits at the target rows) -> (loss, per-head loss [K]). Per head: the mean over valid rows of
    (1 - distill) * CE(hard target) + distill * KL(base || head); the total weighs head k by weights[k]."""
    logp = logits.float().log_softmax(-1)  # [K, B, V]
    per_row = -logp.gather(-1, target_tokens[..., None]).squeeze(-1)  # [K, B]
    if base_logits is not None and distill > 0:
        q = base_logits.float().log_softmax(-1)  # [K, B, V]
        kl = (q.exp() * (q - logp)).sum(-1)  # [K, B]
        per_row = (1 - distill) * per_row + distill * kl
    v = valid.float()
    per_head = (per_row * v).sum(-1) / v.sum(-1).clamp(min=1)  # [K]
    return (weights.to(per_head) * per_head).sum(), per_head.detach()


@torch.no_grad()
def head_accuracy(heads, lm_head, corpus: Corpus, top_k: int = 5, batch: int = 1024) -> dict:
    """Per-head top-1 and top-k accuracy against the greedy continuation: {"top1": [K], "top5": [K], "n": [K]}."""
    K = heads.num_heads
    hit1, hitk, count = torch.zeros(K), torch.zeros(K), torch.zeros(K)
    for a in range(0, len(corpus), batch):
        rows = torch.arange(a, min(a + batch, len(corpus)))
        t, valid = corpus.targets(rows, K)  # [K, B]
        dev = lm_head.weight.device
        logits = heads.to(dev)(corpus.hidden[rows].to(dev).float(), lm_head)  # [K, B, V]
        top = logits.topk(top_k, dim=-1).indices.cpu()  # [K, B, k]
        y = corpus.tokens[t]  # [K, B]
        hit = (top == y[..., None]) & valid[..., None]
        hit1 += hit[..., 0].sum(-1)
        hitk += hit.any(-1).sum(-1)
        count += valid.sum(-1)
    c = count.clamp(min=1)
    return {"top1": (hit1 / c).tolist(), f"top{top_k}": (hitk / c).tolist(), "n": count.long().tolist()}


def _train_fingerprint(cfg: TrainConfig, num_shards: int) -> dict:
    keys = ("num_heads", "num_layers", "epochs", "lr", "weight_decay", "batch_tokens", "full_vocab", "distill", "decay",
            "seed")
    return {"num_shards": num_shards, **{k: getattr(cfg, k) for k in keys}}


CHUNK = 64  # rows per contiguous block: a step's rows are whole blocks, so the targets' base logits are shared
MICRO = 256  # rows per forward/backward pass (bounds the [K, rows, V] logits' memory)


def _lr(step: int, total: int, lr: float, warmup: int = 50) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def train_heads_on(cfg: TrainConfig, paths: list[Path], lm_head: torch.nn.Module, base_name: str = "",
                   log=print, progress: bool = True):
    """Stage 2: train heads on the shards `paths` (resuming from work/checkpoint.pt); return them."""
    from treeopt.heads import HeadsConfig, MedusaHeads

    work = Path(cfg.work)
    ckpt_path = work / "checkpoint.pt"
    fp = _train_fingerprint(cfg, len(paths))
    torch.manual_seed(cfg.seed)
    W = lm_head.weight
    heads = MedusaHeads(HeadsConfig(hidden_size=W.shape[1], vocab_size=W.shape[0], num_heads=cfg.num_heads,
                                    num_layers=cfg.num_layers, base_model_name_or_path=base_name))
    dev = W.device
    heads.to(dev)
    opt = torch.optim.AdamW(heads.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, elapsed = 0, 0.0
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ckpt["fingerprint"] != fp:
            diff = [k for k in fp if ckpt["fingerprint"].get(k) != fp[k]]
            raise TreeoptError(f"{ckpt_path} was trained with other settings ({', '.join(diff)}): use the same "
                               "settings to resume, or remove it to start over")
        heads.heads.load_state_dict(ckpt["heads"])
        opt.load_state_dict(ckpt["opt"])
        step, elapsed = ckpt["step"], ckpt["elapsed"]
        paths = paths[: fp["num_shards"]]
        log(f"resuming at step {step} ({elapsed:.0f} s trained)")
    corpus = load_corpus(paths, "train")
    lm_head = lm_head.float().requires_grad_(False)
    K, N = cfg.num_heads, len(corpus)
    remap = torch.arange(W.shape[0])  # full-vocabulary id -> column of the training projection
    if not cfg.full_vocab:  # the softmax's negatives are the tokens the data holds: V' << V, several times faster
        vocab = corpus.tokens.unique()  # [V']
        remap[vocab] = torch.arange(len(vocab))
        lm_head = torch.nn.Linear(W.shape[1], len(vocab), bias=False).to(dev)
        lm_head.weight.data = W.detach()[vocab.to(dev)].float()
        lm_head.requires_grad_(False)
    weights = loss_weights(K, cfg.decay)
    blocks_per_step = max(1, cfg.batch_tokens // CHUNK)
    num_blocks = math.ceil(N / CHUNK)
    steps_per_epoch = math.ceil(num_blocks / blocks_per_step)
    total = max(1, int(cfg.epochs * steps_per_epoch))
    log(f"training {K} heads x {cfg.num_layers} layers on {N} rows ({len(paths)} shards), softmax over "
        f"{lm_head.weight.shape[0]} tokens: {total} steps of {blocks_per_step * CHUNK} rows, {cfg.epochs} epochs")

    def save():
        state = {"fingerprint": fp, "heads": heads.heads.state_dict(), "opt": opt.state_dict(), "step": step,
                 "elapsed": elapsed + time.time() - t0}
        atomic_write(ckpt_path, lambda p: torch.save(state, p))

    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=step, disable=not progress, desc="train", unit="step")
    t0 = last = time.time()
    run_loss, first_step = None, step
    heads.train()
    while step < total:
        if (cfg.max_train_s is not None and time.time() - t0 > cfg.max_train_s) or \
                (cfg.max_steps is not None and step - first_step >= cfg.max_steps):
            log(f"training stopped at step {step}/{total}; re-run to continue")
            break
        epoch, i = divmod(step, steps_per_epoch)
        perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
        starts = perm[i * blocks_per_step:(i + 1) * blocks_per_step] * CHUNK  # [b]
        rows = (starts[:, None] + torch.arange(CHUNK)).flatten()  # [R]
        rows = rows[rows < N]
        for g in opt.param_groups:
            g["lr"] = _lr(step, total, cfg.lr)
        opt.zero_grad(set_to_none=True)
        per_head_sum = torch.zeros(K)
        for m in range(0, len(rows), MICRO):
            r = rows[m:m + MICRO]  # [B]
            t, valid = corpus.targets(r, K)  # [K, B]
            base = None
            if cfg.distill > 0:
                uniq, inv = torch.unique(t, return_inverse=True)  # the target rows, each projected once
                with torch.no_grad():
                    base = lm_head(corpus.hidden[uniq].to(dev).float())[inv.to(dev)]  # [K, B, V]
            logits = heads(corpus.hidden[r].to(dev).float(), lm_head)  # [K, B, V]
            y = remap[corpus.tokens[t]]  # [K, B]
            loss, per_head = head_loss(logits, y.to(dev), valid.to(dev), weights, base, cfg.distill)
            (loss * len(r) / len(rows)).backward()
            per_head_sum += per_head.cpu() * len(r) / len(rows)
        opt.step()
        step += 1
        run_loss = per_head_sum if run_loss is None else 0.95 * run_loss + 0.05 * per_head_sum
        bar.update(1)
        bar.set_postfix(loss=" ".join(f"{x:.2f}" for x in run_loss.tolist()), lr=f"{_lr(step, total, cfg.lr):.1e}")
        if time.time() - last > cfg.checkpoint_every_s or step == total:
            save()
            last = time.time()
            log(f"step {step}/{total} epoch {step / steps_per_epoch:.2f} per-head loss "
                f"{' '.join(f'{x:.3f}' for x in run_loss.tolist())} ({elapsed + time.time() - t0:.0f} s)")
    bar.close()
    save()
    heads.cpu().eval().requires_grad_(False)
    return heads, {"steps": step, "total_steps": total, "train_rows": N, "train_s": elapsed + time.time() - t0,
                   "num_shards": len(paths)}


# ---------------------------------------------------------------------------------------------
# evaluation on AlpacaEval continuations (evaluation only: never training data)


def eval_data(work: str | Path, loaded, source: str | None = None, num_prompts: int = 40, max_new_tokens: int = 128,
              log=print) -> Path:
    """Greedy continuations (+ hidden states) of the first `num_prompts` AlpacaEval prompts, cached once."""
    from treeopt.generate import greedy_continuations
    from treeopt.models import chat_prompt, stop_token_ids
    from treeopt.prompts import default_prompts, load_instructions

    path = Path(work) / "eval" / f"alpaca_eval-{num_prompts}x{max_new_tokens}.safetensors"
    if path.is_file():
        return path
    prompts = load_instructions(source or default_prompts(), limit=num_prompts)
    model, tok = loaded.model, loaded.tokenizer
    stops = stop_token_ids(model, tok)
    t0 = time.time()
    conts = list(greedy_continuations(model, [chat_prompt(tok, p) for p in prompts], max_new_tokens, stops,
                                      batch_size=len(prompts), pad_id=tok.pad_token_id, with_hidden=True))
    _write_shard(path, conts, prompts)
    log(f"AlpacaEval eval set: {len(prompts)} prompts, {sum(len(c.tokens) for c in conts)} tokens "
        f"in {time.time() - t0:.0f} s")
    return path


def evaluate(heads, lm_head, work: str | Path, paths: list[Path], loaded=None, eval_prompts: int = 40,
             eval_tokens: int = 128) -> dict:
    """Per-head top-1/top-5 on the held-out generated sequences and, with `loaded`, on AlpacaEval."""
    lm_head = lm_head.float()
    out = {}
    try:
        out["heldout"] = head_accuracy(heads, lm_head, load_corpus(paths, "heldout"))
    except TreeoptError:  # too little data for a held-out sequence
        pass
    if loaded is not None and eval_prompts > 0:
        ev = eval_data(work, loaded, num_prompts=eval_prompts, max_new_tokens=eval_tokens)
        out["alpaca_eval"] = head_accuracy(heads, lm_head, load_corpus([ev], "all"))
    return out


def format_accuracy(metrics: dict) -> str:
    lines = ["| set | head | top-1 | top-5 | positions |", "|---|---|---|---|---|"]
    for name, m in metrics.items():
        for k, (a, b, n) in enumerate(zip(m["top1"], m["top5"], m["n"]), 1):
            lines.append(f"| {name} | {k} | {a:.3f} | {b:.3f} | {n} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the pipeline


def train_heads(cfg: TrainConfig, stage: str = "all", log=print, progress: bool = True) -> dict:
    """`treeopt train-heads`: stage `data` (generate shards), `train` (train on the shards there are),
    or `all`; then evaluate and save the heads to cfg.heads_out. Re-running resumes."""
    from treeopt.models import load_model

    if stage not in ("all", "data", "train"):
        raise TreeoptError(f"unknown --stage {stage!r}: use all, data or train")
    refuse_calibration_set(cfg.prompts)
    work = Path(cfg.work)
    if stage == "train":
        paths = sorted((work / "data").glob("shard-*.safetensors"))
        if not paths:
            raise TreeoptError(f"{work / 'data'} holds no shards: run with --stage data (or all) first")
    loaded = load_model(cfg.model, device=cfg.device)
    t0 = time.time()
    if stage in ("all", "data"):
        paths = generate_data(cfg, loaded, log=log)
    gen_s = time.time() - t0
    result = {"config": asdict(cfg), "num_shards": len(paths), "generation_s_this_run": gen_s}
    if stage == "data":
        return result
    lm_head = loaded.model.get_output_embeddings()
    heads, info = train_heads_on(cfg, paths, lm_head, base_name=_base_name(loaded), log=log, progress=progress)
    result.update(info)
    result["metrics"] = evaluate(heads, lm_head, work, paths[: info["num_shards"]], loaded, cfg.eval_prompts,
                                 cfg.eval_tokens)
    log(format_accuracy(result["metrics"]))
    if cfg.heads_out:
        heads.save(cfg.heads_out)
        log(f"heads saved to {cfg.heads_out}")
    write_text(work / "report.json", json.dumps(result, indent=2) + "\n")
    return result


def _base_name(loaded) -> str:
    name = getattr(loaded.model.config, "_name_or_path", "") or loaded.name
    return "HuggingFaceTB/SmolLM2-135M-Instruct" if loaded.name == "smollm2-135m" else name


def heads_from_checkpoint(work: str | Path, model, base_name: str = "") -> "MedusaHeads":
    """The heads in work/checkpoint.pt (e.g. of a run still training), as a MedusaHeads for `model`."""
    from treeopt.heads import HeadsConfig, MedusaHeads

    path = Path(work) / "checkpoint.pt"
    if not path.is_file():
        raise TreeoptError(f"{path} not found: train first (treeopt train-heads --work {work})")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    W = model.get_output_embeddings().weight
    fp = ckpt["fingerprint"]
    heads = MedusaHeads(HeadsConfig(hidden_size=W.shape[1], vocab_size=W.shape[0], num_heads=fp["num_heads"],
                                    num_layers=fp["num_layers"], base_model_name_or_path=base_name))
    heads.heads.load_state_dict(ckpt["heads"])
    return heads.eval().requires_grad_(False)
