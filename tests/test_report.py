"""`treeopt report`: Markdown + HTML pages from run directories holding some or all of their files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from treeopt.reports.report import like_for_like, load_run, markdown_table, write_report
from treeopt.search.api import search_report, sweep_report
from treeopt.search.baselines import best_cartesian
from treeopt.search.grow import search
from test_plots import synthetic_calibration
from treeopt.cli import app
from treeopt.core.errors import TreeoptError
from treeopt.core.published import mc_sim_7b_63
from treeopt.core.record import load_calibration
from treeopt.core.tree import Tree

SECTIONS = ("Summary", "Inputs", "What each figure rests on", "Like for like on held-out prompts", "The trees",
            "Speed on this machine", "Benchmark (measured)", "Calibration", "Sweep")


def make_run(d: Path) -> Path:
    """A run directory as the demo writes it, from synthetic calibrations (fit and held-out differ)."""
    synthetic_calibration(d / "calibration", prompts=12, length=40)
    synthetic_calibration(d / "calibration-heldout", prompts=6, length=40, seed=1, name="held")
    (d / "prompts").mkdir()
    (d / "prompts" / "source.json").write_text(json.dumps({"source": "offline.json", "note": "bundled instructions"}))
    pd.DataFrame({"nodes": [0, 4, 16, 64], "forward_ms": [10.0, 12.0, 14.0, 30.0], "device": "cpu",
                  "dtype": "float32", "model": "m"}).to_csv(d / "latency.csv", index=False)
    search_report(d / "calibration", 16, out=d / "tree.json")
    sweep_report(d / "calibration", max_nodes=64, latency=d / "latency.csv", out=d / "sweep.csv")
    cal = load_calibration(d / "calibration")
    found = search(cal, 63).tree
    trees = {"searched-4": found[:4], "chain-4": Tree.chain(4), "searched-16": found[:16],
             "cartesian-" + "x".join(map(str, best_cartesian(cal, 16))): Tree.cartesian(best_cartesian(cal, 16)),
             "searched-63": found, "mc_sim_7b_63": Tree.from_choices(mc_sim_7b_63)}
    rows = [{"method": "plain", "nodes": 0, "tokens_per_step": 1.0, "speedup": 1.0, "tokens_per_s": 50.0}]
    rows += [{"method": k, "nodes": len(t), "tokens_per_step": 1.3 + 0.01 * len(t), "speedup": 0.9 - 0.005 * len(t),
              "tokens_per_s": 40.0, "predicted_tokens_per_step": 1.35 + 0.01 * len(t)} for k, t in trees.items()]
    (d / "bench").mkdir()
    pd.DataFrame(rows).assign(match_rate=1.0, prompts=6, new_tokens=96).to_csv(d / "bench" / "bench.csv", index=False)
    (d / "bench" / "bench.json").write_text(json.dumps({"device": "cpu", "threads": 2, "max_new_tokens": 40,
                                                        "versions": {"treeopt": "0.2.0", "torch": "2.x"},
                                                        "trees": {k: t.choices for k, t in trees.items()}}))
    (d / "demo.json").write_text(json.dumps({"settings": {"nodes": 16}, "stages": {"calibrate": 5.0, "bench": 7.5},
                                             "machine": {"cpu": "Test CPU", "cores": 2}}))
    return d


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run"))


@pytest.mark.pipeline
def test_full_run_report(full_run):
    md, page = write_report(full_run)
    text = md.read_text()
    for section in SECTIONS + ("Head accuracy", "Run"):
        assert f"## {section}\n" in text
    assert "is missing" not in text and "damaged" not in text
    # the header: inputs and the basis of each figure
    assert "offline.json (bundled instructions)" in text and "| overlap (same instruction in both) | none |" in text
    assert "Test CPU, 2 cores, cpu, 2 torch threads" in text and "treeopt 0.2.0, torch 2.x" in text
    assert "| acceptance rule | greedy |" in text and "uniform expectation" in text  # recorded by calibrate and search
    # the trees as copyable text
    assert "```python\nsearched_4 = [[0]" in text and "mc_sim_7b_63 = [[0], [0, 0]" in text
    # the summary names a tree, its interval and the machine
    assert "**Which tree to deploy.**" in text and "95 % interval" in text and "no tree beats plain decoding" in text
    assert "tokens per step cross-validated over the calibration prompts" in text  # tree.json's headline
    assert "break-even" in text and "flat in tree size" in text
    for fig in ("tree-searched-63", "tree-searched-16", "tree-searched-4", "accuracy", "budget", "speed",
                "predicted_vs_measured"):
        assert f"](figures/{fig}.png)" in text
        for suffix in (".png", ".svg"):
            assert (full_run / "figures" / f"{fig}{suffix}").stat().st_size > 10_000
    html = page.read_text()
    assert html.count("data:image/png;base64,") == 7 and "<table>" in html and "figures/" not in html


def test_like_for_like_pairs_every_baseline_with_a_searched_tree_and_a_ceiling(full_run):
    table = like_for_like(load_run(full_run))
    for n, group in table.groupby("nodes"):
        assert list(group["kind"]) == ["searched"] + ["baseline"] * (len(group) - 2) + ["ceiling"], group
    ceiling = table[table["kind"] == "ceiling"]
    assert np.allclose(ceiling["of_ceiling"], 1.0)
    # the ceiling is fit on the held-out prompts, so nothing of its size replays better there
    best = table.groupby("nodes")["heldout"].max()
    assert np.allclose(ceiling.set_index("nodes")["heldout"], best[ceiling["nodes"]])
    assert (table["ci_low"] <= table["heldout"]).all() and (table["heldout"] <= table["ci_high"]).all()
    assert table.loc[table["tree"] == "searched-16", "measured"].item() == pytest.approx(1.46)


def test_a_searched_tree_is_added_beside_an_unpaired_baseline(tmp_path, full_run):
    """A bench of a published tree alone still gets its same-size searched tree (not measured)."""
    d = tmp_path / "r"
    shutil.copytree(full_run, d)
    meta = json.loads((d / "bench" / "bench.json").read_text())
    meta["trees"] = {"mc_sim_7b_63": meta["trees"]["mc_sim_7b_63"]}
    (d / "bench" / "bench.json").write_text(json.dumps(meta))
    bench = pd.read_csv(d / "bench" / "bench.csv")
    bench[bench["method"].isin(["plain", "mc_sim_7b_63"])].to_csv(d / "bench" / "bench.csv", index=False)
    table = like_for_like(load_run(d))
    assert list(table["tree"]) == ["searched-63", "mc_sim_7b_63", "ceiling-63"]
    assert np.isnan(table["measured"][0]) and table["measured"][1] == pytest.approx(1.93)


def test_partial_run_says_what_is_missing_in_each_section(tmp_path, full_run):
    shutil.copytree(full_run / "bench", tmp_path / "bench")
    md, page = write_report(tmp_path)
    text = md.read_text()
    for section in SECTIONS:
        assert f"## {section}\n" in text  # no section dropped in silence
    for missing, command in (("calibration/", "treeopt calibrate --prompts"), ("calibration-heldout/", "--output-dir "
                             f"{tmp_path.as_posix()}/calibration-heldout"), ("sweep.csv", "treeopt sweep"),
                             ("latency.csv", "treeopt profile")):
        assert f"`{missing}` is missing: make it with `" in text and command in text
    sweep = text.split("## Sweep\n")[1].split("##")[0]
    assert "`sweep.csv` is missing" in sweep and "missing" in page.read_text()


def test_damaged_files_are_reported_not_fatal(tmp_path):
    (tmp_path / "tree.json").write_text("{not json")
    (tmp_path / "sweep.csv").write_text("a,b\n1,2\n")
    pd.DataFrame({"nodes": [0, 16], "forward_ms": [10.0, 12.0]}).to_csv(tmp_path / "latency.csv", index=False)
    run = load_run(tmp_path)
    assert run.tree is None and run.sweep is None and run.latency is not None
    assert "damaged" in run.problems["tree.json"] and "nodes" in run.problems["sweep.csv"]
    md, _ = write_report(tmp_path)
    text = md.read_text()
    assert "## Speed on this machine" in text and "`tree.json` is damaged" in text and "figures/speed.png" in text
    assert "1.20x at 16 nodes (the forward pass" in text


def test_report_errors(tmp_path):
    with pytest.raises(TreeoptError, match="not found"):
        write_report(tmp_path / "nope")
    with pytest.raises(TreeoptError, match="holds none of"):
        write_report(tmp_path)


def test_markdown_table_formats_numbers():
    df = pd.DataFrame({"a": ["x|y", "z"], "b": [1.23456, float("nan")], "c": [3, 4]})
    assert markdown_table(df).splitlines() == ["| a | b | c |", "|---|---|---|", "| x\\|y | 1.235 | 3 |", "| z |  | 4 |"]


@pytest.mark.pipeline
def test_cli_report(full_run):
    result = CliRunner().invoke(app, ["report", str(full_run)])
    assert result.exit_code == 0, result.output
    assert "report.html" in result.output
    result = CliRunner().invoke(app, ["report", str(full_run / "missing")])
    assert result.exit_code == 2 and "error:" in result.output
