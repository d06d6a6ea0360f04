import json

import pytest
import torch

from treeopt.core.errors import TreeoptError
from treeopt.decoding.heads import HeadsConfig, MedusaHeads
from treeopt.training.config import TrainConfig
from treeopt.training.data import Corpus, generate_data, load_corpus, magpie_instructions, magpie_prefix, read_shard
from treeopt.training.train import head_accuracy, head_loss, loss_weights, train_heads, train_heads_on


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from treeopt.decoding.models import load_model

    return load_model(str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"w{i} w{i + 1} w{i + 2}"}) + "\n" for i in range(6)))
    return path


def cfg_for(work, prompts, **kw):
    base = dict(work=str(work), model="unused", prompts=str(prompts), num_prompts=6, batch_size=2, max_new_tokens=12,
                num_heads=3, batch_tokens=128, epochs=3, lr=3e-3, eval_prompts=0, checkpoint_every_s=1e9)
    return TrainConfig(**{**base, **kw})


def test_loss_weights():
    assert torch.allclose(loss_weights(4), torch.tensor([0.8, 0.64, 0.512, 0.4096]))
    # head_loss weighs head k by 0.8^k: a loss only on head 2 counts 0.64 of it
    logits = torch.zeros(3, 2, 5)
    logits[1, :, 0] = 3.0  # head 2 is confident and wrong, heads 1 and 3 uniform
    y = torch.ones(3, 2, dtype=torch.long)
    valid = torch.ones(3, 2, dtype=torch.bool)
    total, per_head = head_loss(logits, y, valid, loss_weights(3))
    assert torch.allclose(total, (loss_weights(3) * per_head).sum())
    assert per_head[0] == pytest.approx(per_head[2]) and per_head[1] > per_head[0]
    # rows past the end of their sequence do not count
    valid[1, 0] = False
    assert head_loss(logits, y, valid, loss_weights(3))[1][1] == pytest.approx(per_head[1].item())


def test_distillation_term_is_zero_when_heads_match_the_base():
    logits = torch.randn(2, 4, 7)
    y = logits.argmax(-1)
    ce = head_loss(logits, y, torch.ones(2, 4, dtype=torch.bool), loss_weights(2))[1]
    mixed = head_loss(logits, y, torch.ones(2, 4, dtype=torch.bool), loss_weights(2), logits, distill=0.5)[1]
    assert torch.allclose(mixed, 0.5 * ce, atol=1e-5)  # KL(p || p) = 0


def test_targets_stay_within_a_sequence():
    c = Corpus(torch.zeros(5, 2, dtype=torch.float16), torch.arange(5), torch.tensor([0, 0, 0, 1, 1]))
    t, valid = c.targets(torch.arange(5), 2)
    assert valid.tolist() == [[True, True, False, True, False], [True, False, False, False, False]]
    assert t[0, :2].tolist() == [1, 2]


@pytest.mark.pipeline
def test_magpie_prefix_and_instructions(tiny):
    assert magpie_prefix(tiny.tokenizer) == tiny.tokenizer("<s> ", add_special_tokens=False)["input_ids"]
    a = magpie_instructions(tiny.model, tiny.tokenizer, 24, seed=1, stop_ids={2}, max_tokens=40)
    b = magpie_instructions(tiny.model, tiny.tokenizer, 24, seed=1, stop_ids={2}, max_tokens=40)
    assert a == b and a and all(len(s.split()) >= 3 and "</s>" not in s for s in a)


@pytest.mark.slow
def test_magpie_prefix_smollm2(smollm2):
    text = smollm2.tokenizer.decode(magpie_prefix(smollm2.tokenizer))
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\n")


def _shards(work):
    return sorted((work / "data").glob("shard-*.safetensors"))


@pytest.mark.pipeline
@pytest.mark.parametrize("source", ["file", "magpie"])
def test_shards_resume_after_interruption(tiny, tmp_path, prompts_file, monkeypatch, source):
    import treeopt.training.data as data

    prompts = "magpie" if source == "magpie" else prompts_file
    kw = dict(num_prompts=16, batch_size=8, magpie_max_tokens=24) if source == "magpie" else {}
    whole = generate_data(cfg_for(tmp_path / "a", prompts, **kw), tiny, log=lambda s: None)
    assert len(whole) == (2 if source == "magpie" else 3)
    real, calls = data.write_shard, []

    def flaky(*a):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(*a)

    monkeypatch.setattr(data, "write_shard", flaky)
    with pytest.raises(KeyboardInterrupt):
        generate_data(cfg_for(tmp_path / "b", prompts, **kw), tiny, log=lambda s: None)
    assert len(_shards(tmp_path / "b")) == 1 and not list((tmp_path / "b" / "data").glob(".shard*"))
    monkeypatch.setattr(data, "write_shard", real)
    again = generate_data(cfg_for(tmp_path / "b", prompts, **kw), tiny, log=lambda s: None)
    for x, y in zip(whole, again):
        hx, tx, ox, px = read_shard(x)
        hy, ty, oy, py = read_shard(y)
        assert torch.equal(hx, hy) and torch.equal(tx, ty) and torch.equal(ox, oy) and px == py
    if source == "file":
        assert [p for s in whole for p in read_shard(s)[3]] == [f"w{i} w{i + 1} w{i + 2}" for i in range(6)]
    # the hidden rows are what the base lm_head reads: its argmax is the greedy token
    h, t, _, _ = read_shard(whole[0])
    assert torch.equal(tiny.model.lm_head(h.float()).argmax(-1), t)
    # other data settings in the same work directory are refused
    with pytest.raises(TreeoptError, match="data set made with other settings.*new --output-dir directory"):
        generate_data(cfg_for(tmp_path / "b", prompts, **{**kw, "max_new_tokens": 5}), tiny)


def _train(tiny, work, prompts, **kw):
    cfg = cfg_for(work, prompts, **kw)
    paths = generate_data(cfg, tiny, log=lambda s: None)
    return train_heads_on(cfg, paths, tiny.model.lm_head, log=lambda s: None, progress=False)


@pytest.mark.pipeline
def test_training_lowers_the_loss_and_is_deterministic(tiny, tmp_path, prompts_file):
    heads, info = _train(tiny, tmp_path / "a", prompts_file, epochs=30, lr=0.05)
    paths = _shards(tmp_path / "a")
    corpus = load_corpus(paths, "all")
    K = heads.num_heads
    start = MedusaHeads(heads.config)
    rows = torch.arange(len(corpus))

    def loss(h):
        t, valid = corpus.targets(rows, K)
        return head_loss(h(corpus.hidden.float(), tiny.model.lm_head), corpus.tokens[t], valid, loss_weights(K))[0]

    with torch.no_grad():
        assert loss(heads) < 0.9 * loss(start)
    assert info["steps"] == info["total_steps"] > 10
    acc = head_accuracy(heads, tiny.model.lm_head, corpus)
    assert len(acc["top1"]) == K and all(0 <= a <= b <= 1 for a, b in zip(acc["top1"], acc["top5"]))
    again, _ = _train(tiny, tmp_path / "b", prompts_file, epochs=30, lr=0.05)
    for p, q in zip(heads.parameters(), again.parameters()):
        assert torch.equal(p, q)
    other, _ = _train(tiny, tmp_path / "c", prompts_file, epochs=30, lr=0.05, seed=1)
    assert any(not torch.equal(p, q) for p, q in zip(heads.parameters(), other.parameters()))


@pytest.mark.pipeline
def test_training_resumes_to_the_same_heads(tiny, tmp_path, prompts_file):
    whole, info = _train(tiny, tmp_path / "a", prompts_file)
    part, _ = _train(tiny, tmp_path / "b", prompts_file, max_steps=2)
    assert (tmp_path / "b" / "checkpoint.pt").is_file()
    resumed, info_b = _train(tiny, tmp_path / "b", prompts_file)
    assert info_b["steps"] == info["steps"]
    for p, q in zip(whole.parameters(), resumed.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    with pytest.raises(TreeoptError, match="other settings"):
        _train(tiny, tmp_path / "b", prompts_file, lr=1e-2)


@pytest.mark.pipeline
def test_pipeline_saves_loadable_heads(tiny, tiny_model_dir, tmp_path, prompts_file, monkeypatch):
    import treeopt.core.prompts

    evalset = tmp_path / "eval.json"  # the report's AlpacaEval metric, without needing ../shared or the hub
    evalset.write_text(json.dumps([{"instruction": f"Describe the number {i}."} for i in range(4)]))
    monkeypatch.setattr(treeopt.core.prompts, "default_prompts", lambda: str(evalset))
    out = tmp_path / "heads"
    cfg = cfg_for(tmp_path / "w", prompts_file, model=str(tiny_model_dir), heads_out=str(out), eval_prompts=2,
                  eval_tokens=6, num_layers=2)
    result = train_heads(cfg, log=lambda s: None, progress=False)
    loaded = MedusaHeads.load(out, tiny.model)
    assert loaded.config.num_heads == 3 and loaded.config.num_layers == 2 and not loaded.config.own_lm_head
    assert len(result["metrics"]["alpaca_eval"]["top1"]) == 3
    assert json.loads((tmp_path / "w" / "report.json").read_text())["steps"] == result["steps"]
    ckpt = torch.load(tmp_path / "w" / "checkpoint.pt", weights_only=False)["heads"]
    for k, v in loaded.heads.state_dict().items():
        assert torch.equal(v, ckpt[k])


def test_bad_inputs(tiny, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(TreeoptError, match="empty"):
        generate_data(cfg_for(tmp_path / "w", tmp_path / "empty.jsonl"), tiny)
    for name in ("/data/alpaca_eval.json", "tatsu-lab/alpaca_eval"):
        with pytest.raises(TreeoptError, match="never train"):
            generate_data(cfg_for(tmp_path / "w", name), tiny)
    with pytest.raises(TreeoptError, match="no shards"):
        train_heads(cfg_for(tmp_path / "none", "magpie", model="smollm2-135m"), stage="train")


def test_cli_one_line_error(tmp_path):
    from typer.testing import CliRunner

    from treeopt.cli import app

    r = CliRunner().invoke(app, ["train-heads", "--output-dir", str(tmp_path), "--prompts", "x/alpaca_eval.json"])
    assert r.exit_code == 2 and "error:" in r.output and "never train" in r.output and "Traceback" not in r.output
