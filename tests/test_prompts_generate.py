import json

import pytest
import torch

from treeopt.core.errors import TreeoptError
from treeopt.decoding.generate import generate_continuations, greedy_continuations
from treeopt.core.prompts import load_instructions, local_alpaca_eval


def test_local_alpaca_eval_copy():
    path = local_alpaca_eval()
    if path is None:
        pytest.skip("no ../shared/data/alpaca_eval.json beside this checkout")
    items = load_instructions(str(path), limit=5, offset=2)
    assert len(items) == 5 and all(isinstance(s, str) and s for s in items)
    assert items[0] == json.loads(path.read_text())[2]["instruction"]


def test_json_and_jsonl(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "hi"}, {"prompt": "yo"}]))
    (tmp_path / "b.jsonl").write_text('{"prompt": "x"}\n\n{"instruction": "y"}\n')
    assert load_instructions(str(tmp_path / "a.json")) == ["hi", "yo"]
    assert load_instructions(str(tmp_path / "b.jsonl"), limit=1) == ["x"]


@pytest.mark.parametrize("content, match", [
    ("", "empty"), ("[]", "no records"), ('[{"text": "a"}]', "instruction"), ("[{", "not valid JSON"),
])
def test_bad_files(tmp_path, content, match):
    (tmp_path / "p.json").write_text(content)
    with pytest.raises(TreeoptError, match=match):
        load_instructions(str(tmp_path / "p.json"))


def test_missing_file_and_offline_hub(tmp_path, monkeypatch):
    with pytest.raises(TreeoptError, match="not found"):
        load_instructions(str(tmp_path / "nope.jsonl"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TreeoptError, match="--prompts PATH"):
        load_instructions("alpaca_eval")


def test_greedy_continuations_match_single_generate(tiny_llama):
    prompts = [[1, 5, 6, 7], [1, 9], [1, 3, 4, 5, 6, 8, 10]]
    outs = list(greedy_continuations(tiny_llama, prompts, max_new_tokens=6, stop_ids={2}, batch_size=2,
                                     with_hidden=True))
    for p, c in zip(prompts, outs):
        ref = tiny_llama.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, eos_token_id=2,
                                  pad_token_id=0)[0, len(p):].tolist()
        assert c.tokens == ref[:len(c.tokens)]
        assert c.hidden.shape == (len(c.tokens), 32)
        # the hidden row before y_t is what the lm_head reads to predict y_t
        assert tiny_llama.lm_head(c.hidden).argmax(-1).tolist() == c.tokens


@pytest.mark.slow  # many single-row generate calls
@pytest.mark.parametrize("batch_size", [1, 3, 11])
def test_refilled_rows_match_model_generate(tiny_llama, batch_size):
    """Rows that stop early take the next prompt: same tokens and hidden states as plain generate."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 97, (int(n),), generator=g).tolist() for n in torch.randint(1, 12, (11,), generator=g)]
    stops = {2, 5, 7}
    fast = list(greedy_continuations(tiny_llama, prompts, 9, stops, batch_size, with_hidden=True))
    ref = list(generate_continuations(tiny_llama, prompts, 9, stops, batch_size, with_hidden=True))
    assert [c.prompt_ids for c in fast] == prompts
    assert [c.tokens for c in fast] == [c.tokens for c in ref]
    assert [c.stopped for c in fast] == [c.stopped for c in ref]
    assert any(c.stopped for c in fast) and not all(c.stopped for c in fast)  # rows of both kinds
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a.hidden, b.hidden, atol=1e-4, rtol=1e-4)


def test_no_new_tokens_and_empty_prompt(tiny_llama):
    assert [c.tokens for c in greedy_continuations(tiny_llama, [[1, 2], [3]], 0, {2})] == [[], []]
    with pytest.raises(TreeoptError, match="empty prompt"):
        list(greedy_continuations(tiny_llama, [[1], []], 4, {2}))
