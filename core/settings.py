"""The settings of each command, one frozen dataclass per command: its field defaults are the CLI's
defaults and the Python twin's (`treeopt/cli.py` reads them from here), and `__post_init__` checks
every number and every combination before any model loads or any file is written, so the CLI and
the twins refuse the same inputs with the same one line (`TreeoptError`, exit 2).

The option that sets a field is `--` + the field's name with dashes, except where `OPTION` says
otherwise (the name a user of transformers/datasets expects: `--output-dir` for a directory,
`--output` for a file, `--tree` for every tree). The calibration and training settings
(`treeopt.calibrate.run.CalibrationConfig`, `treeopt.training.config.TrainConfig`) and the demo's
(`treeopt.demo.DemoConfig`) follow the same rules.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from treeopt.core.drafter import parse_drafter
from treeopt.core.errors import TreeoptError
from treeopt.core.serving import SERVING_FORMATS, check_serving
from treeopt.core.treefile import FORMATS, file_format

DEFAULT_MODEL = "smollm2-135m"  # the bundled model (SmolLM2-135M-Instruct, treeopt.decoding.models)
DEFAULT_ACCEPTANCE_MODEL = "smoothed"  # the acceptance estimator (treeopt.search.acceptance)
ACCEPTANCE_RULES = ("greedy", "typical")
ENGINES = ("treeopt", "vllm")  # treeopt's own decoder; vLLM >= 0.32 in its own environment (a subprocess)

# field -> the option that sets it, where that is not `--` + the field's name
OPTION = {"out": "--output", "work": "--output-dir", "heads_out": "--save-heads", "trees": "--tree",
          "serving_batch": "--serving-batch", "serving_batches": "--serving-batches", "replayed": "--replay",
          "fmt": "--format", "prior": "--prior-calibration", "compiled": "--compile/--eager"}


def option_name(config, name: str) -> str:
    """The CLI option that sets field `name` of `config` (for error messages)."""
    return getattr(config, "OPTION", {}).get(name) or OPTION.get(name) or "--" + name.replace("_", "-")


def default(config, name: str):
    """The default of field `name` of dataclass `config` (the CLI's default for its option)."""
    f = {f.name: f for f in fields(config)}[name]
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return ...  # required


def at_least(config, **bounds) -> None:
    """Each named field (None: unset, allowed) is at least its bound."""
    for name, lo in bounds.items():
        value = getattr(config, name)
        if value is not None and not value >= lo:
            raise TreeoptError(f"{option_name(config, name)} is {value}: pass a number >= {lo}")


def positive(config, *names) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and not value > 0:
            raise TreeoptError(f"{option_name(config, name)} is {value}: pass a number > 0")


def not_with(config, mode: str, *names) -> None:
    """Fields set away from their defaults that `mode` cannot honour: a one-line error naming them."""
    given = [option_name(config, n) for n in names if getattr(config, n) != default(type(config), n)]
    if given:
        raise TreeoptError(f"{mode} does not use {', '.join(given)}: drop {'it' if len(given) == 1 else 'them'}")


def check_drafter(config) -> str:
    """`config.drafter` parses (treeopt.core.drafter), and a drafter other than heads is given neither
    --heads nor another rule than greedy; returns its kind."""
    kind = parse_drafter(config.drafter).kind
    if kind != "heads":
        not_with(config, f"--drafter {kind}", "heads")
        if config.acceptance != "greedy":
            raise TreeoptError(f"--drafter {kind} drafts for --acceptance greedy: drop --acceptance")
    return kind


def int_list(text: str | None, option: str, lo: int) -> tuple[int, ...] | None:
    """'1,4,16' -> (1, 4, 16); None -> None; '' -> () (none). Every number at least `lo`."""
    if text is None:
        return None
    try:
        values = tuple(int(s) for s in text.replace(" ", "").split(",") if s)
    except ValueError:
        raise TreeoptError(f"{option} {text!r}: give comma-separated integers, e.g. 1,4,16") from None
    if any(v < lo for v in values):
        raise TreeoptError(f"{option} {text!r}: every number must be >= {lo}")
    return values


@dataclass(frozen=True, kw_only=True)
class ModelSettings:
    model: str = DEFAULT_MODEL  # smollm2-135m (bundled), a local directory, or a Hugging Face id
    heads: str | None = None  # a directory, `random`, or None: the heads shipped for the bundled model
    device: str = "auto"  # cpu, cuda or auto
    dtype: str = "auto"  # auto, float32, bfloat16 or float16


@dataclass(frozen=True, kw_only=True)
class EngineSettings(ModelSettings):
    compiled: bool | None = None  # torch.compile the decoding steps; None: on a CPU in bfloat16 (the fast path)
    device_map: str | None = None  # auto/balanced/sequential: spread the model over the GPUs (accelerate)
    max_memory: str | None = None  # with device_map: memory per device, e.g. 0=20GiB,cpu=64GiB
    threads: int | None = None  # torch CPU threads (None: torch's default)

    def __post_init__(self):
        at_least(self, threads=1)
        if self.max_memory is not None and self.device_map is None:
            raise TreeoptError("--max-memory is for --device-map: pass --device-map auto too, or drop --max-memory")


@dataclass(frozen=True, kw_only=True)
class RuleSettings:
    """The acceptance rule (treeopt.decoding.decoder.Acceptance)."""
    acceptance: str = "greedy"  # greedy (lossless) or typical (Medusa's typical acceptance)
    temperature: float = 0.7  # typical: the sampling temperature
    posterior_threshold: float = 0.09  # typical: epsilon, the hard threshold
    posterior_alpha: float = 0.3  # typical: delta, the entropy-scaled threshold
    seed: int = 0  # typical: the sampling seed

    def check_rule(self):
        if self.acceptance not in ACCEPTANCE_RULES:
            raise TreeoptError(f"unknown --acceptance {self.acceptance!r}: use greedy or typical")
        if self.acceptance == "greedy":
            not_with(self, "--acceptance greedy", "temperature", "posterior_threshold", "posterior_alpha")
        positive(self, "temperature")
        at_least(self, posterior_threshold=0, posterior_alpha=0)


@dataclass(frozen=True, kw_only=True)
class CalibrationConfig(RuleSettings):
    """`treeopt calibrate` (treeopt.calibrate.run.run_calibration); `seed` also seeds the --limit draw."""
    OPTION = {"out": "--output-dir"}
    out: str | Path = "calibration"
    model: str = DEFAULT_MODEL
    heads: str | None = None  # a directory, `random`, or None for the heads shipped for the bundled model
    drafter: str = "heads"  # heads (--heads), ngram[:MIN-MAX] (vLLM's prompt lookup), draft:MODEL or eagle3[:DIR] (treeopt.core.drafter)
    draft_depth: int = 4  # ngram, draft: the depths recorded (r1..rK); heads: their number
    prompts: str | None = None  # `alpaca_eval`, a .json/.jsonl path; None: the local AlpacaEval copy, else the hub's
    teacher_forced: str | None = None  # chat data for calibrate/teacher.py (instead of prompts and generation)
    limit: int | None = None  # N prompts drawn across the sources, seeded by `seed` (`select_prompts`)
    first: int | None = None  # or the first N prompts, in file order
    max_new_tokens: int = 256
    top_k: int = 10  # ranks recorded per head (a rank >= top_k is a miss)
    batch_size: int = 8
    shard_size: int = 32  # prompts per shard, rounded up to a multiple of batch_size
    probe: str | None = None  # typical: the probe's internal nodes (a tree spec); None: top-4 x top-2 x top-1
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None  # `auto`: spread the model over the GPUs (accelerate), within max_memory
    max_memory: str | None = None  # e.g. "0=20GiB,1=20GiB"
    progress: bool = True

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        self.check_rule()
        if self.limit is not None and self.first is not None:
            raise TreeoptError("--limit and --first both choose the prompts: pass one of them")
        at_least(self, max_new_tokens=1, top_k=1, batch_size=1, shard_size=1, limit=1, first=1)
        kind = check_drafter(self)
        if kind == "heads":
            not_with(self, "--drafter heads (one depth per head)", "draft_depth")
        else:
            not_with(self, f"--drafter {kind}", "teacher_forced")
        if kind == "ngram" and self.top_k not in (1, default(type(self), "top_k")):
            raise TreeoptError("--drafter ngram proposes one token per depth, so its record has top-k 1: drop --top-k")
        at_least(self, draft_depth=1)
        if self.top_k > 32767:
            raise TreeoptError(f"--top-k {self.top_k} is too large: ranks are stored as int16, pass at most 32767")
        if self.acceptance == "typical":
            not_with(self, "--acceptance typical (a probe decode, one prompt at a time)", "teacher_forced",
                     "device_map", "max_memory", "batch_size", "shard_size")
        else:
            not_with(self, f"--acceptance {self.acceptance}", "probe")
        if self.max_memory is not None and self.device_map is None:
            raise TreeoptError("--max-memory is for --device-map: pass --device-map auto too, or drop --max-memory")


@dataclass(frozen=True, kw_only=True)
class EngineChoice:
    """Which engine a command measures or sizes for; with vLLM, `vllm_only` fields apply, else the rest."""
    engine: str = "treeopt"

    def check_engine(self, vllm_only=(), treeopt_only=()) -> None:
        if self.engine not in ENGINES:
            raise TreeoptError(f"--engine {self.engine!r}: use treeopt or vllm")
        if self.engine == "vllm":
            not_with(self, "--engine vllm", *treeopt_only)
        else:
            not_with(self, f"--engine {self.engine}", *vllm_only)


@dataclass(frozen=True, kw_only=True)
class VllmSettings(EngineChoice):
    vllm_python: str | Path | None = None  # vLLM's python; None: $TREEOPT_VLLM_PYTHON, else .venv-vllm/bin/python


@dataclass(frozen=True, kw_only=True)
class SearchSettings:
    """What search, sweep and evaluate share."""
    calibration: str | Path = ...  # the calibration directory (required)
    acceptance_model: str = DEFAULT_ACCEPTANCE_MODEL
    latency: str | Path | None = None  # nodes,forward_ms CSV from `treeopt profile`
    acceptance: str = "greedy"
    prior: str | Path | None = None  # typical: a greedy calibration of the same model and heads

    def check_search(self):
        if self.calibration is ...:
            raise TreeoptError("pass --calibration DIR (from `treeopt calibrate`)")
        if self.acceptance not in ACCEPTANCE_RULES:
            raise TreeoptError(f"unknown --acceptance {self.acceptance!r}: use greedy or typical")
        if self.prior is not None and self.acceptance != "typical":
            raise TreeoptError("--prior-calibration is for --acceptance typical (a typical record searched with a greedy prior)")


@dataclass(frozen=True, kw_only=True)
class SearchConfig(SearchSettings, EngineChoice):
    nodes: str = "64"  # tree size (root excluded), or `auto` (needs latency)
    max_depth: int | None = None  # deepest path (None: the number of heads)
    max_rank: int | None = None  # ranks allowed per head, highest + 1 (None: the calibration's top-k)
    max_nodes: int = 256  # the largest size `auto` considers
    out: str | Path | None = None  # tree file to write (.json, .py, .txt)
    fmt: str | None = None  # json, python, trtllm, vllm or chain; None: from the suffix
    target: str | None = None  # search within a consumer's rules: medusa, trtllm, vllm or chain
    serving_batch: int = 1  # sequences decoded together: the latency file's rows for that batch size
    serving_batches: str | None = None  # e.g. 1,4,16: a schedule, the best tree at each batch size
    drafter: str | None = None  # engine vllm: what vLLM loads (heads:DIR, eagle3:DIR, ...); None: the calibration's

    def __post_init__(self):
        self.check_search()
        self.check_engine(vllm_only=("drafter",),
                          treeopt_only=("nodes", "fmt", "target", "acceptance", "max_depth", "max_rank"))
        if self.drafter is not None:
            check_serving("vllm", self.drafter)
        if self.engine == "vllm" and self.latency is None:
            raise TreeoptError("--engine vllm needs --latency FILE from `treeopt profile --engine vllm`")
        nodes = str(self.nodes)
        if nodes != "auto" and not nodes.isdigit():
            raise TreeoptError(f"--nodes {nodes!r} is not a number: pass a number of nodes, e.g. 64, or auto")
        if nodes == "auto" and self.latency is None:
            raise TreeoptError("--nodes auto needs --latency FILE (from `treeopt profile`)")
        at_least(self, max_depth=1, max_rank=1, max_nodes=1, serving_batch=1)
        if self.serving_batches is not None and self.engine == "treeopt":
            not_with(self, "--serving-batches (a schedule, one tree per batch size)", "nodes", "fmt", "target",
                     "acceptance", "serving_batch")
            if not int_list(self.serving_batches, "--serving-batches", 1):
                raise TreeoptError("--serving-batches is empty: give comma-separated batch sizes, e.g. 1,4,16")
            if self.latency is None:
                raise TreeoptError("--serving-batches needs --latency FILE profiled at those batch sizes "
                                   "(`treeopt profile --serving-batches 1,4,16`)")
        elif self.serving_batch != 1 and self.latency is None:
            raise TreeoptError("--serving-batch needs --latency FILE profiled at that batch size "
                               "(`treeopt profile --serving-batches 1,4,16`)")


@dataclass(frozen=True, kw_only=True)
class SweepConfig(SearchSettings, EngineChoice):
    max_nodes: int = 256  # the largest tree size
    max_depth: int | None = None
    max_rank: int | None = None
    replayed: bool = False  # also replay every size (slower)
    out: str | Path | None = None  # CSV to write
    serving_batches: str | None = None  # engine vllm: the batch sizes of the latency file to size (None: all)

    def __post_init__(self):
        self.check_search()
        self.check_engine(vllm_only=("serving_batches",),
                          treeopt_only=("max_nodes", "max_depth", "max_rank", "replayed", "acceptance"))
        if self.engine == "vllm" and self.latency is None:
            raise TreeoptError("--engine vllm needs --latency FILE from `treeopt profile --engine vllm`")
        int_list(self.serving_batches, "--serving-batches", 1)
        at_least(self, max_nodes=1, max_depth=1, max_rank=1)


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig(SearchSettings):
    trees: tuple[str, ...] = ()  # tree files, published names or list strings
    split: float | None = None  # fit on this fraction of prompts, replay on the rest
    seed: int = 0  # of the prompt split

    def __post_init__(self):
        self.check_search()
        if not self.trees:
            raise TreeoptError("nothing to evaluate: pass --tree FILE (repeat it for more)")
        if self.split is not None and not 0 < self.split < 1:
            raise TreeoptError(f"--split is {self.split}: pass a fraction between 0 and 1, e.g. 0.8")


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    tree: str = ...  # a tree file, a published name or a list string (required)
    out: str | Path = ...  # the file to write (required)
    fmt: str | None = None  # json, python, trtllm, vllm, chain, sglang or trtllm-eagle3; None: from the suffix
    target: str | None = None  # also check this consumer's rules
    drafter: str | None = None  # vllm, sglang, trtllm-eagle3: heads[:DIR], eagle3:DIR, draft:MODEL or ngram[:MIN-MAX]; None: the tree file's, else heads

    def __post_init__(self):
        if self.fmt is not None and self.fmt not in FORMATS:
            raise TreeoptError(f"unknown --format {self.fmt!r}: use {', '.join(FORMATS)}")
        if self.drafter is not None:
            fmt = file_format(self.out, self.fmt) if self.out is not ... else self.fmt
            if fmt not in SERVING_FORMATS:
                raise TreeoptError(f"--drafter is for --format {', '.join(SERVING_FORMATS)} (the engine's config names "
                                   f"it): drop --drafter for --format {fmt}")
            check_serving(fmt, self.drafter)


@dataclass(frozen=True, kw_only=True)
class PlotConfig:
    tree: str = ...  # a tree file, a published name or a list string (required)
    calibration: str | Path | None = None  # colour the nodes by acceptance probability
    out: str | Path = "tree.png"  # .png or .svg
    acceptance_model: str = DEFAULT_ACCEPTANCE_MODEL


@dataclass(frozen=True, kw_only=True)
class DecodeConfig(EngineSettings, RuleSettings):
    tree: str | None = None  # None: plain decoding
    drafter: str = "heads"  # heads (--heads), ngram[:MIN-MAX], draft:MODEL or eagle3[:DIR] (treeopt.core.drafter)
    max_new_tokens: int = 128

    def __post_init__(self):
        EngineSettings.__post_init__(self)
        self.check_rule()
        check_drafter(self)
        at_least(self, max_new_tokens=1)


@dataclass(frozen=True, kw_only=True)
class BenchConfig(EngineSettings, RuleSettings, VllmSettings):
    OPTION = {"out": "--output-dir"}
    trees: tuple[str, ...] = ()  # tree files, published names or list strings
    cartesian: tuple[str, ...] = ()  # Cartesian trees, top-k per depth: 2x3
    drafter: str = "heads"  # heads (--heads), ngram[:MIN-MAX], draft:MODEL or eagle3[:DIR] (treeopt.core.drafter)
    prompts: str | None = None  # None: treeopt.core.prompts.default_prompts()
    first: int = 20  # the first N prompts, in file order
    max_new_tokens: int = 128
    calibration: str | Path | None = None  # adds predicted tokens/step
    out: str | Path | None = None  # directory for bench.csv and bench.json
    repeats: int = 5  # timed forwards per tree size for forward_ms
    chains: str = "1,2,3,4"  # engine vllm: chain lengths k to run (plain vLLM, k = 0, always runs)
    serving_batches: str | None = None  # engine vllm: concurrent requests, comma-separated (None: 1)

    def __post_init__(self):
        EngineSettings.__post_init__(self)
        self.check_rule()
        check_drafter(self)
        at_least(self, first=1, max_new_tokens=1, repeats=1)
        self.check_engine(vllm_only=("chains", "serving_batches", "vllm_python"),
                          treeopt_only=("trees", "cartesian", "device_map", "max_memory", "threads", "acceptance",
                                        "repeats"))
        if self.engine == "vllm":
            if not int_list(self.chains, "--chains", 1):
                raise TreeoptError("--chains is empty: give chain lengths, e.g. 1,2,3,4")
            int_list(self.serving_batches, "--serving-batches", 1)
            if self.device not in ("auto", "cpu"):
                raise TreeoptError(f"--engine vllm runs on this CPU: drop --device {self.device}")
        elif not self.trees and not self.cartesian:
            raise TreeoptError("nothing to compare with plain decoding: pass --tree FILE and/or --cartesian 2x3")


@dataclass(frozen=True, kw_only=True)
class ProfileConfig(EngineSettings, VllmSettings):
    out: str | Path = "latency.csv"  # what `search --nodes auto --latency` reads
    sizes: str | None = None  # tree sizes, comma-separated; None: treeopt.decoding.profile.DEFAULT_SIZES (or the tree's)
    serving_batches: str = "1"  # sequences per forward, comma-separated: one set of rows each
    context: int = 256  # tokens already in the KV cache
    repeats: int = 5  # timed forwards per size (the median is kept)
    tree: str | Path | None = None  # time this tree's first N nodes at each size N
    chains: str = "0,1,2,3,4"  # engine vllm: chain lengths k to time (0: plain)
    new_tokens: int = 32  # engine vllm: tokens generated per request per timing
    prompts: str | None = None  # engine vllm: time on these instructions (real acceptance), not random tokens
    first: int | None = None  # engine vllm with prompts: the first N
    drafter: str = "heads"  # what drafts (treeopt.core.drafter): treeopt times its drafting step, vLLM drafts with it

    def __post_init__(self):
        EngineSettings.__post_init__(self)
        at_least(self, context=1, repeats=1, new_tokens=1, first=1)
        kind = parse_drafter(self.drafter).kind
        if kind != "heads":
            not_with(self, f"--drafter {self.drafter}", "heads")
            if self.engine == "treeopt":
                not_with(self, f"--drafter {kind} (treeopt drafts one sequence at a time)", "serving_batches")
        self.check_engine(vllm_only=("chains", "new_tokens", "prompts", "first", "vllm_python"),
                          treeopt_only=("sizes", "tree", "device_map", "max_memory", "threads", "repeats"))
        if self.engine == "vllm" and not int_list(self.chains, "--chains", 0):
            raise TreeoptError("--chains is empty: give chain lengths, e.g. 0,1,2,3,4")
        if self.first is not None and self.prompts is None:
            raise TreeoptError("--first is for --prompts: pass --prompts FILE too, or drop --first")
        if self.sizes is not None and not int_list(self.sizes, "--sizes", 0):
            raise TreeoptError("--sizes is empty: give tree sizes, e.g. 0,1,2,4,8 (or drop it for the default sizes)")
        if not int_list(self.serving_batches, "--serving-batches", 1):
            raise TreeoptError("--serving-batches is empty: give batch sizes, e.g. 1,4,16")


@dataclass(frozen=True, kw_only=True)
class ExportHeadsConfig:
    OPTION = {"out": "--output-dir"}
    model: str = DEFAULT_MODEL  # the base model the heads were trained for (a shared lm_head is its own)
    heads: str | None = None  # a directory (either published Medusa layout), or None: the shipped heads
    fmt: str = "vllm"  # vllm: the checkpoint vLLM's Medusa drafter loads
    out: str | Path = ...  # the directory to write (required)

    def __post_init__(self):
        if self.fmt != "vllm":
            raise TreeoptError(f"--format {self.fmt!r}: export-heads writes vllm")
        if self.out is ...:
            raise TreeoptError("pass --output-dir DIR: where to write the heads")
