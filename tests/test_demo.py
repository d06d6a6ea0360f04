"""`treeopt demo` end to end on the tiny Llama with random heads and a tiny prompt slice."""

from __future__ import annotations

import json
from dataclasses import replace

import pandas as pd
import pytest

from treeopt.demo import DemoConfig, run_demo, split_prompts
from treeopt.core.errors import TreeoptError

pytestmark = pytest.mark.pipeline


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("demo")
    prompts = d / "prompts.json"
    prompts.write_text(json.dumps([{"instruction": f"w{i} w{i + 1} w{i + 2}"} for i in range(3, 10)]))
    # top-k = the whole vocabulary: every rank prefix is seen, so the search fills its node budget
    cfg = DemoConfig(model=str(tiny_model_dir), heads="random", prompts=str(prompts), seed=1, fit_prompts=3,
                     bench_prompts=2, max_new_tokens=8, top_k=97, nodes=8, cartesian=("best",),
                     published=("mc_sim_7b_63",), profile_sizes="0,8", device="cpu", dtype="float32")
    logs: list[str] = []
    result = run_demo(d / "run", cfg, log=logs.append)
    return cfg, result, logs


def test_demo_writes_every_stage(tiny_demo):
    cfg, result, logs = tiny_demo
    out = result.out
    for rel in ("calibration/calibration.json", "tree.json", "sweep.csv", "latency.csv", "bench/bench.csv",
                "report.md", "report.html", "demo.json"):
        assert (out / rel).is_file(), rel
    assert any("report.html" in line for line in logs)

    fit = [r["instruction"] for r in json.loads((out / "prompts" / "fit.json").read_text())]
    held = [r["instruction"] for r in json.loads((out / "prompts" / "bench.json").read_text())]
    assert [fit, held] == [[r["instruction"] for r in part] for part in split_prompts(cfg)]
    assert len(fit) == 3 and len(held) == 2 and not set(fit) & set(held)

    bench = pd.read_csv(out / "bench" / "bench.csv")
    methods = list(bench["method"])
    assert methods[:2] == ["plain", "hf-generate"] and {"searched-8", "mc_sim_7b_63"} <= set(methods)
    assert any(m.startswith("cartesian-") for m in methods) and any(m.startswith("chain-") for m in methods)
    for _, row in bench[bench["nodes"] > 0].iterrows():  # every baseline beside a searched tree of its node count
        assert f"searched-{row['nodes']}" in methods, row["method"]
    assert list(bench["nodes"][1:]) == sorted(bench["nodes"][1:])
    assert (bench["match_rate"] == 1.0).all()  # tree decoding is lossless under greedy decoding
    assert (bench["prompts"] == 2).all()  # benched on the held-out prompts only
    held_cal = pd.read_parquet(out / "calibration-heldout" / "continuations.parquet")
    assert list(held_cal["instruction"]) == held  # the ceiling's calibration is of the held-out prompts
    assert json.loads((out / "prompts" / "source.json").read_text())["source"] == cfg.prompts

    report = (out / "report.md").read_text()
    assert "## Like for like on held-out prompts" in report and "ceiling-8" in report
    assert "is missing" not in report and "damaged" not in report
    demo = json.loads((out / "demo.json").read_text())
    assert demo["settings"]["nodes"] == 8 and set(demo["stages"]) >= {"calibrate", "search", "bench", "report"}


def test_demo_benches_the_tree_nodes_auto_picks(tiny_demo, tmp_path):
    """With a profile in which steps of 1-3 nodes cost far less than any other (plain decoding too), the
    bench's trees include the tree `--nodes auto` picks from it; without a profile, only the others."""
    import shutil

    from treeopt.core.record import load_calibration
    from treeopt.demo import bench_trees
    from treeopt.search.api import search_report

    cfg, result, _ = tiny_demo
    out = tmp_path / "run"
    shutil.copytree(result.out, out)
    lat = pd.read_csv(out / "latency.csv").iloc[[0]]
    lat = pd.concat([lat.assign(nodes=n, forward_ms=10.0 if 1 <= n <= 3 else 1000.0) for n in range(9)])
    lat.to_csv(out / "latency.csv", index=False)
    auto = search_report(out / "calibration", "auto", latency=out / "latency.csv")[0].tree
    assert 1 <= auto.num_nodes <= 3
    names = [p.rsplit("/", 1)[-1] for p in bench_trees(cfg, out, load_calibration(out / "calibration"))]
    assert f"searched-{auto.num_nodes}.json" in names and "searched-8.json" in names
    (out / "latency.csv").unlink()
    names = [p.rsplit("/", 1)[-1] for p in bench_trees(cfg, out, load_calibration(out / "calibration"))]
    assert f"searched-{auto.num_nodes}.json" not in names and "searched-8.json" in names


def test_demo_resumes_and_guards_settings(tiny_demo):
    cfg, result, _ = tiny_demo
    again = run_demo(result.out, cfg, log=lambda s: None)
    assert all(again.stages[s] == 0.0 for s in ("prompts", "calibrate", "heldout", "profile", "search", "bench"))
    with pytest.raises(TreeoptError, match="other settings.*nodes"):
        run_demo(result.out, replace(cfg, nodes=4), log=lambda s: None)


def test_demo_redoes_stale_stages(tiny_demo, tmp_path):
    """Without demo.json, other settings redo exactly the stages they change, never reuse them."""
    import shutil

    cfg, result, _ = tiny_demo
    out = tmp_path / "copy"
    shutil.copytree(result.out, out)
    (out / "demo.json").unlink()
    logs = []
    again = run_demo(out, replace(cfg, nodes=4), log=logs.append)
    assert again.stages["calibrate"] == 0.0 and again.stages["search"] > 0 and again.stages["bench"] > 0
    assert any("[search] redoing" in line and "nodes 8 -> 4" in line for line in logs)
    assert json.loads((out / "tree.json").read_text())["nodes"] == 4


def test_demo_needs_enough_prompts(tmp_path, tiny_demo):
    cfg, _, _ = tiny_demo
    with pytest.raises(TreeoptError, match="has only"):
        run_demo(tmp_path / "r", replace(cfg, fit_prompts=100), log=lambda s: None)


def test_demo_draws_held_out_prompts_across_sources(tmp_path):
    """A seeded draw across the sources; the bench never holds a fit prompt's text, even repeated."""
    from treeopt.core.prompts import normalized

    records = [{"instruction": f"Question {i}?", "dataset": "ab"[i % 2]} for i in range(20)]
    records += [{"instruction": "  question 0? "}, {"instruction": "QUESTION 2?", "dataset": "b"}]  # repeats
    path = tmp_path / "p.json"
    path.write_text(json.dumps(records))
    cfg = DemoConfig(prompts=str(path), fit_prompts=10, bench_prompts=10)
    for seed in range(5):
        fit, held = split_prompts(replace(cfg, seed=seed))
        assert len(fit) == 10 and len(held) == 10
        assert [r["dataset"] for r in fit].count("a") == 5  # each source its share
        assert not {normalized(r["instruction"]) for r in fit} & {normalized(r["instruction"]) for r in held}
        assert {json.dumps(r) for r in fit + held} <= {json.dumps(r) for r in records}
        assert split_prompts(replace(cfg, seed=seed)) == (fit, held)  # seeded
    draws = {json.dumps(split_prompts(replace(cfg, seed=seed))[0]) for seed in range(5)}
    assert len(draws) > 1
    with pytest.raises(TreeoptError, match="besides the fit ones"):
        split_prompts(replace(cfg, bench_prompts=13))


def test_demo_prompts_offline_without_a_local_copy(monkeypatch):
    """No ../shared copy and no hub: the demo takes the bundled instructions instead of failing."""
    import treeopt.core.prompts
    from treeopt.demo import DemoConfig, prompt_source, split_prompts

    monkeypatch.setattr(treeopt.core.prompts, "local_alpaca_eval", lambda: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    said = []
    cfg = DemoConfig()
    fit, held = split_prompts(cfg, log=said.append)
    texts = [{r["instruction"] for r in part} for part in (fit, held)]
    assert len(fit) == cfg.fit_prompts and len(held) == cfg.bench_prompts and not texts[0] & texts[1]
    assert "offline.json" in said[0]
    source, note = prompt_source(DemoConfig(), log=said.append)
    assert source.endswith("offline.json") and "not AlpacaEval" in note  # the report shows this note
    with pytest.raises(TreeoptError, match="--prompts PATH"):  # calibrate itself still says so
        treeopt.core.prompts.load_instructions(treeopt.core.prompts.default_prompts())


def test_demo_with_the_ngram_drafter_searches_and_benches_chains(tmp_path, tiny_model_dir):
    """--drafter ngram: every stage drafts by n-gram lookup; its record (top-k 1) searches a chain, the
    profile times chains, the bench runs the chains only, and the report names the drafter."""
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"instruction": f"w{i} w{i + 1} w{i + 2} w{i} w{i + 1}"} for i in range(3, 10)]))
    cfg = DemoConfig(model=str(tiny_model_dir), drafter="ngram:1-2", prompts=str(prompts), seed=1, fit_prompts=3,
                     bench_prompts=2, max_new_tokens=24, nodes=2, profile_sizes="0,1,2,4", device="cpu",
                     dtype="float32")
    assert cfg.cartesian == () and cfg.published == ()  # tree baselines: none for a chain drafter
    result = run_demo(tmp_path / "run", cfg, log=lambda s: None)
    out = result.out
    meta = json.loads((out / "calibration" / "calibration.json").read_text())
    assert meta["settings"]["drafter"] == "ngram:1-2" and meta["settings"]["top_k"] == 1
    latency = pd.read_csv(out / "latency.csv")
    assert (latency["drafter"] == "ngram:1-2").all() and (latency["depth"] == latency["nodes"]).all()  # chains
    tree = json.loads((out / "tree.json").read_text())
    # a fixed size: "auto" sizes on this machine's timings, which a busy CPU can tip to plain decoding
    assert tree["nodes"] >= 1 and all(set(p) == {0} for p in tree["medusa_choices"])  # a chain
    assert len(tree["medusa_choices"]) == max(map(len, tree["medusa_choices"]))
    bench = pd.read_csv(out / "bench" / "bench.csv")
    trees = set(bench["method"]) - {"plain", "hf-generate"}
    assert trees and all(m.startswith(("searched-", "chain-")) for m in trees)
    assert (bench["match_rate"] == 1.0).all()  # lossless under greedy
    assert json.loads((out / "bench" / "bench.json").read_text())["drafter"] == "ngram:1-2"
    report = (out / "report.md").read_text()
    assert "ngram:1-2" in report and "is missing" not in report and "damaged" not in report
    again = run_demo(out, cfg, log=lambda s: None)
    assert all(again.stages[s] == 0.0 for s in ("calibrate", "profile", "search", "bench"))


def test_demo_drafter_settings():
    with pytest.raises(TreeoptError, match="--heads"):
        DemoConfig(drafter="eagle3", heads="random")
    with pytest.raises(TreeoptError, match="chains only: drop --cartesian"):
        DemoConfig(drafter="ngram", cartesian="2x2")
    with pytest.raises(TreeoptError, match="chains only: drop --published"):
        DemoConfig(drafter="ngram", published=("mc_sim_7b_63", "vicuna_7b_stage2"))
    with pytest.raises(TreeoptError, match="unknown --drafter"):
        DemoConfig(drafter="medusa")
    assert DemoConfig(drafter="eagle3").cartesian == ("best",)  # a tree drafter keeps the tree baselines


def test_demo_with_an_eagle3_drafter_searches_trees(tmp_path, tiny_model_dir, tiny_llama):
    """--drafter eagle3:DIR: a tree drafter keeps the tree baselines; the profile times its drafting."""
    from test_eagle3 import train_tiny

    from treeopt.decoding.eagle3 import save_eagle3

    save_eagle3(train_tiny(tiny_llama, iters=60), tmp_path / "e")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"instruction": f"w{i} w{i + 1} w{i + 2}"} for i in range(3, 10)]))
    cfg = DemoConfig(model=str(tiny_model_dir), drafter=f"eagle3:{tmp_path / 'e'}", prompts=str(prompts), seed=1,
                     fit_prompts=3, bench_prompts=2, max_new_tokens=12, nodes=8, profile_sizes="0,4,8", device="cpu",
                     dtype="float32")
    out = run_demo(tmp_path / "run", cfg, log=lambda s: None).out
    latency = pd.read_csv(out / "latency.csv")
    assert latency["drafter"].str.startswith("eagle3:").all() and (latency["heads_ms"][latency["nodes"] > 0] > 0).all()
    bench = pd.read_csv(out / "bench" / "bench.csv")
    assert any(m.startswith("cartesian-") for m in bench["method"]) and (bench["match_rate"] == 1.0).all()
    assert "eagle3:" in (out / "report.md").read_text()
