"""`treeopt report RUN_DIR`: one Markdown page and one self-contained HTML page from a run's files.

A run directory (what `treeopt demo` writes) may hold any of:

- ``calibration/``: the calibration the trees were fit on (treeopt/core/record.py),
- ``calibration-heldout/``: a calibration of the held-out prompts (the ceiling: the best tree fit on
  them, and an exact replay of every tree on them),
- ``prompts/fit.json``, ``prompts/bench.json``, ``prompts/source.json``: the two prompt sets and where they came from,
- ``tree.json``: the searched tree (treeopt/core/treefile.py),
- ``sweep.csv``: predicted tokens/step vs nodes of the searched tree (`treeopt sweep`),
- ``bench/bench.csv`` + ``bench/bench.json``: measured decoding, one row per method (`treeopt bench`),
- ``latency.csv``: forward-pass latency vs tree size (`treeopt profile`),
- ``demo.json``: the demo's settings, stage timings and machine.

Every section is always on the page: one whose input is missing or damaged says so, with the
command that makes it. Each input is checked as its own command checks it (a calibration as
treeopt.core.record loads it, tree.json as treeopt.core.treefile reads it, latency.csv as
treeopt.search.budget reads it, bench/bench.csv whole and agreeing with bench/bench.json): damage is
reported, never rendered as if fine. Figures go to RUN_DIR/figures/ (PNG and SVG); the pages are
RUN_DIR/report.md and RUN_DIR/report.html.
"""

from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from treeopt.core.drafter import drafter_of
from treeopt.core.errors import TreeoptError
from treeopt.core import layout
from treeopt.core.fileio import write_text
from treeopt.core.layout import (BENCH, BENCH_META, DEMO, FIGURES, FIT_PROMPTS, HELD_PROMPTS, LATENCY, PROMPT_SOURCE,
                                 REPORT_HTML, REPORT_MD, SWEEP, TREE)
from treeopt.core.settings import DEFAULT_ACCEPTANCE_MODEL

CALIBRATION = layout.CALIBRATION + "/"  # directories: named with their slash in the report
HELDOUT = layout.HELDOUT + "/"

# What makes each input (RUN_DIR is replaced by the run's directory), for the sections that lack it.
MAKERS = {
    CALIBRATION: "treeopt calibrate --prompts RUN_DIR/prompts/fit.json --output-dir RUN_DIR/calibration",
    HELDOUT: "treeopt calibrate --prompts RUN_DIR/prompts/bench.json --output-dir RUN_DIR/calibration-heldout",
    TREE: "treeopt search -c RUN_DIR/calibration --output RUN_DIR/tree.json",
    SWEEP: "treeopt sweep -c RUN_DIR/calibration --latency RUN_DIR/latency.csv --output RUN_DIR/sweep.csv",
    BENCH: "treeopt bench --tree RUN_DIR/tree.json --prompts RUN_DIR/prompts/bench.json -c RUN_DIR/calibration "
           "--output-dir RUN_DIR/bench",
    LATENCY: "treeopt profile --output RUN_DIR/latency.csv",
    DEMO: "treeopt demo --output-dir RUN_DIR",
}
MAKERS[BENCH_META] = MAKERS[BENCH]


@dataclass
class Run:
    """What a run directory holds; None where a file is absent or unreadable (see `problems`)."""

    directory: Path
    calibration: object | None = None  # treeopt.core.record.Calibration
    heldout: object | None = None  # the held-out prompts' calibration
    tree: object | None = None  # treeopt.core.tree.Tree
    tree_meta: dict = field(default_factory=dict)
    sweep: pd.DataFrame | None = None
    bench: pd.DataFrame | None = None
    bench_meta: dict = field(default_factory=dict)
    latency: pd.DataFrame | None = None
    demo: dict = field(default_factory=dict)
    prompt_source: dict = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)  # input -> why it is not there, with the fix

    def maker(self, rel: str) -> str:
        return MAKERS.get(rel, "its command").replace("RUN_DIR", self.directory.as_posix())

    def missing(self, rel: str):
        self.problems[rel] = f"`{rel}` is missing: make it with `{self.maker(rel)}`"

    def unreadable(self, rel: str, why: str):
        why = why.replace(f"{self.directory}/", "")  # paths inside the run, as the page names them
        self.problems[rel] = f"`{rel}` is damaged ({why}): re-make it with `{self.maker(rel)}`"

    def damaged(self, rel: str) -> bool:
        """Whether `rel` is there but damaged (not merely missing)."""
        return rel in self.problems and (self.directory / rel).exists()


def _read_csv(run: Run, rel: str, need: tuple[str, ...], integers: tuple[str, ...] = (),
              numbers: tuple[str, ...] = ()) -> pd.DataFrame | None:
    from treeopt.core.validate import table_problem

    path = run.directory / rel
    if not path.is_file():
        return run.missing(rel)
    df, why = table_problem(path, need, integers, numbers)
    return df if df is not None else run.unreadable(rel, why)


def _why(e: TreeoptError) -> str:
    """A reader's one-line error without its fix (the page names the command that remakes the file)."""
    return str(e).rsplit(": ", 1)[0]


def _read_bench(run: Run) -> None:
    """bench/bench.csv and bench/bench.json, checked whole and against each other (a truncated bench.csv
    has fewer rows, or a cut one, than bench.json records): both None/empty where either is damaged."""
    run.bench = _read_csv(run, BENCH, ("method", "nodes", "tokens_per_step"), ("nodes",), ("tokens_per_step",))
    if run.bench is None:
        return
    run.bench_meta = _read_json(run, BENCH_META)
    rows = run.bench_meta.get("rows")
    methods = list(run.bench["method"].astype(str))
    if isinstance(rows, list) and [r.get("method") for r in rows if isinstance(r, dict)] != methods:
        run.unreadable(BENCH, f"{len(methods)} rows, but `{BENCH_META}` records {len(rows)}")
    elif run.bench["method"].isna().any() or len(set(methods)) != len(methods):
        run.unreadable(BENCH, "a row without a method, or a method twice")
    elif set(run.bench_meta.get("trees") or {}) - set(methods):
        run.unreadable(BENCH, f"no row for {', '.join(sorted(set(run.bench_meta['trees']) - set(methods)))}, "
                              f"which `{BENCH_META}` benched")
    if BENCH in run.problems:
        run.bench, run.bench_meta = None, {}


def _read_latency(run: Run) -> pd.DataFrame | None:
    """latency.csv as `treeopt search --latency` reads it (treeopt.search.budget.read_latencies)."""
    from treeopt.search.budget import read_latencies

    df = _read_csv(run, LATENCY, ("nodes", "forward_ms"), ("nodes",), ("forward_ms",))
    if df is None:
        return None
    try:
        read_latencies(run.directory / LATENCY)
    except TreeoptError as e:
        return run.unreadable(LATENCY, _why(e))
    return df


def _read_json(run: Run, rel: str) -> dict:
    path = run.directory / rel
    if not path.is_file():
        run.missing(rel)
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        run.unreadable(rel, f"does not parse ({type(e).__name__})")
        return {}
    if not isinstance(data, dict):
        run.unreadable(rel, f"a JSON {type(data).__name__}, not an object")
        return {}
    return data


def _read_calibration(run: Run, rel: str):
    from treeopt.core.record import load_calibration

    if not (run.directory / rel).is_dir():
        return run.missing(rel)
    try:
        return load_calibration(run.directory / rel)
    except TreeoptError as e:
        return run.unreadable(rel, _why(e))


def load_run(directory: str | Path) -> Run:
    """Read every file of a run directory that is present; never fails on a missing or bad file."""
    from treeopt.core.treefile import read_tree_meta

    directory = Path(directory)
    if not directory.is_dir():
        raise TreeoptError(f"run directory {directory} not found: pass the --output-dir of `treeopt demo` (e.g. runs/demo)")
    run = Run(directory)
    run.calibration = _read_calibration(run, CALIBRATION)
    run.heldout = _read_calibration(run, HELDOUT)
    if (directory / TREE).is_file():
        try:
            run.tree, run.tree_meta = read_tree_meta(directory / TREE)
        except TreeoptError as e:
            run.unreadable(TREE, _why(e))
    else:
        run.missing(TREE)
    run.sweep = _read_csv(run, SWEEP, ("nodes", "tokens_per_step"), ("nodes",), ("tokens_per_step",))
    _read_bench(run)
    run.latency = _read_latency(run)
    run.demo = _read_json(run, DEMO)
    run.prompt_source = _read_json(run, PROMPT_SOURCE)
    return run


# ---- tables --------------------------------------------------------------------------------------


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        if np.isnan(v):
            return ""
        return f"{v:.3g}" if abs(v) < 0.01 and v != 0 else f"{v:,.3f}".rstrip("0").rstrip(".") if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub Markdown table, numbers shortened to 3 decimals."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines)


def html_table(df: pd.DataFrame, root: Path | None = None) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    num = lambda v: " class='num'" if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) else ""  # noqa: E731
    body = "".join("<tr>" + "".join(f"<td{num(v)}>{_inline(_fmt(v), root)}</td>" for v in row) + "</tr>"
                   for row in df.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CALIBRATION_FIELDS = ("model", "heads", "dataset", "prompts", "num_stopped", "max_new_tokens", "batch_size", "seed",
                      "device", "dtype", "wall_time_s", "tokens_per_s")
BENCH_FIELDS = ("model", "heads", "device", "dtype", "threads", "max_new_tokens", "prompts_source")
BENCH_COLUMNS = ("method", "nodes", "tokens_per_step", "predicted_tokens_per_step", "step_ms", "overhead", "speedup",
                 "tokens_per_s", "match_rate", "first_divergence", "loop_efficiency", "prompts", "new_tokens")


def calibration_summary(cal) -> pd.DataFrame:
    """Key facts of a calibration: sizes from the data, the rest from calibration.json."""
    rows = [("heads (K)", cal.num_heads), ("top-k", cal.top_k), ("prompts", len(np.unique(cal.prompt_ids))),
            ("positions (tokens)", cal.num_positions)]
    rows += [(k, cal.meta[k]) for k in CALIBRATION_FIELDS if isinstance(cal.meta.get(k), (str, int, float))]
    return pd.DataFrame(rows, columns=["", "value"])


def accuracy_top(cal, ranks: int = 5) -> pd.DataFrame:
    """a_k^(i) for i < `ranks`, with the cumulative top-`ranks` accuracy per head."""
    a = cal.accuracy[:, :ranks]  # [K, ranks]
    df = pd.DataFrame(a, columns=[f"rank {i}" for i in range(a.shape[1])])
    df.insert(0, "head", [f"head {k + 1} (token t+{k + 2})" for k in range(a.shape[0])])
    df[f"top-{a.shape[1]}"] = a.sum(axis=1)
    return df


# ---- the like-for-like comparison ----------------------------------------------------------------

SEARCHED = "searched-{}"
CEILING = "ceiling-{}"


def _model(run: Run) -> str:
    return run.tree_meta.get("acceptance_model", DEFAULT_ACCEPTANCE_MODEL)


def compared_trees(run: Run) -> dict[str, object]:
    """name -> Tree: the benched trees (else tree.json and the best Cartesian tree and the top-1 chain
    of its size), plus a searched tree of each size that lacks one (from the calibration), so every
    baseline has a searched tree of its node count beside it."""
    from treeopt.core.tree import Tree

    trees: dict[str, Tree] = {}
    for name, choices in (run.bench_meta.get("trees") or {}).items():
        trees[name] = Tree.from_choices(choices)
    if not trees and run.tree is not None:
        trees[SEARCHED.format(len(run.tree))] = run.tree
        if run.calibration is not None:
            from treeopt.search.baselines import baseline_trees, describe

            base = baseline_trees(run.calibration, len(run.tree), _model(run))
            if len(base["best_cartesian"]):
                trees[f"cartesian-{describe(base['best_cartesian'], run.calibration)}"] = base["best_cartesian"]
            trees[f"chain-{len(base['top1_chain'])}"] = base["top1_chain"]
    if run.calibration is not None:
        from treeopt.search.grow import search

        sizes = sorted({len(t) for t in trees.values()} - {len(t) for n, t in trees.items() if _is_searched(n)})
        if sizes:
            found = search(run.calibration, max(sizes), _model(run))
            for n in sizes:
                if len(found.tree) >= n:
                    trees[SEARCHED.format(n)] = found.tree[:n]
    return trees


def _kind(name: str) -> str:
    """searched, baseline or ceiling, from a compared tree's name (a bench's `tree` is searched too)."""
    from treeopt.reports.plots import family

    return "ceiling" if name.startswith("ceiling-") else "searched" if family(name) == "searched" else "baseline"


def _is_searched(name: str) -> bool:
    return _kind(name) == "searched"


def like_for_like(run: Run, trees: dict | None = None) -> pd.DataFrame | None:
    """One row per compared tree, grouped by node count (searched first, then the baselines of that
    size, then the ceiling: the best tree of that size fit on the held-out prompts' own calibration).
    measured: the bench on the held-out prompts; heldout (ci_low, ci_high): exact replay on the
    held-out calibration, 95 % bootstrap over prompts; of_ceiling: (heldout - 1) / (the ceiling's - 1),
    the share of the best possible extra tokens per step; in_sample: replay on the calibration the
    searched trees were fit on; uniform: 1 + the sum of node values there (the uniform expectation)."""
    trees = dict(compared_trees(run) if trees is None else trees)
    if not trees or (run.heldout is None and run.bench is None and run.calibration is None):
        return None
    from treeopt.search.acceptance import expected_tokens_per_step
    from treeopt.search.grow import search
    from treeopt.core.replay import positions, replay

    held = positions(run.heldout) if run.heldout is not None else None
    fit = positions(run.calibration) if run.calibration is not None else None
    if run.heldout is not None:
        ceiling = search(run.heldout, max(len(t) for t in trees.values()), _model(run))
        for n in sorted({len(t) for t in trees.values()}):
            if n <= len(ceiling.tree):  # a small calibration may hold no n-node tree of nonzero value
                trees[CEILING.format(n)] = ceiling.tree[:n]
    bench = run.bench.set_index("method") if run.bench is not None else None
    rows = []
    for name, tree in trees.items():
        row = {"nodes": len(tree), "tree": name, "kind": _kind(name)}
        if bench is not None:
            got = name in bench.index
            row["measured"] = float(bench.at[name, "tokens_per_step"]) if got else np.nan
            if "speedup" in bench.columns:
                row["speedup"] = float(bench.at[name, "speedup"]) if got else np.nan
        if held is not None:
            r = replay(tree, held)
            row["heldout"] = r.tokens_per_step
            row["ci_low"], row["ci_high"] = r.interval()
        if fit is not None:
            row["in_sample"] = replay(tree, fit).tokens_per_step
            row["uniform"] = expected_tokens_per_step(tree, run.calibration, _model(run))
        rows.append(row)
    df = pd.DataFrame(rows)
    if "heldout" in df.columns:
        best = df[df["kind"] == "ceiling"].set_index("nodes")["heldout"]
        df.insert(df.columns.get_loc("ci_high") + 1, "of_ceiling", (df["heldout"] - 1) / (df["nodes"].map(best) - 1))
    order = {"searched": 0, "baseline": 1, "ceiling": 2}
    return df.sort_values(["nodes", "kind"], key=lambda c: c.map(order) if c.name == "kind" else c,
                          kind="stable").reset_index(drop=True)


# ---- speed ---------------------------------------------------------------------------------------


def _latency(run: Run):
    """treeopt.search.budget.Latency of the run's profile at batch size 1 (where the profile has several)."""
    from treeopt.search.budget import Latency

    df = run.latency
    if df is None:
        return None
    if "batch_size" in df.columns:
        df = df[df["batch_size"] == df["batch_size"].min()]
    table = df.groupby("nodes")["forward_ms"].median()
    return Latency(table.index.to_numpy(), table.to_numpy(np.float64), LATENCY)


def speed_text(run: Run, table: pd.DataFrame | None) -> str:
    """Why speed on this machine is what it is: the step-time ratio per tree size (measured in the
    bench where there is one, else the profile's forward pass), the break-even tokens/step it implies,
    and what the same trees give where step time is flat in tree size."""
    lat = _latency(run)
    searched = table[table["kind"] == "searched"] if table is not None else pd.DataFrame()
    col = "measured" if "measured" in searched.columns and searched["measured"].notna().any() else "heldout"
    accepts = {int(r["nodes"]): (r["tree"], r[col]) for _, r in searched.iterrows() if col in r and pd.notna(r[col])}
    overhead = {} if run.bench is None or "overhead" not in run.bench.columns else \
        dict(zip(run.bench["method"], run.bench["overhead"]))
    measured = {n: overhead[name] for n, (name, _) in accepts.items() if name in overhead}
    sizes = sorted(accepts) or ([int(n) for n in lat.nodes if n > 0][:4] if lat is not None else [])
    profiled = {n: float(lat.forward(n) / lat.forward(0)) for n in sizes if lat is not None and np.isfinite(lat.forward(n))}
    ratio = measured or profiled
    if not ratio:
        return " ".join(filter(None, [run.problems.get(LATENCY), run.problems.get(BENCH)]))
    show = lambda d: ", ".join(f"{v:.2f}x at {n} nodes" for n, v in d.items())  # noqa: E731
    parts = [f"On this machine ({_machine(run)}) a decoding step with a tree costs more than a plain one: "
             + (f"{show(measured)} (measured in the bench: step_ms over plain decoding's)" if measured else
                f"{show(profiled)} (the forward pass, `{LATENCY}`)") + "."]
    if measured and profiled:
        parts.append(f"The profile's forward pass alone (`{LATENCY}`, timed separately) gives {show(profiled)}.")
    if run.latency is not None and "roofline_ms" in run.latency.columns:
        roof = run.latency.groupby("nodes")["roofline_ms"].median()
        if 0 in roof.index:
            parts.append("This machine's roofline (its bandwidth and peak rate) allows "
                         + show({n: float(np.interp(n, roof.index, roof.values)) / roof[0] for n in ratio}) + ".")
    parts.append("A tree beats plain decoding only when it accepts more tokens per step than that ratio: the "
                 "break-even is " + ", ".join(f"{v:.2f} tokens/step at {n} nodes" for n, v in ratio.items()) + ".")
    trees = [(n, *accepts[n]) for n in ratio if n in accepts]
    if trees:
        parts.append("The searched trees accept " + ", ".join(f"{t:.2f} ({name})" for n, name, t in trees)
                     + ", so they run at " + ", ".join(f"{t / ratio[n]:.2f}x" for n, name, t in trees)
                     + " plain decoding's speed here.")
        loop = run.bench["loop_efficiency"].iloc[1:].median() if run.bench is not None and \
            "loop_efficiency" in run.bench.columns else np.nan
        parts.append("On a device whose step time is flat in tree size (a GPU at batch 1 is memory-bound, so a step "
                     "of up to about 64 nodes costs about what a plain one does) the ratio is 1, and the same trees "
                     "would run at " + ", ".join(f"{t:.2f}x" for n, name, t in trees) + " plain decoding's speed"
                     + (f", less the decoding loop's own overhead (`loop_efficiency` {loop:.2f} here)" if pd.notna(loop)
                        else "") + ": profile such a device with `treeopt profile` and size the tree for it with "
                     "`treeopt search --nodes auto --latency latency.csv`.")
    return " ".join(parts)


def _machine(run: Run) -> str:
    """'AMD EPYC, 2 cores, cpu, 1 torch thread, float32': the demo's machine record and the bench's settings."""
    m = run.demo.get("machine") or {}
    dev = run.bench_meta.get("device") or (run.calibration.meta.get("device") if run.calibration is not None else "")
    threads = run.bench_meta.get("threads", m.get("threads"))
    parts = [m.get("cpu", ""), f"{m['cores']} cores" if m.get("cores") else "", m.get("gpu", ""), dev or "",
             f"{threads} torch thread{'s' if threads != 1 else ''}" if threads else "", run.bench_meta.get("dtype", "")]
    return ", ".join(p for p in parts if p) or "not recorded"


# ---- the header: inputs and what each figure rests on ---------------------------------------------


def _instructions(run: Run, cal, rel: str) -> list[str] | None:
    """The instructions of a prompt set: its calibration's continuations, else the prompts file."""
    if cal is not None and cal.directory is not None:
        try:
            return list(cal.continuations()["instruction"].astype(str))
        except (TreeoptError, KeyError):
            pass
    path = run.directory / rel
    try:
        return [r["instruction"] for r in json.loads(path.read_text())] if path.is_file() else None
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _by_source(cal) -> str:
    """' (helpful_base 20, koala 4)' from the continuations' `source` column, where recorded."""
    try:
        conts = cal.continuations() if cal is not None else None
    except TreeoptError:
        return ""
    if conts is None or "source" not in conts.columns:
        return ""
    return " (" + ", ".join(f"{k} {v}" for k, v in conts["source"].astype(str).value_counts().items()) + ")"


def inputs_table(run: Run) -> pd.DataFrame:
    """What the run was made of: model, heads, prompts (counts, overlap), acceptance rule, machine, versions."""
    cal = run.calibration
    meta = cal.meta if cal is not None else {}
    drafter = drafter_of(meta) if meta else run.bench_meta.get("drafter") or "heads"
    rows = [("model", meta.get("model") or run.bench_meta.get("model") or run.demo.get("settings", {}).get("model")),
            ("drafter", drafter)]
    if drafter == "heads":
        rows.append(("heads", meta.get("heads") or run.bench_meta.get("heads")))
    src = run.prompt_source
    source = src.get("source") or meta.get("dataset") or meta.get("prompts")
    if source:
        rows.append(("prompt source", str(source) + (f" ({src['note']})" if src.get("note") else "")))
    fit = _instructions(run, cal, FIT_PROMPTS)
    held = _instructions(run, run.heldout, HELD_PROMPTS)
    n_held = int(run.bench["prompts"].iloc[0]) if run.bench is not None and "prompts" in run.bench.columns else \
        (len(held) if held is not None else None)
    n_fit = len(fit) if fit is not None else 0
    drawn = f", a random draw across the source (seed {src['seed']})" if "seed" in src else ""
    rows.append(("calibration prompts (fit)", (f"{n_fit}" if fit is not None else "not recorded")
                 + (drawn if n_fit else "") + _by_source(cal)))
    rows.append(("held-out prompts (bench, ceiling)", (f"{n_held}" if n_held is not None else "none")
                 + (drawn if n_held else "") + _by_source(run.heldout)))
    if fit is not None and held is not None:
        norm = lambda s: " ".join(s.lower().split())  # noqa: E731
        both = len({norm(s) for s in fit} & {norm(s) for s in held})
        rows.append(("overlap (same instruction in both)", "none" if both == 0 else f"{both} prompts: the held-out "
                     "figures are partly in-sample"))
    rule = meta.get("acceptance") or run.tree_meta.get("acceptance")
    rows.append(("acceptance rule", _show(rule) if rule else "greedy (not recorded in the files; the calibration "
                 "ranks the base model's greedy tokens)"))
    rows.append(("acceptance model", f"unknown: {run.problems[TREE]}" if run.damaged(TREE) else _model(run)))
    rows.append(("machine", _machine(run)))
    files = [f for f in ("calibration/calibration.json", "calibration-heldout/calibration.json", FIT_PROMPTS, HELD_PROMPTS,
                         TREE, SWEEP, BENCH, BENCH_META, LATENCY, DEMO) if (run.directory / f).is_file()]
    rows.append(("files", ", ".join(f"`{f}`" for f in files)))
    versions = run.bench_meta.get("versions") or meta.get("versions") or {}
    if versions:
        rows.append(("versions", ", ".join(f"{k} {versions[k]}" for k in ("treeopt", "torch", "transformers", "python")
                                           if k in versions)))
    return pd.DataFrame([(k, "" if v is None else str(v)) for k, v in rows], columns=["input", "value"])


def _show(v) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k} = {x}" for k, x in v.items())
    return str(v)


def basis_table(run: Run) -> pd.DataFrame:
    """Which figures are measured, replayed on held-out prompts, cross-validated, in-sample or uniform."""
    meta = run.tree_meta
    cross = "uniform_tokens_per_step" in meta  # tree files that carry both: the headline is cross-validated
    rows = [("measured, speedup (bench table, speed chart)", "held-out prompts", "measured: decoding them"),
            ("heldout, ci_low, ci_high, of_ceiling", "held-out prompts",
             "exact replay of their calibration (equals decoding under greedy acceptance); 95 % bootstrap over prompts"),
            ("ceiling-N rows", "held-out prompts", "in-sample there: the best an N-node tree could do"),
            ("in_sample", "calibration prompts", "in-sample: exact replay on the prompts the trees were fit on"),
            ("uniform, budget chart, sweep, bench's predicted_tokens_per_step", "calibration prompts",
             "uniform expectation (1 + the sum of node values), in-sample")]
    if run.tree is not None:
        rows.append(("tree.json predicted_tokens_per_step", "calibration prompts",
                     "cross-validated over prompts (replayed on folds the tree was not fit on)" if cross
                     else "uniform expectation, in-sample"))
    return pd.DataFrame(rows, columns=["figures", "prompts", "basis"])


# ---- figures -------------------------------------------------------------------------------------


def make_figures(run: Run, trees: dict,
                 formats: tuple[str, ...] = (".png", ".svg")) -> tuple[dict[str, Path], dict[str, str]]:
    """Every chart the run's files allow, as RUN_DIR/figures/NAME.png (+ .svg). Returns name -> PNG
    path and name -> why a figure could not be drawn."""
    from treeopt.reports import plots

    out = run.directory / FIGURES
    made: dict[str, Path] = {}
    failed: dict[str, str] = {}

    def draw(name, build):
        try:
            fig = build()
        except TreeoptError as e:
            failed[name] = f"figure `{name}` not drawn: {e}"
            return
        plots.save(fig, *(out / f"{name}{fmt}" for fmt in formats))
        made[name] = out / f"{name}.png"

    for name, tree in tree_pictures(run, trees).items():
        draw(f"tree-{name}", lambda tree=tree, name=name: _tree_figure(run, name, tree))
    if run.calibration is not None:
        draw("accuracy", lambda: plots.accuracy_figure(run.calibration.accuracy, show=20))
    curves = None if run.damaged(TREE) else budget_curves(run)  # its acceptance model is tree.json's
    if curves is not None:
        draw("budget", lambda: plots.budget_figure(curves, measured=run.bench))
    bench = run.bench if run.bench is not None and "speedup" in run.bench.columns else None
    predicted = run.sweep if run.sweep is not None and "speedup" in run.sweep.columns else None
    if bench is not None or run.latency is not None or predicted is not None:
        draw("speed", lambda: plots.speed_figure(bench=bench, latency=run.latency, predicted=predicted))
    if run.bench is not None and "predicted_tokens_per_step" in run.bench.columns:
        draw("predicted_vs_measured", lambda: plots.predicted_vs_measured_figure(run.bench))
    return made, failed


def tree_pictures(run: Run, trees: dict, most: int = 3) -> dict[str, object]:
    """The searched trees to draw: those of the comparison (at most `most`, largest first), else tree.json."""
    searched = {n: t for n, t in trees.items() if _is_searched(n)}
    if not searched and run.tree is not None:
        searched = {SEARCHED.format(len(run.tree)): run.tree}
    return dict(sorted(searched.items(), key=lambda kv: -len(kv[1]))[:most])


def _tree_figure(run: Run, name: str, tree):
    from treeopt.reports import plots

    values, title = None, name
    if run.calibration is not None:
        from treeopt.search.acceptance import node_values
        from treeopt.core.tree import truncate

        if len(truncate(tree, run.calibration.num_heads, run.calibration.top_k)) == len(tree):
            values = node_values(tree, run.calibration, _model(run))
            title = f"{name}, {1 + values.sum():.2f} tokens/step (uniform expectation, {_model(run)} model)"
    return plots.tree_figure(tree, values=values, title=title)


PUBLISHED_LABEL = "Medusa's published trees"


def budget_curves(run: Run, max_nodes: int = 256) -> pd.DataFrame | None:
    """Long table (method, nodes, tokens_per_step) of predicted tokens/step vs node budget: the
    searched trees (sweep.csv, else a search on the calibration), the best Cartesian tree at each
    power-of-two budget, the top-1 chain and Medusa's published trees (one series of points)."""
    frames = []
    if run.sweep is not None:
        frames.append(run.sweep[["nodes", "tokens_per_step"]].assign(method="searched (sweep.csv)"))
    cal = run.calibration
    if cal is not None:
        from treeopt.search.acceptance import expected_tokens_per_step
        from treeopt.search.baselines import best_cartesian
        from treeopt.search.grow import search
        from treeopt.core.published import BASELINES, PUBLISHED
        from treeopt.core.tree import Tree

        model = _model(run)
        if not frames:
            curve = search(cal, max_nodes, model).curve
            frames.append(pd.DataFrame({"nodes": np.arange(len(curve)), "tokens_per_step": curve,
                                        "method": f"searched ({model})"}))
        rows = []
        for budget in (2 ** np.arange(1, int(np.log2(max_nodes)) + 1)).tolist():
            tree = Tree.cartesian(best_cartesian(cal, budget, model))
            rows.append({"method": "best Cartesian", "nodes": len(tree),
                         "tokens_per_step": expected_tokens_per_step(tree, cal, model)})
        for length in range(1, cal.num_heads + 1):
            rows.append({"method": "top-1 chain", "nodes": length,
                         "tokens_per_step": expected_tokens_per_step(Tree.chain(length), cal, model)})
        for name in BASELINES:
            tree = Tree(tuple(map(tuple, PUBLISHED[name])))
            rows.append({"method": PUBLISHED_LABEL, "nodes": len(tree),
                         "tokens_per_step": expected_tokens_per_step(tree, cal, model)})
        frames.append(pd.DataFrame(rows).drop_duplicates(["method", "nodes", "tokens_per_step"]))
    if not frames:
        return None
    return pd.concat(frames, ignore_index=True)[["method", "nodes", "tokens_per_step"]]


# ---- the pages -----------------------------------------------------------------------------------


@dataclass
class Section:
    title: str
    text: str = ""
    table: pd.DataFrame | None = None
    figures: tuple[str, ...] = ()
    code: str = ""  # copyable text (the trees' medusa_choices)


def _needs(run: Run, *inputs: str) -> str:
    """What the page says for a section whose inputs are missing or unreadable ('' when all are there)."""
    return " ".join(run.problems[i] + "." for i in inputs if i in run.problems)


def summary_text(run: Run, table: pd.DataFrame | None) -> str:
    """Which tree to deploy, how sure the number is, and why this machine's speed differs."""
    if table is None or "heldout" not in table.columns and "measured" not in table.columns:
        return _needs(run, *([TREE] if run.damaged(TREE) else []), HELDOUT, BENCH) or "No comparison: this run has no benched or held-out trees."
    col = "heldout" if "heldout" in table.columns else "measured"
    searched = table[(table["kind"] == "searched") & table[col].notna()]
    if not len(searched):
        return "No searched tree was measured or replayed on held-out prompts."
    largest = table[(table["kind"] != "ceiling") & (table["nodes"] == searched["nodes"].max()) & table[col].notna()]
    top = largest.loc[largest[col].idxmax()]
    held = len(np.unique(run.heldout.prompt_ids)) if run.heldout is not None else 0
    sure = (f" (95 % interval {top['ci_low']:.2f}-{top['ci_high']:.2f} over the {held} held-out prompts, "
            f"{top['of_ceiling']:.0%} of the best possible {top['nodes']}-node tree's extra tokens)"
            if col == "heldout" else "")
    lines = [f"**Which tree to deploy.** Where a decoding step costs about the same at any tree size up to "
             f"{top['nodes']} nodes (a GPU at batch 1): **{top['tree']}**, which accepts {top[col]:.2f} tokens per step "
             f"on held-out prompts{sure}; its `medusa_choices` are under The trees."]
    if col == "heldout":
        close = [f"{r['tree']} ({r[col]:.2f})" for _, r in largest.iterrows()
                 if r["tree"] != top["tree"] and r[col] >= top["ci_low"]]
        if close:
            lines.append(f"Within that interval: {', '.join(close)}; the held-out prompts cannot tell them apart.")
    meta = run.tree_meta
    if run.tree is not None and "uniform_tokens_per_step" in meta and len(meta.get("predicted_interval") or ()) == 2:
        lo, hi = meta["predicted_interval"]
        lines.append(f"`tree.json` ({len(run.tree)} nodes) predicts {meta['predicted_tokens_per_step']:.2f} tokens per "
                     f"step cross-validated over the calibration prompts ({lo:.2f}-{hi:.2f}).")
    beaten = []
    for _, r in searched.iterrows():
        others = table[(table["nodes"] == r["nodes"]) & (table["kind"] == "baseline") & table[col].notna()]
        beaten += [f"{o['tree']} {o[col]:.2f} vs {r['tree']} {r[col]:.2f}" for _, o in others.iterrows()]
    if beaten:
        lines.append("Against the baselines of the same size on the same held-out prompts: " + "; ".join(beaten) + ".")
    if "speedup" in table.columns and table["speedup"].notna().any():
        fast = table.loc[table["speedup"].idxmax()]
        if fast["speedup"] > 1:
            lines.append(f"On this machine ({_machine(run)}) the fastest is {fast['tree']}, {fast['speedup']:.2f}x "
                         "plain decoding (measured).")
        else:
            lines.append(f"On this machine ({_machine(run)}) no tree beats plain decoding (best: {fast['tree']}, "
                         f"{fast['speedup']:.2f}x, measured), so plain decoding is the one to run here: a step's cost "
                         "grows with the tree on it (see Speed on this machine).")
    if run.bench is not None and "match_rate" in run.bench.columns:
        worst = run.bench["match_rate"].min()
        lines.append("Every benched tree's output equals plain greedy decoding's on every prompt." if worst == 1 else
                     f"Outputs equal plain greedy decoding's on only {worst:.0%} of prompts for the worst method.")
    return " ".join(lines)


def _choices_code(trees: dict) -> str:
    """One copyable `name = [[0], [0, 0], ...]` line per tree."""
    return "\n".join(f"{re.sub(r'[^0-9a-zA-Z_]', '_', name)} = {json.dumps(tree.choices)}" for name, tree in trees.items())


def sections(run: Run, table: pd.DataFrame | None, trees: dict, figures: dict[str, Path],
             failed: dict[str, str]) -> list[Section]:
    """The page, in order. Every section is present; one without its inputs says what makes them."""
    tree_figs = tuple(k for k in figures if k.startswith("tree-"))
    why = lambda *names: " ".join(failed[n] for n in names if n in failed)  # noqa: E731
    s = [Section("Summary", summary_text(run, table)),
         Section("Inputs", "What this run was made of, and what each figure below rests on.", inputs_table(run)),
         Section("What each figure rests on", "", basis_table(run))]
    if table is not None:
        text = ("Each baseline beside a searched tree of the same node count, on the same held-out prompts, with the "
                "ceiling: the best tree of that size fit on the held-out prompts' own calibration. measured = "
                "tokens/step decoding them (bench); heldout = exact replay of their calibration with a 95 % interval; "
                "of_ceiling = (heldout - 1) / (ceiling's heldout - 1); in_sample and uniform on the calibration prompts.")
        s.append(Section("Like for like on held-out prompts",
                         " ".join(filter(None, [text, _needs(run, HELDOUT, BENCH), why("budget")])), table, ("budget",)))
    else:
        s.append(Section("Like for like on held-out prompts", _needs(run, CALIBRATION, TREE, HELDOUT, BENCH)))
    if not trees and run.tree is not None:
        trees = {SEARCHED.format(len(run.tree)): run.tree}
    s.append(Section("The trees", ("Each tree's `medusa_choices` (paste into Medusa's `medusa_choices.py` or pass to "
                                   "`treeopt bench --tree '...'`); pictures of the searched ones below (one level per "
                                   "head, labels are ranks, colour the probability that a step accepts the node)."
                                   if trees else _needs(run, TREE, BENCH_META)), code=_choices_code(trees),
                     figures=tree_figs))
    s.append(Section("Speed on this machine", " ".join(filter(None, [speed_text(run, table), why("speed")])),
                     run.latency, ("speed",)))
    if run.bench is not None:
        settings = ", ".join(f"{k} = {run.bench_meta[k]}" for k in BENCH_FIELDS
                             if isinstance(run.bench_meta.get(k), (int, float, str)))
        cols = [c for c in BENCH_COLUMNS if c in run.bench.columns]
        s.append(Section("Benchmark (measured)", settings + (". " if settings else "") + "All columns: `bench/bench.csv`. "
                         "predicted_tokens_per_step: uniform expectation on the calibration prompts. "
                         + why("predicted_vs_measured"), run.bench[cols], ("predicted_vs_measured",)))
    else:
        s.append(Section("Benchmark (measured)", _needs(run, BENCH)))
    if run.calibration is not None:
        s.append(Section("Calibration", "", calibration_summary(run.calibration)))
        s.append(Section("Head accuracy", "a_k^(i) = P(head k's rank-i token is the one the base model emits), top 5 "
                         "ranks and their sum. " + why("accuracy"), accuracy_top(run.calibration), ("accuracy",)))
    else:
        s.append(Section("Calibration", _needs(run, CALIBRATION)))
    if run.sweep is not None:
        sizes = {2 ** i for i in range(12)} | (set(table["nodes"].astype(int)) if table is not None else set())
        s.append(Section("Sweep", "The searched tree's predicted figures at a few sizes (uniform expectation, in-sample; "
                         "all sizes: `sweep.csv`).", run.sweep[run.sweep["nodes"].isin(sizes)]))
    else:
        s.append(Section("Sweep", _needs(run, SWEEP)))
    if run.demo:
        stages = run.demo.get("stages", {})
        s.append(Section("Run", _demo_text(run.demo), pd.DataFrame([{"stage": k, "seconds": float(v)}
                                                                    for k, v in stages.items()]) if stages else None))
    extra = [p for k, p in run.problems.items() if k not in (DEMO, PROMPT_SOURCE) and not any(p in x.text for x in s)]
    if extra:
        s.append(Section("Other inputs not read", " ".join(extra)))
    return s


def _demo_text(demo: dict) -> str:
    settings = demo.get("settings", {})

    def show(v):
        if v is None:
            return "default"
        if isinstance(v, list):
            return ", ".join(map(str, v)) or "none"
        return _fmt(v)

    parts = [f"{k} = {show(v)}" for k, v in settings.items()]
    extra = [f"{k} = {_fmt(demo[k])}" for k in ("threads", "total_stage_s", "last_wall_s") if k in demo]
    return "`treeopt demo` settings: " + "; ".join(parts + extra) + ". Stage times are wall seconds of the run " \
        "that made each stage's outputs."


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write RUN_DIR/report.md and RUN_DIR/report.html (+ RUN_DIR/figures/). Returns both paths."""
    run = load_run(run_dir)
    if all(x is None for x in (run.calibration, run.heldout, run.tree, run.bench, run.sweep, run.latency)):
        raise TreeoptError(f"{run.directory} holds none of calibration/, tree.json, sweep.csv, bench/bench.csv, "
                           "latency.csv: pass a run directory (e.g. the --output-dir of `treeopt demo`)")
    # a damaged tree.json hides the acceptance model every prediction rests on: none is shown
    trees = {} if run.damaged(TREE) else compared_trees(run)
    table = None if run.damaged(TREE) else like_for_like(run, trees)
    figures, failed = make_figures(run, trees)
    page = sections(run, table, trees, figures, failed)
    title = f"treeopt report: {run.directory.name}"
    md_path = write_text(run.directory / REPORT_MD, _markdown(title, page, figures, run.directory))
    html_path = write_text(run.directory / REPORT_HTML, _html(title, page, figures, run.directory))
    return md_path, html_path


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _markdown(title: str, page: list[Section], figures: dict[str, Path], root: Path) -> str:
    md = [f"# {title}", "", " · ".join(f"[{s.title}](#{_anchor(s.title)})" for s in page), ""]
    for sec in page:
        md += [f"## {sec.title}", ""]
        if sec.text:
            md += [sec.text, ""]
        if sec.code:
            md += ["```python", sec.code, "```", ""]
        if sec.table is not None:
            md += [markdown_table(sec.table), ""]
        md += [f"![{f}]({figures[f].relative_to(root).as_posix()})\n" for f in sec.figures if f in figures]
    return "\n".join(md)


def _html(title: str, page: list[Section], figures: dict[str, Path], root: Path) -> str:
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>", _STYLE,
           "</head><body>", f"<h1>{html.escape(title)}</h1>",
           "<nav>" + " · ".join(f"<a href='#{_anchor(s.title)}'>{html.escape(s.title)}</a>" for s in page) + "</nav>"]
    for sec in page:
        out.append(f"<h2 id='{_anchor(sec.title)}'>{html.escape(sec.title)}</h2>")
        if sec.text:
            out.append(f"<p>{_inline(sec.text, root)}</p>")
        if sec.code:
            out.append(f"<pre><code>{html.escape(sec.code)}</code></pre>")
        if sec.table is not None:
            out.append(html_table(sec.table, root))
        for f in sec.figures:
            if f in figures:
                data = base64.b64encode(figures[f].read_bytes()).decode()
                out.append(f"<p><img alt='{f}' src='data:image/png;base64,{data}'></p>")
    out.append("</body></html>")
    return "\n".join(out)


def _inline(text: str, root: Path | None = None) -> str:
    """Markdown-ish text as HTML: escaped, `code` and **bold** spans kept; a code span naming a file
    of the run directory `root` becomes a link to it."""
    def code(m):
        name = html.unescape(m.group(1))
        linked = root is not None and re.fullmatch(r"[\w.-]+(/[\w.-]+)*", name) and ".." not in name \
            and (root / name).is_file()
        return f"<a href='{html.escape(name)}'><code>{m.group(1)}</code></a>" if linked else f"<code>{m.group(1)}</code>"

    text = re.sub(r"`([^`]+)`", code, html.escape(text))
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


_STYLE = """<style>
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
nav { font-size: 0.9em; margin-bottom: 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.85em; white-space: pre-wrap; word-break: break-all; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
</style>"""
