"""The `treeopt` command line. It only parses arguments and calls library functions."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import List, Optional

import typer

from treeopt.core.errors import FAILED_RUN, TreeoptError

app = typer.Typer(
    help="treeopt: calibrate Medusa heads, search the best speculative-decoding tree, decode and benchmark it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


ROOT = {"debug": False}  # the root options, set before every command


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error instead of one line.")):
    """treeopt: calibrate Medusa heads, search the best speculative-decoding tree, decode and benchmark it."""
    ROOT["debug"] = debug


def command(*args, **kwargs):
    """app.command whose every failure ends in one line on stderr (naming the file, the problem and the
    fix) and exit status 2 for bad input, 1 for a failed run; `treeopt --debug COMMAND` shows the traceback."""

    def register(fn):
        @functools.wraps(fn)
        def run(*a, **kw):
            try:
                return fn(*a, **kw)
            except KeyboardInterrupt:
                typer.echo("interrupted: run the same command again to resume", err=True)
                raise typer.Exit(130)
            except (typer.Exit, typer.Abort, typer.TyperException):  # typer's own: usage errors, exits
                raise
            except Exception as e:
                if ROOT["debug"]:
                    raise
                typer.echo(f"error: {one_line(e)}", err=True)
                raise typer.Exit(e.exit_code if isinstance(e, TreeoptError) else FAILED_RUN)

        return app.command(*args, **kwargs)(run)

    return register


def one_line(e: Exception) -> str:
    """A failure as one line: a TreeoptError says it all; an OSError names its file; anything else is a bug."""
    if isinstance(e, TreeoptError):
        return str(e)
    if isinstance(e, OSError):
        return f"{e.filename or 'a file'}: {e.strerror or e}: check that path (permissions, free space) and run again"
    return (f"unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
            "(a bug: run `treeopt --debug ...` for the traceback and report it)")


# Options shared by several commands: one name (and short flag) per idea everywhere.
ModelOpt = typer.Option("smollm2-135m", "--model", "-m", help="smollm2-135m (bundled), a local directory, or a Hugging Face id.")
HeadsOpt = typer.Option(None, "--heads", help="Medusa heads directory; default: the heads shipped for the bundled model; `random` for untrained ones.")
DeviceOpt = typer.Option("auto", "--device", help="cpu, cuda or auto.")
ThreadsOpt = typer.Option(None, "--threads", help="torch CPU threads; 1 is best on a machine shared with other jobs.")
DtypeOpt = typer.Option("auto", "--dtype", help="auto (bfloat16 where the device computes it natively, else float32), float32 (exact reference), bfloat16 or float16.")
CompileOpt = typer.Option(None, "--compile/--eager", help="torch.compile the decoding steps (default: on a CPU in bfloat16, the fast path; one graph for all tree sizes, a minute or two to compile, apart from the timings; eager when compiling fails, with a note).")
DeviceMapOpt = typer.Option(None, "--device-map", help="auto (or balanced, sequential): spread a large model over the GPUs with accelerate (--device is then unused).")
MaxMemoryOpt = typer.Option(None, "--max-memory", help="With --device-map: memory per device, e.g. 0=20GiB,1=20GiB,cpu=64GiB.")
PromptsOpt = typer.Option(None, "--prompts", "-p", help="Prompt source: alpaca_eval (hub, via `datasets`), a .json/.jsonl file with an `instruction` or `prompt` field, or a Hugging Face dataset id; default: ../shared/data/alpaca_eval.json if present, else alpaca_eval.")
CalibrationOpt = typer.Option(..., "--calibration", "-c", help="Calibration directory (from `treeopt calibrate`).")
AcceptanceModelOpt = typer.Option("smoothed", "--acceptance-model", help="How node acceptance is estimated from the calibration: smoothed (joint rank counts shrunk toward the product of accuracies, strength cross-validated; smoothed:S fixes it), empirical (joint rank counts) or independent (Medusa paper's product of accuracies).")
AcceptanceOpt = typer.Option("greedy", "--acceptance", help="The acceptance rule: greedy (lossless) or typical (Medusa's typical acceptance, temperature > 0).")
TemperatureOpt = typer.Option(0.7, "--temperature", help="typical: sampling temperature.")
ThresholdOpt = typer.Option(0.09, "--posterior-threshold", help="typical: epsilon, the hard threshold.")
AlphaOpt = typer.Option(0.3, "--posterior-alpha", help="typical: delta, the entropy-scaled threshold.")
PriorOpt = typer.Option(None, "--prior-calibration", help="typical: a greedy calibration of the same model and heads; the search shrinks the record's node gains toward its node values, strength cross-validated over the record's prompts.")
LatencyOpt = typer.Option(None, "--latency", help="Latency CSV (nodes,forward_ms) from `treeopt profile`: adds tokens/s.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars (they are also off when stderr is not a terminal).")
EngineOpt = typer.Option("treeopt", "--engine", help="treeopt (its own decoder) or vllm (vLLM >= 0.32 in its own environment, driven as a subprocess; see --vllm-python).")
VllmPythonOpt = typer.Option(None, "--vllm-python", help="--engine vllm: the python of vLLM's environment (default $TREEOPT_VLLM_PYTHON, else .venv-vllm/bin/python beside the checkout, from `scripts/setup.sh --vllm`).")
ChainsOpt = typer.Option("1,2,3,4", "--chains", help="--engine vllm: chain lengths k to run (vLLM drafts each head's top-1, k tokens); plain vLLM (k = 0) always runs.")


def _progress(quiet: bool) -> bool:
    """Progress bars on long stages: on a terminal, unless --quiet."""
    return not quiet and sys.stderr.isatty()


@command()
def info(
    model: str = ModelOpt,
    heads: Optional[str] = HeadsOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
):
    """Print the model, the heads, the device and library versions."""
    from treeopt.info import describe

    typer.echo(describe(model=model, heads=heads, device=device, dtype=dtype))


# --- train-heads (treeopt.training.train) ---


@command("train-heads")
def train_heads_cmd(
    work: Path = typer.Option(..., "--work", help="Directory for data shards, checkpoints and the report; re-run the same command to resume."),
    heads_out: Optional[Path] = typer.Option(None, "--heads-out", help="Where to save the trained heads (Medusa layout)."),
    prompts: str = typer.Option("magpie", "--prompts", "-p", help="`magpie` (user turns sampled from the model itself), a .json/.jsonl file with an `instruction` or `prompt` field, or a Hugging Face dataset id."),
    num_prompts: int = typer.Option(2000, "--num-prompts", help="Sequences to generate (magpie: an upper bound, duplicates are dropped)."),
    max_new_tokens: int = typer.Option(192, "--max-new-tokens", help="Greedy continuation length per prompt."),
    batch_size: int = typer.Option(48, "--batch-size", help="Sequences per generation batch (= one shard)."),
    magpie_max_tokens: int = typer.Option(64, "--magpie-max-tokens", help="Longest sampled instruction (longer ones are dropped)."),
    num_heads: int = typer.Option(4, "--num-heads"),
    num_layers: int = typer.Option(1, "--num-layers", help="ResBlocks per head."),
    epochs: float = typer.Option(2.0, "--epochs"),
    lr: float = typer.Option(1e-3, "--lr"),
    batch_tokens: int = typer.Option(2048, "--batch-tokens", help="Hidden rows per optimizer step."),
    distill: float = typer.Option(0.5, "--distill", help="Weight of the KL to the base model's distribution (0: hard targets only)."),
    full_vocab: bool = typer.Option(False, "--full-vocab", help="Softmax over the whole vocabulary (default: over the tokens the data holds, several times faster)."),
    eval_prompts: int = typer.Option(40, "--eval-prompts", help="AlpacaEval prompts for the report's held-out metric (evaluation only; 0 skips)."),
    seed: int = typer.Option(0, "--seed"),
    stage: str = typer.Option("all", "--stage", help="all, data (generate shards only) or train (train on the shards there are)."),
    max_gen_minutes: Optional[float] = typer.Option(None, "--max-gen-minutes", help="Stop generating after this long (re-run to continue)."),
    max_train_minutes: Optional[float] = typer.Option(None, "--max-train-minutes", help="Stop training after this long, checkpointed (re-run to continue)."),
    model: str = ModelOpt,
    device: str = DeviceOpt,
    quiet: bool = QuietOpt,
):
    """Train Medusa-1 heads (backbone frozen) on the model's own greedy continuations, and save them."""
    from treeopt.training.train import TrainConfig, train_heads

    cfg = TrainConfig(work=str(work), heads_out=str(heads_out) if heads_out else None, model=model, prompts=prompts,
                      num_prompts=num_prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                      magpie_max_tokens=magpie_max_tokens, num_heads=num_heads, num_layers=num_layers, epochs=epochs,
                      lr=lr, batch_tokens=batch_tokens, distill=distill, full_vocab=full_vocab, seed=seed,
                      device=device, eval_prompts=eval_prompts,
                      max_gen_s=None if max_gen_minutes is None else max_gen_minutes * 60,
                      max_train_s=None if max_train_minutes is None else max_train_minutes * 60)
    train_heads(cfg, stage=stage, log=lambda s: typer.echo(s, err=True), progress=_progress(quiet))


# --- calibrate (calibrate/) ---
@command()
def calibrate(
    model: str = ModelOpt,
    heads: Optional[str] = HeadsOpt,
    prompts: Optional[str] = PromptsOpt,
    teacher_forced: Optional[str] = typer.Option(None, "--teacher-forced", help="Chat data (ShareGPT `conversations` or OpenAI `messages`; .json/.jsonl or a Hugging Face dataset id): rank the heads on its assistant turns in one forward per conversation, instead of generating from --prompts."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use N prompts drawn at random across the prompt file's sources (its `dataset` or `source` field; seeded by --seed); teacher-forced: the first N conversations."),
    first: Optional[int] = typer.Option(None, "--first", help="Use the first N prompts (conversations), in file order (instead of --limit)."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Greedy continuation length cap (stops earlier at EOS); teacher-forced: the cap on each assistant turn."),
    top_k: int = typer.Option(10, "--top-k", help="Ranks >= top-k are recorded as a miss."),
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts per generation batch (1: exactly unbatched greedy); teacher-forced: at most that many sequences per forward, batched by length."),
    shard_size: int = typer.Option(32, "--shard-size", help="Prompts per resumable shard (rounded up to whole batches)."),
    seed: int = typer.Option(0, "--seed", help="typical: the seed of the sampled roots."),
    out: Path = typer.Option(Path("calibration"), "--out", "-o", help="Output directory; rerun the same command to resume."),
    acceptance: str = AcceptanceOpt,
    temperature: float = TemperatureOpt,
    posterior_threshold: float = ThresholdOpt,
    posterior_alpha: float = AlphaOpt,
    probe: Optional[str] = typer.Option(None, "--probe", help="typical: the probe's internal nodes (a tree spec; each gets all its top-k children); default top-4 x top-2 x top-1."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
    quiet: bool = QuietOpt,
):
    """Record where every head ranks the base model's greedy tokens (ranks.parquet, accuracy.csv, ...);
    with --acceptance typical, every probe node's typical test in each step of a seeded decode with
    the probe tree (typical.parquet)."""
    from treeopt.core.record import load_calibration
    from treeopt.calibrate.run import CalibrationConfig, calibrate as generated
    from treeopt.calibrate.teacher import calibrate_teacher_forced

    run_calibration = calibrate_teacher_forced if teacher_forced else generated
    config = CalibrationConfig(out=out, model=model, heads=heads, prompts=prompts, teacher_forced=teacher_forced,
                               limit=limit, first=first,
                               max_new_tokens=max_new_tokens, top_k=top_k, batch_size=batch_size,
                               shard_size=shard_size, seed=seed, device=device, dtype=dtype, device_map=device_map,
                               max_memory=max_memory, progress=_progress(quiet))
    if acceptance != "greedy":
        from treeopt.calibrate.typical import calibrate_typical
        from treeopt.decoding.decoder import Acceptance
        from treeopt.core.treefile import read_tree

        rule = Acceptance(acceptance, temperature, posterior_threshold, posterior_alpha, seed)
        path = calibrate_typical(config, rule, read_tree(probe) if probe else None)
        typer.echo(f"wrote {path}: typical acceptance record (typical.parquet, calibration.json)")
        return
    cal = load_calibration(run_calibration(config))
    top = ", ".join(f"head {k + 1} {a:.3f}" for k, a in enumerate(cal.accuracy.sum(1)))
    typer.echo(f"wrote {out}: {cal.meta['num_prompts']} {'assistant turns' if teacher_forced else 'prompts'}, "
               f"{cal.num_positions} positions, "
               f"{cal.meta['tokens_per_s']:.1f} tok/s; top-{cal.top_k} accuracy: {top}")



# --- search, evaluate, sweep (search/) ---


@command()
def search(
    calibration: Path = CalibrationOpt,
    nodes: str = typer.Option("64", "--nodes", "-n", help="Tree size (root excluded), or `auto` (needs --latency)."),
    acceptance_model: str = AcceptanceModelOpt,
    latency: Optional[Path] = LatencyOpt,
    max_depth: Optional[int] = typer.Option(None, "--max-depth", help="Deepest path (default: number of heads)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Highest rank + 1 per head (default: the calibration's top-k)."),
    max_nodes: int = typer.Option(256, "--max-nodes", help="Largest size --nodes auto considers."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Tree file to write (.json, .py, .txt)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="json, python (Medusa's medusa_choices = [...]), trtllm (the --medusa_choices string of TensorRT-LLM's TensorRT-engine Medusa path, for releases before that backend's removal, NVIDIA/TensorRT-LLM#15918), vllm (vLLM >= 0.32's --speculative-config: a top-1 chain of k tokens) or chain (top-1 chain length); default from the suffix."),
    target: Optional[str] = typer.Option(None, "--target", help="Search within a consumer's rules: medusa, trtllm (TensorRT-LLM's engine backend, releases before NVIDIA/TensorRT-LLM#15918), vllm (>= 0.32: a top-1 chain) or chain (see the README's 'Deploying a tree')."),
    batch_size: int = typer.Option(1, "--batch-size", help="Sequences decoded together: --latency's rows for that batch size (`treeopt profile --batch-sizes`)."),
    batch_sizes: Optional[str] = typer.Option(None, "--batch-sizes", help="e.g. 1,4,16,64: a schedule, the best tree at each batch size (needs --latency; -o writes one JSON file)."),
    acceptance: str = AcceptanceOpt,
    prior: Optional[Path] = PriorOpt,
    engine: str = EngineOpt,
):
    """Search the tree that maximizes expected tokens/step; compare it with the baselines.
    --engine vllm: the chain length of best vLLM throughput per batch size (needs --latency from
    `treeopt profile --engine vllm`), written as vLLM's --speculative-config JSON."""
    from treeopt.search.api import schedule_report, search_report

    if engine == "vllm":
        _vllm_search(calibration, latency, batch_sizes, batch_size, out, acceptance_model, fmt, target, nodes)
        return
    _treeopt_engine(engine)

    if batch_sizes is not None:
        if latency is None:
            raise TreeoptError("--batch-sizes needs --latency FILE profiled at those batch sizes "
                               "(`treeopt profile --batch-sizes 1,4,16`)")
        if not all(b.strip().isdigit() for b in batch_sizes.split(",")):
            raise TreeoptError(f"--batch-sizes {batch_sizes!r}: give comma-separated integers, e.g. 1,4,16,64")
        sizes = [int(b) for b in batch_sizes.split(",")]
        typer.echo(schedule_report(calibration, latency, sizes, acceptance_model, max_depth, top_k, max_nodes, out)[1])
        return
    typer.echo(search_report(calibration, nodes, acceptance_model, max_depth, top_k, latency, max_nodes, out, fmt,
                             batch_size, target, acceptance, prior)[2])


@command()
def export(
    tree: str = typer.Argument(..., help="Tree file (.json, .py, .py:NAME, .txt), published name (mc_sim_7b_63) or '[[0], [0, 0]]'."),
    out: Path = typer.Option(..., "--out", "-o", help="File to write."),
    fmt: Optional[str] = typer.Option(None, "--format", help="json, python (Medusa), trtllm (TensorRT-LLM's engine backend, releases before NVIDIA/TensorRT-LLM#15918), vllm (vLLM >= 0.32: a top-1 chain) or chain; default from the suffix."),
    target: Optional[str] = typer.Option(None, "--target", help="Also check this consumer's rules: medusa, trtllm (releases before NVIDIA/TensorRT-LLM#15918), vllm (>= 0.32) or chain."),
):
    """Write a tree for a consumer, after checking that consumer's rules (one line naming a broken rule)."""
    from treeopt.search.api import export_report

    typer.echo(export_report(tree, out, fmt, target))


@command("export-heads")
def export_heads_cmd(
    heads: str = typer.Argument(..., help="Medusa heads treeopt loads: a directory (Medusa's medusa_lm_head.pt or .safetensors, own or shared lm_head) or `default` (the heads shipped for the bundled model)."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write."),
    fmt: str = typer.Option("vllm", "--format", help="vllm: the checkpoint vLLM's Medusa drafter loads (vLLM >= 0.32: `--speculative-config '{\"method\": \"medusa\", \"model\": OUT, \"num_speculative_tokens\": k}'`)."),
    model: str = ModelOpt,
):
    """Write heads for a serving engine, then check the written weights give the heads' own top-k."""
    from treeopt.decoding.heads import export_heads

    if fmt != "vllm":
        raise TreeoptError(f"--format {fmt!r}: export-heads writes vllm")
    typer.echo(export_heads(heads, out, model))


@command()
def evaluate(
    trees: List[str] = typer.Argument(..., help="Tree files (.json, .py, .py:NAME, .txt), published names (mc_sim_7b_63) or '[[0], [0, 0]]'."),
    calibration: Path = CalibrationOpt,
    acceptance_model: str = AcceptanceModelOpt,
    split: Optional[float] = typer.Option(None, "--split", help="Fit on this fraction of prompts, replay on the rest (e.g. 0.8)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the prompt split."),
    latency: Optional[Path] = LatencyOpt,
    acceptance: str = AcceptanceOpt,
    prior: Optional[Path] = PriorOpt,
):
    """Replay trees on a calibration (exact greedy Medusa decoding) next to the baselines."""
    from treeopt.search.api import evaluate_report

    typer.echo(evaluate_report(trees, calibration, acceptance_model, split, seed, latency, acceptance=acceptance,
                               prior=prior)[1])


@command()
def sweep(
    calibration: Path = CalibrationOpt,
    max_nodes: int = typer.Option(256, "--max-nodes", help="Largest tree size."),
    acceptance_model: str = AcceptanceModelOpt,
    latency: Optional[Path] = LatencyOpt,
    max_depth: Optional[int] = typer.Option(None, "--max-depth", help="Deepest path (default: number of heads)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Highest rank + 1 per head."),
    replayed: bool = typer.Option(False, "--replay", help="Also replay every size (slower)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="CSV to write."),
    acceptance: str = AcceptanceOpt,
    prior: Optional[Path] = PriorOpt,
    engine: str = EngineOpt,
    batch_sizes: Optional[str] = typer.Option(None, "--batch-sizes", help="--engine vllm: the batch sizes of --latency to size (default: all of them)."),
):
    """Predicted tokens/step (and tokens/s with --latency) of the best tree of every size 0..N.
    --engine vllm: predicted vLLM tokens/s of every chain length at each batch size of --latency."""
    from treeopt.search.api import sweep_report

    if engine == "vllm":
        _vllm_search(calibration, latency, batch_sizes, None, out, acceptance_model, None, None, None, sweep=True)
        return
    _treeopt_engine(engine)

    typer.echo(sweep_report(calibration, max_nodes, acceptance_model, latency, max_depth, top_k, replayed, out,
                            acceptance=acceptance, prior=prior)[1])


def _treeopt_engine(engine: str) -> None:
    if engine not in ("treeopt", "vllm"):
        raise TreeoptError(f"--engine {engine!r}: use treeopt or vllm")


def _sizes(text: Optional[str], option: str) -> Optional[List[int]]:
    if text is None:
        return None
    if not all(b.strip().isdigit() for b in text.split(",")):
        raise TreeoptError(f"{option} {text!r}: give comma-separated integers, e.g. 1,4,16")
    return [int(b) for b in text.split(",")]


def _vllm_search(calibration, latency, batch_sizes, batch_size, out, acceptance_model, fmt, target, nodes,
                 sweep: bool = False) -> None:
    """search/sweep --engine vllm: options that size trees for treeopt's engine are refused."""
    from treeopt.search.api import vllm_schedule_report

    if latency is None:
        raise TreeoptError("--engine vllm needs --latency FILE from `treeopt profile --engine vllm`")
    for name, value, default in (("--format", fmt, None), ("--target", target, None), ("--nodes", nodes, "64")):
        if value is not None and value != default:
            raise TreeoptError(f"{name} sizes a tree for treeopt's engine; --engine vllm chooses the chain length itself")
    sizes = _sizes(batch_sizes, "--batch-sizes") or ([batch_size] if batch_size not in (None, 1) else None)
    typer.echo(vllm_schedule_report(calibration, latency, sizes, acceptance_model, out, sweep=sweep)[1])



# --- decode, bench, profile (decoding/) ---


@command()
def decode(
    instruction: str = typer.Argument(..., help="The user turn to answer."),
    tree: Optional[str] = typer.Option(None, "--tree", "-t", help="Tree: a .json/.py/.txt tree file, a published name or '[[0], [0, 0]]'; none: plain decoding."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
    acceptance: str = AcceptanceOpt,
    temperature: float = TemperatureOpt,
    posterior_threshold: float = ThresholdOpt,
    posterior_alpha: float = AlphaOpt,
    seed: int = typer.Option(0, "--seed", help="typical: the sampling seed."),
    model: str = ModelOpt,
    heads: Optional[str] = HeadsOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    compiled: Optional[bool] = CompileOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
):
    """Answer one instruction with Medusa tree decoding; print the reply and tokens/step."""
    from treeopt.decoding.decoder import Acceptance, run_decode

    rule = Acceptance(acceptance, temperature, posterior_threshold, posterior_alpha, seed)
    text, r = run_decode(instruction, tree, model, heads, max_new_tokens, rule, device, dtype, compiled, device_map,
                         max_memory)
    typer.echo(text)
    typer.echo(f"{len(r.tokens)} tokens in {r.steps} steps: {r.tokens_per_step:.2f} tokens/step, "
               f"{len(r.tokens) / max(r.decode_s, 1e-9):.1f} tokens/s decoding, prefill {r.prefill_s * 1e3:.0f} ms", err=True)


@command()
def bench(
    trees: Optional[List[str]] = typer.Option(None, "--trees", "--tree", "-t", help="Tree to benchmark (repeat the option for more): a tree file, a published name or '[[0], [0, 0]]'."),
    cartesian: Optional[List[str]] = typer.Option(None, "--cartesian", help="Cartesian trees, top-k per depth: 2x3,3x2x2."),
    prompts: Optional[str] = PromptsOpt,
    limit: Optional[int] = typer.Option(20, "--limit", help="Prompts to use (the first N)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
    calibration: Optional[Path] = typer.Option(None, "--calibration", "-c", help="Calibration directory: adds predicted tokens/step."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Directory for bench.csv and bench.json (re-run to resume)."),
    repeats: int = typer.Option(5, "--repeats", help="Timed forwards per tree size for forward_ms."),
    threads: Optional[int] = ThreadsOpt,
    acceptance: str = AcceptanceOpt,
    temperature: float = TemperatureOpt,
    posterior_threshold: float = ThresholdOpt,
    posterior_alpha: float = AlphaOpt,
    seed: int = typer.Option(0, "--seed", help="typical: the sampling seed (the same seed gives the same numbers)."),
    model: str = ModelOpt,
    heads: Optional[str] = HeadsOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    compiled: Optional[bool] = CompileOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
    quiet: bool = QuietOpt,
    engine: str = EngineOpt,
    chains: str = ChainsOpt,
    batch_sizes: Optional[str] = typer.Option(None, "--batch-sizes", help="--engine vllm: concurrent requests, comma-separated (e.g. 1,4,16); default 1."),
    vllm_python: Optional[Path] = VllmPythonOpt,
):
    """Plain greedy vs tree decoding on the same prompts: tokens/step, overhead, speedup, lossless match.
    --engine vllm: plain vLLM vs vLLM with the heads at each --chains length and --batch-sizes."""
    from treeopt.decoding.decoder import Acceptance
    from treeopt.reports.bench import render, run_bench

    if engine == "vllm":
        from treeopt.reports.vllm_bench import bench_vllm, render_vllm_bench

        refused = [n for n, v in (("--trees", trees), ("--cartesian", cartesian), ("--device-map", device_map),
                                  ("--threads", threads), ("--max-memory", max_memory)) if v]
        if refused or acceptance != "greedy" or device not in ("auto", "cpu"):
            raise TreeoptError(f"--engine vllm runs greedy top-1 chains on this CPU: drop {', '.join(refused) or '--acceptance/--device'} (chain lengths: --chains)")
        df = bench_vllm(model=model, heads=heads, prompts=prompts, limit=limit, max_new_tokens=max_new_tokens,
                        chains=_sizes(chains, "--chains"), batch_sizes=_sizes(batch_sizes, "--batch-sizes") or [1],
                        calibration=calibration, out=out or Path("bench-vllm"), python=vllm_python, dtype=dtype,
                        eager=compiled is not True, log=lambda m: typer.echo(m, err=True))
        typer.echo(render_vllm_bench(df))
        return
    _treeopt_engine(engine)

    rule = Acceptance(acceptance, temperature, posterior_threshold, posterior_alpha, seed)
    result = run_bench(model=model, heads=heads, trees=trees or (), cartesian=cartesian or (), prompts=prompts,
                       limit=limit, max_new_tokens=max_new_tokens, device=device, dtype=dtype,
                       calibration=str(calibration) if calibration else None, out=out, repeats=repeats,
                       progress=_progress(quiet), threads=threads, compiled=compiled, device_map=device_map,
                       max_memory=max_memory, acceptance=rule)
    typer.echo(render(result))
    if out is not None:
        typer.echo(f"wrote {out / 'bench.csv'} and {out / 'bench.json'}", err=True)


@command()
def profile(
    out: Path = typer.Option(Path("latency.csv"), "--out", "-o", help="CSV to write (what `search --nodes auto --latency` reads)."),
    sizes: Optional[str] = typer.Option(None, "--sizes", help="Tree sizes, comma-separated; default 0,1,2,4,8,16,24,32,48,64,96,128,192,256."),
    batch_sizes: Optional[str] = typer.Option(None, "--batch-sizes", help="Sequences per forward, comma-separated (e.g. 1,4,16): one set of rows each; default 1."),
    context: int = typer.Option(256, "--context", help="Tokens already in the KV cache."),
    repeats: int = typer.Option(5, "--repeats", help="Timed forwards per size (the median is kept)."),
    tree: Optional[str] = typer.Option(None, "--tree", "-t", help="Time this tree's first N nodes at each size N (e.g. `search -n 64`'s tree: the shapes `--nodes auto` chooses among; default sizes: those it holds); default: balanced trees."),
    threads: Optional[int] = ThreadsOpt,
    model: str = ModelOpt,
    heads: Optional[str] = HeadsOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    compiled: Optional[bool] = CompileOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
    quiet: bool = QuietOpt,
    engine: str = EngineOpt,
    chains: str = typer.Option("0,1,2,3,4", "--chains", help="--engine vllm: chain lengths k to time (0: plain)."),
    new_tokens: int = typer.Option(32, "--new-tokens", help="--engine vllm: tokens generated per request per timing."),
    prompts: Optional[str] = typer.Option(None, "--prompts", "-p", help="--engine vllm: time on these instructions (chat template; real acceptance) instead of random-token prompts of --context tokens."),
    limit: Optional[int] = typer.Option(None, "--limit", help="--engine vllm with --prompts: the first N."),
    vllm_python: Optional[Path] = VllmPythonOpt,
):
    """Time one decoding step vs tree size on this device, beside the machine's roofline, into a CSV.
    --engine vllm: vLLM's time per step and per token, plain and with a k-token chain, per batch size."""
    from treeopt.decoding.profile import render_profile, run_profile

    if engine == "vllm":
        from treeopt.decoding.vllm_engine import profile_vllm, render_vllm_profile

        refused = [n for n, v in (("--sizes", sizes), ("--tree", tree), ("--device-map", device_map),
                                  ("--threads", threads), ("--max-memory", max_memory)) if v]
        if refused:
            raise TreeoptError(f"{', '.join(refused)}: not for --engine vllm (it times chains: --chains)")
        df = profile_vllm(model=model, heads=heads, chains=_sizes(chains, "--chains"),
                          batch_sizes=_sizes(batch_sizes, "--batch-sizes") or [1], context=context,
                          new_tokens=new_tokens, python=vllm_python, out=out, dtype=dtype, eager=compiled is not True,
                          prompts=prompts, limit=limit, log=lambda m: typer.echo(m, err=True))
        typer.echo(render_vllm_profile(df))
        typer.echo(f"wrote {out}", err=True)
        return
    _treeopt_engine(engine)
    if prompts is not None or limit is not None:
        raise TreeoptError("--prompts/--limit: only with --engine vllm (treeopt's profile times random contexts)")

    df = run_profile(model=model, heads=heads, sizes=sizes, context=context, repeats=repeats, device=device,
                     dtype=dtype, out=out, progress=_progress(quiet), threads=threads, device_map=device_map,
                     max_memory=max_memory, batch_sizes=batch_sizes, compiled=compiled, tree=tree)
    typer.echo(render_profile(df))
    typer.echo(f"wrote {out}", err=True)


# --- plot, report, demo (reports/) ---


@command()
def plot(
    tree: str = typer.Argument(..., help="Tree: a .json/.py/.txt tree file, a published name (mc_sim_7b_63) or '[[0], [0, 0]]'."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", "-c", help="Calibration directory: colour nodes by acceptance probability."),
    out: Path = typer.Option(Path("tree.png"), "--out", "-o", help="Picture to write: .png or .svg."),
    acceptance_model: str = AcceptanceModelOpt,
):
    """Draw a tree: one level per head, nodes labelled by rank, coloured by acceptance probability."""
    from treeopt.reports.plots import draw_tree

    typer.echo(draw_tree(tree, out, calibration=calibration, model=acceptance_model))


@command()
def report(
    run_dir: Path = typer.Argument(..., help="Run directory (e.g. the --out of `treeopt demo`)."),
):
    """Write RUN_DIR/report.md and a self-contained RUN_DIR/report.html with the run's tables and charts."""
    from treeopt.reports.report import write_report

    md, page = write_report(run_dir)
    typer.echo(f"wrote {md}\nwrote {page}")


@command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Run directory (re-running resumes it)."),
    limit: int = typer.Option(24, "--limit", help="Prompts to calibrate on, drawn at random across the prompt file's sources (seeded by --seed)."),
    bench_prompts: int = typer.Option(8, "--bench-prompts", help="Held-out prompts to benchmark on, drawn the same way among the others."),
    seed: int = typer.Option(0, "--seed", help="Seed of the prompt draw."),
    max_new_tokens: int = typer.Option(96, "--max-new-tokens", help="New tokens per prompt (calibration and bench)."),
    nodes: str = typer.Option("16", "--nodes", help="Size of the searched tree (16 keeps a CPU demo short; 64 on a GPU), or `auto`: the size of best predicted tokens/s on this machine (uses the profile)."),
    top_k: int = typer.Option(10, "--top-k", help="Ranks per head recorded by the calibration."),
    cartesian: str = typer.Option("best", "--cartesian", help="Cartesian baselines: `best` (the best one as large as the searched tree) and/or e.g. 2x3; each is benched beside a searched tree of its size."),
    published: str = typer.Option("mc_sim_7b_63", "--published", help="Medusa's published trees to bench (beside a searched tree of their size), comma-separated; '' for none."),
    chain: bool = typer.Option(True, "--chain/--no-chain", help="Bench the top-1 chain (what vLLM and TGI draft) beside a searched tree of its size."),
    profile_sizes: str = typer.Option("0,1,2,4,8,16,32,64", "--profile-sizes", help="Tree sizes to time (latency.csv); '' to skip."),
    prompts: Optional[str] = PromptsOpt,
    model: str = ModelOpt,
    heads: Optional[str] = HeadsOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    compiled: Optional[bool] = CompileOpt,
    threads: Optional[int] = ThreadsOpt,
    quiet: bool = QuietOpt,
):
    """The main job, small: calibrate on a random sample of AlpacaEval, search the tree, bench each baseline
    (Cartesian, published, chain) beside a searched tree of its size on held-out prompts, write the report."""
    from treeopt.demo import DemoConfig, run_demo

    split = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())  # noqa: E731
    if nodes != "auto" and not nodes.isdigit():
        raise TreeoptError(f"--nodes {nodes!r}: pass a number of nodes, e.g. 64, or auto")
    config = DemoConfig(model=model, heads=heads, prompts=prompts, seed=seed, fit_prompts=limit,
                        bench_prompts=bench_prompts, max_new_tokens=max_new_tokens, top_k=top_k,
                        nodes=nodes if nodes == "auto" else int(nodes),
                        cartesian=split(cartesian), published=split(published), chain=chain,
                        profile_sizes=profile_sizes, device=device, dtype=dtype, compiled=compiled, threads=threads)
    run_demo(out, config, log=typer.echo, progress=_progress(quiet))


def main():
    app()


if __name__ == "__main__":
    main()
