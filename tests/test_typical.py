"""Typical acceptance: the probe decode against the decoder (the record's exact part), the estimator and
search on hand-made records, and `calibrate|search|evaluate|sweep|bench --acceptance typical`."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from treeopt.calibrate.typical import ProbeDecoder, probe_tree
from treeopt.decoding.decoder import Acceptance, TreeDecoder
from treeopt.decoding.heads import random_heads
from treeopt.search import typical
from treeopt.search.crossval import cross_validated
from treeopt.search.grow import search
from treeopt.search.typical import Typical
from treeopt.cli import app
from treeopt.core.record import TypicalRecord, flag_columns
from treeopt.core.tree import Tree

pytestmark = pytest.mark.usefixtures("one_thread")

# The tiny random Llama's distributions are nearly flat: alpha 1.1 puts the threshold where some
# candidates pass and some do not.
RULE = Acceptance("typical", temperature=1.0, posterior_threshold=0.09, posterior_alpha=1.1, seed=3)
INTERNAL = Tree.cartesian([3, 2])
TOP_K = 4


def record_of(tables: list[pd.DataFrame], probe: Tree) -> TypicalRecord:
    df = pd.concat([t.assign(prompt_id=i) for i, t in enumerate(tables)], ignore_index=True)
    return TypicalRecord(df[flag_columns(len(probe))].to_numpy(bool), df["prompt_id"].to_numpy(np.int32),
                         df["position"].to_numpy(np.int32), probe,
                         {"num_heads": 3, "temperature": 1.0, "posterior_threshold": 0.09, "posterior_alpha": 1.1,
                          "seed": 3})


@pytest.fixture(scope="module")
def probed(tiny_llama):
    heads = random_heads(tiny_llama, num_heads=3, seed=0)
    probe = probe_tree(INTERNAL, TOP_K, 3)
    prompts = [np.random.default_rng(i).integers(3, 97, size=4 + i).tolist() for i in range(4)]
    dec = ProbeDecoder(tiny_llama, heads, probe, RULE, stop_ids=(), top_k=TOP_K)
    tables, results = zip(*(dec.probe_decode(p, 40) for p in prompts))
    return heads, probe, prompts, tables, results, record_of(list(tables), probe)


def test_probe_tree_holds_every_child_of_the_internal_nodes():
    probe = probe_tree(Tree(((0,), (1,), (0, 0))), top_k=2, num_heads=3)
    assert probe.paths == ((0,), (1,), (0, 0), (0, 1), (1, 0), (1, 1), (0, 0, 0), (0, 0, 1))


def test_probe_decode_is_the_decoders_and_logs_its_steps(tiny_llama, probed):
    """The record's steps are the decoder's own with the probe tree (same seed, same tokens): its roots
    and accepted depths, and its tests are not trivial."""
    heads, probe, prompts, tables, results, record = probed
    depth = typical.depths(record, probe)
    for i, prompt in enumerate(prompts):
        ref = TreeDecoder(tiny_llama, heads, probe, RULE, stop_ids=(), top_k=TOP_K).generate(prompt, 40)
        assert results[i].tokens == ref.tokens and depth[record.prompt_ids == i].tolist() == ref.accepted
        assert tables[i]["token"].tolist() == [ref.tokens[p] for p in tables[i]["position"]]  # the roots
    assert 0 < depth.mean() < probe.depth and 0 < record.flags.mean() < 1


def closed_subtrees(probe: Tree, count: int, seed: int = 0):
    """Random subtrees of `probe` (every parent kept), in parent-first order."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        keep = set()
        for p in probe.paths:
            if (len(p) == 1 or p[:-1] in keep) and rng.random() < 0.6:
                keep.add(p)
        yield Tree(tuple(p for p in probe.paths if p in keep))


def accepted_from(dec: TreeDecoder, prefix: list[int], root: int) -> int:
    """The depth `dec` accepts in one step with `root` after `prefix` (prompt + output so far), as
    `generate` takes a step: candidates from the heads at the prefix's last token."""
    dec._prepare(len(prefix) + dec.buf.num_nodes)
    hidden, _ = dec.prefill(torch.tensor(prefix))  # [H]
    tokens = torch.cat([torch.tensor([root]), dec.candidates(hidden).flatten()[dec.buf.candidate_index]])  # [N]
    logits, _, _ = dec.tree_forward(tokens)
    return len(dec.accept(tokens, logits)) - 1


@torch.inference_mode()
def test_any_subtree_accepts_what_the_decoder_accepts(tiny_llama, probed):
    """The exact part: in every logged step (its prefix and root), a subtree's decoder accepts the
    depth the record gives it."""
    heads, probe, prompts, _, results, record = probed
    checked = set()
    for tree in closed_subtrees(probe, 4):
        dec = TreeDecoder(tiny_llama, heads, tree, RULE, stop_ids=(), top_k=TOP_K)
        got = typical.depths(record, tree)
        for row in range(0, record.num_steps, 3):
            i, pos = record.prompt_ids[row], record.positions[row]
            out = results[i].tokens
            assert accepted_from(dec, prompts[i] + out[:pos], out[pos]) == got[row]
            checked.add(int(got[row]))
    assert len(checked) > 1  # the case is not trivial


# ---- the estimator on hand-made records ----------------------------------------------------------


def synthetic(seed: int = 0, positions: int = 400) -> TypicalRecord:
    """Flags with a per-position easiness driving every node, and siblings that pass together."""
    probe = probe_tree(Tree.cartesian([3, 2]), 3, 3)
    rng = np.random.default_rng(seed)
    easy = rng.random((positions, 1))
    rank = np.array([p[-1] for p in probe.paths])
    flags = rng.random((positions, len(probe))) < easy * 0.9 / (1 + rank)  # [N, n]
    prompts = np.repeat(np.arange(8), positions // 8).astype(np.int32)
    pos = np.concatenate([np.arange(positions // 8)] * 8).astype(np.int32)
    return TypicalRecord(flags, prompts, pos, probe,
                         {"num_heads": 3, "temperature": 0.7, "posterior_threshold": 0.09, "posterior_alpha": 0.3,
                          "seed": 0})


def brute_depths(record: TypicalRecord, tree: Tree) -> list[int]:
    out = []
    for row in record.flags:
        passes = {p for p in tree.paths if p in record.probe and row[record.probe.index(p)]}
        out.append(max((len(p) for p in tree.paths if all(p[:d] in passes for d in range(1, len(p) + 1))), default=0))
    return out


def test_depths_are_the_deepest_passing_chain():
    record = synthetic()
    for tree in [*closed_subtrees(record.probe, 5, seed=1), Tree(((0,), (0, 0), (0, 0, 0), (0, 0, 0, 0)))]:
        assert typical.depths(record, tree).tolist() == brute_depths(record, tree)


def test_search_values_sum_to_the_prediction_and_stay_in_bounds():
    record = synthetic()
    result = search(Typical(record), 8, max_depth=2, top_k=2 + 1)
    tree = result.tree
    assert tree.num_nodes == 8 and tree.depth <= 2 and tree.max_rank <= 3
    assert all(p in record.probe for p in tree.paths)
    assert result.tokens_per_step == pytest.approx(typical.expected_tokens_per_step(record, tree))
    assert typical.node_values(record, tree) == pytest.approx(result.values)
    for m in (1, 5, 8):  # every prefix's curve point is its own prediction
        assert result.curve[m] == pytest.approx(typical.expected_tokens_per_step(record, tree[:m]))


def test_greedy_step_beats_every_other_single_addition():
    record = synthetic(seed=2)
    result = search(Typical(record), 6)
    for m in range(6):
        base = typical.expected_tokens_per_step(record, result.tree[:m])
        have = set(result.tree[:m].paths)
        options = [p for p in record.probe.paths if p not in have and (len(p) == 1 or p[:-1] in have)]
        best = max(typical.expected_tokens_per_step(record, Tree(result.tree[:m].paths + (p,))) for p in options)
        assert result.curve[m + 1] == pytest.approx(best)
        assert best >= base


def test_replay_is_the_estimate_per_prompt():
    record = synthetic()
    assert typical.replay(record, Tree(())).tokens_per_step == 1.0
    tree = Tree.chain(3)
    r = typical.replay(record, tree)
    assert r.tokens_per_step == pytest.approx(typical.expected_tokens_per_step(record, tree))
    assert r.steps.tolist() == np.bincount(record.prompt_ids).tolist()
    first = record.subset(np.array([0]))
    assert r.per_prompt["tokens_per_step"][0] == pytest.approx(typical.expected_tokens_per_step(first, tree))


def test_targets_and_the_cartesian_search_apply_to_the_typical_record():
    """The consumers' rules are the greedy rule's: a searched tree keeps each target's rules, and the
    Cartesian search (vllm) finds the best Cartesian shape of the record, by brute force over shapes."""
    from itertools import product

    from treeopt.search.baselines import best_cartesian
    from treeopt.search.targets import TARGETS, check

    record = synthetic(seed=6)
    for name, nodes in (("trtllm", 8), ("medusa", 8), ("chain", 3), ("vllm", 9)):
        tree = search(Typical(record), nodes, target=TARGETS[name]).tree
        assert tree.num_nodes > 0 and check(tree, TARGETS[name], record.num_heads) is None, name
    shapes = [list(ks) for d in (1, 2, 3) for ks in product(range(1, 4), repeat=d) if Tree.cartesian(list(ks)).num_nodes <= 9]
    best = max(typical.expected_tokens_per_step(record, Tree.cartesian(ks)) for ks in shapes)
    found = Tree.cartesian(best_cartesian(Typical(record), 9))
    assert typical.expected_tokens_per_step(record, found) == pytest.approx(best)
    assert 1 + Typical(record).values(found).sum() == pytest.approx(best) and found.num_nodes <= 9


# ---- the prior, the strength and the cross-validated prediction ------------------------------------


def prior_of(record: TypicalRecord, seed: int = 0) -> np.ndarray:
    """[n] a made-up prior over the probe: falling with depth and rank (below its parent), with noise."""
    rng = np.random.default_rng(seed)
    return np.array([0.8 ** len(p) / (1 + sum(p)) for p in record.probe.paths]) * rng.uniform(0.9, 1.0, len(record.probe))


def test_strength_moves_the_search_from_the_record_to_the_prior():
    record = synthetic(seed=3)
    prior = prior_of(record)
    plain = search(Typical(record), 8)
    assert search(Typical(record, prior, 0.0), 8).tree == plain.tree
    by_prior = search(Typical(record, prior, np.inf), 8)
    ranked = sorted(range(len(prior)), key=lambda i: -prior[i])  # prior falls along every path: its top 8 are a tree
    assert set(by_prior.tree.paths) == {record.probe.paths[i] for i in ranked[:8]}
    assert by_prior.tree != plain.tree  # the case is not trivial
    assert by_prior.values == pytest.approx(typical.node_values(record, by_prior.tree))  # values stay the record's


def test_cross_validated_replays_each_prompt_with_a_tree_searched_without_it():
    record = synthetic(seed=4)
    sizes = [3, 8]
    results = cross_validated(Typical(record), sizes, folds=4, seed=1)
    prompts = np.unique(record.prompt_ids)
    assert all(sorted(r.prompt_ids.tolist()) == prompts.tolist() for r in results)  # every prompt held out once
    perm = np.random.default_rng(1).permutation(prompts)
    for held in (np.sort(perm[i::4]) for i in range(4)):
        tree = search(Typical(record.subset(np.setdiff1d(prompts, held))), 8).tree
        for m, r in zip(sizes, results):
            keep = np.isin(r.prompt_ids, held)
            want = typical.replay(record.subset(held), tree[:m])
            assert r.tokens[keep].sum() == want.tokens.sum() and r.steps[keep].sum() == want.steps.sum()
    # A tree that does not depend on the fold (the prior's alone) cross-validates to its in-sample figure.
    prior = prior_of(record)
    cv = cross_validated(Typical(record, prior, np.inf), [8])[0]
    assert cv.tokens_per_step == pytest.approx(typical.expected_tokens_per_step(record, search(
        Typical(record, prior, np.inf), 8).tree))


def test_chosen_strength_is_the_strongest_within_one_standard_error_and_never_worse_than_the_prior():
    for seed in range(3):
        record, sizes = synthetic(seed=seed, positions=240), [4, 10]
        prior = prior_of(record, seed)
        runs = {s: cross_validated(Typical(record, prior, s), sizes) for s in typical.STRENGTHS}
        score = {s: np.mean([r.tokens_per_step for r in rs]) for s, rs in runs.items()}
        best = max(score, key=score.get)
        error = np.mean([(hi - lo) / 3.92 for lo, hi in (r.interval() for r in runs[best])])
        chosen = typical.choose_strength(Typical(record, prior, None), sizes)
        assert score[chosen] >= score[best] - error - 1e-12 and score[chosen] >= score[np.inf]
        assert all(score[s] < score[best] - error for s in typical.STRENGTHS if s > chosen)
        assert score[typical.choose_strength(Typical(record, prior, None), sizes, ses=0)] == score[best]
    assert typical.choose_strength(Typical(record), sizes) == 0.0


def test_resolved_strength_is_deterministic_and_kept_in_every_fold():
    record = synthetic(seed=5)
    prior = prior_of(record)
    a, b = (Typical(record, prior, None).resolved([8]) for _ in range(2))
    assert a.strength == b.strength == typical.choose_strength(Typical(record, prior, None), [8])
    assert a.resolved([64]) is a  # chosen once, then fixed
    assert search(a, 8).tree == search(b, 8).tree
    cv = cross_validated(a, [8])[0]
    assert cv.tokens_per_step == cross_validated(Typical(record, prior, a.strength), [8])[0].tokens_per_step


# ---- the commands ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def typical_dir(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("typ")
    prompts = d / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"instruction": f"w{i} w{i + 3} w{2 * i + 5}"}) for i in range(4)) + "\n")
    args = ["calibrate", "--model", str(tiny_model_dir), "--heads", "random", "-p", str(prompts),
            "--max-new-tokens", "16", "--top-k", "4", "--acceptance", "typical", "--temperature", "1.0",
            "--posterior-alpha", "1.1", "--seed", "3", "--probe", "[[0], [1], [0, 0]]", "--quiet",
            "--device", "cpu", "-o", str(d / "cal")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    return d / "cal", prompts


def test_calibrate_typical_writes_the_record(typical_dir):
    cal, _ = typical_dir
    meta = json.loads((cal / "calibration.json").read_text())
    assert meta["acceptance"] == "typical" and meta["temperature"] == 1.0 and meta["posterior_alpha"] == 1.1
    assert meta["seed"] == 3 and meta["probe_internal"] == [[0], [1], [0, 0]]
    df = pd.read_parquet(cal / "typical.parquet")
    assert {"prompt_id", "step", "position", "token"} <= set(df.columns)
    assert meta["num_steps"] == len(df) and meta["probe_tokens_per_step"] >= 1
    assert len(meta["probe"]) == len([c for c in df.columns if c.startswith("a")])


def test_search_evaluate_sweep_typical(typical_dir, tmp_path):
    cal, _ = typical_dir
    runner = CliRunner()
    r = runner.invoke(app, ["search", "-c", str(cal), "--acceptance", "typical", "-n", "6", "-o", str(tmp_path / "t.json")])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "t.json").read_text())
    assert meta["acceptance"] == "typical" and meta["temperature"] == 1.0 and meta["posterior_threshold"] == 0.09
    r = runner.invoke(app, ["evaluate", "-t", str(tmp_path / "t.json"), "-c", str(cal), "--acceptance", "typical", "--split", "0.5"])
    assert r.exit_code == 0 and "best_cartesian" in r.output, r.output
    r = runner.invoke(app, ["sweep", "-c", str(cal), "--acceptance", "typical", "--max-nodes", "8", "--replay"])
    assert r.exit_code == 0 and "in_sample_tokens_per_step" in r.output, r.output
    r = runner.invoke(app, ["search", "-c", str(cal), "--acceptance", "typical", "-n", "6", "-o", str(tmp_path / "c.txt"),
                            "--format", "chain"])  # the consumers' checks apply to typical trees too
    assert r.exit_code == 2 and "top-1 chain" in r.output, r.output
    r = runner.invoke(app, ["search", "-c", str(cal), "-n", "6"])  # greedy asked of a typical record
    assert r.exit_code == 2 and "--acceptance typical" in r.output


def test_search_typical_with_a_greedy_prior(typical_dir, tiny_model_dir, tmp_path):
    """`--prior-calibration`: a greedy calibration of the same model and heads; the tree file says the
    strength chosen and gives the cross-validated prediction."""
    cal, prompts = typical_dir
    runner = CliRunner()
    r = runner.invoke(app, ["calibrate", "--model", str(tiny_model_dir), "--heads", "random", "-p", str(prompts),
                            "--max-new-tokens", "16", "--top-k", "4", "--quiet", "--device", "cpu", "-o", str(tmp_path / "g")])
    assert r.exit_code == 0, r.output
    args = ["search", "-c", str(cal), "--acceptance", "typical", "-n", "6", "--prior-calibration", str(tmp_path / "g")]
    r = runner.invoke(app, [*args, "-o", str(tmp_path / "t.json")])
    assert r.exit_code == 0 and "cross-validated" in r.output, r.output
    meta = json.loads((tmp_path / "t.json").read_text())
    assert float(meta["prior_strength"]) in typical.STRENGTHS and meta["prior_calibration"] == str(tmp_path / "g")
    lo, hi = meta["predicted_interval"]
    assert lo <= meta["predicted_tokens_per_step"] <= hi and meta["cv_folds"] == 4
    for command in (["evaluate", "-t", str(tmp_path / "t.json")], ["sweep", "--max-nodes", "6"]):
        r = runner.invoke(app, [*command, "-c", str(cal), "--acceptance", "typical", "--prior-calibration", str(tmp_path / "g")])
        assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["search", "-c", str(tmp_path / "g"), "-n", "6", "--prior-calibration", str(tmp_path / "g")])
    assert r.exit_code == 2 and "--prior-calibration" in r.output
    r = runner.invoke(app, [*args[:-1], str(cal)])  # a typical record is no greedy prior
    assert r.exit_code == 2, r.output


def test_bench_typical_is_seeded_and_predicted(typical_dir, tiny_model_dir, tmp_path):
    cal, prompts = typical_dir
    args = ["bench", "--model", str(tiny_model_dir), "--heads", "random", "-t", "[[0], [1], [0, 0]]",
            "-p", str(prompts), "--first", "2", "--max-new-tokens", "16", "--device", "cpu", "--repeats", "1",
            "--acceptance", "typical", "--temperature", "1.0", "--posterior-alpha", "1.1", "--seed", "3",
            "-c", str(cal)]
    runs = []
    for out in ("a", "b"):
        r = CliRunner().invoke(app, [*args, "-o", str(tmp_path / out)])
        assert r.exit_code == 0, r.output
        runs.append(pd.read_csv(tmp_path / out / "bench.csv").set_index("method"))
    tree = runs[0].loc["[[0], [1], [0, 0]]"]
    assert np.isfinite(tree["predicted_tokens_per_step"])
    assert runs[0]["steps"].tolist() == runs[1]["steps"].tolist()  # same seed, same numbers
    r = CliRunner().invoke(app, [*args[:-2], "-c", str(cal), "--temperature", "0.5", "-o", str(tmp_path / "c")])
    assert r.exit_code == 2 and "temperature" in r.output
