"""`treeopt report RUN_DIR`: one Markdown page and one self-contained HTML page from a run's files.

A run directory (what `treeopt demo` writes) may hold any of:

- ``calibration/``: a calibration directory (calibrate/format.py),
- ``tree.json``: the searched tree (treeopt/treefile.py),
- ``sweep.csv``: predicted tokens/step vs nodes for the searched and baseline trees (`treeopt sweep`),
- ``bench/bench.csv`` + ``bench/bench.json``: measured decoding, one row per method (`treeopt bench`),
- ``latency.csv``: forward-pass latency vs tree size (`treeopt profile`),
- ``demo.json``: the demo's settings and stage timings.

The report shows what is there and lists what is missing with the command that makes it. Figures
go to RUN_DIR/figures/ (PNG and SVG); the pages are RUN_DIR/report.md and RUN_DIR/report.html.
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

from treeopt.core.errors import TreeoptError
from treeopt.core.fileio import write_text

CALIBRATION = "calibration"
TREE = "tree.json"
SWEEP = "sweep.csv"
BENCH = "bench/bench.csv"
BENCH_META = "bench/bench.json"
LATENCY = "latency.csv"
DEMO = "demo.json"
FIGURES = "figures"

# What makes each file, for the "missing" list.
MAKERS = {
    CALIBRATION: "treeopt calibrate --out RUN_DIR/calibration",
    TREE: "treeopt search --calibration RUN_DIR/calibration --out RUN_DIR/tree.json",
    SWEEP: "treeopt sweep --calibration RUN_DIR/calibration --out RUN_DIR/sweep.csv",
    BENCH: "treeopt bench --tree RUN_DIR/tree.json --out RUN_DIR/bench",
    LATENCY: "treeopt profile --out RUN_DIR/latency.csv",
}


@dataclass
class Run:
    """What a run directory holds; None where a file is absent or unreadable (see `notes`)."""

    directory: Path
    calibration: object | None = None  # treeopt.core.record.Calibration
    tree: object | None = None  # treeopt.core.tree.Tree
    tree_meta: dict = field(default_factory=dict)
    sweep: pd.DataFrame | None = None
    bench: pd.DataFrame | None = None
    bench_meta: dict = field(default_factory=dict)
    latency: pd.DataFrame | None = None
    demo: dict = field(default_factory=dict)
    comparison: pd.DataFrame | None = None  # searched tree vs baselines, filled by write_report
    missing: list[str] = field(default_factory=list)  # relative paths
    notes: list[str] = field(default_factory=list)  # unreadable files, with why


def _read_csv(run: Run, rel: str, need: set[str]) -> pd.DataFrame | None:
    path = run.directory / rel
    if not path.is_file():
        run.missing.append(rel)
        return None
    try:
        df = pd.read_csv(path)
    except Exception as e:  # pandas raises many types for damaged files
        run.notes.append(f"`{rel}` is unreadable ({type(e).__name__}): re-run `{MAKERS.get(rel, 'its command')}`")
        return None
    if not need <= set(df.columns) or df.empty:
        run.notes.append(f"`{rel}` lacks columns {sorted(need - set(df.columns))} or rows: "
                         f"re-run `{MAKERS.get(rel, 'its command')}`")
        return None
    return df


def _read_json(run: Run, rel: str, required: bool = False) -> dict:
    path = run.directory / rel
    if not path.is_file():
        if required:
            run.missing.append(rel)
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        run.notes.append(f"`{rel}` is not valid JSON ({type(e).__name__}): re-create it")
        return {}
    return data if isinstance(data, dict) else {}


def load_run(directory: str | Path) -> Run:
    """Read every file of a run directory that is present; never fails on a missing or bad file."""
    from treeopt.core.record import load_calibration

    directory = Path(directory)
    if not directory.is_dir():
        raise TreeoptError(f"run directory {directory} not found: pass the --out of `treeopt demo` (e.g. runs/demo)")
    run = Run(directory)
    if (directory / CALIBRATION).is_dir():
        try:
            run.calibration = load_calibration(directory / CALIBRATION)
        except TreeoptError as e:
            run.notes.append(f"`{CALIBRATION}/`: {e}")
    else:
        run.missing.append(CALIBRATION + "/")
    if (directory / TREE).is_file():
        try:
            run.tree, run.tree_meta = _read_tree(directory / TREE)
        except TreeoptError as e:
            run.notes.append(f"`{TREE}`: {e}")
    else:
        run.missing.append(TREE)
    run.sweep = _read_csv(run, SWEEP, {"nodes"})
    run.bench = _read_csv(run, BENCH, {"method", "nodes", "tokens_per_step"})
    run.bench_meta = _read_json(run, BENCH_META)
    run.latency = _read_csv(run, LATENCY, {"nodes", "forward_ms"})
    run.demo = _read_json(run, DEMO)
    return run


def _read_tree(path: Path):
    """(Tree, the file's other fields)."""
    from treeopt.core.treefile import read_tree_meta

    return read_tree_meta(path)


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


def html_table(df: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
                   for row in df.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CALIBRATION_FIELDS = ("model", "heads", "prompts", "num_stopped", "max_new_tokens", "batch_size", "seed", "device",
                      "dtype", "wall_time_s", "tokens_per_s")
BENCH_FIELDS = ("model", "heads", "device", "dtype", "threads", "max_new_tokens", "prompts_source")
BENCH_COLUMNS = ("method", "nodes", "tokens_per_step", "predicted_tokens_per_step", "step_ms", "overhead", "speedup",
                 "tokens_per_s", "match_rate", "first_divergence", "prompts", "new_tokens")
TREE_FIELDS = ("predicted_tokens_per_step", "replayed_tokens_per_step", "acceptance_model", "max_depth", "top_k",
               "best_chain_length", "forward_ms", "predicted_tokens_per_s")


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


def baselines(run: Run) -> pd.DataFrame | None:
    """The searched tree against the best Cartesian tree of its size, the top-1 chain and Medusa's
    trees, predicted and replayed on the run's calibration (`search.evaluate.compare`)."""
    if run.calibration is None or run.tree is None:
        return None
    from search.baselines import baseline_trees
    from search.evaluate import compare

    model = run.tree_meta.get("acceptance_model", "empirical")
    trees = {"searched (tree.json)": run.tree, **baseline_trees(run.calibration, len(run.tree), model)}
    return compare({k: t for k, t in trees.items() if len(t)}, run.calibration, model)


# ---- figures -------------------------------------------------------------------------------------


def make_figures(run: Run, formats: tuple[str, ...] = (".png", ".svg")) -> dict[str, Path]:
    """Every chart the run's files allow, as RUN_DIR/figures/NAME.png (+ .svg). name -> PNG path."""
    from reports import plots

    out = run.directory / FIGURES
    made: dict[str, Path] = {}

    def draw(name, fn, *args, **kw):
        try:
            for fmt in formats:
                path = fn(*args, out=out / f"{name}{fmt}", **kw)
                if fmt == ".png":
                    made[name] = path
        except TreeoptError as e:
            run.notes.append(f"figure `{name}` skipped: {e}")

    if run.tree is not None:
        values, title = None, "searched tree"
        if run.calibration is not None:
            from search.acceptance import node_values
            from treeopt.core.tree import truncate

            model = run.tree_meta.get("acceptance_model", "empirical")
            if len(truncate(run.tree, run.calibration.num_heads, run.calibration.top_k)) == len(run.tree):
                values = node_values(run.tree, run.calibration, model)
                title = f"searched tree, predicted {1 + values.sum():.2f} tokens/step ({model} model)"
        draw("tree", lambda out: plots.plot_tree(run.tree, out, values=values, title=title,
                                                 value_label="P(a decoding step accepts the node)" if values is not None else ""))
    if run.calibration is not None:
        draw("accuracy", lambda out: plots.plot_accuracy_heatmap(run.calibration.accuracy, out, show=20))
    curves = budget_curves(run)
    if curves is not None:
        measured = run.bench if run.bench is not None else None
        draw("budget", lambda out: plots.plot_budget_curves(curves, out, measured=measured))
    bench = run.bench if run.bench is not None and "speedup" in run.bench.columns else None
    predicted = run.sweep if run.sweep is not None and "speedup" in run.sweep.columns else None
    if bench is not None or run.latency is not None or predicted is not None:
        draw("speed", lambda out: plots.plot_speed(out, bench=bench, latency=run.latency, predicted=predicted))
    if run.bench is not None and "predicted_tokens_per_step" in run.bench.columns:
        draw("predicted_vs_measured", lambda out: plots.plot_predicted_vs_measured(run.bench, out))
    return made


def budget_curves(run: Run, max_nodes: int = 256) -> pd.DataFrame | None:
    """Long table (method, nodes, tokens_per_step) of predicted tokens/step vs node budget: the
    searched trees (sweep.csv, else a search on the calibration), the best Cartesian tree at each
    power-of-two budget, the top-1 chain and Medusa's published trees (as points)."""
    frames = []
    if run.sweep is not None and "tokens_per_step" in run.sweep.columns:
        frames.append(run.sweep[["nodes", "tokens_per_step"]].assign(method="searched (sweep.csv)"))
    cal = run.calibration
    if cal is not None:
        from treeopt.core.published import BASELINES, PUBLISHED
        from search.acceptance import expected_tokens_per_step
        from search.baselines import best_cartesian
        from search.grow import search
        from treeopt.core.tree import Tree

        model = run.tree_meta.get("acceptance_model", "empirical")
        if not frames:
            curve = search(cal, max_nodes, model).curve
            frames.append(pd.DataFrame({"nodes": np.arange(len(curve)), "tokens_per_step": curve,
                                        "method": f"searched ({model})"}))
        rows = []
        for budget in (2 ** np.arange(1, int(np.log2(max_nodes)) + 1)).tolist():
            ks = best_cartesian(cal, budget, model)
            tree = Tree.cartesian(ks)
            rows.append({"method": "best Cartesian", "nodes": len(tree),
                         "tokens_per_step": expected_tokens_per_step(tree, cal, model)})
        for length in range(1, cal.num_heads + 1):
            rows.append({"method": "top-1 chain", "nodes": length,
                         "tokens_per_step": expected_tokens_per_step(Tree.chain(length), cal, model)})
        for name in BASELINES:
            tree = Tree(tuple(map(tuple, PUBLISHED[name])))
            rows.append({"method": name, "nodes": len(tree), "tokens_per_step": expected_tokens_per_step(tree, cal, model)})
        frames.append(pd.DataFrame(rows).drop_duplicates(["method", "nodes"]))
    if not frames:
        return None
    return pd.concat(frames, ignore_index=True)[["method", "nodes", "tokens_per_step"]]


# ---- the pages -----------------------------------------------------------------------------------


def _sections(run: Run, figures: dict[str, Path]):
    """(title, text, table, figure name) per section, in page order."""
    s = []
    summary = summary_lines(run)
    if summary:
        s.append(("Summary", " ".join(summary), None, None))
    if run.demo:
        stages = run.demo.get("stages", {})
        table = pd.DataFrame([{"stage": k, "seconds": float(v)} for k, v in stages.items()]) if stages else None
        s.append(("Run", _demo_text(run.demo), table, None))
    if run.calibration is not None:
        s.append(("Calibration", "", calibration_summary(run.calibration), None))
        s.append(("Head accuracy a_k^(i)", "P(head k's rank-i token is the one the base model emits), top 5 ranks "
                  "and their sum.", accuracy_top(run.calibration), "accuracy"))
    if run.tree is not None:
        meta = ", ".join(f"{k} = {_fmt(run.tree_meta[k])}" for k in TREE_FIELDS
                         if isinstance(run.tree_meta.get(k), (int, float, str)))
        s.append(("Searched tree", f"{len(run.tree)} nodes, depth {run.tree.depth}, max rank {run.tree.max_rank - 1}. "
                  + meta, None, "tree"))
    table = run.comparison
    if table is not None:
        s.append(("Searched tree vs baselines", "Tokens per step on the run's calibration. predicted: 1 + the sum of "
                  "the tree's node values under the acceptance model; replayed: greedy decoding with the tree replayed "
                  "exactly on the logged continuations, with a 95 % bootstrap interval over prompts (ci_low, ci_high).",
                  table, "budget"))
    elif "budget" in figures:
        s.append(("Tokens per step vs node budget", "", None, "budget"))
    if run.bench is not None:
        settings = ", ".join(f"{k} = {run.bench_meta[k]}" for k in BENCH_FIELDS
                             if isinstance(run.bench_meta.get(k), (int, float, str)))
        cols = [c for c in BENCH_COLUMNS if c in run.bench.columns]
        s.append(("Benchmark (measured)", settings + (". " if settings else "") + "All columns: `bench/bench.csv`.",
                  run.bench[cols], "speed"))
        if "predicted_vs_measured" in figures:
            s.append(("Predicted vs measured", "", None, "predicted_vs_measured"))
    elif run.latency is not None:
        s.append(("Latency", "", None, "speed"))
    if run.latency is not None:
        s.append(("Forward latency vs tree size", "", run.latency, None))
    if run.sweep is not None:
        sizes = {2 ** i for i in range(12)} | ({len(run.tree)} if run.tree is not None else set())
        s.append(("Sweep", "The optimal tree's predicted figures at a few sizes (all sizes: `sweep.csv`).",
                  run.sweep[run.sweep["nodes"].isin(sizes)], None))
    return s


def summary_lines(run: Run) -> list[str]:
    """The headline figures, as sentences: predicted (calibration) and measured (bench)."""
    lines = []
    table = run.comparison
    if table is not None and len(table):
        first = table.iloc[0]
        others = [f"{r['tree']} ({r['nodes']} nodes) {r['replayed']:.2f}" for _, r in table.iloc[1:].iterrows()
                  if r["tree"] in ("best_cartesian", "mc_sim_7b_63")]
        lines.append(f"Searched tree ({first['nodes']} nodes): {first['replayed']:.2f} tokens per step replayed on the "
                     "calibration" + (f", against {'; '.join(others)}." if others else "."))
    if run.bench is not None and {"speedup", "match_rate"} <= set(run.bench.columns):
        rows = run.bench[run.bench["nodes"] > 0]
        if len(rows):
            parts = [f"{r['method']} {r['tokens_per_step']:.2f} tokens/step, {r['speedup']:.2f}x"
                     for _, r in rows.iterrows()]
            prompts = int(run.bench["prompts"].iloc[0]) if "prompts" in run.bench.columns else "?"
            lines.append(f"Measured on {prompts} prompts (speedup = tokens/s over plain greedy decoding): "
                         + "; ".join(parts) + ". " + ("Every method's output equals plain greedy decoding's on every "
                         "prompt." if (rows["match_rate"] == 1).all() else f"Outputs equal to plain greedy decoding's "
                         f"on only {rows['match_rate'].min():.0%} of prompts for the worst method: see match_rate."))
    return lines


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


def _missing_text(run: Run) -> list[str]:
    lines = []
    for rel in run.missing:
        maker = MAKERS.get(rel.rstrip("/"))
        lines.append(f"`{rel}` is missing" + (f": make it with `{maker}`" if maker else ""))
    return lines + run.notes


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write RUN_DIR/report.md and RUN_DIR/report.html (+ RUN_DIR/figures/). Returns both paths."""
    run = load_run(run_dir)
    if run.calibration is None and run.tree is None and run.bench is None and run.sweep is None and run.latency is None:
        raise TreeoptError(f"{run.directory} holds none of calibration/, tree.json, sweep.csv, bench/bench.csv, "
                           "latency.csv: pass a run directory (e.g. the --out of `treeopt demo`)")
    figures = make_figures(run)
    run.comparison = baselines(run)
    sections = _sections(run, figures)
    title = f"treeopt report: {run.directory.name}"
    missing = _missing_text(run)

    md = [f"# {title}", ""]
    for head, text, table, fig in sections:
        md += [f"## {head}", ""]
        if text:
            md += [text, ""]
        if table is not None:
            md += [markdown_table(table), ""]
        if fig in figures:
            md += [f"![{fig}]({figures[fig].relative_to(run.directory).as_posix()})", ""]
    if missing:
        md += ["## Not in this run", ""] + [f"- {m}" for m in missing] + [""]
    md_path = write_text(run.directory / "report.md", "\n".join(md))

    page = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>", _STYLE,
            "</head><body>", f"<h1>{html.escape(title)}</h1>"]
    for head, text, table, fig in sections:
        page.append(f"<h2>{html.escape(head)}</h2>")
        if text:
            page.append(f"<p>{_inline(text)}</p>")
        if table is not None:
            page.append(html_table(table))
        if fig in figures:
            data = base64.b64encode(figures[fig].read_bytes()).decode()
            page.append(f"<p><img alt='{fig}' src='data:image/png;base64,{data}'></p>")
    if missing:
        page.append("<h2>Not in this run</h2><ul>" + "".join(f"<li>{_inline(m)}</li>" for m in missing) + "</ul>")
    page.append("</body></html>")
    html_path = write_text(run.directory / "report.html", "\n".join(page))
    return md_path, html_path


def _inline(text: str) -> str:
    """Markdown-ish text as HTML: escaped, `code` spans kept."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


_STYLE = """<style>
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
</style>"""
