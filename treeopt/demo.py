"""`treeopt demo`: the whole job, small, on the bundled model: calibrate, search, bench, report.

Stages, each writing into OUT (a run directory, see reports/report.py):

1. prompts   OUT/prompts/fit.json and OUT/prompts/bench.json: `fit_prompts` to calibrate on and
             `bench_prompts` held out for the benchmark, each a seeded random draw across the prompt
             set's sources (AlpacaEval's `dataset`), the bench among prompts whose text is not in
             the fit set (never evaluate on what the tree was fitted to).
             OUT/prompts/source.json says where they came from.
2. calibrate OUT/calibration/ (calibrate/: the drafter's rank of each true token, per position and
             depth; `drafter`: the Medusa heads, else n-gram lookup, a draft model or EAGLE-3, whose
             profile, search and bench then use it too; n-gram lookup drafts chains only, so its
             record (top-k 1) searches chains and the demo benches no tree baselines).
3. heldout   OUT/calibration-heldout/: the same on the held-out prompts, for the report's ceiling
             (the best tree fit on them) and an exact replay of every tree there.
4. profile   OUT/latency.csv (decoding/profile.py: forward ms vs tree size on this machine, timed on
             the prefixes of the calibration's searched tree, OUT/profile-tree.json).
5. search    OUT/tree.json and OUT/sweep.csv (search/: the greedy optimal tree).
6. bench     OUT/bench/ (reports/bench.py: plain greedy vs each baseline (the best Cartesian tree,
             Medusa's published trees, the top-1 chain) beside a searched tree of the same node count,
             and the tree `--nodes auto` picks from the profile, OUT/trees/*.json, on the held-out
             prompts; outputs checked equal to plain greedy).
7. report    OUT/report.md and OUT/report.html.

Re-running skips a stage only when OUT/stages/NAME/ says the same settings made its outputs from the
same inputs (sha256) and its outputs are still what it wrote (parsed, rows counted, bytes compared:
treeopt.core.validate); otherwise it says why and redoes the stage (an interrupted calibration or
bench resumes where it stopped). OUT/demo.json keeps the settings and each stage's wall time.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from treeopt.core import layout
from treeopt.core.errors import TreeoptError
from treeopt.core.fileio import check_writable, locking, write_text
from treeopt.core.layout import DEMO, HELDOUT, PROFILE_TREE, STAGES
from treeopt.core.drafter import parse_drafter
from treeopt.core.settings import (DEFAULT_ACCEPTANCE_MODEL, BenchConfig, CalibrationConfig, EngineSettings,
                                   ModelSettings, ProfileConfig, at_least, default, int_list, option_name)
from treeopt.core.stage import Stage
from treeopt.core.validate import sha256_file

OUTPUTS = "outputs"  # the one part of a demo stage


@dataclass(frozen=True)
class DemoConfig:
    """The demo's settings: the defaults of the commands it runs (ModelSettings, CalibrationConfig), apart
    from those a short run on a CPU needs. Every number and every tree spec is checked here, before the
    demo writes anything."""
    OPTION = {"fit_prompts": "--limit"}
    model: str = ModelSettings.model
    heads: str | None = ModelSettings.heads  # None: the heads shipped for the bundled model
    drafter: str = CalibrationConfig.drafter  # heads (--heads), ngram[:MIN-MAX] (chains only), draft:MODEL or eagle3[:DIR]
    prompts: str | None = None  # None: treeopt.core.prompts.default_prompts() (AlpacaEval)
    seed: int = 0  # of the random draw of the fit and bench prompts
    fit_prompts: int = 12  # calibrate on these
    bench_prompts: int = 4  # and bench on the next ones
    max_new_tokens: int = 48  # per prompt, in calibration and bench
    top_k: int = CalibrationConfig.top_k  # ranks the calibration records per head
    nodes: int | str = 16  # searched tree size (64 on a GPU), or "auto": best predicted tokens/s (needs the profile)
    cartesian: tuple[str, ...] = ("best",)  # Cartesian baselines: "best" = the best one as large as the searched tree, or e.g. "2x3"
    published: tuple[str, ...] = ("mc_sim_7b_63",)  # Medusa's published trees to bench
    chain: bool = True  # bench the top-1 chain (what vLLM and TGI draft) too
    profile_sizes: str = "0,1,2,4,8,16,32,64"  # latency profile sizes ("" to skip the profile)
    device: str = ModelSettings.device
    dtype: str = ModelSettings.dtype
    compiled: bool | None = EngineSettings.compiled  # torch.compile the decoding steps (profile and bench)
    threads: int | None = EngineSettings.threads  # torch CPU threads (None: torch's default); 1 is best on a shared machine

    def __post_init__(self):
        split = lambda v: tuple(x.strip() for x in v.split(",") if x.strip()) if isinstance(v, str) else tuple(v)  # noqa: E731
        object.__setattr__(self, "cartesian", split(self.cartesian))
        object.__setattr__(self, "published", split(self.published))
        nodes = str(self.nodes)
        if nodes != "auto" and not nodes.isdigit():
            raise TreeoptError(f"--nodes {nodes!r} is not a number: pass a number of nodes, e.g. 64, or auto")
        object.__setattr__(self, "nodes", nodes if nodes == "auto" else int(nodes))
        at_least(self, fit_prompts=1, bench_prompts=1, max_new_tokens=1, top_k=1, threads=1,
                 **({} if self.nodes == "auto" else {"nodes": 1}))
        CalibrationConfig(top_k=self.top_k, max_new_tokens=self.max_new_tokens, drafter=self.drafter,
                          heads=self.heads)  # the calibration's own checks (a drafter and --heads conflict)
        if parse_drafter(self.drafter).kind == "ngram":  # it drafts chains only: the tree baselines cannot run
            for name in ("cartesian", "published"):
                if getattr(self, name) not in ((), default(DemoConfig, name)):
                    raise TreeoptError(f"--drafter ngram drafts chains only: drop {option_name(self, name)} "
                                       "(the demo benches the searched chain and the top-1 chain)")
                object.__setattr__(self, name, ())
        sizes = int_list(self.profile_sizes, "--profile-sizes", 0)
        if self.nodes == "auto" and not sizes:
            raise TreeoptError("--nodes auto needs the latency profile: drop --profile-sizes '' or pass --nodes N")


@dataclass
class DemoResult:
    out: Path
    report: Path  # report.html
    stages: dict[str, float] = field(default_factory=dict)  # seconds, this run (0 = skipped, outputs existed)
    wall_s: float = 0.0


def _settings(cfg: DemoConfig) -> dict:
    """What the outputs depend on (not `threads`, which only changes the timings; the drafter only when
    it is not the heads, so that a heads run's settings name what it uses: model and heads)."""
    settings = json.loads(json.dumps(asdict(cfg)))
    settings.pop("threads")
    if settings["drafter"] == "heads":
        settings.pop("drafter")
    return settings


def _check_settings(out: Path, cfg: DemoConfig) -> dict:
    """The earlier demo.json of OUT, after checking it was made with the same settings."""
    path = out / DEMO
    if not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise TreeoptError(f"{path} is damaged: delete it (the stages' outputs are kept) and re-run") from None
    if old.get("settings") != _settings(cfg):
        changed = sorted(k for k, v in _settings(cfg).items() if old.get("settings", {}).get(k) != v)
        raise TreeoptError(f"{out} holds a demo run with other settings ({', '.join(changed)}): "
                           "pass another --output-dir, or delete that directory to start over")
    return old


def _check_inputs(cfg: DemoConfig) -> None:
    """Parse the options the later stages read (baseline trees, profile sizes), so that a typo stops
    the demo before it calibrates, not after."""
    from treeopt.decoding.profile import checked_sizes, parse_sizes
    from treeopt.reports.bench import parse_cartesian
    from treeopt.core.treefile import read_tree

    for name in cfg.published:
        read_tree(name)
    for spec in cfg.cartesian:
        if spec != "best":
            parse_cartesian(spec)
    if cfg.profile_sizes:
        checked_sizes(parse_sizes(cfg.profile_sizes), cfg.max_new_tokens + 64)


def prompt_source(cfg: DemoConfig, log: Callable[[str], None] = print) -> tuple[str, str]:
    """(source, note): --prompts, else AlpacaEval (the copy beside the checkout, else the hub's);
    offline with no copy, the general instructions bundled for this case, so the demo runs on any
    machine, with a note that says so (the report shows it)."""
    from treeopt.core.env import hub_reachable
    from treeopt.core.prompts import ALPACA_EVAL, OFFLINE_PROMPTS, default_prompts

    if cfg.prompts:
        return cfg.prompts, ""
    source = default_prompts()
    if source == ALPACA_EVAL and not hub_reachable():
        log(f"AlpacaEval: no local copy and the hub is unreachable; using the bundled {OFFLINE_PROMPTS} "
            "(--prompts FILE for others)")
        return str(OFFLINE_PROMPTS), ("bundled general instructions, not AlpacaEval: no local AlpacaEval copy and "
                                      "the hub was unreachable")
    return source, ""


def split_prompts(cfg: DemoConfig, log: Callable[[str], None] = print,
                  source: str | None = None) -> tuple[list[dict], list[dict]]:
    """(fit, held-out) prompt records ({"instruction", "dataset"}, "dataset" where the source is
    known): `fit_prompts` drawn at random across the prompt set's sources
    (`treeopt.core.prompts.stratified_sample`, seeded by `seed`), then `bench_prompts` drawn the same
    way among the other prompts whose text (normalized) is not in the fit set, so the bench is held
    out even where the file repeats a prompt."""
    from treeopt.core.prompts import load_prompts, normalized, stratified_sample

    source = source or prompt_source(cfg, log)[0]
    instructions, sources = load_prompts(source)
    fit = stratified_sample(sources, cfg.fit_prompts, cfg.seed)
    seen = {normalized(instructions[i]) for i in fit}
    rest = [i for i, text in enumerate(instructions) if normalized(text) not in seen]
    if len(fit) < cfg.fit_prompts or len(rest) < cfg.bench_prompts:
        raise TreeoptError(f"{source} has only {len(instructions)} prompts ({len(rest)} besides the fit ones): "
                           f"lower --limit ({cfg.fit_prompts}) or --bench-prompts ({cfg.bench_prompts})")
    held = [rest[j] for j in stratified_sample([sources[i] for i in rest], cfg.bench_prompts, cfg.seed)]
    record = lambda i: {"instruction": instructions[i], **({"dataset": sources[i]} if sources[i] else {})}  # noqa: E731
    return [record(i) for i in fit], [record(i) for i in held]


@locking("out")
def run_demo(out: str | Path = layout.DEMO_DIR, config: DemoConfig | None = None,
             log: Callable[[str], None] = print, progress: bool = False) -> DemoResult:
    """Run (or resume) every stage of the demo into `out`; returns where the report is. `progress`
    shows progress bars on the long stages (calibrations, profile, bench)."""
    from treeopt.core.record import ACCURACY, CONTINUATIONS, META, RANKS
    from treeopt.decoding.models import set_threads

    cfg = config or DemoConfig()
    set_threads(cfg.threads)
    out = check_writable(out, directory=True, fix="pass another --output-dir")
    _check_inputs(cfg)
    old = _check_settings(out, cfg)
    stages: dict[str, float] = dict(old.get("stages", {}))
    result = DemoResult(out, out / layout.REPORT_HTML)
    t_start = time.perf_counter()

    def stage(name: str, settings: dict, inputs: list[Path], outputs: list[Path], fn):
        """Run `fn` unless its manifest says these settings made its outputs from these very inputs
        (sha256) and the outputs are still what it wrote; otherwise say why and redo it."""
        st = Stage(out / STAGES / name, {**settings, "inputs": {str(f.relative_to(out)): sha256_file(f) for f in inputs}},
                   what=f"demo {name} stage")
        if st.recorded() is None:
            log(f"[{name}] ...")
        else:
            why = st.mismatch() or st.why_not_done(OUTPUTS)
            if not why:
                log(f"[{name}] done already: skipped")
                result.stages[name] = 0.0
                return
            log(f"[{name}] redoing: {why}")
            st.clear()
        st.open()
        t0 = time.perf_counter()
        fn()
        st.finish(OUTPUTS, files=outputs)
        stages[name] = result.stages[name] = round(time.perf_counter() - t0, 2)
        log(f"[{name}] {stages[name]:.1f} s")
        _save(out, cfg, stages, old)

    fit_file, bench_file, source_file = out / layout.FIT_PROMPTS, out / layout.HELD_PROMPTS, out / layout.PROMPT_SOURCE
    cal_file, latency, tree_file = out / layout.CALIBRATION / META, out / layout.LATENCY, out / layout.TREE
    held_file = out / HELDOUT / META

    def prompts():
        source, note = prompt_source(cfg, log)
        fit, held = split_prompts(cfg, log, source)
        write_text(fit_file, json.dumps(fit, indent=1) + "\n")
        write_text(bench_file, json.dumps(held, indent=1) + "\n")
        write_text(source_file, json.dumps({"source": source, "note": note, "seed": cfg.seed,
                                                                "fit": len(fit), "held_out": len(held)}, indent=1) + "\n")

    c = _settings(cfg)
    model = {k: c[k] for k in ("model", "heads", "drafter", "device", "dtype") if k in c}
    stage("prompts", {k: c[k] for k in ("prompts", "seed", "fit_prompts", "bench_prompts")}, [],
          [fit_file, bench_file, source_file], prompts)
    calibration = {**model, "max_new_tokens": c["max_new_tokens"], "top_k": c["top_k"]}
    files = lambda d: [d / f for f in (RANKS, CONTINUATIONS, ACCURACY, META)]  # noqa: E731  a calibration's files
    stage("calibrate", calibration, [fit_file], files(cal_file.parent),
          lambda: _calibrate(cfg, fit_file, cal_file.parent, progress))
    stage("heldout", calibration, [bench_file], files(held_file.parent),
          lambda: _calibrate(cfg, bench_file, held_file.parent, progress))
    if cfg.profile_sizes:
        stage("profile", {**model, "sizes": c["profile_sizes"], "context": cfg.max_new_tokens + 64,
                          "compiled": c["compiled"]}, [cal_file], [latency, out / PROFILE_TREE],
              lambda: _profile(cfg, out, progress))
    stage("search", {"nodes": c["nodes"]}, [cal_file] + ([latency] if cfg.profile_sizes else []),
          [tree_file, out / layout.SWEEP], lambda: _search(cfg, out, log))
    stage("bench", {**model, "max_new_tokens": c["max_new_tokens"], "cartesian": c["cartesian"],
                    "published": c["published"], "chain": c["chain"], "compiled": c["compiled"]},
          [bench_file, cal_file, tree_file] + ([latency] if cfg.profile_sizes else []),
          [out / layout.BENCH, out / layout.BENCH_META], lambda: _bench(cfg, out, bench_file, log, progress))

    from treeopt.reports.report import write_report

    t0 = time.perf_counter()
    write_report(out)  # always: it only reads the stages' outputs
    stages["report"] = result.stages["report"] = round(time.perf_counter() - t0, 2)
    result.wall_s = round(time.perf_counter() - t_start, 2)
    _save(out, cfg, stages, old, wall_s=result.wall_s)
    log(f"report: {out / layout.REPORT_HTML} (and {out / layout.REPORT_MD})")
    return result


def machine() -> dict:
    """The machine the timings come from: CPU model, cores, torch threads, platform."""
    import os
    import platform

    import torch

    cpu = platform.processor()
    try:
        names = [l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                 if l.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""}


def _save(out: Path, cfg: DemoConfig, stages: dict, old: dict, wall_s: float | None = None):
    import torch

    doc = {"settings": _settings(cfg), "stages": stages, "threads": torch.get_num_threads(), "machine": machine(),
           "total_stage_s": round(sum(stages.values()), 2)}
    if wall_s is not None:
        doc["last_wall_s"] = wall_s
    write_text(out / DEMO, json.dumps(doc, indent=1) + "\n")


def _calibrate(cfg: DemoConfig, prompts: Path, out: Path, progress: bool):
    from treeopt.calibrate.run import calibrate

    calibrate(CalibrationConfig(out=out, model=cfg.model, heads=cfg.heads, drafter=cfg.drafter, prompts=str(prompts),
                                max_new_tokens=cfg.max_new_tokens, top_k=cfg.top_k, device=cfg.device,
                                dtype=cfg.dtype, progress=progress))


def _profile(cfg: DemoConfig, out: Path, progress: bool):
    """Time the searched tree's prefixes (the trees `--nodes auto` chooses among: a step's cost depends
    on the tree's shape, e.g. whether the heads fit in the verification product, not only on its size)."""
    from treeopt.decoding.profile import parse_sizes, run_profile
    from treeopt.search.api import search_report

    sizes = parse_sizes(cfg.profile_sizes)
    tree = search_report(out / layout.CALIBRATION, max(sizes), out=out / PROFILE_TREE)[0].tree
    run_profile(ProfileConfig(model=cfg.model, heads=cfg.heads, drafter=cfg.drafter, sizes=",".join(str(n) for n in sizes if n <= len(tree)),
                              context=cfg.max_new_tokens + 64, device=cfg.device, dtype=cfg.dtype,
                              out=out / layout.LATENCY, threads=cfg.threads, compiled=cfg.compiled,
                              tree=out / PROFILE_TREE), progress=progress)


def _search(cfg: DemoConfig, out: Path, log):
    from treeopt.search.api import search_report, sweep_report

    latency = out / layout.LATENCY if (out / layout.LATENCY).is_file() else None
    if cfg.nodes == "auto" and latency is None:
        raise TreeoptError("--nodes auto needs the latency profile: drop --profile-sizes '' or pass --nodes N")
    result, _, text = search_report(out / layout.CALIBRATION, cfg.nodes, latency=latency, out=out / layout.TREE)
    max_nodes = max(len(result.tree), 128)
    log(text)
    sweep_report(out / layout.CALIBRATION, max_nodes=max_nodes, latency=latency, out=out / layout.SWEEP)


def cartesian_specs(cfg: DemoConfig, calibration, nodes: int) -> list[str]:
    """The Cartesian baselines as bench specs ('3x2x2'): 'best' becomes the best one of at most `nodes` nodes."""
    from treeopt.search.baselines import best_cartesian

    specs = []
    for spec in cfg.cartesian:
        if spec == "best":
            ks = best_cartesian(calibration, nodes)
            spec = "x".join(map(str, ks)) if ks else ""
        if spec and spec not in specs:
            specs.append(spec)
    return specs


def bench_trees(cfg: DemoConfig, out: Path, calibration) -> list[str]:
    """Tree files for the bench, named as its table will show them, in OUT/trees/: each baseline (the
    Cartesian trees, Medusa's published trees cut to the calibration's heads (a 3-head run cannot
    draft 4 deep), the top-1 chain) after a searched tree of its node count (every prefix of one
    greedy search is the best tree of its size; none where the calibration holds no tree that large
    of nonzero value), smallest first; with the profile, also the tree `--nodes auto` picks for this
    machine (none where it picks plain decoding)."""
    from treeopt.search.grow import search
    from treeopt.core.tree import Tree, truncate
    from treeopt.core.treefile import read_tree, read_tree_meta, write_tree

    tree, meta = read_tree_meta(out / layout.TREE)
    baselines: dict[str, tuple[Tree, dict]] = {}
    for spec in cartesian_specs(cfg, calibration, len(tree)):
        baselines[f"cartesian-{spec}"] = (Tree.cartesian([int(k) for k in spec.split("x")]), {})
    for name in cfg.published:
        full = read_tree(name)
        cut = truncate(full, calibration.num_heads, full.max_rank)
        baselines[name] = (cut, {"source": f"published Medusa tree {name}",
                                 "note": "" if len(cut) == len(full) else f"cut to {calibration.num_heads} heads"})
    if cfg.chain:
        baselines[f"chain-{calibration.num_heads}"] = (Tree.chain(calibration.num_heads), {"source": "top-1 chain"})
    auto = None
    if (out / layout.LATENCY).is_file():  # what `treeopt search --nodes auto --latency` picks
        from treeopt.search.api import search_report

        auto = search_report(out / layout.CALIBRATION, "auto", latency=out / layout.LATENCY)[0].tree
    sizes = sorted({len(tree)} | {len(t) for t, _ in baselines.values()} | ({len(auto)} if auto else set()))
    found = search(calibration, max(sizes), meta.get("acceptance_model", DEFAULT_ACCEPTANCE_MODEL))
    files = []
    for n in sizes:
        if n == len(tree):
            files.append(write_tree(tree, out / layout.TREES / f"searched-{n}.json", **meta))
        elif auto and n == len(auto):
            files.append(write_tree(auto, out / layout.TREES / f"searched-{n}.json",
                                    source=f"--nodes auto on {calibration.directory} and {out / layout.LATENCY}"))
        elif n <= len(found.tree):  # a small calibration may hold no n-node tree of nonzero value
            files.append(write_tree(found.tree[:n], out / layout.TREES / f"searched-{n}.json",
                                    source=f"searched on {calibration.directory}"))
        files += [write_tree(t, out / layout.TREES / f"{name}.json", **m) for name, (t, m) in baselines.items() if len(t) == n]
    return [str(f) for f in files]


def _bench(cfg: DemoConfig, out: Path, bench_file: Path, log, progress: bool):
    from treeopt.reports.bench import render, run_bench
    from treeopt.core.record import load_calibration

    trees = bench_trees(cfg, out, load_calibration(out / layout.CALIBRATION))
    result = run_bench(BenchConfig(model=cfg.model, heads=cfg.heads, drafter=cfg.drafter, trees=tuple(trees), prompts=str(bench_file),
                                   first=None, max_new_tokens=cfg.max_new_tokens, device=cfg.device, dtype=cfg.dtype,
                                   calibration=str(out / layout.CALIBRATION), out=out / layout.BENCH_DIR,
                                   threads=cfg.threads, compiled=cfg.compiled), progress=progress)
    log(render(result))
