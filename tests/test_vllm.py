"""vLLM as an engine: the heads' export for vLLM's Medusa loader, the schedule's rules, the runner's job
and result. The tests that run vLLM itself need its environment (`scripts/setup.sh --vllm`, or
TREEOPT_VLLM_PYTHON) and are slow."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from treeopt.core.errors import TreeoptError
from treeopt.decoding.heads import (MedusaHeads, HeadsConfig, PT_FILE, ST_FILE, export_vllm, same_top_k, vllm_config,
                                    vllm_logits, vllm_state)
from treeopt.decoding.vllm_engine import DEFAULT_PYTHON, RUNNER, VllmRun, parse_runs, speculative_config, vllm_python
from treeopt.search.budget import Latency
from treeopt.core.serving import validate_ranges
from treeopt.search.vllm import batch_ranges, best_k, speculative_config as schedule_config

H, V = 16, 50


def tiny_heads(own: bool, layers: int = 1, seed: int = 0) -> MedusaHeads:
    heads = MedusaHeads(HeadsConfig(hidden_size=H, vocab_size=V, num_heads=3, num_layers=layers, own_lm_head=own))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return heads.eval()


def published_safetensors(heads: MedusaHeads, directory):
    """Medusa's layout (`{h}.{l}.linear.weight`, `{h}.{L}.weight`) in a safetensors file, as published heads ship."""
    from safetensors.torch import save_file

    directory.mkdir()
    save_file({k: v.contiguous() for k, v in heads.heads.state_dict().items()}, str(directory / ST_FILE))
    return directory


@pytest.mark.parametrize("layout", ["medusa-pt", "medusa-safetensors", "shared-lm_head", "two-layers"])
def test_export_gives_the_heads_top_k(tmp_path, layout):
    own = layout in ("medusa-pt", "medusa-safetensors")
    heads = tiny_heads(own, layers=2 if layout == "two-layers" else 1)
    src = published_safetensors(heads, tmp_path / "src") if layout == "medusa-safetensors" else heads.save(tmp_path / "src")
    assert (src / (PT_FILE if layout == "medusa-pt" else ST_FILE)).is_file()
    loaded = MedusaHeads.load(src, None) if own else MedusaHeads.load(src)
    lm = None if own else torch.nn.Linear(H, V, bias=False)
    out = export_vllm(loaded, tmp_path / "vllm", None if own else lm.weight)
    hidden = torch.randn(40, H)
    assert same_top_k(heads, out, hidden, lm)
    ours = heads(hidden, lm)
    torch.testing.assert_close(vllm_logits(out, hidden), ours, rtol=1e-5, atol=1e-5)


def test_export_layout_is_vllms(tmp_path):
    """vllm/model_executor/models/medusa.py: blocks.{h}.layers.{l}.weight/bias, lm_heads.{h}.weight (own) or
    lm_heads.0.weight with original_lm_head; MedusaConfig reads num_heads and num_hidden_layers."""
    own = vllm_state(tiny_heads(True, layers=2))
    assert set(own) == {f"blocks.{h}.layers.{l}.{p}" for h in range(3) for l in range(2) for p in ("weight", "bias")} \
        | {f"lm_heads.{h}.weight" for h in range(3)}
    shared = vllm_state(tiny_heads(False), torch.zeros(V, H))
    assert "lm_heads.0.weight" in shared and "lm_heads.1.weight" not in shared
    cfg = vllm_config(tiny_heads(False))
    assert cfg["model_type"] == "medusa" and cfg["num_heads"] == 3 and cfg["num_hidden_layers"] == 1
    assert cfg["medusa_fc_bias"] is True and cfg["original_lm_head"] is True
    assert [k for k in cfg if "num" in k] == ["num_heads", "num_hidden_layers"]  # MedusaConfig renames any other
    with pytest.raises(TreeoptError, match="--model"):
        vllm_state(tiny_heads(False))  # shared heads need the base model's lm_head
    with pytest.raises(TreeoptError, match="--model"):
        vllm_state(tiny_heads(False), torch.zeros(V + 1, H))


def test_a_wrong_export_is_caught(tmp_path):
    heads = tiny_heads(True)
    out = export_vllm(heads, tmp_path / "vllm")
    from safetensors.torch import load_file, save_file

    state = load_file(str(out / "model.safetensors"))
    state["lm_heads.0.weight"], state["lm_heads.1.weight"] = state["lm_heads.1.weight"], state["lm_heads.0.weight"]
    save_file(state, str(out / "model.safetensors"))
    assert not same_top_k(heads, out, torch.randn(40, H), None)


# ---- the schedule -------------------------------------------------------------------------------------


def latency(batch: int, ms) -> Latency:
    return Latency(np.arange(len(ms)), np.asarray(ms, dtype=float), batch_size=batch)


def test_best_k_maximizes_throughput_and_takes_plain_where_speculation_loses():
    steps = np.array([1.0, 1.5, 1.8, 1.9, 1.95])
    k, tps = best_k(steps, latency(1, [10, 11, 12, 13, 14]))
    assert k == 2 and np.argmax(tps) == 2  # 1.8 / 12 ms beats 1.9 / 13 ms
    np.testing.assert_allclose(tps, steps / np.array([10, 11, 12, 13, 14]) * 1000)
    assert best_k(steps, latency(16, [10, 20, 30, 40, 50]))[0] == 0
    k, tps = best_k(steps, Latency(np.array([0, 2]), np.array([10.0, 10.0])))  # only k in the profile
    assert k == 2 and np.isnan(tps[[1, 3, 4]]).all()


def test_ranges_keep_vllms_rules():
    entries = [{"batch_size": b, "k": k} for b, k in ((1, 3), (4, 3), (16, 1), (64, 0))]
    ranges = batch_ranges(entries)
    assert ranges == [[1, 15, 3], [16, 63, 1], [64, 64, 0]]
    assert validate_ranges(ranges) == [tuple(r) for r in ranges]
    assert batch_ranges([{"batch_size": 2, "k": 2}]) == [[1, 2, 2]]  # the first range starts at 1
    config = schedule_config(entries, "heads:heads")
    assert config == {"method": "medusa", "model": "heads", "num_speculative_tokens": 3,
                      "num_speculative_tokens_per_batch_size": ranges}
    assert schedule_config([{"batch_size": 1, "k": 2}, {"batch_size": 8, "k": 2}]) == \
        {"method": "medusa", "num_speculative_tokens": 2}
    assert schedule_config([{"batch_size": 1, "k": 0}]) is None
    for bad, why in (([[2, 4, 1]], "start at 1"), ([[1, 4, 1], [3, 8, 2]], "non-overlapping"),
                     ([[1, 0, 1]], "positive"), ([[1, 4, -1]], ">= 0"), ([[4, 1, 1]], "<= high"), ([], "non-empty")):
        with pytest.raises(TreeoptError, match=why):
            validate_ranges(bad)
    with pytest.raises(TreeoptError, match="distinct positive"):
        batch_ranges([{"batch_size": 4, "k": 1}, {"batch_size": 1, "k": 1}])


def test_vllm_schedule_on_a_calibration():
    from treeopt.core.record import Calibration
    from treeopt.search.vllm import chain_predictions, vllm_schedule

    rng = np.random.default_rng(0)
    ranks = np.where(rng.random((400, 4)) < [0.6, 0.35, 0.2, 0.1], 0, 5).astype(np.int16)
    cal = Calibration(ranks, np.repeat(np.arange(8), 50), np.tile(np.arange(50), 8), top_k=10)
    steps = chain_predictions(cal, 4, "empirical")
    assert steps[0] == 1 and (np.diff(steps) >= 0).all() and steps[4] < 1 + 0.6 + 0.35 + 0.2 + 0.1 + 0.05
    entries = vllm_schedule(cal, {1: latency(1, [10, 10.5, 11, 11.5, 12]), 16: latency(16, [10, 20, 30, 40, 50])},
                            4, "empirical")
    assert [e["batch_size"] for e in entries] == [1, 16]
    assert entries[0]["k"] >= 2 and entries[1]["k"] == 0 and entries[1]["predicted_speedup"] == 1


# ---- the runner's job and result ------------------------------------------------------------------------


def runner_module():
    spec = importlib.util.spec_from_file_location("vllm_runner", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # stdlib only at import: vLLM is imported inside main()
    return module


class FakeMetric:
    def __init__(self, name, value=None, values=None):
        self.name, self.value, self.values = name, value, values


class FakeLLM:
    def __init__(self, drafts, accepted, per_pos):
        self.metrics = [FakeMetric("vllm:spec_decode_num_drafts", drafts),
                        FakeMetric("vllm:spec_decode_num_draft_tokens", 3 * drafts),
                        FakeMetric("vllm:spec_decode_num_accepted_tokens", accepted),
                        FakeMetric("vllm:spec_decode_num_accepted_tokens_per_pos", values=per_pos),
                        FakeMetric("vllm:num_requests_running", 1)]

    def get_metrics(self):
        return self.metrics


def test_runner_reads_vllms_counters_as_differences():
    r = runner_module()
    before = r.counters(FakeLLM(10, 4, [3, 1, 0]))
    after = r.counters(FakeLLM(30, 19, [12, 5, 2]))
    assert before == {"drafts": 10, "draft_tokens": 30, "accepted": 4, "accepted_per_position": [3, 1, 0]}
    assert r.delta(after, before) == {"drafts": 20, "draft_tokens": 60, "accepted": 15, "accepted_per_position": [9, 4, 2]}
    plain = r.counters(type("Plain", (), {"get_metrics": lambda self: []})())
    assert r.delta(plain, plain) == {"drafts": 0, "draft_tokens": 0, "accepted": 0, "accepted_per_position": []}


def test_results_parse_into_runs():
    result = {"vllm": "0.32.0", "runs": [{"name": "batch-1", "batch_size": 1, "wall_s": 2.0, "generated": 10,
                                          "drafts": 8, "draft_tokens": 24, "accepted": 2,
                                          "accepted_per_position": [2, 0, 0], "tokens": [[1, 2], [3]]}]}
    (run,) = parse_runs(result)
    assert run == VllmRun("batch-1", 1, 2.0, 10, 8, 24, 2, (2, 0, 0), ((1, 2), (3,)))
    assert run.tokens_per_step == 1.25 and run.tokens_per_s == 5.0
    del result["runs"][0]["drafts"]
    with pytest.raises(TreeoptError, match="malformed"):
        parse_runs(result)
    assert speculative_config("heads:h", 0) is None
    assert speculative_config("heads:h", 2) == {"method": "medusa", "model": "h", "num_speculative_tokens": 2}
    assert speculative_config("eagle3:e", 3) == {"method": "eagle3", "model": "e", "num_speculative_tokens": 3}


def test_a_missing_vllm_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("TREEOPT_VLLM_PYTHON", raising=False)
    with pytest.raises(TreeoptError, match="setup.sh --vllm"):
        vllm_python(tmp_path / "nope" / "python")


# ---- vLLM itself ----------------------------------------------------------------------------------------

VLLM = os.environ.get("TREEOPT_VLLM_PYTHON") or (str(DEFAULT_PYTHON) if DEFAULT_PYTHON.is_file() else None)
needs_vllm = pytest.mark.skipif(VLLM is None, reason="vLLM's environment is absent: run `scripts/setup.sh --vllm` "
                                                     "or set TREEOPT_VLLM_PYTHON")


@pytest.mark.slow
@needs_vllm
def test_vllm_runs_the_exported_heads_losslessly(tmp_path):
    """vLLM with the shipped heads as a 2-token Medusa chain gives plain vLLM's greedy tokens and drafts."""
    from treeopt.reports.vllm_bench import bench_vllm

    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([{"instruction": "List three colours."}, {"instruction": "Say hello in French."}]))
    df = bench_vllm(prompts=str(prompts), limit=2, max_new_tokens=12, chains=(2,), batch_sizes=(1, 2),
                    out=tmp_path / "b", python=VLLM)
    assert df["k"].tolist() == [0, 2, 0, 2] and (df["match_rate"] == 1).all()
    spec = df[df["k"] == 2]
    assert (spec["drafts"] > 0).all() and (spec["tokens_per_step"] >= 1).all()
    assert (df[df["k"] == 0]["drafts"] == 0).all()


def test_search_and_sweep_engine_vllm_write_vllms_config(make_calibration, tmp_path):
    from typer.testing import CliRunner

    from treeopt.cli import app

    rng = np.random.default_rng(1)
    cal = make_calibration([np.where(rng.random((120, 4)) < [0.7, 0.5, 0.3, 0.1], 0, 3).astype(np.int16)
                            for _ in range(6)], top_k=4)
    rows = [f"{k},{ms},{b}" for b, step in ((1, 1.0), (16, 12.0)) for k, ms in enumerate(10 + step * np.arange(5))]
    lat = tmp_path / "latency-vllm.csv"
    lat.write_text("nodes,forward_ms,batch_size\n" + "\n".join(rows) + "\n")
    runner = CliRunner()
    base = ["search", "-c", str(cal.directory), "--engine", "vllm", "--latency", str(lat)]
    r = runner.invoke(app, [*base, "-o", str(tmp_path / "spec.json")])
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "spec.json").read_text())
    assert config["method"] == "medusa" and 1 <= config["num_speculative_tokens"] <= 4
    assert validate_ranges(config["num_speculative_tokens_per_batch_size"])[-1] == (16, 16, 0)  # batch 16: plain
    assert "keeps k fixed" in r.output
    r = runner.invoke(app, [*base, "--serving-batches", "16", "-o", str(tmp_path / "plain.json")])
    assert r.exit_code == 0 and "speculation loses" in r.output and json.loads((tmp_path / "plain.json").read_text()) == {}
    r = runner.invoke(app, [*base, "--target", "trtllm"])
    assert r.exit_code == 2 and "--engine vllm" in r.output and "--target" in r.output
    r = runner.invoke(app, ["sweep", "-c", str(cal.directory), "--engine", "vllm", "--latency", str(lat),
                            "-o", str(tmp_path / "sweep.csv")])
    assert r.exit_code == 0, r.output
    import pandas as pd

    sweep = pd.read_csv(tmp_path / "sweep.csv")
    assert len(sweep) == 10 and (sweep.groupby("batch_size")["chosen"].count() == 1).all()
    r = runner.invoke(app, ["search", "-c", str(cal.directory), "--engine", "tgi"])
    assert r.exit_code == 2 and "--engine 'tgi'" in r.output
