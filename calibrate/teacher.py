"""`treeopt calibrate --teacher-forced DATA`: rank the heads on a chat dataset's own assistant turns.

No generation: each conversation goes through the base model in one forward, and every head ranks the
data's next tokens at the hidden states of the assistant turns. A shard's sequences are batched by
length (`forward_groups`: little padding), run causally without an attention mask (a token never
sees the padding after its sequence), then ranked all at once (calibrate/ranks.py). A row of the
record is an assistant turn (its `prompt_id`), its tokens are the turn's answer as the chat template
writes it (cut after the first stop token, and at --max-new-tokens), and its prompt is the
conversation before the turn, with the generation prompt. The record says `teacher_forced: true`:
its ranks measure the heads against the data's text, not the base model's own greedy tokens (the
ones a decoding step accepts), which is what the generated calibration (calibrate/run.py) measures.

DATA is a .json/.jsonl file or a Hugging Face dataset id whose records hold ShareGPT
`conversations` ([{"from": "human"|"gpt"|"system", "value": ...}]) or OpenAI-style `messages`
([{"role": "user"|"assistant"|"system", "content": ...}]). Shards, processes and the merge are
calibrate/run.py's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from treeopt.calibrate.run import CalibrationConfig, Unit, load, processes, run_settings, run_meta, run_shards, write_merged
from treeopt.core.errors import TreeoptError
from treeopt.core.fileio import check_writable, locking

PADDING = 1 / 16  # the most of a forward's tokens that may be padding (forward_groups)
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
         "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system"}


@dataclass(frozen=True)
class Sequence:
    """Token ids of one forward and the assistant turns in it: turn j's answer is ids[s:e] for
    (s, e) = spans[j], its prompt ids[:s]."""

    ids: list[int]
    spans: list[tuple[int, int]]
    instructions: list[str]  # each turn's last user message


def read_conversations(source: str) -> list[list[dict]]:
    """[[{"role", "content"}, ...], ...] from ShareGPT `conversations` or OpenAI `messages` records."""
    from treeopt.core.prompts import read_records

    out = []
    for n, record in enumerate(read_records(source)):
        turns = record.get("conversations", record.get("messages")) if isinstance(record, dict) else None
        if not isinstance(turns, list):
            raise TreeoptError(f"{source}: record {n} has no `conversations` (ShareGPT) or `messages` (OpenAI) list: "
                               "pass a chat dataset")
        messages = []
        for t in turns:
            role = ROLES.get(str(t.get("from", t.get("role", ""))).lower()) if isinstance(t, dict) else None
            content = t.get("value", t.get("content")) if isinstance(t, dict) else None
            if role is None or not isinstance(content, str):
                raise TreeoptError(f"{source}: record {n} has a turn {str(t)[:60]!r} without a known role and text: "
                                   "use from/value (human, gpt, system) or role/content (user, assistant, system)")
            messages.append({"role": role, "content": content})
        if any(m["role"] == "assistant" for m in messages):
            out.append(messages)
    if not out:
        raise TreeoptError(f"{source} holds no conversation with an assistant turn: pass a chat dataset")
    return out


def _template(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])


def sequences(tokenizer, messages: list[dict], stops: set[int], max_tokens: int) -> list[Sequence]:
    """The forwards that cover a conversation's assistant turns: one when the chat template only
    appends (each turn's prompt starts with the text before it), else one per turn. A turn's answer
    is what the template writes after the generation prompt (for templates that rewrite the prompt,
    the content's own tokens), up to its first stop token and at most `max_tokens` tokens."""
    if not getattr(tokenizer, "chat_template", None):
        raise TreeoptError("the tokenizer has no chat template: teacher-forced calibration needs one")
    out: list[Sequence] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _template(tokenizer, messages[:i], True)
        if not prompt:
            continue
        full = _template(tokenizer, messages[: i + 1], False)
        answer = full[len(prompt):] if full[: len(prompt)] == prompt else tokenizer(m["content"], add_special_tokens=False)["input_ids"]
        cut = next((j + 1 for j, t in enumerate(answer) if t in stops), len(answer))
        answer = answer[: min(cut, max_tokens)]
        if not answer:
            continue
        user = next((u["content"] for u in reversed(messages[:i]) if u["role"] == "user"), "")
        last = out[-1] if out else None
        if last is not None and prompt[: len(last.ids)] == last.ids:  # the same forward, extended
            out[-1] = Sequence(prompt + answer, last.spans + [(len(prompt), len(prompt) + len(answer))],
                               last.instructions + [user])
        else:
            out.append(Sequence(prompt + answer, [(len(prompt), len(prompt) + len(answer))], [user]))
    return out


def forward_groups(lengths: list[int], size: int, padding: float = PADDING) -> list[list[int]]:
    """Indices of sequences grouped into forwards: longest first, at most `size` a forward, and a
    forward's padding (up to its first, longest sequence) at most `padding` of its tokens."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        group = groups[-1] if groups else []
        width = len(group) + 1
        tokens = sum(lengths[j] for j in group) + lengths[i]
        if group and width <= size and tokens >= (1 - padding) * width * lengths[group[0]]:
            group.append(i)
        else:
            groups.append([i])
    return groups


@torch.inference_mode()
def hidden_states(model, batch: list[list[int]], pad: int) -> torch.Tensor:
    """Final hidden states [B, L, H] of right-padded sequences, in one causal forward: a token only sees
    those before it, so no attention mask is needed (the fast causal attention path) and the states
    of a sequence's own tokens do not depend on the padding after it."""
    device = model.get_input_embeddings().weight.device
    ids = torch.full((len(batch), max(map(len, batch))), pad, dtype=torch.long)  # [B, L]
    for b, s in enumerate(batch):
        ids[b, : len(s)] = torch.tensor(s)
    return model.get_decoder()(input_ids=ids.to(device), use_cache=False).last_hidden_state


@locking("config.out")
def calibrate_teacher_forced(config: CalibrationConfig, *, loaded=None, heads=None,
                             on_shard: Callable[[int], None] | None = None) -> Path:
    """Run a teacher-forced calibration of `config.teacher_forced` into `config.out` (see the module doc);
    `config.prompts`, `seed` are unused, `limit` takes the first conversations, `max_new_tokens` caps
    each answer, `batch_size` caps the sequences per forward."""
    from treeopt.decoding.generate import Continuation
    from treeopt.decoding.models import check_context, stop_token_ids

    config.check()
    if not config.teacher_forced:
        raise TreeoptError("pass the chat data to calibrate on: --teacher-forced DATA")
    conversations = read_conversations(config.teacher_forced)[: config.first or config.limit]
    check_writable(config.out, directory=True, fix="pass another --output-dir")
    procs = processes()
    loaded, heads = load(config, procs, loaded, heads)
    model, tokenizer = loaded.model, loaded.tokenizer
    lm_head = model.get_output_embeddings()
    stop = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop)
    seqs = [sequences(tokenizer, c, stop, config.max_new_tokens) for c in conversations]  # per conversation
    forwards = [(s, c) for c, conv in enumerate(seqs) for s in conv]  # the conversation of each forward
    check_context(model, [s.ids for s, _ in forwards], 0,
                  [f"conversation {c + 1}: {s.instructions[0]}" for s, c in forwards], str(config.teacher_forced))
    first = [0]  # each conversation's first turn id
    for c in seqs:
        first.append(first[-1] + sum(len(s.spans) for s in c))
    if first[-1] == 0:
        raise TreeoptError(f"{config.teacher_forced}: no assistant turn has any text: pass a chat dataset")

    B = config.batch_size
    settings = run_settings(config, loaded.name, str(lm_head.weight.dtype).removeprefix("torch."), heads,
                            teacher_forced=True, data_sha256=hashlib.sha256(json.dumps(conversations).encode()).hexdigest(),
                            num_conversations=len(conversations), batch_size=B, shard_size=config.shard_size)

    def shard(ids: range) -> Iterator[list[Unit]]:
        # (sequence, id of its first turn) of the shard's conversations
        work = [(s, first[c] + sum(len(x.spans) for x in seqs[c][:j])) for c in ids for j, s in enumerate(seqs[c])]
        units = []
        for group in forward_groups([len(s.ids) for s, _ in work], B):
            hidden = hidden_states(model, [work[w][0].ids for w in group], pad)  # [G, L, H]
            units += [Unit(turn + j, s.instructions[j], Continuation(s.ids[:a], s.ids[a:e], s.ids[e - 1] in stop,
                                                                       hidden[g, a - 1:e - 1]))
                      for g, (s, turn) in enumerate(work[w] for w in group) for j, (a, e) in enumerate(s.spans)]
        yield sorted(units, key=lambda u: u.prompt_id)  # ranked at once, in turn order

    merged = run_shards(Path(config.out), settings, len(conversations), config.shard_size, shard, heads, lm_head,
                        config.top_k, procs, config.progress, on_shard)
    if merged is not None:
        write_merged(config.out, merged, run_meta(config, loaded, settings, "greedy", str(config.teacher_forced),
                                                  first[-1], lm_head.weight.device.type, teacher_forced=True,
                                                  num_conversations=len(conversations), batch_size=B))
    procs.wait()
    return Path(config.out)
