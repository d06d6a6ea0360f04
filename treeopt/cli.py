"""The `treeopt` command line. It only parses arguments and calls library functions.

Every command's settings are one dataclass (treeopt.core.settings, CalibrationConfig, TrainConfig,
DemoConfig): each option reads its default from the field of the same name (`opt`), and the dataclass
checks every number and combination before any model loads or any file is written."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import List, Optional

import typer
import typer.core

from treeopt.core import layout
from treeopt.core.errors import BAD_INPUT, FAILED_RUN, TreeoptError
from treeopt.core.settings import (BenchConfig, CalibrationConfig, DecodeConfig, EngineChoice, EngineSettings,
                                   EvaluateConfig, ExportConfig, ExportHeadsConfig, ModelSettings, PlotConfig,
                                   ProfileConfig, RuleSettings, SearchConfig, SearchSettings, SweepConfig,
                                   VllmSettings, default)
from treeopt.demo import DemoConfig
from treeopt.training.config import DrafterTrainConfig, TrainConfig


_click = getattr(typer.core, "_click", None)  # the click typer runs on (typer >= 0.29 vendors its own)
if _click is None:  # pragma: no cover  older typer: the click package
    import click as _click


_NoArgsIsHelp = getattr(_click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2 (older: a UsageError)


class _Group(typer.core.TyperGroup):
    """Typer's group whose usage errors (a bad number, an unknown option) are one `error:` line, exit 2,
    like every other bad input (not a boxed panel)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NoArgsIsHelp as e:
            typer.echo(e.ctx.get_help() if e.ctx else str(e))
            rv = 0
        except _click.exceptions.UsageError as e:
            name = e.ctx.info_name if e.ctx and e.ctx.parent else next(
                (a for a in (sys.argv[1:] if args is None else args) if a in self.commands), None)
            typer.echo(f"error: {e.format_message()} (see `treeopt {name + ' ' if name else ''}--help`)", err=True)
            rv = BAD_INPUT
        except _click.exceptions.ClickException as e:
            typer.echo(f"error: {e.format_message()}", err=True)
            rv = e.exit_code
        except typer.Abort:
            typer.echo("aborted", err=True)
            rv = FAILED_RUN
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_Group,
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


def command(*args, resumable: bool = False, **kwargs):
    """app.command whose every failure ends in one line on stderr (naming the file, the problem and the
    fix) and exit status 2 for bad input, 1 for a failed run; `treeopt --debug COMMAND` shows the traceback.
    `resumable`: an interrupted run of it resumes when run again (and says so)."""

    def register(fn):
        @functools.wraps(fn)
        def run(*a, **kw):
            try:
                return fn(*a, **kw)
            except KeyboardInterrupt:
                typer.echo("interrupted: run the same command again to resume" if resumable else "interrupted",
                           err=True)
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


def opt(config, name: str, *flags: str, **kw):
    """typer.Option for field `name` of `config`, its default read from the field (one definition)."""
    value = default(config, name)
    return typer.Option(None if value == () else value, *flags, **kw)


def joined(config, name: str, *flags: str, **kw):
    """typer.Option for a tuple field given as one comma-separated string ('' for none)."""
    return typer.Option(",".join(default(config, name)), *flags, **kw)


def settings(config, given: dict, **extra):
    """`config` built from the command's arguments of the same names (the rest are the CLI's own)."""
    from dataclasses import fields

    names = {f.name for f in fields(config)}
    values = {k: (tuple(v) if isinstance(v, list) else () if v is None and default(config, k) == () else v)
              for k, v in given.items() if k in names}
    return config(**values, **extra)


# Options shared by several commands: one name (and short flag) per idea everywhere.
ModelOpt = opt(ModelSettings, "model", "--model", "-m", help="smollm2-135m (bundled), a local directory, or a Hugging Face id.")
DrafterOpt = opt(CalibrationConfig, "drafter", "--drafter", help="What drafts: heads (--heads), ngram[:MIN-MAX] (vLLM's prompt lookup, chains only), draft:MODEL (a causal LM sharing the tokenizer) or eagle3[:DIR] (an EAGLE-3 drafter; default: the one shipped for the bundled model).")
HeadsOpt = opt(ModelSettings, "heads", "--heads", help="Medusa heads directory; default: the heads shipped for the bundled model; `random` for untrained ones.")
DeviceOpt = opt(ModelSettings, "device", "--device", help="cpu, cuda or auto.")
DtypeOpt = opt(ModelSettings, "dtype", "--dtype", help="auto (bfloat16 where the device computes it natively, else float32), float32 (exact reference), bfloat16 or float16.")
ThreadsOpt = opt(EngineSettings, "threads", "--threads", help="torch CPU threads; 1 is best on a machine shared with other jobs.")
CompileOpt = opt(EngineSettings, "compiled", "--compile/--eager", help="torch.compile the decoding steps (default: on a CPU in bfloat16, the fast path; one graph for all tree sizes, a minute or two to compile, apart from the timings; eager when compiling fails, with a note).")
DeviceMapOpt = opt(EngineSettings, "device_map", "--device-map", help="auto (or balanced, sequential): spread a large model over the GPUs with accelerate (--device is then unused).")
MaxMemoryOpt = opt(EngineSettings, "max_memory", "--max-memory", help="With --device-map: memory per device, e.g. 0=20GiB,1=20GiB,cpu=64GiB.")
PromptsOpt = typer.Option(None, "--prompts", "-p", help="Prompt source: alpaca_eval (hub, via `datasets`), a .json/.jsonl file with an `instruction` or `prompt` field, or a Hugging Face dataset id; default: ../shared/data/alpaca_eval.json if present, else alpaca_eval.")
CalibrationOpt = opt(SearchSettings, "calibration", "--calibration", "-c", help="Calibration directory (from `treeopt calibrate`).")
AcceptanceModelOpt = opt(SearchSettings, "acceptance_model", "--acceptance-model", help="How node acceptance is estimated from the calibration: smoothed (joint rank counts shrunk toward the product of accuracies, strength cross-validated; smoothed:S fixes it), empirical (joint rank counts) or independent (Medusa paper's product of accuracies).")
AcceptanceOpt = opt(RuleSettings, "acceptance", "--acceptance", help="The acceptance rule: greedy (lossless) or typical (Medusa's typical acceptance, temperature > 0).")
TemperatureOpt = opt(RuleSettings, "temperature", "--temperature", help="typical: sampling temperature.")
ThresholdOpt = opt(RuleSettings, "posterior_threshold", "--posterior-threshold", help="typical: epsilon, the hard threshold.")
AlphaOpt = opt(RuleSettings, "posterior_alpha", "--posterior-alpha", help="typical: delta, the entropy-scaled threshold.")
PriorOpt = opt(SearchSettings, "prior", "--prior-calibration", help="typical: a greedy calibration of the same model and heads; the search shrinks the record's node gains toward its node values, strength cross-validated over the record's prompts.")
LatencyOpt = opt(SearchSettings, "latency", "--latency", help="Latency CSV (nodes,forward_ms) from `treeopt profile`: adds tokens/s.")
MaxDepthOpt = opt(SearchConfig, "max_depth", "--max-depth", help="Deepest path (default: number of heads).")
MaxRankOpt = opt(SearchConfig, "max_rank", "--max-rank", help="Ranks allowed per head: highest rank + 1 (default: the calibration's --top-k).")
FormatOpt = opt(SearchConfig, "fmt", "--format", help="json, python (Medusa's medusa_choices = [...]), trtllm (--medusa_choices string), vllm (--speculative-config keys), chain (top-1 chain length), sglang (launch flags) or trtllm-eagle3 (TensorRT-LLM's EAGLE-3 options); the last three for the calibration's drafter (see `treeopt export --help`); default from the suffix.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars (they are also off when stderr is not a terminal).")
TreeHelp = "a .json/.py/.py:NAME/.txt tree file, a published name (mc_sim_7b_63) or '[[0], [0, 0]]'"
EngineOpt = opt(EngineChoice, "engine", "--engine", help="treeopt (its own decoder) or vllm (vLLM >= 0.32 in its own environment, driven as a subprocess; see --vllm-python).")
VllmPythonOpt = opt(VllmSettings, "vllm_python", "--vllm-python", help="--engine vllm: the python of vLLM's environment (default $TREEOPT_VLLM_PYTHON, else .venv-vllm/bin/python beside the checkout, from `scripts/setup.sh --vllm`).")


def _progress(quiet: bool) -> bool:
    """Progress bars on long stages (and transformers' while loading): on a terminal, unless --quiet."""
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
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

    typer.echo(describe(**vars(settings(ModelSettings, locals()))))


# --- train-heads (treeopt.training.train) ---


@command("train-heads", resumable=True)
def train_heads_cmd(
    work: Path = opt(TrainConfig, "work", "--output-dir", "-o", help="Directory for data shards, checkpoints and the report; re-run the same command to resume."),
    heads_out: Optional[Path] = opt(TrainConfig, "heads_out", "--save-heads", help="Directory to save the trained heads in (Medusa layout)."),
    prompts: str = opt(TrainConfig, "prompts", "--prompts", "-p", help="`magpie` (user turns sampled from the model itself), a .json/.jsonl file with an `instruction` or `prompt` field, or a Hugging Face dataset id."),
    num_prompts: int = opt(TrainConfig, "num_prompts", "--num-prompts", help="Sequences to generate (magpie: an upper bound, duplicates are dropped)."),
    max_new_tokens: int = opt(TrainConfig, "max_new_tokens", "--max-new-tokens", help="Greedy continuation length per prompt."),
    batch_size: int = opt(TrainConfig, "batch_size", "--batch-size", help="Sequences per generation batch (= one shard)."),
    magpie_max_tokens: int = opt(TrainConfig, "magpie_max_tokens", "--magpie-max-tokens", help="Longest sampled instruction (longer ones are dropped)."),
    num_heads: int = opt(TrainConfig, "num_heads", "--num-heads"),
    num_layers: int = opt(TrainConfig, "num_layers", "--num-layers", help="ResBlocks per head."),
    epochs: float = opt(TrainConfig, "epochs", "--epochs"),
    lr: float = opt(TrainConfig, "lr", "--lr"),
    batch_tokens: int = opt(TrainConfig, "batch_tokens", "--batch-tokens", help="Hidden rows per optimizer step."),
    distill: float = opt(TrainConfig, "distill", "--distill", help="Weight of the KL to the base model's distribution, 0..1 (0: hard targets only)."),
    full_vocab: bool = opt(TrainConfig, "full_vocab", "--full-vocab", help="Softmax over the whole vocabulary (default: over the tokens the data holds, several times faster)."),
    eval_prompts: int = opt(TrainConfig, "eval_prompts", "--eval-prompts", help="AlpacaEval prompts for the report's held-out metric (evaluation only; 0 skips)."),
    seed: int = opt(TrainConfig, "seed", "--seed"),
    stage: str = opt(TrainConfig, "stage", "--stage", help="all, data (generate shards only) or train (train on the shards there are)."),
    max_gen_minutes: Optional[float] = typer.Option(None, "--max-gen-minutes", help="Stop generating after this long (re-run to continue)."),
    max_train_minutes: Optional[float] = typer.Option(None, "--max-train-minutes", help="Stop training after this long, checkpointed (re-run to continue)."),
    model: str = ModelOpt,
    device: str = opt(TrainConfig, "device", "--device", help="cpu, cuda or auto."),
    quiet: bool = QuietOpt,
):
    """Train Medusa-1 heads (backbone frozen) on the model's own greedy continuations, and save them."""
    from treeopt.training.train import train_heads

    minutes = lambda m: None if m is None else m * 60  # noqa: E731
    cfg = settings(TrainConfig, {**locals(), "work": str(work), "heads_out": str(heads_out) if heads_out else None},
                   max_gen_s=minutes(max_gen_minutes), max_train_s=minutes(max_train_minutes))
    train_heads(cfg, log=lambda s: typer.echo(s, err=True), progress=_progress(quiet))


# --- train-drafter (treeopt.training.eagle3) ---


@command("train-drafter", resumable=True)
def train_drafter_cmd(
    work: Path = opt(DrafterTrainConfig, "work", "--output-dir", "-o", help="Directory for data shards, aux hidden states, checkpoints and the report; re-run the same command to resume (a train-heads directory with the same data settings reuses its shards)."),
    kind: str = opt(DrafterTrainConfig, "kind", "--kind", help="The drafter to train: eagle3."),
    drafter_out: Optional[Path] = opt(DrafterTrainConfig, "drafter_out", "--save-drafter", help="Directory to save the trained drafter in (vLLM's EAGLE-3 layout; --drafter eagle3:DIR reads it)."),
    prompts: str = opt(DrafterTrainConfig, "prompts", "--prompts", "-p", help="`magpie` (user turns sampled from the model itself), a .json/.jsonl file with an `instruction` or `prompt` field, or a Hugging Face dataset id."),
    num_prompts: int = opt(DrafterTrainConfig, "num_prompts", "--num-prompts", help="Sequences to generate (magpie: an upper bound, duplicates are dropped)."),
    max_new_tokens: int = opt(DrafterTrainConfig, "max_new_tokens", "--max-new-tokens", help="Greedy continuation length per prompt."),
    batch_size: int = opt(DrafterTrainConfig, "batch_size", "--batch-size", help="Sequences per generation batch (= one shard)."),
    magpie_max_tokens: int = opt(DrafterTrainConfig, "magpie_max_tokens", "--magpie-max-tokens", help="Longest sampled instruction (longer ones are dropped)."),
    draft_vocab: int = opt(DrafterTrainConfig, "draft_vocab", "--draft-vocab", help="The drafter's vocabulary: the most frequent tokens of the continuations."),
    steps: int = opt(DrafterTrainConfig, "steps", "--steps", help="Training-time test: the drafter unrolled on its own outputs this many steps."),
    epochs: float = opt(DrafterTrainConfig, "epochs", "--epochs"),
    lr: float = opt(DrafterTrainConfig, "lr", "--lr"),
    batch_sequences: int = opt(DrafterTrainConfig, "batch_sequences", "--batch-sequences", help="Texts per optimizer step."),
    seed: int = opt(DrafterTrainConfig, "seed", "--seed"),
    stage: str = opt(DrafterTrainConfig, "stage", "--stage", help="all, data (generate shards only) or train (aux states and training on the shards there are)."),
    max_gen_minutes: Optional[float] = typer.Option(None, "--max-gen-minutes", help="Stop generating after this long (re-run to continue)."),
    max_train_minutes: Optional[float] = typer.Option(None, "--max-train-minutes", help="Stop training after this long, checkpointed (re-run to continue)."),
    model: str = ModelOpt,
    device: str = opt(DrafterTrainConfig, "device", "--device", help="cpu, cuda or auto."),
    quiet: bool = QuietOpt,
):
    """Train an EAGLE-3 drafter (base model frozen, training-time test) on the model's own greedy continuations, and save it."""
    from treeopt.training.eagle3 import train_drafter

    minutes = lambda m: None if m is None else m * 60  # noqa: E731
    cfg = settings(DrafterTrainConfig, {**locals(), "work": str(work), "drafter_out": str(drafter_out) if drafter_out else None},
                   max_gen_s=minutes(max_gen_minutes), max_train_s=minutes(max_train_minutes))
    train_drafter(cfg, log=lambda s: typer.echo(s, err=True), progress=_progress(quiet))


# --- calibrate (calibrate/) ---
@command(resumable=True)
def calibrate(
    model: str = ModelOpt,
    heads: Optional[str] = HeadsOpt,
    drafter: str = DrafterOpt,
    draft_depth: int = opt(CalibrationConfig, "draft_depth", "--draft-depth", help="ngram, draft: the depths recorded (r1..rK); heads record one per head."),
    prompts: Optional[str] = PromptsOpt,
    teacher_forced: Optional[str] = opt(CalibrationConfig, "teacher_forced", "--teacher-forced", help="Chat data (ShareGPT `conversations` or OpenAI `messages`; .json/.jsonl or a Hugging Face dataset id): rank the heads on its assistant turns in one forward per conversation, instead of generating from --prompts."),
    limit: Optional[int] = opt(CalibrationConfig, "limit", "--limit", help="Use N prompts drawn at random across the prompt file's sources (its `dataset` or `source` field; seeded by --seed); teacher-forced: the first N conversations."),
    first: Optional[int] = opt(CalibrationConfig, "first", "--first", help="Use the first N prompts (conversations), in file order (instead of --limit)."),
    max_new_tokens: int = opt(CalibrationConfig, "max_new_tokens", "--max-new-tokens", help="Greedy continuation length cap (stops earlier at EOS); teacher-forced: the cap on each assistant turn."),
    top_k: int = opt(CalibrationConfig, "top_k", "--top-k", help="Ranks recorded per head: ranks >= top-k are recorded as a miss."),
    batch_size: int = opt(CalibrationConfig, "batch_size", "--batch-size", help="Prompts per generation batch (1: exactly unbatched greedy); teacher-forced: at most that many sequences per forward, batched by length."),
    shard_size: int = opt(CalibrationConfig, "shard_size", "--shard-size", help="Prompts per resumable shard (rounded up to whole batches)."),
    seed: int = opt(CalibrationConfig, "seed", "--seed", help="The seed of the prompt draw (--limit) and, typical, of the sampled roots."),
    out: Path = opt(CalibrationConfig, "out", "--output-dir", "-o", help="Output directory; rerun the same command to resume."),
    acceptance: str = AcceptanceOpt,
    temperature: float = TemperatureOpt,
    posterior_threshold: float = ThresholdOpt,
    posterior_alpha: float = AlphaOpt,
    probe: Optional[str] = opt(CalibrationConfig, "probe", "--probe", help="typical: the probe's internal nodes (a tree spec; each gets all its top-k children); default top-4 x top-2 x top-1."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
    quiet: bool = QuietOpt,
):
    """Record where every head ranks the base model's greedy tokens (ranks.parquet, accuracy.csv, ...);
    with --acceptance typical, every probe node's typical test in each step of a seeded decode with
    the probe tree (typical.parquet)."""
    from treeopt.calibrate.api import run_calibration

    config = settings(CalibrationConfig, locals(), progress=_progress(quiet))
    typer.echo(run_calibration(config))


# --- search, evaluate, sweep (search/) ---


@command()
def search(
    calibration: Path = CalibrationOpt,
    nodes: str = opt(SearchConfig, "nodes", "--nodes", "-n", help="Tree size (root excluded), or `auto` (needs --latency)."),
    acceptance_model: str = AcceptanceModelOpt,
    latency: Optional[Path] = LatencyOpt,
    max_depth: Optional[int] = MaxDepthOpt,
    max_rank: Optional[int] = MaxRankOpt,
    max_nodes: int = opt(SearchConfig, "max_nodes", "--max-nodes", help="Largest size --nodes auto considers."),
    out: Optional[Path] = opt(SearchConfig, "out", "--output", "-o", help="Tree file to write (.json, .py, .txt)."),
    fmt: Optional[str] = FormatOpt,
    target: Optional[str] = opt(SearchConfig, "target", "--target", help="Search within a consumer's rules: medusa, trtllm, vllm or chain (see the README's 'Deploying a tree')."),
    serving_batch: int = opt(SearchConfig, "serving_batch", "--serving-batch", help="Sequences the server decodes together: --latency's rows for that batch size (`treeopt profile --serving-batches`)."),
    serving_batches: Optional[str] = opt(SearchConfig, "serving_batches", "--serving-batches", help="e.g. 1,4,16,64: a schedule, the best tree at each serving batch size (needs --latency; -o writes one JSON file)."),
    acceptance: str = AcceptanceOpt,
    prior: Optional[Path] = PriorOpt,
    engine: str = EngineOpt,
    drafter: Optional[str] = opt(SearchConfig, "drafter", "--drafter", help="--engine vllm: what vLLM loads, of the calibration's kind: heads:DIR (from `treeopt export-heads`), eagle3:DIR, draft:MODEL or ngram:MIN-MAX; default: the calibration's drafter."),
):
    """Search the tree that maximizes expected tokens/step; compare it with the baselines.
    --engine vllm: the chain length of best vLLM throughput per serving batch size (needs --latency from
    `treeopt profile --engine vllm`), written as vLLM's --speculative-config JSON for the drafter."""
    from treeopt.core.settings import int_list
    from treeopt.search.api import schedule_report, search_report, vllm_schedule_report

    c = settings(SearchConfig, locals())
    if c.engine == "vllm":
        sizes = int_list(c.serving_batches, "--serving-batches", 1) or (
            [c.serving_batch] if c.serving_batch != 1 else None)
        typer.echo(vllm_schedule_report(c.calibration, c.latency, sizes and list(sizes), c.acceptance_model, c.out,
                                        drafter=c.drafter)[1])
        return
    if c.serving_batches is not None:
        sizes = list(int_list(c.serving_batches, "--serving-batches", 1))
        typer.echo(schedule_report(c.calibration, c.latency, sizes, c.acceptance_model, c.max_depth, c.max_rank,
                                   c.max_nodes, c.out)[1])
        return
    typer.echo(search_report(c.calibration, c.nodes, c.acceptance_model, c.max_depth, c.max_rank, c.latency,
                             c.max_nodes, c.out, c.fmt, c.serving_batch, c.target, c.acceptance, c.prior)[2])


@command()
def export(
    tree: str = opt(ExportConfig, "tree", "--tree", "-t", help=f"The tree: {TreeHelp}."),
    out: Path = opt(ExportConfig, "out", "--output", "-o", help="File to write."),
    fmt: Optional[str] = opt(ExportConfig, "fmt", "--format", help="json, python (Medusa), trtllm (TensorRT-LLM's engine backend, releases before NVIDIA/TensorRT-LLM#15918), vllm (vLLM >= 0.32's --speculative-config: a top-1 chain), chain, sglang (SGLang's launch flags for an EAGLE-3 or draft-model chain; .args) or trtllm-eagle3 (TensorRT-LLM's Eagle3DecodingConfig as LLM API options YAML; .yaml); default from the suffix."),
    target: Optional[str] = opt(ExportConfig, "target", "--target", help="Also check this consumer's rules: medusa, trtllm (releases before NVIDIA/TensorRT-LLM#15918), vllm (>= 0.32) or chain."),
    drafter: Optional[str] = opt(ExportConfig, "drafter", "--drafter", help="vllm, sglang, trtllm-eagle3: what the engine drafts with: heads[:DIR] (vLLM's Medusa), eagle3:DIR, draft:MODEL or ngram[:MIN-MAX] (vLLM); default: the drafter the tree file's calibration used, else heads."),
):
    """Write a tree for a consumer, after checking that consumer's rules (one line naming a broken rule).
    vllm, sglang and trtllm-eagle3 serve a top-1 chain: the engine's config for --drafter."""
    from treeopt.search.api import export_report

    c = settings(ExportConfig, locals())
    typer.echo(export_report(c.tree, c.out, c.fmt, c.target, c.drafter))


@command("export-heads")
def export_heads_cmd(
    heads: Optional[str] = HeadsOpt,
    out: Path = opt(ExportHeadsConfig, "out", "--output-dir", "-o", help="Directory to write."),
    fmt: str = opt(ExportHeadsConfig, "fmt", "--format", help="vllm: the checkpoint vLLM's Medusa drafter loads (vLLM >= 0.32: `--speculative-config '{\"method\": \"medusa\", \"model\": OUT, \"num_speculative_tokens\": k}'`)."),
    model: str = ModelOpt,
):
    """Write heads for a serving engine, then check the written weights give the heads' own top-k."""
    from treeopt.decoding.heads import export_heads

    c = settings(ExportHeadsConfig, locals())
    typer.echo(export_heads(c.heads, c.out, c.model))


@command()
def evaluate(
    trees: Optional[List[str]] = opt(EvaluateConfig, "trees", "--tree", "-t", help=f"A tree to replay (repeat the option for more): {TreeHelp}."),
    calibration: Path = CalibrationOpt,
    acceptance_model: str = AcceptanceModelOpt,
    split: Optional[float] = opt(EvaluateConfig, "split", "--split", help="Fit on this fraction of prompts, replay on the rest (e.g. 0.8)."),
    seed: int = opt(EvaluateConfig, "seed", "--seed", help="Seed of the prompt split."),
    latency: Optional[Path] = LatencyOpt,
    acceptance: str = AcceptanceOpt,
    prior: Optional[Path] = PriorOpt,
):
    """Replay trees on a calibration (exact greedy Medusa decoding) next to the baselines."""
    from treeopt.search.api import evaluate_report

    c = settings(EvaluateConfig, locals())
    typer.echo(evaluate_report(list(c.trees), c.calibration, c.acceptance_model, c.split, c.seed, c.latency,
                               acceptance=c.acceptance, prior=c.prior)[1])


@command()
def sweep(
    calibration: Path = CalibrationOpt,
    max_nodes: int = opt(SweepConfig, "max_nodes", "--max-nodes", help="Largest tree size."),
    acceptance_model: str = AcceptanceModelOpt,
    latency: Optional[Path] = LatencyOpt,
    max_depth: Optional[int] = MaxDepthOpt,
    max_rank: Optional[int] = MaxRankOpt,
    replayed: bool = opt(SweepConfig, "replayed", "--replay", help="Also replay every size (slower)."),
    out: Optional[Path] = opt(SweepConfig, "out", "--output", "-o", help="CSV to write."),
    acceptance: str = AcceptanceOpt,
    prior: Optional[Path] = PriorOpt,
    engine: str = EngineOpt,
    serving_batches: Optional[str] = opt(SweepConfig, "serving_batches", "--serving-batches", help="--engine vllm: the batch sizes of --latency to size (default: all of them)."),
):
    """Predicted tokens/step (and tokens/s with --latency) of the best tree of every size 0..N.
    --engine vllm: predicted vLLM tokens/s of every chain length at each batch size of --latency."""
    from treeopt.search.api import sweep_report

    c = settings(SweepConfig, locals())
    if c.engine == "vllm":
        from treeopt.core.settings import int_list
        from treeopt.search.api import vllm_schedule_report

        sizes = int_list(c.serving_batches, "--serving-batches", 1)
        typer.echo(vllm_schedule_report(c.calibration, c.latency, sizes and list(sizes), c.acceptance_model, c.out,
                                        sweep=True)[1])
        return
    typer.echo(sweep_report(c.calibration, c.max_nodes, c.acceptance_model, c.latency, c.max_depth, c.max_rank,
                            c.replayed, c.out, acceptance=c.acceptance, prior=c.prior)[1])

# --- decode, bench, profile (decoding/) ---


@command()
def decode(
    instruction: str = typer.Argument(..., help="The user turn to answer."),
    tree: Optional[str] = opt(DecodeConfig, "tree", "--tree", "-t", help=f"The tree: {TreeHelp}; none: plain decoding."),
    max_new_tokens: int = opt(DecodeConfig, "max_new_tokens", "--max-new-tokens"),
    acceptance: str = AcceptanceOpt,
    temperature: float = TemperatureOpt,
    posterior_threshold: float = ThresholdOpt,
    posterior_alpha: float = AlphaOpt,
    seed: int = opt(DecodeConfig, "seed", "--seed", help="typical: the sampling seed."),
    model: str = ModelOpt,
    heads: Optional[str] = HeadsOpt,
    drafter: str = DrafterOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    compiled: Optional[bool] = CompileOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
):
    """Answer one instruction with Medusa tree decoding; print the reply and tokens/step."""
    from treeopt.decoding.decoder import Acceptance, run_decode

    c = settings(DecodeConfig, locals())
    rule = Acceptance(c.acceptance, c.temperature, c.posterior_threshold, c.posterior_alpha, c.seed)
    text, r = run_decode(instruction, c.tree, c.model, c.heads, c.max_new_tokens, rule, c.device, c.dtype, c.compiled,
                         c.device_map, c.max_memory, drafter=c.drafter)
    typer.echo(text)
    typer.echo(f"{len(r.tokens)} tokens in {r.steps} steps: {r.tokens_per_step:.2f} tokens/step, "
               f"{len(r.tokens) / max(r.decode_s, 1e-9):.1f} tokens/s decoding, prefill {r.prefill_s * 1e3:.0f} ms", err=True)


@command(resumable=True)
def bench(
    trees: Optional[List[str]] = opt(BenchConfig, "trees", "--tree", "-t", help=f"A tree to benchmark (repeat the option for more): {TreeHelp}."),
    cartesian: Optional[List[str]] = opt(BenchConfig, "cartesian", "--cartesian", help="Cartesian trees, top-k per depth: 2x3,3x2x2."),
    prompts: Optional[str] = PromptsOpt,
    first: Optional[int] = opt(BenchConfig, "first", "--first", help="Use the first N prompts, in file order."),
    max_new_tokens: int = opt(BenchConfig, "max_new_tokens", "--max-new-tokens"),
    calibration: Optional[Path] = opt(BenchConfig, "calibration", "--calibration", "-c", help="Calibration directory: adds predicted tokens/step."),
    out: Optional[Path] = opt(BenchConfig, "out", "--output-dir", "-o", help="Directory for bench.csv and bench.json (re-run to resume)."),
    repeats: int = opt(BenchConfig, "repeats", "--repeats", help="Timed forwards per tree size for forward_ms."),
    threads: Optional[int] = ThreadsOpt,
    acceptance: str = AcceptanceOpt,
    temperature: float = TemperatureOpt,
    posterior_threshold: float = ThresholdOpt,
    posterior_alpha: float = AlphaOpt,
    seed: int = opt(BenchConfig, "seed", "--seed", help="typical: the sampling seed (the same seed gives the same numbers)."),
    model: str = ModelOpt,
    heads: Optional[str] = HeadsOpt,
    drafter: str = DrafterOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    compiled: Optional[bool] = CompileOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
    quiet: bool = QuietOpt,
    engine: str = EngineOpt,
    chains: str = opt(BenchConfig, "chains", "--chains", help="--engine vllm: chain lengths k to run (vLLM drafts each head's top-1, k tokens); plain vLLM (k = 0) always runs."),
    serving_batches: Optional[str] = opt(BenchConfig, "serving_batches", "--serving-batches", help="--engine vllm: concurrent requests, comma-separated (e.g. 1,4,16); default 1."),
    vllm_python: Optional[Path] = VllmPythonOpt,
):
    """Plain greedy vs tree decoding on the same prompts: tokens/step, overhead, speedup, lossless match.
    --engine vllm: plain vLLM vs vLLM with the heads at each --chains length and --serving-batches."""
    from treeopt.core.settings import int_list
    from treeopt.reports.bench import render, run_bench

    c = settings(BenchConfig, locals())
    if c.engine == "vllm":
        from treeopt.reports.vllm_bench import bench_vllm, render_vllm_bench

        df = bench_vllm(model=c.model, heads=c.heads, prompts=c.prompts, limit=c.first, max_new_tokens=c.max_new_tokens,
                        chains=list(int_list(c.chains, "--chains", 1)),
                        batch_sizes=list(int_list(c.serving_batches, "--serving-batches", 1) or [1]),
                        calibration=c.calibration, out=c.out or Path("bench-vllm"), python=c.vllm_python, dtype=c.dtype,
                        eager=c.compiled is not True, drafter=c.drafter, log=lambda m: typer.echo(m, err=True))
        typer.echo(render_vllm_bench(df))
        return
    typer.echo(render(run_bench(c, progress=_progress(quiet))))
    if c.out is not None:
        typer.echo(f"wrote {Path(c.out) / 'bench.csv'} and {Path(c.out) / 'bench.json'}", err=True)


@command()
def profile(
    out: Path = opt(ProfileConfig, "out", "--output", "-o", help="CSV to write (what `search --nodes auto --latency` reads)."),
    sizes: Optional[str] = opt(ProfileConfig, "sizes", "--sizes", help="Tree sizes, comma-separated; default 0,1,2,4,8,16,24,32,48,64,96,128,192,256 (with --tree: those it holds)."),
    serving_batches: str = opt(ProfileConfig, "serving_batches", "--serving-batches", help="Sequences per forward, comma-separated (e.g. 1,4,16): one set of rows each."),
    context: int = opt(ProfileConfig, "context", "--context", help="Tokens already in the KV cache."),
    repeats: int = opt(ProfileConfig, "repeats", "--repeats", help="Timed forwards per size (the median is kept)."),
    tree: Optional[str] = opt(ProfileConfig, "tree", "--tree", "-t", help="Time this tree's first N nodes at each size N (e.g. `search -n 64`'s tree: the shapes `--nodes auto` chooses among); default: balanced trees."),
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
    chains: str = opt(ProfileConfig, "chains", "--chains", help="--engine vllm: chain lengths k to time (0: plain)."),
    new_tokens: int = opt(ProfileConfig, "new_tokens", "--new-tokens", help="--engine vllm: tokens generated per request per timing."),
    prompts: Optional[str] = opt(ProfileConfig, "prompts", "--prompts", "-p", help="--engine vllm: time on these instructions (chat template; real acceptance) instead of random-token prompts of --context tokens."),
    first: Optional[int] = opt(ProfileConfig, "first", "--first", help="--engine vllm with --prompts: the first N, in file order."),
    vllm_python: Optional[Path] = VllmPythonOpt,
    drafter: str = opt(ProfileConfig, "drafter", "--drafter", help="What drafts: heads (--heads), ngram[:MIN-MAX] (chains), draft:MODEL or eagle3[:DIR]; treeopt times its drafting step (heads_ms), --engine vllm drafts with it."),
):
    """Time one decoding step vs tree size on this device, beside the machine's roofline, into a CSV.
    --engine vllm: vLLM's time per step and per token, plain and with a k-token chain, per batch size."""
    from treeopt.decoding.profile import render_profile, run_profile

    c = settings(ProfileConfig, locals())
    if c.engine == "vllm":
        from treeopt.core.settings import int_list
        from treeopt.decoding.vllm_engine import profile_vllm, render_vllm_profile

        df = profile_vllm(model=c.model, heads=c.heads, chains=list(int_list(c.chains, "--chains", 0)),
                          batch_sizes=list(int_list(c.serving_batches, "--serving-batches", 1)), context=c.context,
                          new_tokens=c.new_tokens, python=c.vllm_python, out=Path(c.out), dtype=c.dtype,
                          eager=c.compiled is not True, prompts=c.prompts, limit=c.first, drafter=c.drafter,
                          log=lambda m: typer.echo(m, err=True))
        typer.echo(render_vllm_profile(df))
        typer.echo(f"wrote {c.out}", err=True)
        return
    typer.echo(render_profile(run_profile(c, progress=_progress(quiet))))
    typer.echo(f"wrote {c.out}", err=True)


# --- plot, report, demo (reports/) ---


@command()
def plot(
    tree: str = opt(PlotConfig, "tree", "--tree", "-t", help=f"The tree: {TreeHelp}."),
    calibration: Optional[Path] = opt(PlotConfig, "calibration", "--calibration", "-c", help="Calibration directory: colour nodes by acceptance probability."),
    out: Path = opt(PlotConfig, "out", "--output", "-o", help="Picture to write: .png or .svg."),
    acceptance_model: str = AcceptanceModelOpt,
):
    """Draw a tree: one level per head, nodes labelled by rank, coloured by acceptance probability."""
    from treeopt.reports.plots import draw_tree

    c = settings(PlotConfig, locals())
    typer.echo(draw_tree(c.tree, c.out, calibration=c.calibration, model=c.acceptance_model))


@command()
def report(
    run_dir: Path = typer.Argument(..., help="Run directory (e.g. the --output-dir of `treeopt demo`)."),
):
    """Write RUN_DIR/report.md and a self-contained RUN_DIR/report.html with the run's tables and charts."""
    from treeopt.reports.report import write_report

    md, page = write_report(run_dir)
    typer.echo(f"wrote {md}\nwrote {page}")


@command(resumable=True)
def demo(
    out: Path = typer.Option(Path(layout.DEMO_DIR), "--output-dir", "-o", help="Run directory (re-running resumes it)."),
    fit_prompts: int = opt(DemoConfig, "fit_prompts", "--limit", help="Prompts to calibrate on, drawn at random across the prompt file's sources (seeded by --seed)."),
    bench_prompts: int = opt(DemoConfig, "bench_prompts", "--bench-prompts", help="Held-out prompts to benchmark on, drawn the same way among the others."),
    seed: int = opt(DemoConfig, "seed", "--seed", help="Seed of the prompt draw."),
    max_new_tokens: int = opt(DemoConfig, "max_new_tokens", "--max-new-tokens", help="New tokens per prompt (calibration and bench)."),
    nodes: str = opt(DemoConfig, "nodes", "--nodes", help="Size of the searched tree (16 keeps a CPU demo short; 64 on a GPU), or `auto`: the size of best predicted tokens/s on this machine (uses the profile)."),
    top_k: int = opt(DemoConfig, "top_k", "--top-k", help="Ranks recorded per head by the calibration."),
    cartesian: str = joined(DemoConfig, "cartesian", "--cartesian", help="Cartesian baselines, comma-separated: `best` (the best one as large as the searched tree) and/or e.g. 2x3; each is benched beside a searched tree of its size; '' for none."),
    published: str = joined(DemoConfig, "published", "--published", help="Medusa's published trees to bench (beside a searched tree of their size), comma-separated; '' for none."),
    chain: bool = opt(DemoConfig, "chain", "--chain/--no-chain", help="Bench the top-1 chain (what vLLM and TGI draft) beside a searched tree of its size."),
    profile_sizes: str = opt(DemoConfig, "profile_sizes", "--profile-sizes", help="Tree sizes to time (latency.csv); '' to skip."),
    prompts: Optional[str] = PromptsOpt,
    model: str = ModelOpt,
    heads: Optional[str] = HeadsOpt,
    drafter: str = opt(DemoConfig, "drafter", "--drafter", help="What drafts, in every stage: heads (--heads), ngram[:MIN-MAX] (vLLM's prompt lookup: chains only, so no tree baselines), draft:MODEL or eagle3[:DIR]."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    compiled: Optional[bool] = CompileOpt,
    threads: Optional[int] = ThreadsOpt,
    quiet: bool = QuietOpt,
):
    """The main job, small: calibrate on a random sample of AlpacaEval, search the tree, bench each baseline
    (Cartesian, published, chain) beside a searched tree of its size on held-out prompts, write the report."""
    from treeopt.demo import run_demo

    config = settings(DemoConfig, locals())
    run_demo(out, config, log=typer.echo, progress=_progress(quiet))


def main():
    app()


if __name__ == "__main__":
    main()
