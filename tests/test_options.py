"""The options of every command: each default is its settings dataclass's, every bad number or conflict
is one `error:` line (exit 2) before any model loads or any file is written. No model is loaded here."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from treeopt.cli import app
from treeopt.core.errors import TreeoptError
from treeopt.core.settings import (BenchConfig, CalibrationConfig, DecodeConfig, EvaluateConfig, ExportConfig,
                                   ExportHeadsConfig,
                                   ModelSettings, PlotConfig, ProfileConfig, SearchConfig, SweepConfig, default)
from treeopt.demo import DemoConfig
from treeopt.training.config import DrafterTrainConfig, TrainConfig

runner = CliRunner()
CONFIGS = {"info": ModelSettings, "train-heads": TrainConfig, "train-drafter": DrafterTrainConfig, "calibrate": CalibrationConfig, "search": SearchConfig,
           "export": ExportConfig, "export-heads": ExportHeadsConfig, "evaluate": EvaluateConfig, "sweep": SweepConfig, "decode": DecodeConfig,
           "bench": BenchConfig, "profile": ProfileConfig, "plot": PlotConfig, "demo": DemoConfig}
CLI_ONLY = {"quiet", "max_gen_minutes", "max_train_minutes", "instruction", "run_dir", "out@demo"}
NO_MODEL = ["--model", "/nonexistent/model"]  # a check that ran after loading would fail on the model instead


def commands():
    return get_command(app).commands


def test_every_command_has_its_settings():
    assert set(commands()) == set(CONFIGS) | {"report"}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_each_default_is_written_once_in_the_settings(name):
    """Every option's default (what `--help` shows) is its dataclass field's default."""
    config = CONFIGS[name]
    names = {f.name for f in fields(config)}
    for param in commands()[name].params:
        if param.name in CLI_ONLY or f"{param.name}@{name}" in CLI_ONLY:
            assert param.default in (None, False) or name == "demo", (name, param.name)
            continue
        assert param.name in names, f"{name} --{param.name} has no field in {config.__name__}"
        want = default(config, param.name)
        if want is ...:
            assert param.required, (name, param.name)
            continue
        got = param.default
        if isinstance(want, tuple):  # a repeatable option (None: none), or one comma-separated string
            got = tuple(got or ()) if not isinstance(got, str) else tuple(x for x in got.split(",") if x)
        elif isinstance(want, Path) or isinstance(got, Path):
            got, want = str(got), str(want)
        assert got == want, f"{name} --{param.name}: CLI default {got!r}, {config.__name__} {want!r}"


def test_one_bundled_model_name_and_one_acceptance_model_default():
    from treeopt.core.settings import DEFAULT_ACCEPTANCE_MODEL, DEFAULT_MODEL
    from treeopt.search.acceptance import DEFAULT_MODEL as SEARCH_DEFAULT

    assert SEARCH_DEFAULT == DEFAULT_ACCEPTANCE_MODEL == default(PlotConfig, "acceptance_model")
    assert {default(c, "model") for c in (ModelSettings, TrainConfig, CalibrationConfig, DemoConfig)} == {DEFAULT_MODEL}
    root = Path(__file__).parents[1]
    named = [p for d in ("treeopt", "core", "decoding", "calibrate", "search", "training", "reports")
             for p in (root / d).rglob("*.py") if f'"{DEFAULT_MODEL}"' in p.read_text()]
    assert [p.relative_to(root).as_posix() for p in named] == ["core/settings.py"]


def error_line(r, *words):
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


BAD = [
    (["train-heads", "-o", "{tmp}/t", "--num-heads", "0"], "--num-heads"),
    (["train-heads", "-o", "{tmp}/t", "--epochs", "-1"], "--epochs"),
    (["train-heads", "-o", "{tmp}/t", "--lr", "0"], "--lr"),
    (["train-heads", "-o", "{tmp}/t", "--distill", "2"], "--distill"),
    (["train-heads", "-o", "{tmp}/t", "--batch-size", "0"], "--batch-size"),
    (["train-heads", "-o", "{tmp}/t", "--stage", "nope"], "--stage"),
    (["calibrate", "-o", "{tmp}/c", "--top-k", "0"], "--top-k"),
    (["calibrate", "-o", "{tmp}/c", "--limit", "2", "--first", "2"], "--first"),
    (["calibrate", "-o", "{tmp}/c", "--acceptance", "typical", "--teacher-forced", "x.json"], "--teacher-forced"),
    (["calibrate", "-o", "{tmp}/c", "--acceptance", "typical", "--device-map", "auto"], "--device-map"),
    (["calibrate", "-o", "{tmp}/c", "--acceptance", "typical", "--batch-size", "4"], "--batch-size"),
    (["calibrate", "-o", "{tmp}/c", "--probe", "[[0]]"], "--probe"),
    (["calibrate", "-o", "{tmp}/c", "--temperature", "1.0"], "--temperature"),
    (["calibrate", "-o", "{tmp}/c", "--max-memory", "0=1GiB"], "--max-memory"),
    (["search", "-c", "{tmp}", "--nodes", "x"], "--nodes"),
    (["search", "-c", "{tmp}", "--nodes", "auto"], "--latency"),
    (["search", "-c", "{tmp}", "--serving-batch", "0"], "--serving-batch"),
    (["search", "-c", "{tmp}", "--max-rank", "0"], "--max-rank"),
    (["search", "-c", "{tmp}", "--serving-batches", "1,4", "--nodes", "8", "--latency", "l.csv"], "--nodes"),
    (["search", "-c", "{tmp}", "--serving-batches", "1,4", "--format", "json", "--latency", "l.csv"], "--format"),
    (["search", "-c", "{tmp}", "--serving-batches", "1,4", "--target", "vllm", "--latency", "l.csv"], "--target"),
    (["search", "-c", "{tmp}", "--serving-batches", "1,4", "--acceptance", "typical", "--latency", "l.csv"],
     "--acceptance"),
    (["search", "-c", "{tmp}", "--serving-batches", "1,x", "--latency", "l.csv"], "--serving-batches"),
    (["search", "-c", "{tmp}", "--serving-batches", "1,4"], "--latency"),
    (["search", "-c", "{tmp}", "--prior-calibration", "{tmp}"], "--prior-calibration"),
    (["sweep", "-c", "{tmp}", "--max-nodes", "-5"], "--max-nodes"),
    (["evaluate", "-c", "{tmp}"], "--tree"),
    (["evaluate", "-c", "{tmp}", "-t", "mc_sim_7b_63", "--split", "1.5"], "--split"),
    (["decode", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["decode", "hi", "--acceptance", "nucleus"], "--acceptance"),
    (["decode", "hi", "--temperature", "0", "--acceptance", "typical"], "--temperature"),
    (["bench", "-t", "mc_sim_7b_63", "--repeats", "0"], "--repeats"),
    (["bench", "-t", "mc_sim_7b_63", "--first", "0"], "--first"),
    (["bench", "-t", "mc_sim_7b_63", "--threads", "0"], "--threads"),
    (["bench"], "--tree"),
    (["profile", "-o", "{tmp}/l.csv", "--repeats", "0"], "--repeats"),
    (["profile", "-o", "{tmp}/l.csv", "--sizes", ""], "--sizes"),
    (["profile", "-o", "{tmp}/l.csv", "--sizes", "-1"], "--sizes"),
    (["profile", "-o", "{tmp}/l.csv", "--serving-batches", "0"], "--serving-batches"),
    (["profile", "-o", "{tmp}/l.csv", "--context", "0"], "--context"),
    (["demo", "-o", "{tmp}/d", "--top-k", "0"], "--top-k"),
    (["demo", "-o", "{tmp}/d", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["demo", "-o", "{tmp}/d", "--limit", "0"], "--limit"),
    (["demo", "-o", "{tmp}/d", "--nodes", "0"], "--nodes"),
    (["demo", "-o", "{tmp}/d", "--nodes", "auto", "--profile-sizes", ""], "--profile-sizes"),
    (["demo", "-o", "{tmp}/d", "--published", "mc_sim_7b_64"], "mc_sim_7b_64"),
    (["demo", "-o", "{tmp}/d", "--cartesian", "best,2by3"], "2by3"),
    (["demo", "-o", "{tmp}/d", "--profile-sizes", "1,x"], "--profile-sizes"),
]


@pytest.mark.parametrize("args,names", BAD, ids=[" ".join(a[:1] + a[3:]) for a, _ in BAD])
def test_bad_numbers_and_conflicts_fail_before_any_model_loads(args, names, tmp_path):
    """One line naming the option, exit 2, before a model loads (the model given does not exist) and
    before any file is written (tmp_path stays empty)."""
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    takes_model = {p.name for p in commands()[args[0]].params} >= {"model"}
    r = runner.invoke(app, args + (NO_MODEL if takes_model else []))
    error_line(r, names)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [["demo", "--limit", "1e9"], ["calibrate", "--top-k", "ten"], ["bench", "--trees", "x"],
                                  ["search", "-c"], ["nosuchcommand"]])
def test_usage_errors_are_one_error_line(args):
    error_line(runner.invoke(app, args))


def test_a_refused_demo_setting_leaves_nothing_that_blocks_the_fixed_rerun(tmp_path):
    out = tmp_path / "D"
    for bad in (["--top-k", "0"], ["--max-new-tokens", "-1"]):
        error_line(runner.invoke(app, ["demo", "-o", str(out), *bad, *NO_MODEL]))
        assert not out.exists()


def test_the_python_twins_check_the_same(tmp_path):
    from treeopt.decoding.profile import run_profile
    from treeopt.reports.bench import run_bench

    with pytest.raises(TreeoptError, match="--repeats"):
        run_profile(repeats=0, out=tmp_path / "l.csv")
    with pytest.raises(TreeoptError, match="--sizes"):
        run_profile(sizes="", out=tmp_path / "l.csv")
    with pytest.raises(TreeoptError, match="--tree"):
        run_bench(prompts="x.json")
    with pytest.raises(TreeoptError, match="--num-heads"):
        TrainConfig(work=str(tmp_path), num_heads=0)
    with pytest.raises(TreeoptError, match="--top-k"):
        DemoConfig(top_k=0)
    assert DemoConfig(nodes="16").nodes == 16 and DemoConfig(cartesian="best, 2x3").cartesian == ("best", "2x3")


def test_an_output_under_a_file_is_refused_before_training(tmp_path, monkeypatch):
    import treeopt.decoding.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    a_file = tmp_path / "f"
    a_file.write_text("x")
    error_line(runner.invoke(app, ["train-heads", "-o", str(a_file / "w"), "-p", "magpie"]), "not a directory")
    error_line(runner.invoke(app, ["train-heads", "-o", str(tmp_path / "w"), "--save-heads", str(a_file)]), "a file")
    prompts = tmp_path / "p.json"
    prompts.write_text('[{"instruction": "hi"}]')
    error_line(runner.invoke(app, ["calibrate", "--acceptance", "typical", "-p", str(prompts), "-o", str(a_file)]),
               "not a directory")


def test_messages_name_the_problem(tmp_path):
    error_line(runner.invoke(app, ["calibrate", "-p", str(tmp_path), "-o", str(tmp_path / "c"), *NO_MODEL]),
               str(tmp_path), "is a directory")
    deep = tmp_path / "deep.json"
    deep.write_text('{"medusa_choices": [[0], [0, 0], [0, 0, 0]]}')
    from treeopt.core.treefile import read_tree

    with pytest.raises(TreeoptError, match="deep.json: tree is 3 deep"):
        read_tree(deep, num_heads=2)
    with pytest.raises(TreeoptError, match="is a directory"):
        read_tree(tmp_path)


@pytest.mark.parametrize("name,twin,resumes", [("profile", "treeopt.decoding.profile.run_profile", False),
                                               ("decode", "treeopt.decoding.decoder.run_decode", False),
                                               ("bench", "treeopt.reports.bench.run_bench", True)])
def test_an_interrupt_says_resume_only_where_a_run_resumes(name, twin, resumes, monkeypatch):
    module, fn = twin.rsplit(".", 1)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(__import__(module, fromlist=[fn]), fn, interrupted)
    args = {"profile": ["profile"], "decode": ["decode", "hi"], "bench": ["bench", "-t", "mc_sim_7b_63"]}[name]
    r = runner.invoke(app, args)
    assert r.exit_code == 130 and "interrupted" in r.output
    assert ("resume" in r.output) == resumes


def test_the_engine_that_ran_is_recorded():
    import torch

    from treeopt.decoding.decoder import _Step, engine_ran

    def fails(*a):
        raise RuntimeError("no C++ compiler\nmore")

    step = _Step(lambda x: x + 1, torch.device("cpu"), compiled=False)
    step.fn = fails  # as a compiled step whose compile fails
    assert step.warm(1) == 2 and step.fn is step.eager
    assert step.fallback == "torch.compile failed (RuntimeError: no C++ compiler)"

    class Dec:
        def __init__(self, engine, reason=""):
            self.engine = {"engine": engine, "reason": reason}

    assert engine_ran([Dec("compiled"), Dec("compiled")], True) == {"compiled": True, "engine": "compiled",
                                                                    "engine_reason": ""}
    fell = engine_ran([Dec("compiled"), Dec("eager", step.fallback)], True)
    assert fell["compiled"] is False and fell["engine_reason"] == step.fallback
    assert "not asked" in engine_ran([Dec("eager")], False)["engine_reason"]
