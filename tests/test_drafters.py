"""Every drafter behind treeopt.decoding.drafters: its calibration ranks replay the steps the tree
decoder takes with it, prompt by prompt (float32, tiny random models), and its proposals are right
(n-gram: vLLM's rule against a brute-force reference; a draft model equal to the base model: every
token accepted)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from treeopt.core.drafter import parse_drafter
from treeopt.core.errors import TreeoptError
from treeopt.core.record import Calibration
from treeopt.core.replay import replay
from treeopt.core.tree import Tree
from treeopt.decoding import decoder
from treeopt.decoding.drafters import DraftModelDrafter, HeadsDrafter, NgramDrafter, ngram_propose
from treeopt.decoding.heads import random_heads

pytestmark = pytest.mark.usefixtures("one_thread")


def brute_ngram(context: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """vLLM's prompt lookup, literally: for n = max..min, the earliest start s whose n tokens equal the
    last n and end before the last token; the k tokens after it."""
    L = len(context)
    for n in range(max_n, min_n - 1, -1):
        for s in range(0, L - n):
            if context[s:s + n] == context[L - n:]:
                return context[s + n:s + n + k]
    return []


def test_ngram_matches_brute_force_reference():
    rng = np.random.default_rng(0)
    for trial in range(400):
        L = int(rng.integers(1, 40))
        ctx = rng.integers(0, int(rng.integers(2, 6)), size=L).tolist()  # small alphabets: many matches
        lo = int(rng.integers(1, 4))
        hi = lo + int(rng.integers(0, 3))
        k = int(rng.integers(1, 6))
        assert ngram_propose(ctx, lo, hi, k) == brute_ngram(ctx, lo, hi, k), (ctx, lo, hi, k)
    assert ngram_propose([1, 2, 3, 1, 2], 2, 2, 3) == [3, 1, 2]
    assert ngram_propose([7, 1, 2, 9, 1, 2, 5, 1, 2], 2, 2, 1) == [9]  # the earliest occurrence, as vLLM
    assert ngram_propose([1, 2, 3], 1, 3, 2) == []


def test_parse_drafter():
    assert str(parse_drafter(None)) == "heads"
    assert str(parse_drafter("ngram")) == "ngram:5-5"
    assert (parse_drafter("ngram:2-4").min_n, parse_drafter("ngram:2-4").max_n) == (2, 4)
    assert parse_drafter("draft:some/dir").path == "some/dir"
    for bad in ("medusa", "ngram:4-2", "ngram:x", "draft"):
        with pytest.raises(TreeoptError):
            parse_drafter(bad)


def perturbed(model, scale: float, seed: int = 1):
    """A copy of `model` with noise on every weight: a draft model that agrees with it often, not always."""
    g = torch.Generator().manual_seed(seed)
    draft = copy.deepcopy(model)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp(min=1e-3))
    return draft


def replay_matches_decoder(model, drafter, tree: Tree, top_k: int, prompts, max_new_tokens: int = 30, stop=(2,)):
    """Calibration ranks of `drafter` on each prompt's greedy continuation (ending at a `stop` token)
    -> replayed steps, compared with the decoder's steps prompt by prompt; returns the nodes accepted in all."""
    ranks, steps, accepted = [], [], 0
    for prompt in prompts:
        result = decoder.TreeDecoder(model, drafter, tree, stop_ids=()).generate(prompt, max_new_tokens)
        reference = decoder.greedy_reference(model, prompt, max_new_tokens, stop_ids=stop)
        tokens = reference.tokens[:max_new_tokens]
        end = next((i for i, t in enumerate(tokens) if t in stop), None)
        if end is not None:  # the reference stops there; the decoder was told never to stop
            tokens = tokens[: end + 1]
        assert result.tokens[: len(tokens)] == tokens  # greedy decoding with any drafter is lossless
        result = decoder.TreeDecoder(model, drafter, tree, stop_ids=set(stop)).generate(prompt, max_new_tokens)
        assert result.tokens == tokens
        ranks.append(drafter.ranks(prompt, tokens, top_k, tree.depth).numpy())
        steps.append(result.steps)
        accepted += sum(result.accepted)
    lengths = [len(r) for r in ranks]
    cal = Calibration(np.concatenate(ranks), np.repeat(np.arange(len(ranks)), lengths).astype(np.int32),
                      np.concatenate([np.arange(T) for T in lengths]).astype(np.int32), top_k)
    assert replay(tree, cal).steps.tolist() == steps
    return accepted


PROMPTS = [[5, 9, 5, 9, 5], [3, 4, 5, 6, 7, 8], [11, 12, 11]]


def test_ngram_replay_equals_decoder(tiny_llama):
    chain = Tree(((0,), (0, 0), (0, 0, 0)))
    accepted = replay_matches_decoder(tiny_llama, NgramDrafter(1, 3), chain, top_k=4, prompts=PROMPTS, max_new_tokens=40)
    assert accepted > 5  # a random Llama repeats itself: the lookup accepts tokens


def test_ngram_refuses_a_tree(tiny_llama):
    with pytest.raises(TreeoptError, match="chain"):
        decoder.TreeDecoder(tiny_llama, NgramDrafter(1, 3), Tree.cartesian([2, 1]))


def test_draft_model_replay_equals_decoder(tiny_llama):
    drafter = DraftModelDrafter(perturbed(tiny_llama, 0.3))
    tree = Tree(Tree.cartesian([3, 2]).paths + ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 0, 0)))
    accepted = replay_matches_decoder(tiny_llama, drafter, tree, top_k=3, prompts=PROMPTS)
    assert accepted > 10
    chain = Tree(((0,), (0, 0), (0, 0, 0)))
    assert replay_matches_decoder(tiny_llama, drafter, chain, top_k=1, prompts=PROMPTS) > 5


def test_draft_model_equal_to_base_accepts_every_token(tiny_llama):
    drafter = DraftModelDrafter(tiny_llama)
    chain = Tree(((0,), (0, 0), (0, 0, 0)))
    result = decoder.TreeDecoder(tiny_llama, drafter, chain, stop_ids=()).generate([3, 4, 5], 41)
    assert result.accepted == [3] * 11  # root + 3 accepted at every step (the last one cut at 41)
    assert len(result.tokens) == 41 and result.steps == 11
    ranks = drafter.ranks([3, 4, 5], result.tokens, 4, 3).numpy()
    assert (ranks[ranks >= 0] == 0).all()


def test_heads_drafter_decodes_as_heads(tiny_llama):
    heads = random_heads(tiny_llama, num_heads=3, seed=0)
    tree = Tree.cartesian([3, 2])
    a = decoder.TreeDecoder(tiny_llama, heads, tree, stop_ids=()).generate([3, 4, 5], 20)
    b = decoder.TreeDecoder(tiny_llama, HeadsDrafter(heads), tree, stop_ids=()).generate([3, 4, 5], 20)
    assert (a.tokens, a.accepted) == (b.tokens, b.accepted)


@pytest.mark.parametrize("drafter", ["ngram:1-3", "draft", "eagle3"])
def test_calibrate_records_any_drafter_and_replays_the_decoder(tmp_path, tiny_model_dir, tiny_llama, drafter):
    """`treeopt calibrate --drafter`: the same files, naming the drafter; a rerun resumes (same bytes);
    the record replays the decoder's steps with that drafter, prompt by prompt."""
    import json

    from typer.testing import CliRunner

    from treeopt.cli import app
    from treeopt.core.record import RANKS, load_calibration
    from treeopt.decoding.drafters import resolve_drafter
    from treeopt.decoding.models import load_model

    spec = f"draft:{tiny_model_dir}" if drafter == "draft" else drafter
    if drafter == "eagle3":  # trained for the tiny model on its own text (tests/test_eagle3.py)
        from test_eagle3 import train_tiny

        from treeopt.decoding.eagle3 import save_eagle3

        spec = f"eagle3:{save_eagle3(train_tiny(tiny_llama, iters=60), tmp_path / 'e3')}"
    model_drafter = drafter in ("draft", "eagle3")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": w}) + "\n" for w in ["w4 w5 w4", "w7", "w9 w9 w3 w9", "w12 w5"]))
    args = ["calibrate", "--model", str(tiny_model_dir), "--drafter", spec, "--draft-depth", "3", "--prompts",
            str(prompts), "--max-new-tokens", "24", "--batch-size", "1", "--shard-size", "2",
            "--output-dir", str(tmp_path / "c"), "--quiet"] + (["--top-k", "5"] if model_drafter else [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    first = (tmp_path / "c" / RANKS).read_bytes()
    assert CliRunner().invoke(app, args).exit_code == 0 and (tmp_path / "c" / RANKS).read_bytes() == first
    cal = load_calibration(tmp_path / "c")
    assert cal.meta["drafter"]["kind"] == drafter.split(":")[0] and len(cal.meta["drafter"]["sha256"]) == 64
    assert cal.meta["settings"]["drafter"] == spec and cal.ranks.shape[1] == 3
    assert cal.top_k == (5 if model_drafter else 1)  # n-gram lookup: one candidate per depth

    loaded = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    drafting = resolve_drafter(spec, loaded.model)
    chain = Tree(((0,), (0, 0), (0, 0, 0)))
    steps = []
    conts = cal.continuations().sort_values("prompt_id")
    for ids, tokens in zip(conts["prompt_ids"], conts["tokens"]):
        out = decoder.TreeDecoder(loaded.model, drafting, chain).generate(list(ids), 24)
        assert out.tokens == list(tokens)
        steps.append(out.steps)
    assert replay(chain, cal).steps.tolist() == steps
    if drafter == "draft":  # the base model drafting for itself: every recorded rank is 0
        assert (cal.ranks[cal.ranks >= 0] == 0).all()

    # search reads the record unchanged, and names its drafter
    result = CliRunner().invoke(app, ["search", "-c", str(tmp_path / "c"), "--nodes", "3", "-o", str(tmp_path / "t.json")])
    assert result.exit_code == 0 and f"drafter {spec}, 3 depths" in result.output, result.output
    if drafter == "ngram:1-3":  # one candidate per depth: the search finds the chain
        assert json.loads((tmp_path / "t.json").read_text())["medusa_choices"] == [[0], [0, 0], [0, 0, 0]]

    # bench and decode with the same drafter: lossless, and the record's prediction is what it measures
    bench = ["bench", "--model", str(tiny_model_dir), "--drafter", spec, "--tree", "[[0], [0, 0], [0, 0, 0]]",
             "--prompts", str(prompts), "--first", "4", "--max-new-tokens", "24", "--device", "cpu", "--dtype",
             "float32", "--repeats", "1", "--calibration", str(tmp_path / "c"), "-o", str(tmp_path / "b")]
    result = CliRunner().invoke(app, bench)
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "b" / "bench.json").read_text())["rows"][2]
    assert row["match_rate"] == 1.0
    assert row["tokens_per_step"] == pytest.approx(row["predicted_tokens_per_step"], abs=1e-6)
    result = CliRunner().invoke(app, ["decode", "w4 w5 w4", "--model", str(tiny_model_dir), "--drafter", spec,
                                      "--tree", "[[0], [0, 0]]", "--max-new-tokens", "8", "--device", "cpu"])
    assert result.exit_code == 0 and "tokens/step" in result.output, result.output
    other = "ngram:2-2" if model_drafter else "ngram:1-2"  # a record of another drafter is refused
    result = CliRunner().invoke(app, [*bench[:4], other, *bench[5:]])
    assert result.exit_code == 2 and "calibrated with --drafter" in result.output, result.output


def test_drafter_options_checked():
    from treeopt.core.settings import CalibrationConfig

    with pytest.raises(TreeoptError, match="--heads"):
        CalibrationConfig(drafter="ngram", heads="x")
    with pytest.raises(TreeoptError, match="--draft-depth"):
        CalibrationConfig(draft_depth=3)
    with pytest.raises(TreeoptError, match="greedy"):
        CalibrationConfig(drafter="ngram", acceptance="typical")
    with pytest.raises(TreeoptError, match="top-k 1"):
        CalibrationConfig(drafter="ngram", top_k=4)
    with pytest.raises(TreeoptError, match="unknown --drafter"):
        CalibrationConfig(drafter="eagle")


@pytest.mark.slow
def test_bundled_model_ngram_and_itself_as_draft(smollm2):
    """The bundled model (fp32): n-gram lookup's record replays the decoder's chain steps prompt by
    prompt, and the model drafting for itself has every token accepted."""
    from treeopt.decoding.models import chat_prompt, stop_token_ids

    model, tok = smollm2.model, smollm2.tokenizer
    stop = tuple(sorted(stop_token_ids(model, tok)))
    prompts = [chat_prompt(tok, s) for s in ("List the days of the week, then list them again.",
                                             "Write a Python function that adds two numbers.")]
    chain = Tree(((0,), (0, 0), (0, 0, 0)))
    assert replay_matches_decoder(model, NgramDrafter(1, 3), chain, top_k=4, prompts=prompts, max_new_tokens=48,
                                  stop=stop) > 5
    drafter = DraftModelDrafter(model)
    result = decoder.TreeDecoder(model, drafter, chain, stop_ids=()).generate(prompts[0], 48)
    assert result.accepted == [3] * 12
    ranks = drafter.ranks(prompts[0], result.tokens, 4, 3).numpy()
    assert (ranks[ranks >= 0] == 0).all()


def test_calibrating_heads_behind_the_interface_is_calibrating_heads(tmp_path, tiny_model_dir):
    import json

    from treeopt.calibrate.run import calibrate
    from treeopt.core.record import RANKS
    from treeopt.core.settings import CalibrationConfig
    from treeopt.decoding.models import load_model

    loaded = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    heads = random_heads(loaded.model, num_heads=2, seed=1, scale=0.3)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": w}) + "\n" for w in ["w4 w5", "w7"]))
    kw = dict(prompts=str(prompts), max_new_tokens=8, top_k=5, progress=False)
    a = calibrate(CalibrationConfig(out=tmp_path / "a", **kw), loaded=loaded, heads=heads)
    b = calibrate(CalibrationConfig(out=tmp_path / "b", **kw), loaded=loaded, heads=HeadsDrafter(heads))
    assert (a / RANKS).read_bytes() == (b / RANKS).read_bytes()
    meta = json.loads((b / "calibration.json").read_text())
    assert meta["drafter"]["kind"] == "heads" and meta["settings"]["heads_sha256"] == meta["drafter"]["sha256"]
