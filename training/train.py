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

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from treeopt.training.config import TrainConfig
from treeopt.training.data import Corpus, generate_data, load_corpus, refuse_calibration_set, write_shard
from treeopt.core.errors import TreeoptError
from treeopt.core.fileio import atomic_write, check_writable, locking, write_text
from treeopt.core.settings import DEFAULT_MODEL
from treeopt.core.stage import differences


def loss_weights(num_heads: int, decay: float = 0.8) -> torch.Tensor:
    """[K]: head k (1-based) weighs decay**k, as in the Medusa paper."""
    return torch.tensor([decay ** k for k in range(1, num_heads + 1)])


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


def lr_at(step: int, total: int, lr: float, warmup: int = 50) -> float:
    """Linear warm-up over `warmup` steps, then cosine to 0 at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def out_of_budget(cfg, seconds: float, steps: int) -> bool:
    """This run has trained for its --max-train-minutes or its max_steps (a rerun resumes)."""
    return (cfg.max_train_s is not None and seconds > cfg.max_train_s) or (cfg.max_steps is not None and steps >= cfg.max_steps)


def save_checkpoint(path: Path, **state) -> None:
    """A training checkpoint, written atomically (an interrupted run resumes from the last one)."""
    atomic_write(path, lambda p: torch.save(state, p))


def train_heads_on(cfg: TrainConfig, paths: list[Path], lm_head: torch.nn.Module, base_name: str = "",
                   log=print, progress: bool = True):
    """Stage 2: train heads on the shards `paths` (resuming from work/checkpoint.pt); return them."""
    from treeopt.decoding.heads import HeadsConfig, MedusaHeads

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
            raise TreeoptError(f"{ckpt_path} was trained with other settings ({differences(ckpt['fingerprint'], fp)}): use the same "
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
        save_checkpoint(ckpt_path, fingerprint=fp, heads=heads.heads.state_dict(), opt=opt.state_dict(), step=step,
                        elapsed=elapsed + time.time() - t0)

    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=step, disable=not progress, desc="train", unit="step")
    t0 = last = time.time()
    run_loss, first_step = None, step
    heads.train()
    while step < total:
        if out_of_budget(cfg, time.time() - t0, step - first_step):
            log(f"training stopped at step {step}/{total}; re-run to continue")
            break
        epoch, i = divmod(step, steps_per_epoch)
        perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
        starts = perm[i * blocks_per_step:(i + 1) * blocks_per_step] * CHUNK  # [b]
        rows = (starts[:, None] + torch.arange(CHUNK)).flatten()  # [R]
        rows = rows[rows < N]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, cfg.lr)
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
        bar.set_postfix(loss=" ".join(f"{x:.2f}" for x in run_loss.tolist()), lr=f"{lr_at(step, total, cfg.lr):.1e}")
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
    from treeopt.decoding.generate import greedy_continuations
    from treeopt.decoding.models import chat_prompt, stop_token_ids
    from treeopt.core.prompts import default_prompts, load_instructions

    path = Path(work) / "eval" / f"alpaca_eval-{num_prompts}x{max_new_tokens}.safetensors"
    if path.is_file():
        return path
    prompts = load_instructions(source or default_prompts(), limit=num_prompts)
    model, tok = loaded.model, loaded.tokenizer
    stops = stop_token_ids(model, tok)
    t0 = time.time()
    conts = list(greedy_continuations(model, [chat_prompt(tok, p) for p in prompts], max_new_tokens, stops,
                                      batch_size=len(prompts), pad_id=tok.pad_token_id, with_hidden=True))
    write_shard(path, conts, prompts)
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


@locking("cfg.work")
def train_heads(cfg: TrainConfig, stage: str | None = None, log=print, progress: bool = True) -> dict:
    """`treeopt train-heads`: stage `data` (generate shards), `train` (train on the shards there are),
    or `all` (None: cfg.stage); then evaluate and save the heads to cfg.heads_out. Re-running resumes."""
    from treeopt.decoding.models import load_model

    stage = stage or cfg.stage
    if stage not in ("all", "data", "train"):
        raise TreeoptError(f"unknown --stage {stage!r}: use all, data or train")
    refuse_calibration_set(cfg.prompts)
    work = check_writable(cfg.work, directory=True, fix="pass another --output-dir")
    if cfg.heads_out:
        check_writable(cfg.heads_out, directory=True, fix="pass another --save-heads")
    if stage == "train":
        paths = sorted((work / "data").glob("shard-*.safetensors"))
        if not paths:
            raise TreeoptError(f"{work / 'data'} holds no shards: run with --stage data (or all) first")
    loaded = load_model(cfg.model, device=cfg.device, dtype="float32")  # training and its data: the exact reference
    t0 = time.time()
    if stage in ("all", "data"):
        paths = generate_data(cfg, loaded, log=log, progress=progress)
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
    return "HuggingFaceTB/SmolLM2-135M-Instruct" if loaded.name == DEFAULT_MODEL else name
