"""`treeopt bench`, `treeopt profile` and `treeopt decode` on the tiny model: files, columns, errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from treeopt.reports.bench import COLUMNS, parse_cartesian, tree_methods
from treeopt.decoding.profile import profile_tree
from treeopt.cli import app
from treeopt.core.errors import TreeoptError
from treeopt.core.tree import Tree

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    path.write_text("\n".join(json.dumps({"instruction": f"w{i} w{i + 3} w{2 * i + 5}"}) for i in range(3)) + "\n")
    return path


def test_bench_cli_writes_csv_and_json(tiny_model_dir, prompts_file, tmp_path):
    tree = tmp_path / "chain3.json"
    tree.write_text(json.dumps({"medusa_choices": [[0], [0, 0], [0, 0, 0]]}))
    out = tmp_path / "bench"
    args = ["bench", "--model", str(tiny_model_dir), "--heads", "random", "--tree", str(tree),
            "--cartesian", "8x3,2x2", "--prompts", str(prompts_file), "--first", "2", "--max-new-tokens", "12",
            "--device", "cpu", "--dtype", "float32", "--repeats", "1", "-o", str(out)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    df = pd.read_csv(out / "bench.csv")
    assert list(df.columns) == COLUMNS
    assert df["method"].tolist() == ["plain", "hf-generate", "chain3", "cartesian-8x3", "cartesian-2x2"]
    assert df["nodes"].tolist() == [0, 0, 3, 8 + 24, 2 + 4]
    assert (df["match_rate"] == 1.0).all() and df["first_divergence"].isna().all()  # fp32 greedy is lossless
    assert df.loc[0, "overhead"] == 1.0 and df.loc[0, "speedup"] == 1.0 and df.loc[0, "tokens_per_step"] == 1.0
    assert (df["tokens_per_step"] >= 1.0).all() and (df["prompts"] == 2).all()
    assert (df["new_tokens"] == df.loc[0, "new_tokens"]).all()
    engine = df[df["method"] != "hf-generate"]
    assert (engine["loop_efficiency"] > 0).all() and df["predicted_tokens_per_step"].isna().all()
    doc = json.loads((out / "bench.json").read_text())
    assert doc["dtype"] == "float32" and doc["device"] == "cpu" and "torch" in doc["versions"]
    assert [row["method"] for row in doc["rows"]] == df["method"].tolist()
    assert len(doc["per_prompt"]) == 2 * 5
    assert not (out / ".bench-records").exists()
    assert "cartesian-8x3" in r.output and "loop_efficiency" in r.output


def test_bench_resumes_from_partial_records(tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    import treeopt.reports.bench as bench

    out = tmp_path / "bench"
    kw = dict(model=str(tiny_model_dir), heads="random", cartesian=["2x2"], prompts=str(prompts_file), first=2,
              max_new_tokens=8, device="cpu", out=out, repeats=1, progress=False)
    calls = []
    real = bench.bench_decoding

    def interrupted(*a, on_record=None, **k):
        def record(rec):
            on_record(rec)
            calls.append(rec)
            if len(calls) == 2:
                raise KeyboardInterrupt
        return real(*a, on_record=record, **k)

    monkeypatch.setattr(bench, "bench_decoding", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench.run_bench(**kw)
    saved = list((out / ".bench-records").glob("*.done.json"))
    assert len(saved) == 2  # prompt 0: plain and hf-generate
    monkeypatch.setattr(bench, "bench_decoding", real)
    ran = []
    monkeypatch.setattr(bench, "greedy_reference", lambda *a, **k: ran.append(1) or real_greedy(*a, **k))
    result = bench.run_bench(**kw)
    assert result.table["prompts"].tolist() == [2, 2, 2]
    assert len(ran) == 1 + 1  # the warm-up + the plain run left (prompt 1); prompt 0 is not re-run


def real_greedy(*a, **k):
    from treeopt.decoding.decoder import greedy_reference

    return greedy_reference(*a, **k)


def test_bench_needs_a_tree_and_good_specs(tiny_model_dir, prompts_file):
    r = runner.invoke(app, ["bench", "--model", str(tiny_model_dir), "--heads", "random",
                            "--prompts", str(prompts_file), "--device", "cpu"])
    assert r.exit_code == 2 and "error: nothing to compare" in r.output
    r = runner.invoke(app, ["bench", "--model", str(tiny_model_dir), "--heads", "random", "--cartesian", "2by3",
                            "--prompts", str(prompts_file), "--device", "cpu"])
    assert r.exit_code == 2 and "--cartesian '2by3'" in r.output
    r = runner.invoke(app, ["bench", "--model", str(tiny_model_dir), "--heads", "random", "--cartesian", "2x2x2x2x2",
                            "--prompts", str(prompts_file), "--device", "cpu"])
    assert r.exit_code == 2 and "deep" in r.output and "Traceback" not in r.output


def test_tree_methods_names():
    methods = tree_methods(["mc_sim_7b_63"], ["2x3,3x2x2"])
    assert list(methods) == ["mc_sim_7b_63", "cartesian-2x3", "cartesian-3x2x2"]
    assert methods["cartesian-2x3"] == Tree.cartesian([2, 3])
    assert parse_cartesian("4") == ("cartesian-4", Tree.cartesian([4]))
    with pytest.raises(TreeoptError):
        parse_cartesian("2x")


def test_profile_cli_writes_a_latency_csv_search_reads(tiny_model_dir, tmp_path):
    from treeopt.search.budget import read_latency

    out = tmp_path / "latency.csv"
    r = runner.invoke(app, ["profile", "--model", str(tiny_model_dir), "--heads", "random", "--sizes", "0,1,4,16",
                            "--context", "16", "--repeats", "2", "--device", "cpu", "-o", str(out)])
    assert r.exit_code == 0, r.output
    df = pd.read_csv(out)
    assert df["nodes"].tolist() == [0, 1, 4, 16]
    assert {"forward_ms", "roofline_ms", "roofline_ratio", "compile_s", "device", "dtype", "model"} <= set(df.columns)
    assert (df["roofline_ms"] > 0).all() and (df["roofline_ms"].diff()[1:] > 0).all()  # more nodes, more work
    assert (df["forward_ms"] > 0).all() and df.loc[0, "heads_ms"] == 0 and (df["heads_ms"][1:] > 0).all()
    assert read_latency(out).nodes.tolist() == [0, 1, 4, 16]
    r = runner.invoke(app, ["profile", "--model", str(tiny_model_dir), "--heads", "random", "--sizes", "a,b",
                            "--device", "cpu", "-o", str(out)])
    assert r.exit_code == 2 and "--sizes" in r.output


def test_profile_tree_sizes_and_depth():
    for n in (0, 1, 5, 17, 64, 256):
        t = profile_tree(n, 4)
        assert t.num_nodes == n and t.depth <= 4
    shape = Tree(((0,), (1,), (2,), (0, 0), (0, 0, 0)))
    assert [profile_tree(n, 4, shape) for n in (0, 3, 5)] == [Tree(()), shape[:3], shape]
    with pytest.raises(TreeoptError, match="the --tree has 5"):
        profile_tree(6, 4, shape)


def test_profile_cli_times_a_trees_prefixes(tiny_model_dir, tmp_path):
    tree, out = tmp_path / "tree.json", tmp_path / "latency.csv"
    tree.write_text('{"medusa_choices": [[0], [1], [2], [0, 0], [0, 0, 0]]}')
    base = ["profile", "--model", str(tiny_model_dir), "--heads", "random", "--context", "16", "--repeats", "1",
            "--device", "cpu", "-o", str(out), "--tree", str(tree)]
    r = runner.invoke(app, base)  # default sizes: those the tree holds
    assert r.exit_code == 0, r.output
    df = pd.read_csv(out)
    assert df["nodes"].tolist() == [0, 1, 2, 4] and df["depth"].tolist() == [0, 1, 1, 2]
    r = runner.invoke(app, base + ["--sizes", "0,8"])
    assert r.exit_code == 2 and "the --tree has 5" in r.output


def test_profile_times_each_drafters_drafting_step(tiny_model_dir, tmp_path):
    """--drafter eagle3:DIR: heads_ms is its propose for each tree (one forward per level, > 0) and
    forward_ms includes it; --drafter ngram: chains, drafting without a model; both read by search."""
    from treeopt.decoding.eagle3 import for_model, save_eagle3
    from treeopt.decoding.models import load_model
    from treeopt.search.budget import read_latency

    save_eagle3(for_model(load_model(str(tiny_model_dir), device="cpu", dtype="float32").model, draft_vocab_size=40,
                          aux_layers=(0, 1, 1)), tmp_path / "e")
    base = ["profile", "--model", str(tiny_model_dir), "--sizes", "0,1,4,8", "--context", "16", "--repeats", "2",
            "--device", "cpu", "--dtype", "float32"]
    out = tmp_path / "eagle3.csv"
    r = runner.invoke(app, base + ["--drafter", f"eagle3:{tmp_path / 'e'}", "-o", str(out)])
    assert r.exit_code == 0, r.output
    df = pd.read_csv(out)
    assert df["nodes"].tolist() == [0, 1, 4, 8]
    assert df["depth"].tolist() == [profile_tree(n, 4).depth for n in (0, 1, 4, 8)]  # balanced trees, 4 deep at most
    assert df.loc[0, "heads_ms"] == 0 and (df["heads_ms"][1:] > 0).all()
    assert (df["forward_ms"] - df["base_ms"] - df["heads_ms"]).abs().max() < 1e-3
    assert df["drafter"].str.startswith("eagle3:").all() and "drafter eagle3" in r.output
    assert read_latency(out).forward_ms.tolist() == df["forward_ms"].tolist()  # what --nodes auto prices

    out = tmp_path / "ngram.csv"
    r = runner.invoke(app, base + ["--drafter", "ngram:1-3", "-o", str(out)])
    assert r.exit_code == 0, r.output
    df = pd.read_csv(out)
    assert df["depth"].tolist() == [0, 1, 4, 8]  # chains
    assert (df["heads_ms"] >= 0).all() and (df["forward_ms"] > 0).all() and (df["drafter"] == "ngram:1-3").all()
    r = runner.invoke(app, ["profile", "--model", "/nonexistent", "--drafter", "ngram", "--tree", "[[0], [1]]"])
    assert r.exit_code == 2 and "pass a chain" in r.output


def test_profile_drafter_conflicts(tmp_path):
    from treeopt.core.settings import ProfileConfig

    ProfileConfig(drafter="eagle3")  # treeopt's engine times any drafter
    with pytest.raises(TreeoptError, match="--heads"):
        ProfileConfig(drafter="ngram", heads="random")
    with pytest.raises(TreeoptError, match="--serving-batches"):
        ProfileConfig(drafter="ngram", serving_batches="1,4")
    ProfileConfig(drafter="ngram", serving_batches="1,4", engine="vllm")  # vLLM batches any drafter


def test_decode_cli(tiny_model_dir):
    r = runner.invoke(app, ["decode", "w1 w2 w3", "--model", str(tiny_model_dir), "--heads", "random",
                            "--tree", "[[0], [1], [0, 0]]", "--max-new-tokens", "6", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "tokens/step" in r.output
    r = runner.invoke(app, ["decode", "w1", "--model", str(tiny_model_dir), "--heads", "random",
                            "--acceptance", "nucleus", "--device", "cpu"])
    assert r.exit_code == 2 and "greedy or typical" in r.output


def test_bench_predicts_tokens_per_step_from_a_calibration(tiny_llama):
    import numpy as np

    from treeopt.core.record import Calibration
    from treeopt.reports.bench import bench_decoding, render
    from treeopt.decoding.heads import random_heads
    from treeopt.core.replay import replay

    rng = np.random.default_rng(0)
    ranks = rng.integers(0, 4, size=(40, 3)).astype(np.int16)
    cal = Calibration(ranks, np.repeat(np.arange(4), 10).astype(np.int32), np.tile(np.arange(10), 4).astype(np.int32), 4)
    trees = {"c": Tree.cartesian([2, 2]), "too-wide": Tree.cartesian([6])}  # rank 5 is beyond the calibration's top-4
    heads = random_heads(tiny_llama, num_heads=3)
    r = bench_decoding(tiny_llama, heads, trees, [[5, 6, 7]], 6, {2}, calibration=cal, warmup_tokens=2, repeats=1)
    t = r.table.set_index("method")
    assert t.loc["c", "predicted_tokens_per_step"] == pytest.approx(replay(trees["c"], cal).tokens_per_step)
    assert t.loc["plain", "predicted_tokens_per_step"] == pytest.approx(1.0)
    assert np.isnan(t.loc["too-wide", "predicted_tokens_per_step"])
    assert "warning" not in render(r)
    from treeopt.core.env import process_age_s

    assert 0 < r.settings["first_token_s"] < process_age_s()  # the process's age at its first decoded token
    assert f"first decoded token {r.settings['first_token_s']:.1f} s after" in render(r)
    r.settings["calibration_overlap"] = 1  # run_bench counts the bench prompts the calibration also holds
    assert "warning: 1 of the 1 bench prompts are also in the calibration" in render(r)


def test_first_divergence():
    from treeopt.reports.bench import first_divergence

    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2
