"""The EAGLE-3 drafter (treeopt.decoding.eagle3, treeopt.training.eagle3): its checkpoint is the layout
vLLM's `Eagle3LlamaForCausalLM` loads; a drafter trained by training-time test on a tiny random model's
own greedy text drafts what its calibration ranks replay, prompt by prompt, lossless (float32)."""

from __future__ import annotations

import json

import pytest
import torch

from treeopt.core.errors import TreeoptError
from treeopt.core.tree import Tree
from treeopt.decoding import decoder
from treeopt.decoding.drafters import Eagle3Drafter, resolve_drafter
from treeopt.decoding.eagle3 import Eagle3Config, for_model, load_eagle3, save_eagle3
from treeopt.training.eagle3 import aux_states, depth_targets, draft_vocabulary, sequence_loss

from test_drafters import PROMPTS, replay_matches_decoder

pytestmark = pytest.mark.usefixtures("one_thread")
AUX = (0, 1, 1)  # the tiny model has 2 layers


def tiny_texts(model, n: int = 24, new: int = 40):
    """Greedy continuations of random prompts: (text ids, prompt length) each."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 97, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
    out = []
    for p in prompts:
        tokens = decoder.TreeDecoder(model, None, Tree(()), stop_ids=()).generate(p, new).tokens
        out.append((p + tokens, len(p)))
    return out


def train_tiny(model, steps: int = 3, iters: int = 150, draft_vocab: int = 97):
    texts = tiny_texts(model)
    aux = aux_states(model, [t for t, _ in texts], AUX)
    seqs = [(a, torch.tensor(t), p) for a, (t, p) in zip(aux, texts)]
    eagle = for_model(model, draft_vocab_size=draft_vocab, aux_layers=AUX)
    eagle.set_vocab(draft_vocabulary(seqs, draft_vocab, 97) if draft_vocab < 97 else torch.arange(97))
    eagle.embed.requires_grad_(False)
    params = [p for p in eagle.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-3)
    index = eagle.draft_index()
    torch.manual_seed(0)
    with torch.enable_grad():
        for i in range(iters):
            aux_i, ids, p = seqs[i % len(seqs)]
            opt.zero_grad()
            loss, _ = sequence_loss(eagle, aux_i, ids, p, steps, index)
            loss.backward()
            opt.step()
    return eagle.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def trained(tiny_llama):
    return train_tiny(tiny_llama)


def test_checkpoint_is_vllms_eagle3_layout(tmp_path, tiny_llama):
    eagle = for_model(tiny_llama, draft_vocab_size=40, aux_layers=AUX)
    keep = torch.arange(3, 97, 2)[:40]
    eagle.set_vocab(keep)
    assert torch.equal(eagle.target_ids(), keep)  # vLLM: target id = draft id + d2t[draft id]
    assert eagle.t2d.sum() == 40 and eagle.t2d[keep].all()
    save_eagle3(eagle, tmp_path / "e")
    config = json.loads((tmp_path / "e" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["num_hidden_layers"] == 1
    assert config["draft_vocab_size"] == 40 and config["vocab_size"] == 97
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == list(AUX)
    from safetensors.torch import load_file

    names = set(load_file(str(tmp_path / "e" / "model.safetensors")))
    assert names == {"fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d",
                     *(f"midlayer.{n}.weight" for n in ("input_layernorm", "hidden_norm", "post_attention_layernorm",
                       "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))}  # no embed_tokens: vLLM shares the target's
    again = load_eagle3(tmp_path / "e", tiny_llama)
    for k, v in eagle.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    assert again.midlayer.self_attn.q_proj.weight.shape[1] == 2 * 32  # [embed, hidden]
    assert Eagle3Config.from_hf(config) == eagle.config


def test_bad_checkpoints_are_one_line(tmp_path, tiny_llama):
    with pytest.raises(TreeoptError, match="no config.json"):
        load_eagle3(tmp_path, tiny_llama)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(TreeoptError, match="not valid JSON"):
        load_eagle3(tmp_path, tiny_llama)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(TreeoptError, match="not an EAGLE-3 checkpoint"):
        load_eagle3(tmp_path, tiny_llama)
    eagle = for_model(tiny_llama, aux_layers=AUX)
    save_eagle3(eagle, tmp_path / "e")
    from conftest import make_tiny_llama

    with pytest.raises(TreeoptError, match="vocabulary 97"):
        load_eagle3(tmp_path / "e", make_tiny_llama(vocab_size=50))
    with pytest.raises(TreeoptError, match="layer 5"):
        save_eagle3(for_model(make_tiny_llama(layers=6), aux_layers=(0, 1, 5)), tmp_path / "deep")
        load_eagle3(tmp_path / "deep", tiny_llama)


def test_depth_targets_skip_the_prompt():
    ids = torch.arange(10, 20)  # prompt of 4, then 6 continuation tokens
    targets, valid = depth_targets(ids, 4, 2)
    assert targets[0, 0] == 12 and targets[1, 0] == 13  # row 0: x_2 at depth 1, x_3 at depth 2
    assert valid[0].tolist() == [False, False, True, True, True, True, True, True, False]
    assert valid[1].tolist() == [False, True, True, True, True, True, True, False, False]


def test_trained_drafter_replays_the_decoder(tiny_llama, trained):
    drafter = Eagle3Drafter(trained, tiny_llama)
    tree = Tree(Tree.cartesian([3, 2]).paths + ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 0, 0)))
    accepted = replay_matches_decoder(tiny_llama, drafter, tree, top_k=3, prompts=PROMPTS)
    assert accepted > 20  # trained on the model's own text, it drafts it
    chain = Tree(((0,), (0, 0), (0, 0, 0)))
    assert replay_matches_decoder(tiny_llama, drafter, chain, top_k=1, prompts=PROMPTS) > 10


def test_reduced_draft_vocabulary_replays_the_decoder(tiny_llama):
    eagle = train_tiny(tiny_llama, iters=60, draft_vocab=30)
    drafter = Eagle3Drafter(eagle, tiny_llama)
    tree = Tree(Tree.cartesian([2, 2]).paths + ((0, 0, 0),))
    replay_matches_decoder(tiny_llama, drafter, tree, top_k=3, prompts=PROMPTS)
    with pytest.raises(TreeoptError, match="narrower tree"):
        decoder.TreeDecoder(tiny_llama, drafter, Tree(((30,),)))


def test_resolve_eagle3(tmp_path, tiny_llama, trained):
    save_eagle3(trained, tmp_path / "e")
    drafter = resolve_drafter(f"eagle3:{tmp_path / 'e'}", tiny_llama)
    assert isinstance(drafter, Eagle3Drafter) and drafter.describe()["kind"] == "eagle3"
    assert len(drafter.describe()["sha256"]) == 64


def test_eagle3_on_the_avx2_load_takes_its_products_and_decodes_losslessly(tmp_path, tiny_llama, trained):
    """On the AVX2 decode-time load (PackedLinear linears) the drafter's linears are PackedLinear
    too, and a tree it drafts decodes what plain greedy decoding of the float32 reference does."""
    from conftest import make_tiny_llama
    from treeopt.decoding.models import PackedLinear, packed_linears

    save_eagle3(trained, tmp_path / "e")
    fast = packed_linears(make_tiny_llama())  # tiny_llama's weights, the AVX2 load's products
    reference = resolve_drafter(f"eagle3:{tmp_path / 'e'}", tiny_llama)
    assert not any(isinstance(m, PackedLinear) for m in reference.eagle.modules())
    drafter = resolve_drafter(f"eagle3:{tmp_path / 'e'}", fast)
    linears = [m for m in drafter.eagle.modules() if isinstance(m, (torch.nn.Linear, PackedLinear))]
    assert linears and all(isinstance(m, PackedLinear) for m in linears)
    tree = Tree(Tree.cartesian([3, 2]).paths + ((0, 0, 0),))
    for p in PROMPTS:
        want = decoder.decode(tiny_llama, None, Tree(()), p, 24).tokens
        with torch.inference_mode():
            assert decoder.decode(fast, drafter, tree, p, 24).tokens == want


@pytest.mark.slow
def test_shipped_eagle3_replays_the_decoder_on_the_bundled_model(smollm2):
    """The EAGLE-3 drafter shipped for the bundled model (fp32): its record replays the decoder's steps
    prompt by prompt, for a searched-size tree and a chain, and it drafts accepted tokens."""
    from treeopt.decoding.models import chat_prompt, stop_token_ids

    model, tok = smollm2.model, smollm2.tokenizer
    drafter = resolve_drafter("eagle3", model)
    stop = tuple(sorted(stop_token_ids(model, tok)))
    prompts = [chat_prompt(tok, s) for s in ("Give three tips for staying healthy.",
                                             "Write a Python function that adds two numbers.")]
    tree = Tree(Tree.cartesian([3, 2]).paths + ((0, 0, 0), (0, 0, 0, 0)))
    assert replay_matches_decoder(model, drafter, tree, top_k=3, prompts=prompts, max_new_tokens=40, stop=stop) > 20
    chain = Tree(((0,), (0, 0), (0, 0, 0)))
    assert replay_matches_decoder(model, drafter, chain, top_k=1, prompts=prompts, max_new_tokens=40, stop=stop) > 10


def test_train_drafter_resumes_to_the_same_drafter_and_saves_it(tmp_path, tiny_model_dir):
    """`treeopt train-drafter --kind eagle3`'s twin: a run stopped after 2 steps saves no drafter; its rerun
    resumes and ends with the weights of an uninterrupted run, saved in the layout load_eagle3 reads."""
    from dataclasses import replace

    from treeopt.decoding.models import load_model
    from treeopt.training.config import DrafterTrainConfig
    from treeopt.training.eagle3 import train_drafter

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": f"w{i} w{i + 1} w{i + 2}"}) + "\n" for i in range(8)))
    cfg = DrafterTrainConfig(work=str(tmp_path / "a"), model=str(tiny_model_dir), prompts=str(prompts), num_prompts=8,
                             batch_size=4, max_new_tokens=16, draft_vocab=40, epochs=2, batch_sequences=2,
                             checkpoint_every_s=1e9, drafter_out=str(tmp_path / "e3a"), max_steps=2)
    first = train_drafter(cfg, log=lambda s: None, progress=False)
    assert first["steps"] == 2 and not first["finished"] and not (tmp_path / "e3a").exists()
    resumed = train_drafter(replace(cfg, max_steps=None), log=lambda s: None, progress=False)
    assert resumed["finished"] and resumed["steps"] == resumed["total_steps"] > 2
    whole = train_drafter(replace(cfg, work=str(tmp_path / "b"), drafter_out=str(tmp_path / "e3b"), max_steps=None),
                          log=lambda s: None, progress=False)
    assert whole["steps"] == resumed["steps"]
    model = load_model(str(tiny_model_dir), device="cpu", dtype="float32").model
    a, b = load_eagle3(tmp_path / "e3a", model), load_eagle3(tmp_path / "e3b", model)
    assert a.config.draft_vocab_size == 40 and a.config.aux_layers == (1, 1, 0)
    for k, v in a.state_dict().items():
        assert torch.allclose(v.float(), b.state_dict()[k].float(), atol=1e-6), k
    with pytest.raises(TreeoptError, match="other settings"):
        train_drafter(replace(cfg, max_steps=None, lr=5e-3), log=lambda s: None, progress=False)
