"""vLLM as an engine of treeopt: its heads exported for vLLM's Medusa drafter, vLLM run in its own
environment on a job, and vLLM's time per step plain and with a k-token chain (`profile --engine vllm`).

treeopt never imports vLLM (vLLM pins its own torch build). It writes a JSON job, runs
`treeopt/decoding/vllm_runner.py` with vLLM's interpreter (`--vllm-python`, else
$TREEOPT_VLLM_PYTHON, else `.venv-vllm/bin/python` beside the checkout, made by
`scripts/setup.sh --vllm`), and reads the JSON result. One job is one engine configuration:

- ``model``: a local model directory (the bundled model's converted copy, or --model's);
- ``dtype``, ``max_model_len``, ``max_num_seqs``, ``gpu_memory_utilization`` (on a CPU: the share of
  the host's memory vLLM reserves for its KV cache);
- ``speculative_config``: None (plain) or vLLM's own dict, ``{"method": "medusa", "model": HEADS_DIR,
  "num_speculative_tokens": k}``: vLLM drafts each head's top-1, a k-token chain;
- ``warmup`` and ``runs``: lists of {name, prompts (token ids), max_new_tokens, batch_size,
  ignore_eos}; each run is generated `batch_size` requests at a time, greedily.

The result holds per run: wall_s, generated tokens, every request's tokens, and the change of vLLM's
counters (drafts, draft_tokens, accepted, accepted_per_position); `parse_runs` turns them into
`VllmRun`s. On a CPU vLLM's speculative decoding wants Intel OpenMP preloaded (it warns otherwise):
`engine_env` preloads the `libiomp5.so` of vLLM's `intel-openmp` dependency and, where Debian's
google-perftools installed it, `libtcmalloc_minimal.so.4`.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from treeopt.core.settings import DEFAULT_MODEL
from treeopt.core.errors import TreeoptError
from treeopt.core.fileio import write_text

RUNNER = Path(__file__).with_name("vllm_runner.py")
CHECKOUT = Path(__file__).resolve().parents[1]
DEFAULT_PYTHON = CHECKOUT / ".venv-vllm" / "bin" / "python"
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
ENGINE_DEFAULTS = {"dtype": "float32", "max_model_len": 2048, "max_num_seqs": 16, "gpu_memory_utilization": 0.2,
                   "enforce_eager": True}
# enforce_eager: vLLM's torch.compile takes minutes per engine start on a CPU (one start per chain length)


def engine_dtype(dtype: str) -> str:
    """--dtype for vLLM: auto is treeopt's choice on this machine (bfloat16 where the CPU computes it
    natively, else float32: emulated bfloat16 GEMMs are about 2x slower than float32 on an AVX2 CPU)."""
    import torch

    from treeopt.decoding.models import resolve_dtype

    return str(resolve_dtype(dtype, torch.device("cpu"))).removeprefix("torch.")


def vllm_python(path: str | Path | None = None) -> Path:
    """vLLM's interpreter: `path`, else $TREEOPT_VLLM_PYTHON, else `.venv-vllm/bin/python` here."""
    python = Path(path or os.environ.get("TREEOPT_VLLM_PYTHON") or DEFAULT_PYTHON)
    if not python.is_file():
        raise TreeoptError(f"vLLM's python {python} not found: run `bash scripts/setup.sh --vllm` (makes "
                           ".venv-vllm), or pass --vllm-python / set TREEOPT_VLLM_PYTHON to a python with vLLM")
    return python


def engine_env(python: Path) -> dict[str, str]:
    """The environment vLLM runs in: LD_PRELOAD with Intel OpenMP (from vLLM's venv) and tcmalloc."""
    venv = python.parent.parent
    preload = [str(p) for p in (venv / "lib" / "libiomp5.so", TCMALLOC) if p.is_file()]
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(preload + ([env["LD_PRELOAD"]] if env.get("LD_PRELOAD") else []))
    env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    return env


def run_job(job: dict, python: Path, log: Path | None = None, timeout: float | None = None) -> dict:
    """Run one job through the runner with vLLM's python; its result. vLLM's own output goes to `log`
    (default: a temporary file, gone with the run)."""
    job = {**ENGINE_DEFAULTS, **job}
    with tempfile.TemporaryDirectory(prefix="treeopt-vllm-") as tmp:
        job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps(job))
        log = log or Path(tmp) / "vllm.log"
        with open(log, "w") as f:
            try:
                done = subprocess.run([str(python), "-P", str(RUNNER), str(job_file), str(result_file)], stdout=f,
                                      stderr=subprocess.STDOUT, env=engine_env(python), timeout=timeout)
            except subprocess.TimeoutExpired:
                raise TreeoptError(f"vLLM did not finish within {timeout:.0f} s (log: {log})") from None
        if done.returncode != 0 or not result_file.is_file():
            tail = [l for l in log.read_text(errors="replace").splitlines() if l.strip()][-3:]
            raise TreeoptError(f"vLLM failed (exit {done.returncode}): {' | '.join(tail)[-400:]}; full log {log}")
        return json.loads(result_file.read_text())


def speculative_config(drafter: str | None, k: int) -> dict | None:
    """vLLM's speculative config for a k-token chain of `drafter` (a --drafter string with its
    checkpoint: heads:DIR, eagle3:DIR, draft:MODEL, ngram:MIN-MAX; treeopt.core.serving.vllm_config);
    None for plain decoding (k = 0)."""
    from treeopt.core.serving import vllm_config

    return None if k == 0 else vllm_config(drafter, int(k))


@dataclass(frozen=True)
class VllmRun:
    """One run as vLLM measured it."""

    name: str
    batch_size: int
    wall_s: float
    generated: int
    drafts: int  # verification steps that carried a draft, summed over requests
    draft_tokens: int
    accepted: int
    accepted_per_position: tuple[int, ...]
    tokens: tuple[tuple[int, ...], ...]

    @property
    def tokens_per_step(self) -> float:
        """Tokens per verification step per request: 1 (the target's own token) + accepted per draft."""
        return 1.0 + self.accepted / self.drafts if self.drafts else 1.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated / self.wall_s if self.wall_s > 0 else float("nan")


def parse_runs(result: dict) -> list[VllmRun]:
    """The runs of a runner result (see the module docstring), checked for the fields they need."""
    try:
        return [VllmRun(name=r["name"], batch_size=int(r["batch_size"]), wall_s=float(r["wall_s"]),
                        generated=int(r["generated"]), drafts=int(r["drafts"]), draft_tokens=int(r["draft_tokens"]),
                        accepted=int(r["accepted"]), accepted_per_position=tuple(map(int, r["accepted_per_position"])),
                        tokens=tuple(tuple(map(int, t)) for t in r["tokens"]))
                for r in result["runs"]]
    except (KeyError, TypeError, ValueError) as e:
        raise TreeoptError(f"vLLM runner result is malformed ({type(e).__name__}: {e}): "
                           "rerun with the runner shipped with this treeopt") from None


# ---- the model and heads, as vLLM reads them --------------------------------------------------------


@dataclass(frozen=True)
class VllmDrafter:
    """What vLLM drafts with: the --drafter string naming the checkpoint vLLM loads (heads: their
    export), and the longest chain it can draft (None: any)."""

    drafter: str
    max_k: int | None = None

    @property
    def method(self) -> str:
        return speculative_config(self.drafter, 1)["method"]

    def config(self, k: int) -> dict | None:
        return speculative_config(self.drafter, k)


def prepare(model: str, heads: str | None, out: Path, drafter: str | None = None):
    """(model directory vLLM loads, VllmDrafter, tokenizer, model): the model's local copy and what
    `--drafter` names as vLLM reads it (heads: written in vLLM's Medusa layout under `out`/vllm-heads;
    an EAGLE-3 checkpoint: its own directory, already vLLM's layout, checked by loading it)."""
    from treeopt.core.drafter import parse_drafter
    from treeopt.decoding.heads import export_vllm, resolve_heads
    from treeopt.decoding.models import load_model

    spec = parse_drafter(drafter)
    loaded = load_model(model, device="cpu", dtype="float32")
    if spec.kind == "heads":
        medusa = resolve_heads(spec.path or heads, loaded.model)
        heads_dir = export_vllm(medusa, Path(out) / "vllm-heads", loaded.model.get_output_embeddings().weight)
        found = VllmDrafter(f"heads:{heads_dir}", medusa.num_heads)
    elif spec.kind == "eagle3":
        from treeopt.decoding.eagle3 import load_eagle3, shipped_eagle3

        directory = Path(spec.path) if spec.path else shipped_eagle3(loaded.model)
        load_eagle3(directory, loaded.model)  # a one-line error for a checkpoint that is not this model's drafter
        found = VllmDrafter(f"eagle3:{directory.resolve()}")
    elif spec.kind == "ngram":
        found = VllmDrafter(str(spec))
    else:
        found = VllmDrafter(f"draft:{Path(spec.path).resolve() if Path(spec.path).exists() else spec.path}")
    return loaded.source, found, loaded.tokenizer, loaded.model


# ---- profile --engine vllm ------------------------------------------------------------------------------

PROFILE_COLUMNS = ["engine", "batch_size", "context", "nodes", "forward_ms", "ms_per_token", "tokens_per_step",
                   "tokens_per_s", "prefill_ms", "new_tokens", "requests", "vllm", "dtype", "model"]


def profile_vllm(model: str = DEFAULT_MODEL, heads: str | None = None, chains=(0, 1, 2, 3, 4), batch_sizes=(1,),
                 context: int = 256, new_tokens: int = 64, python: str | Path | None = None,
                 out: Path = Path("latency-vllm.csv"), dtype: str = "auto", eager: bool = True,
                 prompts: str | None = None, limit: int | None = None, seed: int = 0, drafter: str | None = None,
                 log=lambda s: None) -> pd.DataFrame:
    """vLLM's time per decoding step and per generated token, plain (nodes 0) and with a k-token Medusa
    chain (nodes k), for each batch size B (concurrent requests).

    The requests: B random-token prompts of `context` tokens, or with `prompts` the first `limit` of
    those instructions (chat template applied; real acceptance), B at a time. Each engine (one per k)
    generates them twice at each B, for 1 token (prefill) and for `new_tokens` + 1 (ignoring EOS); step
    time = (second - first) ÷ steps per request group, steps = `new_tokens` plain, else vLLM's drafts ÷
    requests x B. Rows carry `treeopt search --latency`'s columns (nodes, forward_ms, batch_size), so a
    search prices chains with vLLM's own step times, and tokens_per_s (the second pass's tokens ÷ its
    wall time) and tokens_per_step (vLLM's counters)."""
    python = vllm_python(python)
    dtype = engine_dtype(dtype)
    work = Path(out).with_suffix("")
    engine_dir = work.parent / (work.name + "-engine")  # the exported heads and vLLM's logs
    engine_dir.mkdir(parents=True, exist_ok=True)
    model_dir, drafting, tokenizer, lm = prepare(model, heads, engine_dir, drafter)
    rng = np.random.default_rng(seed)
    vocab = lm.get_output_embeddings().weight.shape[0]
    if prompts is not None:
        from treeopt.decoding.models import chat_prompt
        from treeopt.core.prompts import load_instructions

        chat = [chat_prompt(tokenizer, s) for s in load_instructions(prompts, limit)]
        requests = lambda b: chat  # noqa: E731
        context = max(map(len, chat))
    else:
        requests = lambda b: rng.integers(0, vocab, (b, context)).tolist()  # noqa: E731
    rows = []
    for k in chains:
        runs = []
        for b in batch_sizes:
            ids = requests(b)
            runs += [{"name": f"prefill-{b}", "prompts": ids, "max_new_tokens": 1, "batch_size": b, "ignore_eos": True},
                     {"name": f"decode-{b}", "prompts": ids, "max_new_tokens": new_tokens + 1, "batch_size": b,
                      "ignore_eos": True}]
        log(f"vLLM profile: chain {k}, batch sizes {', '.join(map(str, batch_sizes))}")
        result = run_job({"model": model_dir, "dtype": dtype, "enforce_eager": eager,
                          "max_model_len": context + new_tokens + 16, "max_num_seqs": max(batch_sizes),
                          "speculative_config": drafting.config(k),
                          "warmup": [{**runs[1], "name": "warmup", "prompts": runs[1]["prompts"][:2], "max_new_tokens": 8}],
                          "runs": runs}, python, log=engine_dir / f"vllm-k{k}.log")
        done = parse_runs(result)
        for prefill, decode in zip(done[0::2], done[1::2]):
            b, n = decode.batch_size, len(decode.tokens)
            groups = -(-n // b)  # request groups of b, run one after another
            steps = new_tokens * groups if k == 0 else decode.drafts / b
            ms = (decode.wall_s - prefill.wall_s) * 1e3
            rows.append({"engine": "vllm", "batch_size": b, "context": context, "nodes": k,
                         "forward_ms": ms / steps, "ms_per_token": ms / (decode.generated - prefill.generated) * b,
                         "tokens_per_step": decode.tokens_per_step, "tokens_per_s": decode.tokens_per_s,
                         "prefill_ms": prefill.wall_s * 1e3 / groups, "new_tokens": new_tokens,
                         "requests": n, "vllm": result["vllm"], "dtype": dtype, "model": model})
    df = pd.DataFrame(rows, columns=PROFILE_COLUMNS).sort_values(["batch_size", "nodes"], kind="stable")
    write_text(Path(out), df.to_csv(index=False))
    return df


def render_vllm_profile(df: pd.DataFrame) -> str:
    lines = ["vLLM step time (ms) by batch size (rows) and chain length k (columns; 0 = plain):"]
    table = df.pivot_table(index="batch_size", columns="nodes", values="forward_ms")
    lines.append(table.to_string(float_format=lambda x: f"{x:.1f}"))
    return "\n".join(lines)
