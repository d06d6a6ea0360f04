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
    """The failure's message, after checking it is one `error:` line with `words`, and the exit code
    (transformers' own "Loading weights" bar aside)."""
    lines = [s for s in result.stderr.strip().splitlines() if not s.startswith("Loading weights")]
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


# ---- every command is in the fault classes below --------------------------------------------
# A new command must say here which inputs it reads and whether it writes a run directory; the
# parametrized tests below then try every fault of those classes on it.

READS_RECORD = {"search", "evaluate", "sweep", "plot", "bench", "report"}  # a calibration record
READS_TREE = {"bench", "evaluate", "export", "plot", "decode", "profile"}  # a tree file
READS_LATENCY = {"search", "evaluate", "sweep"}  # a latency CSV
READS_PROMPTS = {"decode", "calibrate", "bench", "demo"}  # prompts the model reads
WRITES_RUN = {"calibrate", "bench", "demo", "train-heads", "train-drafter"}  # a run directory (locked)
NEITHER = {"info", "export-heads"}  # export-heads reads heads only; its output is checked against them


def test_every_command_is_in_a_fault_class():
    names = {c.name or c.callback.__name__.replace("_cmd", "").replace("_", "-") for c in app.registered_commands}
    classified = READS_RECORD | READS_TREE | READS_LATENCY | READS_PROMPTS | WRITES_RUN | NEITHER
    assert names == classified, f"classify {sorted(names - classified)} in tests/test_faults.py"


# ---- damaged or edited calibration records ---------------------------------------------------

def _ranks(d: Path, edit) -> None:
    df = pd.read_parquet(d / "ranks.parquet")
    edit(df).to_parquet(d / "ranks.parquet", index=False)


def _meta(d: Path, edit) -> None:
    meta = json.loads((d / "calibration.json").read_text())
    (d / "calibration.json").write_text(json.dumps(edit(meta)))


def _set(df, col, row, value):
    df.loc[row, col] = value
    return df


RECORD_FAULTS = {  # what is done to the record -> (its damaged file, words of the error)
    "rank 99 > top_k": (lambda d: _ranks(d, lambda df: _set(df, "r2", 0, 99)), "ranks.parquet", "rank 99 in r2"),
    "rank -7": (lambda d: _ranks(d, lambda df: _set(df, "r1", 1, -7)), "ranks.parquet", "outside -1..97"),
    "rank column missing": (lambda d: _ranks(d, lambda df: df.drop(columns="r2")), "ranks.parquet", "not r1..rK"),
    "rank column of floats": (lambda d: _ranks(d, lambda df: df.astype({"r1": "float64"})), "ranks.parquet",
                              "column r1 is float64, not integers"),
    "no position column": (lambda d: _ranks(d, lambda df: df.drop(columns="position")), "ranks.parquet",
                           "lacks the column position"),
    "zero rows": (lambda d: _ranks(d, lambda df: df.iloc[:0]), "ranks.parquet", "no rows"),
    "rows dropped": (lambda d: _ranks(d, lambda df: df.iloc[:-3]), "ranks.parquet", "num_tokens"),
    "not parquet": (lambda d: (d / "ranks.parquet").write_bytes(b"PAR1 cut"), "ranks.parquet", "does not parse"),
    "calibration.json a list": (lambda d: (d / "calibration.json").write_text("[1, 2]"), "calibration.json",
                                "a JSON list, not an object"),
    "top_k not a number": (lambda d: _meta(d, lambda m: {**m, "top_k": "ten"}), "calibration.json",
                           "top_k is 'ten'"),
    "num_heads not the columns": (lambda d: _meta(d, lambda m: {**m, "num_heads": 3, "settings": {
        **m["settings"], "num_heads": 3}}), "ranks.parquet",
                                  "4 heads but calibration.json says num_heads 3"),
    "settings disagree": (lambda d: _meta(d, lambda m: {**m, "settings": {**m["settings"], "top_k": 10}}),
                          "calibration.json", "top_k is 97 but its settings say 10"),
}

RECORD_COMMANDS = {  # a command that reads the record at C (tmp: a scratch directory)
    "search": lambda c, tmp, tiny, prompts: ["search", "-c", c, "-n", 4],
    "evaluate": lambda c, tmp, tiny, prompts: ["evaluate", "-t", "[[0], [1]]", "-c", c],
    "sweep": lambda c, tmp, tiny, prompts: ["sweep", "-c", c, "--max-nodes", 4],
    "plot": lambda c, tmp, tiny, prompts: ["plot", "-t", "[[0], [1]]", "-c", c, "-o", tmp / "t.png"],
    "bench": lambda c, tmp, tiny, prompts: ["bench", *tiny, "-t", "[[0]]", "-p", prompts, "--first", 1, "-c", c],
}
assert set(RECORD_COMMANDS) == READS_RECORD - {"report"}


@pytest.fixture
def damaged_record(request, calibration, tmp_path) -> tuple[Path, str, str]:
    damage, file, words = RECORD_FAULTS[request.param]
    copy = tmp_path / "cal"
    shutil.copytree(calibration, copy)
    damage(copy)
    return copy, file, words


@pytest.mark.parametrize("command", sorted(RECORD_COMMANDS))
@pytest.mark.parametrize("damaged_record", sorted(RECORD_FAULTS), indirect=True)
def test_damaged_record_is_one_line(command, damaged_record, tmp_path, tiny, prompts, no_model):
    cal, file, words = damaged_record
    args = RECORD_COMMANDS[command](cal, tmp_path, tiny, prompts)
    one_line(cli(*args), 2, str(cal / file), words)


@pytest.mark.parametrize("damaged_record", ["rank 99 > top_k", "calibration.json a list", "zero rows"], indirect=True)
def test_report_says_a_damaged_record_is_damaged(damaged_record, demo, tmp_path):
    cal, file, words = damaged_record
    run = tmp_path / "run"
    shutil.copytree(demo[0], run)
    shutil.rmtree(run / "calibration")
    shutil.copytree(cal, run / "calibration")
    from treeopt.reports.report import write_report

    text = write_report(run)[0].read_text()
    assert f"`calibration/` is damaged (calibration/{file} is damaged: " in text and words in text
    assert "## Head accuracy" not in text  # nothing rendered from it


def test_the_typical_record_is_checked(tmp_path, tiny, prompts, no_model):
    from treeopt.core.record import TYPICAL, flag_columns

    d = tmp_path / "typical"
    d.mkdir()
    probe = [[0], [1], [0, 0]]
    meta = {"acceptance": "typical", "temperature": 0.7, "posterior_threshold": 0.09, "posterior_alpha": 0.3,
            "seed": 0, "top_k": 2, "num_heads": 2, "probe": probe, "num_steps": 3}
    table = pd.DataFrame({"prompt_id": pd.Series([0, 0, 1], dtype="int32"), "step": pd.Series([0, 1, 0], dtype="int32"),
                          "position": pd.Series([0, 2, 0], dtype="int32"), "token": 5,
                          **{c: [True, False, True] for c in flag_columns(3)}})
    search = ["search", "-c", d, "--acceptance", "typical", "-n", 2]
    cases = [(meta, table, ""),
             ([meta], table, "calibration.json is damaged: it holds a JSON list"),
             ({**meta, "top_k": "2"}, table, "top_k is '2'"),
             ({**meta, "top_k": 1}, table, "its probe (depth 2, ranks < 2) exceeds"),
             ({**meta, "temperature": "hot"}, table, "temperature is 'hot', not a number"),
             (meta, table.astype({"a1": "int64"}), f"{TYPICAL} is damaged: column a1 is int64, not booleans"),
             (meta, table.drop(columns="a2"), "lacks the flag column a2"),
             (meta, table.iloc[:0], "it has no rows"),
             (meta, table.iloc[:2], "it has 2 rows but calibration.json says num_steps 3")]
    for m, t, words in cases:
        (d / "calibration.json").write_text(json.dumps(m))
        t.to_parquet(d / TYPICAL, index=False)
        r = cli(*search)
        if not words:
            assert r.exit_code == 0, r.stderr
        else:
            one_line(r, 2, str(d), words)


def test_bench_refuses_a_calibration_of_other_heads(tmp_path, tiny, prompts, calibration, tiny_llama):
    from treeopt.decoding.heads import random_heads

    other = random_heads(tiny_llama, num_heads=4, seed=1).save(tmp_path / "other-heads")
    args = ["bench", *tiny[:2], "--heads", other, "--device", "cpu", "-t", "[[0]]", "-p", prompts, "--first", 1,
            "--max-new-tokens", 3, "--repeats", 1, "-c", calibration]
    one_line(cli(*args), 2, str(calibration), "calibrated with heads random", f"not with --heads {other}")
    same = ["bench", *tiny, "-t", "[[0]]", "-p", prompts, "--first", 1, "--max-new-tokens", 3, "--repeats", 1,
            "-c", calibration]
    r = cli(*same)
    assert r.exit_code == 0, r.stderr


# ---- damaged run-directory inputs: tree files, latency CSVs, bench records ---------------------

TREE_FAULTS = {  # the text of tree.json -> words of the error
    "cut JSON": ('{"medusa_choices": [[0], [0', "is not valid JSON"),
    "nodes disagree": ('{"medusa_choices": [[0], [1]], "nodes": 3}\n', "says nodes 3 but its medusa_choices have 2"),
    "a path without its parent": ('{"medusa_choices": [[0, 0]]}\n', "comes before (or without) its parent"),
    "not a list": ('{"medusa_choices": 5}\n', "medusa_choices is a int, not a list"),
}

TREE_COMMANDS = {  # a command that reads the tree file T
    "bench": lambda t, tmp, tiny, prompts, cal: ["bench", *tiny, "-t", t, "-p", prompts, "--first", 1],
    "evaluate": lambda t, tmp, tiny, prompts, cal: ["evaluate", "-t", t, "-c", cal],
    "export": lambda t, tmp, tiny, prompts, cal: ["export", "-t", t, "-o", tmp / "out.json"],
    "plot": lambda t, tmp, tiny, prompts, cal: ["plot", "-t", t, "-o", tmp / "t.png"],
    "decode": lambda t, tmp, tiny, prompts, cal: ["decode", "w3 w4", "-t", t, *tiny],
    "profile": lambda t, tmp, tiny, prompts, cal: ["profile", "-t", t, *tiny, "-o", tmp / "latency.csv"],
}
assert set(TREE_COMMANDS) == READS_TREE


@pytest.mark.parametrize("command", sorted(TREE_COMMANDS))
@pytest.mark.parametrize("fault", sorted(TREE_FAULTS))
def test_damaged_tree_file_is_one_line(command, fault, tmp_path, tiny, prompts, calibration, no_model):
    text, words = TREE_FAULTS[fault]
    tree = tmp_path / "tree.json"
    tree.write_text(text)
    one_line(cli(*TREE_COMMANDS[command](tree, tmp_path, tiny, prompts, calibration)), 2, str(tree), words)


LATENCY_FAULTS = {  # the text of latency.csv -> words of the error
    "bad columns": ("nodes,ms\n0,10\n4,12\n", "lacks the columns nodes,forward_ms"),
    "cut mid-row": ("nodes,forward_ms\n0,10.0\n4,12.0\n8,1", "cut short"),
    "text in forward_ms": ("nodes,forward_ms\n0,10.0\n4,fast\n", "positive forward_ms on every row"),
    "no rows": ("nodes,forward_ms\n", "positive forward_ms on every row"),
}

LATENCY_COMMANDS = {  # a command that reads the latency file L
    "search": lambda lat, cal: ["search", "-c", cal, "--nodes", "auto", "--latency", lat],
    "evaluate": lambda lat, cal: ["evaluate", "-t", "[[0]]", "-c", cal, "--latency", lat],
    "sweep": lambda lat, cal: ["sweep", "-c", cal, "--max-nodes", 4, "--latency", lat],
}
assert set(LATENCY_COMMANDS) == READS_LATENCY


@pytest.mark.parametrize("command", sorted(LATENCY_COMMANDS))
@pytest.mark.parametrize("fault", sorted(LATENCY_FAULTS))
def test_damaged_latency_file_is_one_line(command, fault, tmp_path, calibration):
    text, words = LATENCY_FAULTS[fault]
    latency = tmp_path / "latency.csv"
    latency.write_text(text)
    one_line(cli(*LATENCY_COMMANDS[command](latency, calibration)), 2, str(latency), words)


def _cut_mid_row(path: Path) -> None:
    data = path.read_bytes().rstrip(b"\n")
    start = data.rfind(b"\n") + 1
    path.write_bytes(data[: start + max(1, (len(data) - start) // 2)])  # the first half of the last row


def _drop_last_row(path: Path) -> None:
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))


REPORT_FAULTS = {  # damage to a finished run directory -> (the damaged input, words the page says)
    "bench.csv cut mid-row": (lambda d: _cut_mid_row(d / "bench" / "bench.csv"), "bench/bench.csv", "cut short"),
    "bench.csv last row gone": (lambda d: _drop_last_row(d / "bench" / "bench.csv"), "bench/bench.csv",
                                "rows, but `bench/bench.json` records"),
    "bench.csv without tokens_per_step": (
        lambda d: pd.read_csv(d / "bench" / "bench.csv").drop(columns="tokens_per_step").to_csv(
            d / "bench" / "bench.csv", index=False), "bench/bench.csv", "lacks the column tokens_per_step"),
    "tree.json cut": (lambda d: (d / "tree.json").write_text('{"medusa_choices": [[0], [1'), "tree.json",
                      "is not valid JSON"),
    "tree.json edited": (lambda d: _meta_file(d / "tree.json", lambda m: {**m, "nodes": 99}), "tree.json",
                         "says nodes 99"),
    "latency.csv bad columns": (lambda d: (d / "latency.csv").write_text("nodes,ms\n0,1\n"), "latency.csv",
                                "lacks the column forward_ms"),
    "latency.csv cut": (lambda d: _cut_mid_row(d / "latency.csv"), "latency.csv", "cut short"),
}


def _meta_file(path: Path, edit) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


@pytest.fixture(scope="module")
def profiled_demo(tmp_path_factory, demo) -> Path:
    """The demo's run directory with a latency.csv (the demo fixture skips profiling)."""
    run = tmp_path_factory.mktemp("profiled") / "run"
    shutil.copytree(demo[0], run)
    pd.DataFrame({"nodes": [0, 4, 8], "forward_ms": [1.0, 1.2, 1.5]}).to_csv(run / "latency.csv", index=False)
    return run


@pytest.mark.parametrize("fault", sorted(REPORT_FAULTS))
def test_report_says_damaged_inputs_are_damaged(fault, profiled_demo, tmp_path):
    from treeopt.reports.report import MAKERS, write_report

    damage, rel, words = REPORT_FAULTS[fault]
    run = tmp_path / "run"
    shutil.copytree(profiled_demo, run)
    whole = write_report(run)[0].read_text()
    damage(run)
    r = cli("report", run)
    assert r.exit_code == 0, r.stderr
    text = (run / "report.md").read_text()
    assert f"`{rel}` is damaged (" in text and words in text, text
    remake = MAKERS[rel].replace("RUN_DIR", run.as_posix())
    assert f"re-make it with `{remake}`" in text
    if rel.startswith("bench"):  # nothing measured is shown from it
        assert "## Benchmark (measured)" in text and "| plain |" in whole and "| plain |" not in text
    if rel == "tree.json":  # the acceptance model it records is not guessed
        assert "| acceptance model | unknown: `tree.json` is damaged" in text
        like = text.split("## Like for like on held-out prompts\n")[1].split("\n## ")[0]
        assert "`tree.json` is damaged" in like and "|" not in like  # no predictions under a guessed model


# ---- prompts longer than the model's context --------------------------------------------------

CONTEXT_COMMANDS = {  # a command whose prompts are the file P (or, for decode, the one instruction S)
    "decode": lambda p, s, tmp, tiny: ["decode", s, *tiny, "--max-new-tokens", 4],
    "calibrate": lambda p, s, tmp, tiny: ["calibrate", *tiny, "-p", p, "--max-new-tokens", 4, "-o", tmp / "c"],
    "bench": lambda p, s, tmp, tiny: ["bench", *tiny, "-t", "[[0]]", "-p", p, "--max-new-tokens", 4, "--repeats", 1],
    "demo": lambda p, s, tmp, tiny: ["demo", *tiny, "-p", p, "--limit", 1, "--bench-prompts", 1,
                                     "--max-new-tokens", 4, "--profile-sizes", "", "-o", tmp / "d"],
}
assert set(CONTEXT_COMMANDS) == READS_PROMPTS


@pytest.mark.parametrize("command", sorted(CONTEXT_COMMANDS))
def test_a_prompt_longer_than_the_context_is_one_line(command, tmp_path, tiny):
    """The tiny model's context is 512 positions (max_position_embeddings)."""
    long = " ".join(f"w{3 + i % 90}" for i in range(600))
    file = tmp_path / "long.json"
    file.write_text(json.dumps([{"instruction": long}, {"instruction": long + " w4"}]))
    msg = one_line(cli(*CONTEXT_COMMANDS[command](file, long, tmp_path, tiny)), 2, "tokens, longer than the model's "
                   "context of 512 tokens", "'w3 w4 w5")
    # the file that holds it (the demo's: its fit set, drawn from the file), or the command line's instruction
    named = {"decode": "the instruction", "demo": f"prompt 1 of {tmp_path / 'd' / 'prompts' / 'fit.json'}"}
    assert named.get(command, f"prompt 1 of {file}") in msg


def test_a_prompt_that_leaves_no_room_names_max_new_tokens(tmp_path, tiny):
    near = " ".join(f"w{3 + i % 90}" for i in range(500))
    one_line(cli("decode", near, *tiny, "--max-new-tokens", 40), 2, "passes the model's context of 512 tokens",
             "lower --max-new-tokens to")


# ---- one writer per run directory --------------------------------------------------------------

HOLDER = """
import sys, time
from treeopt.core.fileio import locked
with locked(sys.argv[1], "treeopt holder --out " + sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""

LOCK_COMMANDS = {  # a command that writes the run directory D
    "calibrate": lambda d, tiny, prompts: ["calibrate", *tiny, "-p", prompts, "-o", d],
    "bench": lambda d, tiny, prompts: ["bench", *tiny, "-t", "[[0]]", "-p", prompts, "-o", d],
    "demo": lambda d, tiny, prompts: ["demo", *tiny, "-p", prompts, "-o", d],
    "train-heads": lambda d, tiny, prompts: ["train-heads", "--output-dir", d, "-p", prompts, "--model", tiny[1],
                                             "--device", "cpu"],
    "train-drafter": lambda d, tiny, prompts: ["train-drafter", "--output-dir", d, "-p", prompts, "--model", tiny[1],
                                               "--device", "cpu"],
}
assert set(LOCK_COMMANDS) == WRITES_RUN


@pytest.fixture
def held(tmp_path):
    """A run directory another process is writing (it holds the lock); yields (directory, that process)."""
    d = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(d)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert p.stdout.readline().strip() == "held"
    yield d, p
    p.kill()
    p.wait()


@pytest.mark.parametrize("command", sorted(LOCK_COMMANDS))
def test_a_second_writer_is_one_line(command, held, tiny, prompts, no_model):
    d, holder = held
    one_line(cli(*LOCK_COMMANDS[command](d, tiny, prompts)), 2, str(d.absolute()), f"pid {holder.pid}",
             "treeopt holder --out", "being written by another run")
    assert sorted(f.name for f in d.iterdir()) == [".lock"]  # nothing of the second run written


def test_a_lock_is_released_and_stale_safe(held):
    from treeopt.core.fileio import LOCK, locked

    d, holder = held
    holder.kill()  # SIGKILL: its lock file stays, its flock goes with it
    holder.wait()
    assert (d / LOCK).is_file()
    with locked(d, "second"):
        assert "second" in (d / LOCK).read_text()
        with locked(d):  # a nested hold in one process
            pass
        assert (d / LOCK).is_file()
    assert not (d / LOCK).exists()


def test_a_refused_writer_leaves_no_directory(tmp_path, tiny, prompts, no_model):
    out = tmp_path / "c"
    one_line(cli("calibrate", *tiny, "-p", prompts, "--top-k", 0, "-o", out), 2, "--top-k")
    assert not out.exists()
