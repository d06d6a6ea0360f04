"""Exports for the engines that serve drafters other than Medusa heads: vLLM's --speculative-config per
drafter kind (and its per-batch-size schedule), SGLang's EAGLE-3 / draft-model flags, TensorRT-LLM's
Eagle3DecodingConfig; each engine's rules as `treeopt.core.serving` cites them. One test constructs
vLLM 0.32's SpeculativeConfig from the n-gram config (needs vLLM's environment; no engine starts)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess

import numpy as np
import pytest
from typer.testing import CliRunner

from treeopt.cli import app
from treeopt.core.errors import TreeoptError
from treeopt.core.serving import sglang_args, trtllm_eagle3_config, validate_ranges, vllm_config
from treeopt.core.tree import Tree
from treeopt.core.treefile import format_tree, read_tree_meta
from treeopt.decoding.vllm_engine import DEFAULT_PYTHON
from treeopt.search.vllm import speculative_config

runner = CliRunner()
CHAIN = "[[0], [0, 0], [0, 0, 0]]"


def test_vllm_config_per_drafter_kind():
    assert vllm_config("heads", 3) == {"method": "medusa", "num_speculative_tokens": 3}
    assert vllm_config("heads:/h", 3) == {"method": "medusa", "model": "/h", "num_speculative_tokens": 3}
    assert vllm_config("eagle3:/e", 2) == {"method": "eagle3", "model": "/e", "num_speculative_tokens": 2}
    assert vllm_config("draft:org/m", 4) == {"method": "draft_model", "model": "org/m", "num_speculative_tokens": 4}
    assert vllm_config("ngram:2-4", 3) == {"method": "ngram", "prompt_lookup_min": 2, "prompt_lookup_max": 4,
                                           "num_speculative_tokens": 3}
    assert vllm_config("ngram", 1)["prompt_lookup_min"] == vllm_config("ngram", 1)["prompt_lookup_max"] == 5  # vLLM's
    with pytest.raises(TreeoptError, match="eagle3:DIR"):
        vllm_config("eagle3", 2)
    with pytest.raises(TreeoptError, match="without --speculative-config"):
        vllm_config("eagle3:/e", 0)


def test_vllm_schedule_per_drafter_keeps_vllms_range_rules():
    entries = [{"batch_size": b, "k": k} for b, k in ((1, 4), (8, 2), (32, 0))]
    config = speculative_config(entries, "eagle3:/e")
    assert config == {"method": "eagle3", "model": "/e", "num_speculative_tokens": 4,
                      "num_speculative_tokens_per_batch_size": [[1, 7, 4], [8, 31, 2], [32, 32, 0]]}
    assert validate_ranges(config["num_speculative_tokens_per_batch_size"])[0] == (1, 7, 4)
    assert speculative_config(entries, "ngram:2-4")["num_speculative_tokens_per_batch_size"][-1] == [32, 32, 0]
    assert speculative_config([{"batch_size": 1, "k": 0}], "eagle3:/e") is None  # plain everywhere
    with pytest.raises(TreeoptError, match="largest k"):  # vLLM caps every range's k at num_speculative_tokens
        vllm_config("eagle3:/e", 2, [[1, 4, 3]])
    with pytest.raises(TreeoptError, match="start at 1"):
        vllm_config("eagle3:/e", 3, [[2, 4, 3]])


def test_sglang_flags_for_a_chain():
    """k steps of topk 1 and k + 1 draft tokens: the value `_handle_eagle_family` keeps at topk 1."""
    for k in (1, 3, 7):
        flags = dict(zip(*[iter(sglang_args("eagle3:/ckpt dir", k))] * 2))
        assert flags == {"--speculative-algorithm": "EAGLE3", "--speculative-draft-model-path": "/ckpt dir",
                         "--speculative-num-steps": str(k), "--speculative-eagle-topk": "1",
                         "--speculative-num-draft-tokens": str(k + 1)}
    assert sglang_args("draft:org/small", 2)[:2] == ["--speculative-algorithm", "STANDALONE"]
    text = format_tree(Tree.chain(3), "sglang", drafter="eagle3:/ckpt dir")
    assert shlex.split(text) == sglang_args("eagle3:/ckpt dir", 3)  # quoted for the shell
    for bad in ("heads", "heads:/h", "ngram:2-4"):
        with pytest.raises(TreeoptError, match="eagle3:DIR or draft:MODEL"):
            sglang_args(bad, 3)


def test_trtllm_eagle3_options():
    assert trtllm_eagle3_config("eagle3:/e", 3) == {
        "speculative_config": {"decoding_type": "Eagle3", "max_draft_len": 3, "speculative_model": "/e"}}
    text = format_tree(Tree.chain(3), "trtllm-eagle3", drafter="eagle3:/e")
    assert json.loads(text) == trtllm_eagle3_config("eagle3:/e", 3)
    yaml = pytest.importorskip("yaml")  # trtllm-serve reads the file with yaml.safe_load
    assert yaml.safe_load(text) == json.loads(text)
    for bad in ("draft:m", "ngram", "heads:/h"):
        with pytest.raises(TreeoptError, match="Eagle3DecodingConfig"):
            trtllm_eagle3_config(bad, 3)


@pytest.mark.parametrize("name,fmt,drafter", [("spec.json", "vllm", "eagle3:/e"), ("spec.json", "vllm", "ngram:2-4"),
                                              ("spec.json", "vllm", "draft:m"), ("sglang.args", None, "eagle3:/e"),
                                              ("sglang.args", None, "draft:m"), ("trt.yaml", None, "eagle3:/e")])
def test_export_writes_each_engine_and_reads_back_the_chain(tmp_path, name, fmt, drafter):
    out = tmp_path / name
    r = runner.invoke(app, ["export", "-t", CHAIN, "-o", str(out), "--drafter", drafter, *(["--format", fmt] if fmt else [])])
    assert r.exit_code == 0, r.output
    assert f"top-1 chain of 3 tokens with {drafter}" in r.output
    tree, _ = read_tree_meta(out)
    assert tree == Tree.chain(3)


def test_export_takes_the_tree_files_drafter(tmp_path):
    tree = tmp_path / "t.json"
    tree.write_text(format_tree(Tree.chain(2), "json", num_heads=4, drafter="ngram:2-3"))
    r = runner.invoke(app, ["export", "-t", str(tree), "-o", str(tmp_path / "v.json"), "--format", "vllm"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "v.json").read_text())["prompt_lookup_max"] == 3
    r = runner.invoke(app, ["export", "-t", str(tree), "-o", str(tmp_path / "w.json"), "--format", "vllm",
                            "--drafter", "ngram:5-5"])  # another lookup than the one the tree was searched on
    assert r.exit_code == 2 and "--drafter ngram:2-3" in r.output and not (tmp_path / "w.json").exists()


def error_line(args, *words, tmp_path):
    r = runner.invoke(app, args)
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.output
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,words", [
    (["-t", "[[0], [1]]", "-o", "{tmp}/a.args", "--drafter", "eagle3:/e"], ["top-1 chain only", "--target chain"]),
    (["-t", "[[0], [1]]", "-o", "{tmp}/a.json", "--format", "vllm", "--drafter", "eagle3:/e"], ["--target vllm"]),
    (["-t", CHAIN, "-o", "{tmp}/a.args"], ["--drafter eagle3:DIR"]),
    (["-t", CHAIN, "-o", "{tmp}/a.yaml", "--drafter", "draft:m"], ["Eagle3DecodingConfig"]),
    (["-t", CHAIN, "-o", "{tmp}/a.json", "--drafter", "eagle3:/e"], ["drop --drafter"]),
    (["-t", CHAIN, "-o", "{tmp}/a.json", "--format", "vllm", "--drafter", "eagle3"], ["eagle3:DIR"]),
    (["-t", CHAIN, "-o", "{tmp}/a.json", "--format", "vllm", "--drafter", "ngram:4-2"], ["MIN <= MAX"]),
    (["-t", CHAIN, "-o", "{tmp}/a.json", "--format", "sglng"], ["--format", "sglang"]),
    (["-t", "[]", "-o", "{tmp}/a.args", "--drafter", "eagle3:/e"], ["at least one node"]),
])
def test_bad_exports_are_one_line_and_write_nothing(tmp_path, args, words):
    error_line(["export", *[a.replace("{tmp}", str(tmp_path)) for a in args]], *words, tmp_path=tmp_path)


def ngram_calibration(make_calibration, drafter: str):
    rng = np.random.default_rng(1)
    cal = make_calibration([np.where(rng.random((120, 4)) < [0.7, 0.5, 0.3, 0.1], 0, 3).astype(np.int16)
                            for _ in range(6)], top_k=4)
    meta_file = cal.directory / "calibration.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "settings": {"drafter": drafter}}))
    return cal.directory


def test_search_engine_vllm_writes_the_calibrations_drafter(make_calibration, tmp_path):
    cal = ngram_calibration(make_calibration, "ngram:2-4")
    rows = [f"{k},{ms},{b}" for b, step in ((1, 1.0), (16, 12.0)) for k, ms in enumerate(10 + step * np.arange(5))]
    lat = tmp_path / "latency-vllm.csv"
    lat.write_text("nodes,forward_ms,batch_size\n" + "\n".join(rows) + "\n")
    base = ["search", "-c", str(cal), "--engine", "vllm", "--latency", str(lat)]
    r = runner.invoke(app, [*base, "-o", str(tmp_path / "spec.json")])
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "spec.json").read_text())
    assert config["method"] == "ngram" and config["prompt_lookup_min"] == 2 and config["prompt_lookup_max"] == 4
    assert validate_ranges(config["num_speculative_tokens_per_batch_size"])[-1] == (16, 16, 0)
    assert "keeps k fixed" not in r.output  # n-gram lookup takes the per-batch k
    r = runner.invoke(app, [*base, "--drafter", "eagle3:/e"])
    assert r.exit_code == 2 and "--drafter ngram:2-4" in r.output
    r = runner.invoke(app, ["search", "-c", str(cal), "--drafter", "ngram:2-4"])
    assert r.exit_code == 2 and "does not use --drafter" in r.output


VLLM = os.environ.get("TREEOPT_VLLM_PYTHON") or (str(DEFAULT_PYTHON) if DEFAULT_PYTHON.is_file() else None)
needs_vllm = pytest.mark.skipif(VLLM is None, reason="vLLM's environment is absent: run `scripts/setup.sh --vllm` "
                                                     "or set TREEOPT_VLLM_PYTHON")


@pytest.mark.slow
@needs_vllm
def test_vllm_accepts_the_ngram_config():
    """vLLM 0.32's SpeculativeConfig (pydantic, extra keys forbidden; `__post_init__`, `_verify_args`)
    takes the n-gram config treeopt writes, schedule included; no model loads, no engine starts."""
    config = speculative_config([{"batch_size": 1, "k": 3}, {"batch_size": 8, "k": 1}], "ngram:2-4")
    code = ("import json, sys; from vllm.config import SpeculativeConfig; c = SpeculativeConfig(**json.loads(sys.argv[1]));"
            "print(json.dumps([c.method, c.num_speculative_tokens, c.prompt_lookup_min, c.prompt_lookup_max,"
            " [list(r) for r in c.num_speculative_tokens_per_batch_size]]))")
    done = subprocess.run([VLLM, "-c", code, json.dumps(config)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == ["ngram", 3, 2, 4, [[1, 7, 3], [8, 8, 1]]]
    bad = subprocess.run([VLLM, "-c", code, json.dumps({**config, "speculative_token_tree": "[(0,)]"})],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0  # the check can fail: an unknown key is refused
