import json

import pytest
import torch

from treeopt.core.errors import TreeoptError
from treeopt.decoding.heads import PT_FILE, ST_FILE, HeadsConfig, MedusaHeads, random_heads, resolve_heads


def test_random_heads_shapes(tiny_llama):
    heads = random_heads(tiny_llama, num_heads=3, num_layers=2)
    h = torch.randn(2, 5, 32)
    logits = heads(h, tiny_llama.lm_head)  # [K, B, S, V]
    assert logits.shape == (3, 2, 5, 97)
    assert heads.features(h).shape == (3, 2, 5, 32)


@pytest.mark.parametrize("own", [True, False])
@pytest.mark.parametrize("layers", [1, 2])
def test_round_trip(tmp_path, tiny_llama, own, layers):
    heads = random_heads(tiny_llama, num_heads=4, num_layers=layers, own_lm_head=own, seed=3)
    heads.save(tmp_path)
    assert (tmp_path / (PT_FILE if own else ST_FILE)).is_file()
    back = MedusaHeads.load(tmp_path, tiny_llama)
    assert back.config == heads.config
    h = torch.randn(3, 32)
    assert torch.equal(back(h, tiny_llama.lm_head), heads(h, tiny_llama.lm_head))


def test_reads_hand_written_medusa_v1_checkpoint(tmp_path, tiny_llama):
    """The layout of FasterDecoding/medusa-vicuna-7b-v1.3: a .pt with a projection per head, and a
    config that understates the number of heads (trust the weights, warn)."""
    H, V, K = 32, 97, 5
    state = {}
    for h in range(K):
        state[f"{h}.0.linear.weight"] = torch.randn(H, H)
        state[f"{h}.0.linear.bias"] = torch.randn(H)
        state[f"{h}.1.weight"] = torch.randn(V, H)
    torch.save(state, tmp_path / PT_FILE)
    (tmp_path / "config.json").write_text(json.dumps(
        {"medusa_num_heads": 2, "medusa_num_layers": 1, "base_model_name_or_path": "lmsys/vicuna-7b-v1.3"}))
    with pytest.warns(UserWarning, match="5"):
        heads = MedusaHeads.load(tmp_path, tiny_llama)
    assert heads.num_heads == K and heads.config.own_lm_head
    x = torch.randn(H)
    expect = state["2.1.weight"] @ (x + torch.nn.functional.silu(state["2.0.linear.weight"] @ x + state["2.0.linear.bias"]))
    torch.testing.assert_close(heads(x)[2], expect)


def test_reads_hand_written_v2_safetensors(tmp_path, tiny_llama):
    """ResBlocks only; the base model's lm_head is shared."""
    from safetensors.torch import save_file

    H = 32
    state = {f"{h}.0.linear.{p}": torch.randn(H, H) if p == "weight" else torch.randn(H)
             for h in range(4) for p in ("weight", "bias")}
    save_file(state, str(tmp_path / ST_FILE))
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 4, "medusa_num_layers": 1}))
    heads = MedusaHeads.load(tmp_path, tiny_llama)
    assert not heads.config.own_lm_head and heads.config.vocab_size == 97
    x = torch.randn(H)
    expect = tiny_llama.lm_head(x + torch.nn.functional.silu(state["1.0.linear.weight"] @ x + state["1.0.linear.bias"]))
    torch.testing.assert_close(heads(x, tiny_llama.lm_head)[1], expect)


def test_mismatched_model_is_one_line_error(tmp_path, tiny_llama):
    from tests.conftest import make_tiny_llama

    random_heads(make_tiny_llama(hidden_size=48), num_heads=2).save(tmp_path)
    with pytest.raises(TreeoptError, match="hidden size 48") as e:
        MedusaHeads.load(tmp_path, tiny_llama)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("write, match", [
    (lambda d: None, "neither"),
    (lambda d: (d / ST_FILE).write_bytes(b"garbage"), "unreadable"),
    (lambda d: torch.save({"foo": torch.zeros(1)}, d / PT_FILE), "unexpected weight"),
])
def test_bad_checkpoints(tmp_path, tiny_llama, write, match):
    write(tmp_path)
    with pytest.raises(TreeoptError, match=match):
        MedusaHeads.load(tmp_path, tiny_llama)


def test_missing_directory(tmp_path, tiny_llama):
    with pytest.raises(TreeoptError, match="not found"):
        resolve_heads(str(tmp_path / "nope"), tiny_llama)


def test_resolve_random_matches_model(tiny_llama):
    heads = resolve_heads("random", tiny_llama, num_heads=3)
    assert heads.config == HeadsConfig(hidden_size=32, vocab_size=97, num_heads=3, num_layers=1,
                                       base_model_name_or_path=heads.config.base_model_name_or_path)
