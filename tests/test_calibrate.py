import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from conftest import slow_ranks
from treeopt.core.record import ACCURACY, CONTINUATIONS, META, MISSING, RANKS, load_calibration
from treeopt.calibrate.ranks import count_above, head_ranks, head_targets
from treeopt.calibrate.run import SHARDS, TIMING, CalibrationConfig, calibrate, select_prompts
from treeopt.cli import app
from treeopt.core.errors import TreeoptError
from treeopt.decoding.heads import random_heads
from treeopt.decoding.models import load_model

WORDS = [" ".join(f"w{(7 * i + 3 * j) % 90 + 3}" for j in range(2 + i % 5)) for i in range(7)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    path.write_text("".join(json.dumps({"instruction": w}) + "\n" for w in WORDS))
    return path


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory, tiny):
    return random_heads(tiny.model, num_heads=3, seed=1, scale=0.3).save(tmp_path_factory.mktemp("heads"))


def config(out, prompts_file, heads_dir, **kw):
    kw = {"limit": 5, "max_new_tokens": 10, "top_k": 40, "batch_size": 2, "shard_size": 2, **kw}
    return CalibrationConfig(out=out, heads=str(heads_dir), prompts=str(prompts_file), progress=False, **kw)


def run(cfg, tiny, **kw):
    from treeopt.decoding.heads import resolve_heads

    return calibrate(cfg, loaded=tiny, heads=resolve_heads(cfg.heads, tiny.model), **kw)


def files(directory):
    """The run's outputs as bytes, with calibration.json's timing fields dropped."""
    meta = json.loads((directory / META).read_text())
    return {f: (directory / f).read_bytes() for f in (RANKS, ACCURACY, CONTINUATIONS)} | {
        META: {k: v for k, v in meta.items() if k not in TIMING}}


def test_head_targets():
    assert head_targets(torch.tensor([5, 6, 7]), 2).tolist() == [[6, 7, MISSING], [7, MISSING, MISSING]]
    assert head_targets(torch.tensor([5]), 3).tolist() == [[MISSING]] * 3


def test_count_above_with_bias_and_blocks():
    g = torch.Generator().manual_seed(0)
    weight, bias, x = torch.randn(23, 5, generator=g), torch.randn(23, generator=g), torch.randn(6, 5, generator=g)
    target = torch.tensor([0, 22, 7, 7, 15, 3])
    logits = x @ weight.T + bias
    expect = (logits > logits[torch.arange(6), target][:, None]).sum(1)
    for block in (1, 4, 23, 100):
        assert count_above(weight, bias, x, target, block).tolist() == expect.tolist()


@pytest.mark.parametrize("own", [False, True])
def test_head_ranks_chunks_and_own_lm_head(tiny_llama, own):
    heads = random_heads(tiny_llama, num_heads=2, own_lm_head=own, seed=3, scale=0.3)
    hidden = torch.randn(9, 32)
    targets = torch.randint(0, 97, (2, 9))
    targets[1, -2:] = MISSING
    whole = head_ranks(heads, tiny_llama.lm_head, hidden, targets, top_k=97)
    tiled = head_ranks(heads, tiny_llama.lm_head, hidden, targets, top_k=30, rows=2, block=10)  # 97 = 9 x 10 + 7
    logits = heads(hidden, tiny_llama.lm_head)  # [K, N, V]
    expect = (logits > logits.gather(2, targets.clamp(min=0)[..., None])).sum(-1).T  # [N, K]
    expect[-2:, 1] = MISSING
    assert whole.dtype == torch.int16 and whole.tolist() == expect.tolist()
    assert tiled.tolist() == torch.where(expect >= 30, 30, expect).tolist()
    for top_k in (1, 3, 8):  # small top_k: the screen decides most misses, the full count the rest
        clipped = head_ranks(heads, tiny_llama.lm_head, hidden, targets, top_k=top_k, rows=4, block=16)
        assert clipped.tolist() == torch.where(expect >= top_k, top_k, expect).tolist()


@pytest.mark.parametrize("batch_size", [1, 3])
def test_ranks_equal_slow_reference(tmp_path, tiny, prompts_file, heads_dir, batch_size):
    from treeopt.decoding.heads import MedusaHeads

    out = run(config(tmp_path / "c", prompts_file, heads_dir, batch_size=batch_size, top_k=40), tiny)
    cal = load_calibration(out)
    conts = cal.continuations()
    heads = MedusaHeads.load(heads_dir, tiny.model)
    assert list(conts["prompt_id"]) == list(range(5)) and cal.num_heads == 3
    assert (conts["source"] == "").all() and cal.sources is None  # the prompts file names no sources
    assert ((cal.ranks >= 0) & (cal.ranks < 40)).any() and (cal.ranks == 40).any()  # hits and misses
    for row in conts.itertuples():
        tokens, prompt_ids = row.tokens.tolist(), row.prompt_ids.tolist()
        if batch_size == 1:  # unbatched: exactly what a plain greedy generate gives
            ref = tiny.model.generate(torch.tensor([prompt_ids]), max_new_tokens=10, do_sample=False,
                                      eos_token_id=2, pad_token_id=0)[0, len(prompt_ids):].tolist()
            assert tokens == ref[:len(tokens)] and row.stopped == (tokens[-1] == 2)
        mine = cal.ranks[cal.prompt_ids == row.prompt_id]
        assert cal.positions[cal.prompt_ids == row.prompt_id].tolist() == list(range(len(tokens)))
        np.testing.assert_array_equal(mine, slow_ranks(tiny.model, heads, prompt_ids, tokens, 40))
    meta = cal.meta
    assert meta["batch_size"] == batch_size and meta["num_tokens"] == cal.num_positions
    assert meta["seed"] == 0 and meta["max_new_tokens"] == 10 and meta["top_k"] == 40 and "torch" in meta["versions"]
    acc = pd.read_csv(out / ACCURACY)
    assert len(acc) == 3 * 40 and acc.groupby("head")["cumulative"].max().le(1).all()


def test_interrupted_run_resumes_to_identical_files(tmp_path, tiny, prompts_file, heads_dir):
    whole = run(config(tmp_path / "a", prompts_file, heads_dir), tiny)

    def stop_after_first(i):
        if i == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(config(tmp_path / "b", prompts_file, heads_dir), tiny, on_shard=stop_after_first)
    assert not (tmp_path / "b" / RANKS).exists() and len(list((tmp_path / "b" / SHARDS).glob("*.json"))) == 2
    redone = []
    resumed = run(config(tmp_path / "b", prompts_file, heads_dir), tiny, on_shard=redone.append)
    assert redone == [1, 2]  # shard 0 was kept, not recomputed
    assert files(resumed) == files(whole)  # and a second run gives the same files as the first
    again = []
    run(config(tmp_path / "b", prompts_file, heads_dir), tiny, on_shard=again.append)
    assert again == [] and files(resumed) == files(whole)


def test_other_settings_into_same_dir_is_an_error(tmp_path, tiny, prompts_file, heads_dir):
    run(config(tmp_path / "a", prompts_file, heads_dir, limit=2), tiny)
    before = files(tmp_path / "a")
    with pytest.raises(TreeoptError, match="other settings.*top_k 40 -> 5.*new --output-dir DIR"):
        run(config(tmp_path / "a", prompts_file, heads_dir, limit=2, top_k=5), tiny)
    assert files(tmp_path / "a") == before
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / RANKS).write_text("mine")
    with pytest.raises(TreeoptError, match="unknown origin"):
        run(config(tmp_path / "x", prompts_file, heads_dir), tiny)
    assert (tmp_path / "x" / RANKS).read_text() == "mine"


def cli(*args):
    result = CliRunner().invoke(app, ["calibrate", "--quiet", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def one_line_error(stderr, match):
    """The last line is the error; nothing before it but progress bars (model loading), no traceback."""
    last = stderr.rstrip("\n").split("\n")[-1]
    return last.startswith("error: ") and match in last and "Traceback" not in stderr


def test_cli_end_to_end(tmp_path, tiny_model_dir, prompts_file, heads_dir):
    code, stdout, stderr = cli("--model", tiny_model_dir, "--heads", heads_dir, "--prompts", prompts_file,
                               "--limit", 3, "--max-new-tokens", 6, "--top-k", 5, "--batch-size", 2, "--output-dir", tmp_path / "c")
    assert code == 0, stderr
    assert "3 prompts" in stdout and "top-5 accuracy" in stdout
    cal = load_calibration(tmp_path / "c")
    assert cal.meta["model"] == str(tiny_model_dir) and cal.meta["prompts"] == str(prompts_file)
    assert cal.ranks.shape == (cal.meta["num_tokens"], 3) and cal.ranks.max() <= 5


@pytest.mark.parametrize("content, heads, match", [
    ("", "good", "is empty"),
    ('[{"text": "w4"}]', "good", "no non-empty `instruction`"),
    ('[{"instruction": "w4"}]', "other", "heads have hidden size 16"),
    ('[{"instruction": "w4"}]', "none", "not found"),
])
def test_cli_bad_inputs_one_line(tmp_path, tiny_model_dir, heads_dir, content, heads, match):
    from tests.conftest import make_tiny_llama

    (tmp_path / "p.json").write_text(content)
    if heads == "other":
        heads_dir = random_heads(make_tiny_llama(vocab_size=50, hidden_size=16), 2).save(tmp_path / "h")
    elif heads == "none":
        heads_dir = tmp_path / "missing"
    code, _, stderr = cli("--model", tiny_model_dir, "--heads", heads_dir, "--prompts", tmp_path / "p.json",
                          "--output-dir", tmp_path / "c")
    assert code == 2 and one_line_error(stderr, match)


def test_limit_draws_across_sources_and_first_keeps_the_order(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"instruction": f"i{n}", "dataset": "b" if n < 6 else "a"} for n in range(10)]))
    assert select_prompts(str(path), first=3) == (["i0", "i1", "i2"], ["b", "b", "b"])
    ins, src = select_prompts(str(path), limit=5, seed=1)
    assert sorted(src) == ["a", "a", "b", "b", "b"] and ins == sorted(ins, key=lambda s: int(s[1:]))  # shares, file order
    assert select_prompts(str(path), limit=5, seed=1) == (ins, src) != select_prompts(str(path), limit=5, seed=2)
    assert len(select_prompts(str(path))[0]) == 10
    with pytest.raises(TreeoptError, match="--limit and --first"):
        CalibrationConfig(limit=2, first=2).check()


def test_bad_numbers(tmp_path, tiny_model_dir, prompts_file):
    code, _, stderr = cli("--model", tiny_model_dir, "--prompts", prompts_file, "--top-k", 0, "--output-dir", tmp_path)
    assert code == 2 and one_line_error(stderr, "--top-k is 0")


def test_alpaca_eval_offline_names_dataset_path(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, stderr = cli("--model", tiny_model_dir, "--prompts", "alpaca_eval", "--output-dir", tmp_path)
    assert code == 2 and one_line_error(stderr, "--prompts PATH")
