"""`treeopt report`: Markdown + HTML pages from run directories holding some or all of their files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from reports.report import load_run, markdown_table, write_report
from test_plots import synthetic_calibration
from treeopt.cli import app
from treeopt.core.errors import TreeoptError
from search.api import search_report, sweep_report


def bench_table() -> pd.DataFrame:
    return pd.DataFrame({"method": ["plain", "tree", "cartesian-2x3"], "nodes": [0, 64, 8],
                         "tokens_per_step": [1.0, 2.1, 1.7], "step_ms": [20.0, 26.0, 21.0], "overhead": [1, 1.3, 1.05],
                         "speedup": [1.0, 1.5, 1.3], "tokens_per_s": [50.0, 75.0, 65.0], "prefill_ms": 30.0,
                         "match_rate": 1.0, "predicted_tokens_per_step": [np.nan, 2.2, 1.6], "prompts": 8,
                         "new_tokens": 96})


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("run")
    synthetic_calibration(d / "calibration", prompts=12, length=40)
    search_report(d / "calibration", 32, out=d / "tree.json")
    sweep_report(d / "calibration", max_nodes=64, out=d / "sweep.csv")
    (d / "bench").mkdir()
    bench_table().to_csv(d / "bench" / "bench.csv", index=False)
    (d / "bench" / "bench.json").write_text(json.dumps({"device": "cpu", "max_new_tokens": 96}))
    pd.DataFrame({"nodes": [0, 16, 64], "forward_ms": [10.0, 11.0, 15.0], "device": "cpu", "dtype": "float32",
                  "model": "m"}).to_csv(d / "latency.csv", index=False)
    (d / "demo.json").write_text(json.dumps({"settings": {"nodes": 64, "cartesian": ["best", "2x3"]}, "stages": {"calibrate": 5.0, "bench": 7.5}, "threads": 2}))
    return d


def test_full_run_report(full_run):
    md, page = write_report(full_run)
    text = md.read_text()
    for section in ("## Calibration", "## Head accuracy", "## Searched tree", "## Searched tree vs baselines",
                    "## Benchmark (measured)", "## Predicted vs measured", "## Sweep", "## Run"):
        assert section in text
    assert "Not in this run" not in text
    assert "Searched tree (32 nodes):" in text and "Measured on 8 prompts" in text and "tree 2.10 tokens/step, 1.50x" in text
    assert "| searched (tree.json) | 32 |" in text and "best_cartesian" in text and "mc_sim_7b_63" in text
    for fig in ("tree", "accuracy", "budget", "speed", "predicted_vs_measured"):
        assert f"](figures/{fig}.png)" in text
        for suffix in (".png", ".svg"):
            assert (full_run / "figures" / f"{fig}{suffix}").stat().st_size > 10_000
    html = page.read_text()
    assert html.count("data:image/png;base64,") == 5 and "<table>" in html and "figures/" not in html


def test_partial_run_says_what_is_missing(tmp_path, full_run):
    (tmp_path / "bench").mkdir()
    bench_table().to_csv(tmp_path / "bench" / "bench.csv", index=False)
    md, page = write_report(tmp_path)
    text = md.read_text()
    assert "## Benchmark (measured)" in text and "## Calibration" not in text
    for missing in ("calibration/", "tree.json", "sweep.csv", "latency.csv"):
        assert f"`{missing}` is missing" in text
    assert "treeopt calibrate" in text and "Not in this run" in page.read_text()


def test_damaged_files_are_reported_not_fatal(tmp_path, full_run):
    (tmp_path / "tree.json").write_text("{not json")
    (tmp_path / "sweep.csv").write_text("a,b\n1,2\n")
    pd.DataFrame({"nodes": [0, 16], "forward_ms": [10.0, 12.0]}).to_csv(tmp_path / "latency.csv", index=False)
    run = load_run(tmp_path)
    assert run.tree is None and run.sweep is None and run.latency is not None
    assert any("tree.json" in n for n in run.notes) and any("sweep.csv" in n and "nodes" in n for n in run.notes)
    md, _ = write_report(tmp_path)
    text = md.read_text()
    assert "## Forward latency vs tree size" in text and "tree.json" in text and "figures/speed.png" in text


def test_report_errors(tmp_path):
    with pytest.raises(TreeoptError, match="not found"):
        write_report(tmp_path / "nope")
    with pytest.raises(TreeoptError, match="holds none of"):
        write_report(tmp_path)


def test_markdown_table_formats_numbers():
    df = pd.DataFrame({"a": ["x|y", "z"], "b": [1.23456, float("nan")], "c": [3, 4]})
    assert markdown_table(df).splitlines() == ["| a | b | c |", "|---|---|---|", "| x\\|y | 1.235 | 3 |", "| z |  | 4 |"]


def test_cli_report(full_run):
    result = CliRunner().invoke(app, ["report", str(full_run)])
    assert result.exit_code == 0, result.output
    assert "report.html" in result.output
    result = CliRunner().invoke(app, ["report", str(full_run / "missing")])
    assert result.exit_code == 2 and "error:" in result.output
