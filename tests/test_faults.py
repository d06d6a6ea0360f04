"""Fault injection on the tiny model: every bad input and fault of issue #19 ends in one line naming the
file, the problem and the fix (exit 2: bad input, 1: failed run), nothing stale is reused, and a run
killed with SIGKILL resumes to the very bytes an uninterrupted run writes."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from treeopt.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line(result, code: int, *words: str) -> str:
    """The failure's message, after checking it is one `error:` line with `words`, and the exit code."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == code, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.json"
    path.write_text(json.dumps([{"instruction": f"w{i} w{i + 1} w{i + 2}"} for i in range(3, 11)]))
    return path


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> list[str]:
    return ["--model", str(tiny_model_dir), "--heads", "random", "--device", "cpu"]


@pytest.fixture(scope="module")
def calibration(tmp_path_factory, tiny, prompts) -> Path:
    out = tmp_path_factory.mktemp("cal") / "cal"
    r = cli("calibrate", *tiny, "-p", prompts, "--limit", 4, "--max-new-tokens", 6, "--top-k", 97, "-o", out,
            "--quiet")
    assert r.exit_code == 0, r.stderr
    return out


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: preflight must stop a command before it."""
    import treeopt.decoding.models

    def load_model(*a, **kw):
        raise AssertionError("a model was loaded before the inputs and outputs were checked")

    monkeypatch.setattr(treeopt.decoding.models, "load_model", load_model)


@pytest.fixture
def read_only(tmp_path, monkeypatch) -> Path:
    """A directory nobody may write into. chmod does not stop root, so as root the kernel's answer
    (EACCES) is given by os.open and os.mkdir for paths inside it."""
    d = tmp_path / "read-only"
    d.mkdir()
    d.chmod(0o555)
    if os.geteuid() == 0:
        for name in ("open", "mkdir"):
            real = getattr(os, name)

            def refuse(path, *a, _real=real, **kw):
                if str(Path(path).absolute()).startswith(str(d)):
                    raise PermissionError(errno.EACCES, "Permission denied", str(path))
                return _real(path, *a, **kw)

            monkeypatch.setattr(os, name, refuse)
    yield d
    d.chmod(0o755)


# ---- bad inputs -----------------------------------------------------------------------------

def test_binary_prompts_file(tmp_path, tiny, no_model):
    binary = tmp_path / "data.json"
    binary.write_bytes(bytes(range(200, 256)) * 4)
    one_line(cli("calibrate", *tiny, "-p", binary, "-o", tmp_path / "c"), 2, str(binary), "not UTF-8", "pass a")


def test_malformed_jsonl_names_the_file_line(tmp_path, tiny, no_model):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"instruction": "a"}\n\n{"instruction": "b"}\n{bad\n')
    one_line(cli("calibrate", *tiny, "-p", bad, "-o", tmp_path / "c"), 2, str(bad), "line 4", "fix the file")


# ---- unwritable places, checked before a model is loaded ------------------------------------

def test_read_only_out_dir(read_only, tiny, prompts, calibration, no_model):
    for args in (["calibrate", *tiny, "-p", prompts, "-o", read_only / "cal"],
                 ["search", "-c", calibration, "-n", 4, "-o", read_only / "tree.json"],
                 ["profile", *tiny, "--sizes", "0,2", "-o", read_only / "latency.csv"],
                 ["plot", "-t", "[[0], [1]]", "-o", read_only / "tree.png"]):
        one_line(cli(*args), 2, str(read_only), "permission denied", "pass another")
    assert not list(read_only.iterdir())


def test_out_naming_a_file(tmp_path, tiny, prompts, calibration, no_model):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    one_line(cli("calibrate", *tiny, "-p", prompts, "-o", a_file), 2, str(a_file), "is a file, not a directory")
    one_line(cli("search", "-c", calibration, "-o", a_file / "tree.json"), 2, f"{a_file} is a file, not a directory")
    one_line(cli("demo", *tiny, "-p", prompts, "-o", a_file), 2, str(a_file), "not a directory")
    assert a_file.read_text() == "mine\n"


def test_demo_checks_its_options_before_calibrating(tmp_path, tiny, prompts, no_model):
    one_line(cli("demo", *tiny, "-p", prompts, "--published", "mc_sim_7b_64", "-o", tmp_path / "r"), 2,
             "mc_sim_7b_64", "not found")
    one_line(cli("demo", *tiny, "-p", prompts, "--cartesian", "best,2by3", "-o", tmp_path / "r"), 2, "2by3")
    assert not (tmp_path / "r").exists()


def test_disk_full_is_a_failed_run(tmp_path, calibration, monkeypatch):
    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    tree = tmp_path / "tree.json"
    one_line(cli("search", "-c", calibration, "-n", 4, "-o", tree), 1, str(tree), "disk is full", "run the same command")
    assert list(tmp_path.iterdir()) == []  # no half-written file left behind


def test_debug_shows_the_traceback(tmp_path, calibration):
    a_file = tmp_path / "f"
    a_file.write_text("")
    r = cli("--debug", "search", "-c", calibration, "-o", a_file / "t.json")
    assert r.exit_code != 0 and "is a file, not a directory" in str(r.exception)


# ---- the model cache ------------------------------------------------------------------------

@pytest.fixture
def fake_conversion(monkeypatch, tiny_model_dir) -> list[Path]:
    """The bundled model's GGUF conversion (20 s) replaced by a copy of the tiny model; lists its calls."""
    import treeopt.decoding.models

    calls = []

    def convert(directory: Path):
        calls.append(directory)
        for f in tiny_model_dir.iterdir():
            shutil.copy(f, directory / f.name)

    monkeypatch.setattr(treeopt.decoding.models, "_convert_gguf", convert)
    return calls


def test_read_only_model_cache(read_only, monkeypatch, fake_conversion):
    monkeypatch.setenv("TREEOPT_CACHE", str(read_only / "cache"))
    one_line(cli("info", "--device", "cpu"), 2, str(read_only), "TREEOPT_CACHE")
    assert fake_conversion == []  # said before converting


def test_truncated_cached_model_is_rebuilt(tmp_path, monkeypatch, fake_conversion, caplog):
    from treeopt.decoding.models import load_model

    monkeypatch.setenv("TREEOPT_CACHE", str(tmp_path))
    load_model("smollm2-135m", device="cpu")
    weights = tmp_path / "smollm2-135m-instruct" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    load_model("smollm2-135m", device="cpu")
    assert len(fake_conversion) == 2 and "damaged model.safetensors" in caplog.text and "rebuilding" in caplog.text
    load_model("smollm2-135m", device="cpu")
    assert len(fake_conversion) == 2 and not list(tmp_path.glob(".tmp-*"))


@pytest.mark.slow
def test_bundled_model_cache_truncated_is_rebuilt(tmp_path, monkeypatch, caplog):
    """The real conversion of the bundled GGUF file (~20 s, twice)."""
    from treeopt.decoding.models import cache_problem, load_model, model_path

    monkeypatch.setenv("TREEOPT_CACHE", str(tmp_path))
    cached = Path(model_path("smollm2-135m"))
    assert cache_problem(cached) == "" and not list(tmp_path.glob(".tmp-*"))
    os.truncate(cached / "model.safetensors", (cached / "model.safetensors").stat().st_size - 4096)
    assert "damaged model.safetensors" in cache_problem(cached)
    load_model("smollm2-135m", device="cpu")
    assert "rebuilding it" in caplog.text and cache_problem(cached) == ""


# ---- demo stages: reused only when their outputs are intact ---------------------------------

@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny, prompts) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("demo") / "run"
    args = ["demo", *tiny, "-p", prompts, "--limit", 3, "--bench-prompts", 1, "--max-new-tokens", 4, "--top-k", 97,
            "--cartesian", "2x3", "--profile-sizes", "", "--threads", 1]
    r = cli(*args, "--nodes", 8, "-o", out)
    assert r.exit_code == 0, r.stderr
    return out, args


def rerun_copy(demo, tmp_path, damage, *extra) -> tuple[Path, str]:
    out, args = demo
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    damage(copy)
    r = cli(*args, *(extra or ("--nodes", 8)), "-o", copy)
    assert r.exit_code == 0, r.stderr
    return copy, r.stdout


@pytest.mark.pipeline
def test_demo_nodes_change_without_demo_json(demo, tmp_path):
    copy, log = rerun_copy(demo, tmp_path, lambda d: (d / "demo.json").unlink(), "--nodes", 4)
    assert "[search] redoing: nodes 8 -> 4" in log and "[bench] redoing" in log
    assert "[calibrate] done already" in log
    assert json.loads((copy / "tree.json").read_text())["nodes"] == 4
    assert "searched-4" in set(pd.read_csv(copy / "bench" / "bench.csv")["method"])


@pytest.mark.pipeline
def test_demo_corrupt_tree_json_is_redone(demo, tmp_path):
    copy, log = rerun_copy(demo, tmp_path, lambda d: (d / "tree.json").write_text('{"medusa_choices": [[0], [0'))
    from treeopt.core.treefile import read_tree

    assert "[search] redoing:" in log and "tree.json does not parse (JSONDecodeError)" in log
    assert read_tree(copy / "tree.json") == read_tree(demo[0] / "tree.json")


@pytest.mark.pipeline
def test_demo_truncated_bench_csv_is_redone(demo, tmp_path):
    def truncate(d):
        lines = (d / "bench" / "bench.csv").read_text().splitlines(keepends=True)
        (d / "bench" / "bench.csv").write_text("".join(lines[:-1]))

    copy, log = rerun_copy(demo, tmp_path, truncate)
    rows = len(pd.read_csv(demo[0] / "bench" / "bench.csv"))
    assert f"bench.csv has {rows - 1} rows, {rows} were written" in log and "[search] done already" in log
    assert len(pd.read_csv(copy / "bench" / "bench.csv")) == rows


# ---- kill -9, then resume -------------------------------------------------------------------

# `python -m treeopt ARGS` that SIGKILLs itself at its KILL_AT-th rename of a file under KILL_UNDER:
# the file is written in full under its temporary name, and never renamed.
KILLER = """
import os, runpy, signal, sys
real, renames = os.replace, []
def replace(src, dst):
    if str(dst).startswith(os.environ["KILL_UNDER"]):
        renames.append(dst)
        if len(renames) == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
os.replace = replace
sys.argv[0] = "treeopt"
runpy.run_module("treeopt", run_name="__main__", alter_sys=True)
"""


def killed(under: Path, at: int, *args) -> None:
    env = {**os.environ, "KILL_UNDER": str(under), "KILL_AT": str(at), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", KILLER, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]


def files(d: Path) -> dict[str, bytes]:
    return {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}


@pytest.mark.process
def test_calibrate_killed_resumes_byte_identical(tmp_path, tiny, prompts, caplog):
    from treeopt.core.record import ACCURACY, CONTINUATIONS, RANKS

    args = ["calibrate", *tiny, "-p", prompts, "--limit", 6, "--max-new-tokens", 6, "--batch-size", 2,
            "--shard-size", 2, "--quiet"]
    assert cli(*args, "-o", tmp_path / "whole").exit_code == 0
    out = tmp_path / "killed"
    # renames: the manifest, shard 0's two parquets and marker, shard 1's ranks; killed writing its continuations
    killed(out, 6, *args, "-o", out)
    shards = out / "shards"
    assert (shards / "000000.done.json").is_file() and not (shards / "000002.done.json").exists()
    first = {f: b for f, b in files(shards).items() if f.startswith("000000.")}
    (shards / "000002.ranks.parquet").write_bytes(b"PAR1 half a shard")  # a damaged leftover, unmarked
    assert cli(*args, "-o", out).exit_code == 0
    assert {f: b for f, b in files(shards).items() if f.startswith("000000.")} == first  # kept, not redone
    for f in (RANKS, CONTINUATIONS, ACCURACY):
        assert (out / f).read_bytes() == (tmp_path / "whole" / f).read_bytes(), f

    # a shard damaged after it was marked done is said and redone, never read as done
    os.truncate(shards / "000002.ranks.parquet", 100)
    assert cli(*args, "-o", out).exit_code == 0
    assert "calibration shard 000002:" in caplog.text and "does not parse" in caplog.text
    assert (out / RANKS).read_bytes() == (tmp_path / "whole" / RANKS).read_bytes()


@pytest.mark.process
def test_search_killed_leaves_the_old_tree_whole(tmp_path, calibration):
    tree = tmp_path / "tree.json"
    assert cli("search", "-c", calibration, "-n", 8, "-o", tree).exit_code == 0
    before = tree.read_bytes()
    killed(tree, 1, "search", "-c", calibration, "-n", 4, "-o", tree)
    assert tree.read_bytes() == before  # the old tree, whole: never half of the new one
    assert cli("search", "-c", calibration, "-n", 4, "-o", tree).exit_code == 0
    assert cli("search", "-c", calibration, "-n", 4, "-o", tmp_path / "whole.json").exit_code == 0
    assert tree.read_bytes() == (tmp_path / "whole.json").read_bytes()


@pytest.mark.process
def test_bench_killed_resumes_with_its_records(tmp_path, tiny, prompts, caplog):
    from treeopt.reports.bench import RECORDS

    args = ["bench", *tiny, "-t", "[[0], [1], [0, 0]]", "-p", prompts, "--first", 3, "--max-new-tokens", 5,
            "--repeats", 1, "--threads", 1]
    out = tmp_path / "bench"
    killed(out, 5, *args, "-o", out)  # the manifest and 3 of the 6 records were saved
    markers = sorted((out / RECORDS).glob("*.done.json"))
    assert len(markers) == 3
    saved = [json.loads(m.read_text()) for m in markers]
    markers[1].write_text('{"method": "pla')  # a damaged record: said and redone
    assert cli(*args, "-o", out).exit_code == 0
    assert "is damaged: redoing it" in caplog.text
    per_prompt = {(r["method"], r["prompt"]): r for r in json.loads((out / "bench.json").read_text())["per_prompt"]}
    for i in (0, 2):  # the intact records were kept as they were, not measured again
        rec = per_prompt[(saved[i]["method"], saved[i]["prompt"])]
        assert (rec["prefill_ms"], rec["decode_ms"]) == (saved[i]["prefill_s"] * 1e3, saved[i]["decode_s"] * 1e3)
    assert cli(*args, "-o", tmp_path / "whole").exit_code == 0
    same = ["method", "nodes", "tokens_per_step", "match_rate", "new_tokens", "steps"]
    resumed, whole = (pd.read_csv(d / "bench.csv")[same] for d in (out, tmp_path / "whole"))
    pd.testing.assert_frame_equal(resumed, whole)
