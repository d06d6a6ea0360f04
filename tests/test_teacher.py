"""Teacher-forced calibration (calibrate/teacher.py): chat data in, one forward per conversation."""

import json
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest import slow_ranks

from treeopt.calibrate.run import CalibrationConfig, calibrate
from treeopt.calibrate.teacher import (PADDING, calibrate_teacher_forced, forward_groups, hidden_states, read_conversations,
                               sequences)
from treeopt.decoding.heads import MedusaHeads, random_heads
from treeopt.decoding.models import load_model
from treeopt.cli import app
from treeopt.core.errors import TreeoptError
from treeopt.core.record import load_calibration

pytestmark = pytest.mark.usefixtures("one_thread")
# A template that only appends, like ChatML: a turn's prompt starts with the text before it.
APPENDING = ("{% for m in messages %}<s> {{ 'w2' if m['role'] == 'assistant' else 'w1' }} {{ m['content'] }} </s> "
             "{% endfor %}{% if add_generation_prompt %}<s> w2 {% endif %}")
WORDS = [" ".join(f"w{(7 * i + 3 * j) % 90 + 5}" for j in range(2 + i % 4)) for i in range(6)]


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("chat-llama")
    shutil.copytree(tiny_model_dir, d, dirs_exist_ok=True)
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "chat_template.jinja").unlink(missing_ok=True)
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": APPENDING}))
    return d


@pytest.fixture(scope="module")
def chat(chat_model_dir):
    return load_model(str(chat_model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory, chat):
    return random_heads(chat.model, num_heads=3, seed=1, scale=0.3).save(tmp_path_factory.mktemp("heads"))


def test_read_sharegpt_and_openai(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps([{"conversations": [
        {"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        {"conversations": [{"from": "human", "value": "no answer"}]}]))
    (tmp_path / "o.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "yo"}]}) + "\n")
    assert read_conversations(str(tmp_path / "s.json")) == [[{"role": "system", "content": "be brief"},
                                                             {"role": "user", "content": "hi"},
                                                             {"role": "assistant", "content": "yo"}]]
    assert read_conversations(str(tmp_path / "o.jsonl"))[0][1] == {"role": "assistant", "content": "yo"}
    (tmp_path / "bad.json").write_text(json.dumps([{"instruction": "hi"}]))
    with pytest.raises(TreeoptError, match="no `conversations`"):
        read_conversations(str(tmp_path / "bad.json"))


def test_one_forward_per_conversation_when_the_template_appends(chat, tiny_model_dir):
    messages = [{"role": "user", "content": "w5 w6"}, {"role": "assistant", "content": "w7 w8 w9"},
                {"role": "user", "content": "w10"}, {"role": "assistant", "content": "w11"}]
    [seq] = sequences(chat.tokenizer, messages, {2}, max_tokens=64)
    words = chat.tokenizer.convert_ids_to_tokens(seq.ids)
    assert [words[a:e] for a, e in seq.spans] == [["w7", "w8", "w9", "</s>"], ["w11", "</s>"]]
    assert seq.instructions == ["w5 w6", "w10"]
    assert [len(s.spans) for s in sequences(chat.tokenizer, messages, {2}, max_tokens=2)] == [2]
    # a template that rewrites the generation prompt: one forward per turn, the answer's own tokens
    other = load_model(str(tiny_model_dir), device="cpu").tokenizer
    seqs = sequences(other, messages, {2}, max_tokens=64)
    assert [other.convert_ids_to_tokens(s.ids[s.spans[0][0]:]) for s in seqs] == [["w7", "w8", "w9"], ["w11"]]


@given(st.lists(st.integers(1, 300), max_size=40), st.integers(1, 9))
def test_forward_groups_batch_by_length_with_little_padding(lengths, size):
    groups = forward_groups(lengths, size)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    order = [lengths[i] for g in groups for i in g]
    assert order == sorted(lengths, reverse=True)  # longest first: each group pads up to its first
    for g in groups:
        assert len(g) <= size
        assert len(g) * lengths[g[0]] - sum(lengths[i] for i in g) <= PADDING * len(g) * lengths[g[0]]


def test_hidden_states_ignore_the_padding_after_a_sequence(chat):
    long, short = list(range(3, 40)), list(range(50, 60))
    both = hidden_states(chat.model, [long, short], pad=0)  # [2, 37, H], the short one right-padded
    torch.testing.assert_close(both[1, :10], hidden_states(chat.model, [short], pad=0)[0])
    torch.testing.assert_close(both[0], hidden_states(chat.model, [long], pad=0)[0])


def test_teacher_forced_ranks_equal_a_reference(tmp_path, chat, heads_dir):
    """Multi-turn conversations of many lengths, batched by length with padding: every turn's ranks are
    those of a forward of that turn's prompt + answer alone, ranked over the whole vocabulary."""
    data = tmp_path / "chat.json"
    turns = lambda i: [{"from": "human", "value": WORDS[i]}, {"from": "gpt", "value": " ".join(WORDS[i:])},
                       {"from": "human", "value": "w9"}, {"from": "gpt", "value": WORDS[(i + 1) % 6] * (1 + i % 3)}]
    data.write_text(json.dumps([{"conversations": turns(i)[: 2 + 2 * (i % 2)]} for i in range(6)]))
    cal = load_calibration(calibrate_teacher_forced(CalibrationConfig(
        out=tmp_path / "tf", teacher_forced=str(data), heads=str(heads_dir), max_new_tokens=12, top_k=30,
        batch_size=3, shard_size=4, progress=False), loaded=chat))
    conts = cal.continuations()
    heads = MedusaHeads.load(heads_dir, chat.model)
    assert list(conts["prompt_id"]) == list(range(9)) and len({len(t) for t in conts["tokens"]}) > 3
    assert ((cal.ranks >= 0) & (cal.ranks < 30)).any() and (cal.ranks == 30).any()  # hits and misses
    for row in conts.itertuples():
        mine = cal.ranks[cal.prompt_ids == row.prompt_id]
        np.testing.assert_array_equal(mine, slow_ranks(chat.model, heads, row.prompt_ids.tolist(),
                                                       row.tokens.tolist(), 30))


def test_teacher_forced_on_the_models_own_answers_equals_generated(tmp_path, chat, heads_dir):
    """On conversations made of the prompts and the model's own greedy answers, the teacher-forced ranks
    are the generated calibration's: the same hidden states, one forward instead of a loop."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": w}) + "\n" for w in WORDS))
    common = {"heads": str(heads_dir), "max_new_tokens": 10, "top_k": 40, "batch_size": 4, "shard_size": 4,
              "progress": False}
    gen = load_calibration(calibrate(CalibrationConfig(out=tmp_path / "gen", prompts=str(prompts), **common), loaded=chat))
    conts = gen.continuations()
    answers = [chat.tokenizer.decode(t) for t in conts["tokens"]]
    data = tmp_path / "chat.json"
    data.write_text(json.dumps([{"conversations": [{"from": "human", "value": i}, {"from": "gpt", "value": a}]}
                                for i, a in zip(conts["instruction"], answers)]))
    tf = load_calibration(calibrate_teacher_forced(CalibrationConfig(out=tmp_path / "tf", teacher_forced=str(data),
                                                                     **common), loaded=chat))
    assert tf.meta["teacher_forced"] is True and tf.meta["settings"]["teacher_forced"] is True
    shared = [k for k in gen.meta if k in tf.meta]  # one writer: the same leading keys, the same meanings
    assert list(gen.meta)[:14] == list(tf.meta)[:14] == shared[:14] and tf.meta["acceptance"] == "greedy"
    assert all(tf.meta[k] == gen.meta[k] for k in ("heads", "num_heads", "top_k", "max_new_tokens", "dtype", "device"))
    assert np.array_equal(tf.prompt_ids, gen.prompt_ids) and np.array_equal(tf.positions, gen.positions)
    assert gen.num_positions >= 40 and (gen.ranks < 40).any() & (gen.ranks >= 0).any()
    assert np.array_equal(tf.ranks, gen.ranks)
    assert list(tf.continuations()["tokens"].map(list)) == list(conts["tokens"].map(list))


def test_cli_teacher_forced(tmp_path, chat_model_dir, heads_dir):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": w}, {"role": "assistant", "content": w},
                                                     {"role": "user", "content": "w9"}, {"role": "assistant", "content": "w9 w8"}]})
                            + "\n" for w in WORDS))
    r = CliRunner().invoke(app, ["calibrate", "--quiet", "--model", str(chat_model_dir), "--heads", str(heads_dir),
                                 "--teacher-forced", str(data), "--limit", "4", "--top-k", "5", "--output-dir", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert "8 assistant turns" in r.stdout
    cal = load_calibration(tmp_path / "c")
    assert cal.meta["teacher_forced"] and cal.meta["num_conversations"] == 4 and len(np.unique(cal.prompt_ids)) == 8
