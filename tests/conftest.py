"""Shared fixtures: a tiny random Llama (fast tests) and the bundled SmolLM2 (slow, end-to-end), and
the test tiers. `pytest -m "not slow"` is the fast tier: no bundled model, no real processes, no
whole pipelines. `process` (real `treeopt` processes: kill -9, accelerate launch) and `pipeline`
(a whole run on a tiny model) tests belong to the slow tier too. torch is imported inside the
fixtures, so the torch-free core's tests run without it."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("process") or item.get_closest_marker("pipeline"):
            item.add_marker(pytest.mark.slow)


def make_tiny_llama(vocab_size: int = 97, hidden_size: int = 32, layers: int = 2, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads; on a shared, busy CPU a second OpenMP thread only spins
    (10x slower). Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_llama):
    """The tiny Llama saved with a word-level tokenizer and a chat template: loadable by --model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(tiny_llama.config.vocab_size - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>")
    fast.chat_template = "{% for m in messages %}<s> {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w0 {% endif %}"
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama.save_pretrained(d)
    fast.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def smollm2():
    """The bundled SmolLM2-135M-Instruct (fp32, CPU). Slow: use in end-to-end tests only."""
    from treeopt.decoding.models import load_model

    return load_model("smollm2-135m", device="cpu", dtype="float32")


def slow_ranks(model, heads, prompt_ids, tokens, top_k):
    """Reference ranks [T, K] of a continuation: a forward of prompt + continuation alone, every head's
    full argsort of its logits."""
    import numpy as np
    import torch

    from treeopt.core.record import MISSING

    P, T, K = len(prompt_ids), len(tokens), heads.num_heads
    hidden = model.model(torch.tensor([prompt_ids + tokens])).last_hidden_state[0, P - 1:P - 1 + T]  # [T, H]
    order = heads(hidden, model.lm_head).argsort(-1, descending=True)  # [K, T, V]
    out = np.full((T, K), MISSING)
    for t in range(T):
        for k in range(1, K + 1):
            if t + k < T:
                out[t, k - 1] = min((order[k - 1, t] == tokens[t + k]).nonzero().item(), top_k)
    return out


def random_ranks(lengths, num_heads: int, top_k: int, seed: int = 0, miss: float = 0.3):
    """Correlated rank matrices, one [T, K] int16 array per prompt: a per-position easiness drives
    every head (so heads are not independent), misses are top_k, -1 past the continuation's end."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for T in lengths:
        easy = rng.random((T, 1))  # [T, 1]
        r = np.floor(-np.log(rng.random((T, num_heads))) * (1 + 2 * (1 - easy)) * (1 + np.arange(num_heads)) / 2)
        r = np.where(rng.random((T, num_heads)) < miss * (1 - easy), top_k, np.minimum(r, top_k)).astype(np.int16)
        t, k = np.arange(T)[:, None], np.arange(1, num_heads + 1)[None, :]
        out.append(np.where(t + k >= T, -1, r).astype(np.int16))  # [T, K]
    return out


@pytest.fixture
def make_calibration(tmp_path):
    """make(ranks_by_prompt, top_k, sources=None, instructions=None) writes a calibration directory
    with treeopt.core.record's write_calibration (continuations are placeholders but for the given
    per-prompt sources and instructions) and returns it loaded."""
    import numpy as np
    import pandas as pd

    from treeopt.core.record import load_calibration, rank_columns, write_calibration

    def make(ranks_by_prompt, top_k: int, name: str = "calibration", sources=None, instructions=None):
        K = ranks_by_prompt[0].shape[1]
        ranks = pd.DataFrame(np.concatenate(ranks_by_prompt), columns=rank_columns(K))
        ranks.insert(0, "position", np.concatenate([np.arange(len(r)) for r in ranks_by_prompt]).astype(np.int32))
        ranks.insert(0, "prompt_id", np.repeat(np.arange(len(ranks_by_prompt)), [len(r) for r in ranks_by_prompt]).astype(np.int32))
        continuations = pd.DataFrame({"prompt_id": np.arange(len(ranks_by_prompt)), "instruction": instructions or "x",
                                      "prompt_ids": [[1]] * len(ranks_by_prompt),
                                      "tokens": [[3] * len(r) for r in ranks_by_prompt], "stopped": True,
                                      "source": sources or ""})
        write_calibration(tmp_path / name, ranks, continuations, {"top_k": top_k, "model": "test"})
        return load_calibration(tmp_path / name)

    return make
