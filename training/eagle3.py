"""EAGLE-3 drafter training by self-distillation, base model frozen: `treeopt train-drafter --kind eagle3`.

Three resumable stages under one work directory:

1. data: the base model's greedy continuations of self-sampled prompts, the `train-heads` data stage
   (treeopt.training.data: `data/shard-*.safetensors`; never AlpacaEval).
2. aux: one teacher-forced forward of each chat prompt + continuation, keeping the hidden states
   entering the drafter's `aux_layers`: `aux/aux-00000.safetensors` per data shard (aux fp16
   [N, A * H], text ids [N], offsets [n+1], prompt lengths [n]), each written atomically.
3. train: training-time test (Eagle3.unroll): the drafter is unrolled `steps` times on its own outputs
   over every position of a text, depth d's row i drafting x_{i+d+1}. Loss = sum over depths d of
   0.8^(d-1) CE(depth d, the greedy token), on the continuation's positions only (the prompt's
   tokens are the user's, not the model's). The draft vocabulary is the `draft_vocab` most frequent
   tokens of the continuations (`draft_vocabulary`); `lm_head` starts from the base model's rows of
   those tokens and `norm` from its final norm.
   Checkpoints (atomic) every few minutes; re-running the same command resumes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from treeopt.core.errors import TreeoptError
from treeopt.core.fileio import atomic_write, check_writable, locking, write_text
from treeopt.core.stage import differences
from treeopt.training.config import DrafterTrainConfig
from treeopt.training.data import generate_data, held_out, read_shard, refuse_calibration_set
from treeopt.training.train import lr_at, out_of_budget, save_checkpoint

AUX = "aux-{:05d}.safetensors"
DECAY = 0.8  # depth d's loss weight is DECAY ** (d - 1), as EAGLE-3 weights its unrolled steps


# ---- stage 2: the base model's auxiliary hidden states ------------------------------------------------

@torch.inference_mode()
def aux_states(model, texts: list[list[int]], layers, batch: int = 8) -> list[torch.Tensor]:
    """Teacher-forced hidden states entering `layers` for each text -> [L, A * H] fp16 each (right-padded batches)."""
    out = []
    device = model.get_output_embeddings().weight.device
    for s in range(0, len(texts), batch):
        group = texts[s : s + batch]
        L = max(map(len, group))
        ids = torch.zeros(len(group), L, dtype=torch.long)
        mask = torch.zeros(len(group), L, dtype=torch.long)
        for j, t in enumerate(group):
            ids[j, : len(t)], mask[j, : len(t)] = torch.tensor(t), 1
        h = model.get_decoder()(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True).hidden_states
        aux = torch.cat([h[i] for i in layers], -1)  # [b, L, A * H]
        out += [aux[j, : len(t)].to("cpu", torch.float16) for j, t in enumerate(group)]
    return out


def write_aux(work: Path, paths: list[Path], loaded, layers, log=print) -> list[Path]:
    """Stage 2: an aux shard for each data shard that has none; all of them, in order."""
    from safetensors.torch import save_file

    from treeopt.decoding.models import chat_prompt

    d = work / "aux"
    d.mkdir(parents=True, exist_ok=True)
    (d / "layers.json").write_text(json.dumps(list(layers)))
    out, t0 = [], time.time()
    for i, path in enumerate(paths):
        target = d / AUX.format(i)
        out.append(target)
        if target.is_file():
            continue
        _, tokens, offsets, prompts = read_shard(path)
        texts = [chat_prompt(loaded.tokenizer, p) + tokens[offsets[j] : offsets[j + 1]].tolist() for j, p in enumerate(prompts)]
        aux = aux_states(loaded.model, texts, layers)
        lens = torch.tensor([len(t) for t in texts])
        tensors = {"aux": torch.cat(aux), "ids": torch.tensor([x for t in texts for x in t], dtype=torch.int32),
                   "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]),
                   "prompt_len": torch.tensor([len(t) - (offsets[j + 1] - offsets[j]).item() for j, t in enumerate(texts)])}
        atomic_write(target, lambda p: save_file(tensors, str(p)))
        log(f"aux {i + 1}/{len(paths)}: {int(lens.sum())} positions ({time.time() - t0:.0f} s)")
    return out


def read_aux(paths: list[Path], split: str = "train") -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """[(aux [L, A * H] fp16, ids [L], prompt length)] of one split: train, heldout (~3 %, by hash) or all."""
    from safetensors.torch import load_file

    seqs = []
    for i, path in enumerate(paths):
        t = load_file(str(path))
        off = t["offsets"].tolist()
        for j in range(len(off) - 1):
            if split != "all" and held_out(i, j) != (split == "heldout"):
                continue
            seqs.append((t["aux"][off[j] : off[j + 1]], t["ids"][off[j] : off[j + 1]].long(), int(t["prompt_len"][j])))
    if not seqs:
        raise TreeoptError(f"no {split} sequences in {len(paths)} aux shard(s): generate more data (--num-prompts)")
    return seqs


# ---- stage 3: training-time test ----------------------------------------------------------------------

def depth_targets(ids: torch.Tensor, prompt_len: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Text ids [L] -> (targets [steps, n], valid [steps, n]) over the unroll's rows i = 0..n-1 (n = L - 1):
    depth d's target at row i is x_{i+d+1}, valid where that is a continuation token (index >= prompt_len)."""
    n = ids.shape[0] - 1
    idx = torch.arange(n)[None] + torch.arange(2, steps + 2)[:, None]  # [steps, n]
    valid = (idx < ids.shape[0]) & (idx >= prompt_len)
    return ids[idx.clamp(max=ids.shape[0] - 1)], valid


def sequence_loss(eagle, aux, ids, prompt_len: int, steps: int, index: torch.Tensor):
    """One text's loss (sum over depths of DECAY^(d-1) x mean CE) and per-depth (correct, count) top-1."""
    n = ids.shape[0] - 1
    inputs = torch.cat([ids[1:], ids.new_zeros(steps - 1)])
    outs = eagle.unroll(aux[:n].float(), inputs, steps)
    targets, valid = depth_targets(ids, prompt_len, steps)
    loss, stats = 0.0, []
    for d, out in enumerate(outs):
        keep = valid[d] & (index[targets[d]] >= 0)  # the draft vocabulary lacks the others: never drafted
        y = index[targets[d]][keep]
        if not keep.any():
            stats.append((0, 0))
            continue
        logits = eagle.logits(out[keep])  # [m, Vd]
        loss = loss + DECAY ** d * torch.nn.functional.cross_entropy(logits, y)
        stats.append((int((logits.argmax(-1) == y).sum()), int(valid[d].sum())))
    return loss, stats


def draft_vocabulary(seqs, size: int, vocab: int) -> torch.Tensor:
    """`size` target ids, ascending: the continuations' tokens by frequency, then (the data being
    smaller than the vocabulary) the lowest unseen ids, which a BPE vocabulary gives its earliest,
    most frequent merges."""
    counts = torch.zeros(vocab, dtype=torch.long)
    for _, ids, p in seqs:
        counts += torch.bincount(ids[p:], minlength=vocab)
    order = sorted(range(vocab), key=lambda t: (-int(counts[t]), t))
    return torch.tensor(order[: min(size, vocab)]).sort().values


@torch.no_grad()
def accuracy(eagle, seqs, steps: int) -> list[dict]:
    """Top-1 per depth over `seqs` (greedy targets; a token outside the draft vocabulary counts as a miss)."""
    index = eagle.draft_index().cpu()
    totals = [[0, 0] for _ in range(steps)]
    for aux, ids, p in seqs:
        _, stats = sequence_loss(eagle, aux, ids, p, steps, index)
        for d, (c, m) in enumerate(stats):
            totals[d][0] += c
            totals[d][1] += m
    return [{"depth": d + 1, "top1": c / m if m else float("nan"), "positions": m} for d, (c, m) in enumerate(totals)]


def train_eagle3_on(cfg: DrafterTrainConfig, aux_paths: list[Path], model, log=print, progress: bool = True):
    """Stage 3: train on the aux shards (resuming from work/eagle3-checkpoint.pt); (drafter, info)."""
    from tqdm.auto import tqdm

    from treeopt.decoding.eagle3 import for_model

    work = Path(cfg.work)
    ckpt_path = work / "eagle3-checkpoint.pt"
    fp = {k: v for k, v in asdict(cfg).items() if k not in ("work", "drafter_out", "checkpoint_every_s", "max_train_s",
                                                            "max_gen_s", "max_steps", "stage", "device", "eval_prompts")}
    fp["num_shards"] = len(aux_paths)
    seqs = read_aux(aux_paths, "train")
    W = model.get_output_embeddings().weight
    eagle = for_model(model, draft_vocab_size=cfg.draft_vocab, aux_layers=cfg.aux_layers, seed=cfg.seed).float()
    if cfg.draft_vocab > W.shape[0]:
        raise TreeoptError(f"--draft-vocab {cfg.draft_vocab} exceeds the model's vocabulary ({W.shape[0]}): pass at most that")
    vocab = draft_vocabulary(seqs, cfg.draft_vocab, W.shape[0])
    eagle.set_vocab(vocab)
    with torch.no_grad():
        eagle.lm_head.weight.copy_(W.detach()[vocab.to(W.device)].float())  # start from the base model's rows
        eagle.norm.weight.copy_(model.get_decoder().norm.weight.float())
    eagle.embed.requires_grad_(False)
    params = [p for p in eagle.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, elapsed = 0, 0.0
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ckpt["fingerprint"] != fp:
            raise TreeoptError(f"{ckpt_path} was trained with other settings ({differences(ckpt['fingerprint'], fp)}): "
                               "use the same settings to resume, or remove it to start over")
        eagle.load_state_dict(ckpt["eagle"])
        opt.load_state_dict(ckpt["opt"])
        step, elapsed = ckpt["step"], ckpt["elapsed"]
        log(f"resuming at step {step} ({elapsed:.0f} s trained)")
    index = eagle.draft_index().cpu()
    per_step = cfg.batch_sequences
    steps_per_epoch = math.ceil(len(seqs) / per_step)
    total = max(1, int(cfg.epochs * steps_per_epoch))
    positions = sum(len(ids) - p for _, ids, p in seqs)
    log(f"training an EAGLE-3 drafter ({cfg.steps} unrolled steps, draft vocabulary {cfg.draft_vocab}, aux layers "
        f"{list(eagle.config.aux_layers)}) on {len(seqs)} sequences ({positions} continuation tokens): {total} steps")

    def save():
        save_checkpoint(ckpt_path, fingerprint=fp, eagle=eagle.state_dict(), opt=opt.state_dict(), step=step,
                        elapsed=elapsed + time.time() - t0)

    bar = tqdm(total=total, initial=step, disable=not progress, desc="train", unit="step")
    t0 = last = time.time()
    first_step, run = step, None
    eagle.train()
    while step < total:
        if out_of_budget(cfg, time.time() - t0, step - first_step):
            log(f"training stopped at step {step}/{total}; re-run to continue")
            break
        epoch, i = divmod(step, steps_per_epoch)
        perm = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
        batch = perm[i * per_step : (i + 1) * per_step].tolist()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, cfg.lr, warmup=30)
        opt.zero_grad(set_to_none=True)
        acc = torch.zeros(cfg.steps)
        for j in batch:
            aux, ids, p = seqs[j]
            loss, stats = sequence_loss(eagle, aux, ids, p, cfg.steps, index)
            if torch.is_tensor(loss):
                (loss / len(batch)).backward()
            acc += torch.tensor([c / m if m else 0.0 for c, m in stats]) / len(batch)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        run = acc if run is None else 0.95 * run + 0.05 * acc
        bar.update(1)
        bar.set_postfix(top1=" ".join(f"{x:.2f}" for x in run.tolist()))
        if time.time() - last > cfg.checkpoint_every_s or step == total:
            save()
            last = time.time()
            log(f"step {step}/{total}: train top-1 per depth {' '.join(f'{x:.3f}' for x in run.tolist())} "
                f"({elapsed + time.time() - t0:.0f} s)")
    bar.close()
    save()
    eagle.eval().requires_grad_(False)
    return eagle, {"steps": step, "total_steps": total, "train_sequences": len(seqs), "train_positions": positions,
                   "train_s": elapsed + time.time() - t0, "num_shards": len(aux_paths), "finished": step >= total}


@locking("cfg.work")
def train_drafter(cfg: DrafterTrainConfig, stage: str | None = None, log=print, progress: bool = True) -> dict:
    """`treeopt train-drafter --kind eagle3`: stage `data`, `train` (aux + training on the shards there
    are) or `all` (None: cfg.stage); then held-out accuracy and the drafter saved to cfg.drafter_out."""
    from treeopt.decoding.eagle3 import default_aux_layers, save_eagle3
    from treeopt.decoding.models import load_model

    stage = stage or cfg.stage
    refuse_calibration_set(cfg.prompts)
    work = check_writable(cfg.work, directory=True, fix="pass another --output-dir")
    if cfg.drafter_out:
        check_writable(cfg.drafter_out, directory=True, fix="pass another --save-drafter")
    if stage == "train":
        paths = sorted((work / "data").glob("shard-*.safetensors"))
        if not paths:
            raise TreeoptError(f"{work / 'data'} holds no shards: run with --stage data (or all) first")
    loaded = load_model(cfg.model, device=cfg.device, dtype="float32")
    t0 = time.time()
    if stage in ("all", "data"):
        paths = generate_data(cfg, loaded, log=log, progress=progress)
    result = {"config": asdict(cfg), "num_shards": len(paths), "generation_s_this_run": time.time() - t0}
    if stage == "data":
        return result
    layers = cfg.aux_layers or default_aux_layers(loaded.model.config.num_hidden_layers)
    t1 = time.time()
    aux_paths = write_aux(work, paths, loaded, layers, log=log)
    result["aux_s_this_run"] = time.time() - t1
    eagle, info = train_eagle3_on(cfg, aux_paths, loaded.model, log=log, progress=progress)
    result.update(info)
    try:
        result["heldout"] = accuracy(eagle, read_aux(aux_paths, "heldout"), cfg.steps)
        log("held-out top-1 per depth: " + " ".join(f"{r['top1']:.3f}" for r in result["heldout"]))
    except TreeoptError:  # too little data for a held-out sequence
        pass
    if cfg.drafter_out and info["finished"]:
        save_eagle3(eagle, cfg.drafter_out)
        log(f"EAGLE-3 drafter saved to {cfg.drafter_out}")
    write_text(work / "eagle3-report.json", json.dumps(result, indent=2) + "\n")
    return result
