"""What a serving engine is told to draft a top-1 chain of k tokens with a given drafter, per engine:
vLLM's `--speculative-config`, SGLang's launch flags, TensorRT-LLM's `speculative_config` for
EAGLE-3. Pure formatting and the engines' own rules, as read in their source (file and function
cited); which tree an engine drafts is `treeopt.search.targets`' business (a top-1 chain for all three).

vLLM 0.32 (`vllm/config/speculative.py`, `SpeculativeConfig`):

- ``method``: ``medusa`` (heads), ``eagle3``, ``draft_model``, ``ngram`` (`SpeculativeMethod`); a
  drafter with weights names them in ``model`` (`__post_init__` stops with "num_speculative_tokens
  was provided but without speculative model" otherwise); ngram takes none and reads
  ``prompt_lookup_min``/``prompt_lookup_max`` (>= 1, min <= max, `__post_init__`).
- ``num_speculative_tokens`` > 0 (`_verify_args`).
- ``num_speculative_tokens_per_batch_size``: inclusive [low, high, k] ranges
  (`vllm/v1/spec_decode/dynamic/utils.py`, `validate_and_normalize_dynamic_sd_schedule`: positive,
  low <= high, k >= 0, sorted, non-overlapping, the first starting at 1); the scheduler looks k up per
  step (`vllm/v1/core/sched/scheduler.py`, `Scheduler.__init__`, `build_dynamic_sd_schedule_lookup`:
  the last range's k carries on to larger batches, every k capped at ``num_speculative_tokens``) and
  hands it to the drafter. EAGLE-3 and a draft model take it (`vllm/v1/spec_decode/llm_base_proposer.py`,
  `SpecDecodeBaseProposer.propose` sets its k per call), so does n-gram lookup
  (`vllm/v1/spec_decode/ngram_proposer.py`, `NgramProposer.propose` asserts k <= the configured one);
  Medusa does not (`vllm/v1/spec_decode/medusa.py`, `MedusaProposer.propose` asserts k == the
  configured one): `VARIABLE_K`.

SGLang (`python/sglang/srt/server_args.py`, `ServerArgs`: the flags are the fields
``speculative_algorithm``, ``speculative_draft_model_path``, ``speculative_num_steps``,
``speculative_eagle_topk``, ``speculative_num_draft_tokens``; `python/sglang/srt/arg_groups/speculative_hook.py`,
`handle_speculative_decoding` sends EAGLE, EAGLE3 and STANDALONE (a draft model) to
`_handle_eagle_family`, which sets num_draft_tokens = num_steps + 1 whenever topk is 1, and wants
all three given together). A chain of k: k steps of top-1, k + 1 tokens verified. SGLang's NGRAM
is its own trie lookup (`_handle_ngram`), not vLLM's prompt lookup the record replays, and it
serves no Medusa heads.

TensorRT-LLM (`tensorrt_llm/llmapi/llm_args.py`, `Eagle3DecodingConfig` over
`DecodingBaseConfig`): ``decoding_type: Eagle3``, ``max_draft_len`` (the chain length),
``speculative_model`` (alias ``speculative_model_dir``). Written as the LLM API options YAML that
``trtllm-serve --extra_llm_api_options FILE`` reads (its ``speculative_config`` key; in Python
``LLM(..., speculative_config=Eagle3DecodingConfig(...))`` takes the same fields). The file is
JSON, which YAML reads as it is. Its per-batch-size ``draft_len_schedule`` is not written: treeopt
sizes schedules from vLLM's measured step times (`treeopt.search.vllm`), and TensorRT-LLM's
differ; its rule is in docs/exports.md.
"""

from __future__ import annotations

import json
import shlex

from treeopt.core.drafter import DrafterSpec, parse_drafter
from treeopt.core.errors import TreeoptError

SERVING_FORMATS = ("vllm", "sglang", "trtllm-eagle3")  # the formats that take --drafter
VLLM_METHOD = {"heads": "medusa", "eagle3": "eagle3", "draft": "draft_model", "ngram": "ngram"}
VARIABLE_K = frozenset({"eagle3", "draft_model", "ngram"})  # vLLM drafters that take a per-step k
SGLANG_ALGORITHM = {"eagle3": "EAGLE3", "draft": "STANDALONE"}
ENGINE = {"vllm": "vLLM", "sglang": "SGLang", "trtllm-eagle3": "TensorRT-LLM"}


def check_serving(format: str, drafter: str | None) -> DrafterSpec:
    """The drafter `format`'s engine can serve, or a one-line error naming what it serves."""
    spec = parse_drafter(drafter)
    if format == "sglang" and spec.kind not in SGLANG_ALGORITHM:
        raise TreeoptError(f"SGLang serves no --drafter {spec.kind} chain (its NGRAM is its own trie lookup, and it has "
                           "no Medusa heads): pass --drafter eagle3:DIR or draft:MODEL, or use --format vllm")
    if format == "trtllm-eagle3" and spec.kind != "eagle3":
        raise TreeoptError(f"--format trtllm-eagle3 is TensorRT-LLM's Eagle3DecodingConfig: pass --drafter eagle3:DIR "
                           f"(not {spec.kind}), or use --format vllm")
    if spec.kind == "eagle3" and not spec.path:
        raise TreeoptError("--drafter eagle3 needs its checkpoint: pass --drafter eagle3:DIR")
    return spec


PLAIN = {"vllm": "serve vLLM without --speculative-config", "sglang": "launch SGLang without --speculative-algorithm",
         "trtllm-eagle3": "serve TensorRT-LLM without speculative_config"}


def _chain_length(k: int, format: str) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise TreeoptError(f"chain length {k!r}: pass a whole number of draft tokens >= 1")
    if k == 0:
        raise TreeoptError(f"a chain of 0 tokens is plain decoding: {PLAIN[format]}")
    return k


def vllm_config(drafter: str | None, k: int, ranges: list[list[int]] | None = None) -> dict:
    """vLLM 0.32's `--speculative-config` for a k-token chain of `drafter` (module docstring); with
    `ranges` ([low, high, k_i] per batch size, k = the largest k_i), the per-batch-size schedule.
    heads without a directory: no "model" (add the heads from `treeopt export-heads --format vllm`)."""
    spec = check_serving("vllm", drafter)
    k = _chain_length(k, "vllm")
    config: dict = {"method": VLLM_METHOD[spec.kind]}
    if spec.kind == "ngram":
        config.update(prompt_lookup_min=spec.min_n, prompt_lookup_max=spec.max_n)
    elif spec.path:
        config["model"] = str(spec.path)
    config["num_speculative_tokens"] = k
    if ranges is not None:
        parsed = validate_ranges(ranges)
        if max(r[2] for r in parsed) != k:
            raise TreeoptError(f"num_speculative_tokens {k} is not the schedule's largest k: vLLM caps every "
                               "range's k at it (build_dynamic_sd_schedule_lookup)")
        config["num_speculative_tokens_per_batch_size"] = [list(r) for r in parsed]
    return config


def validate_ranges(ranges) -> list[tuple[int, int, int]]:
    """vLLM's rules for `num_speculative_tokens_per_batch_size` (module docstring), re-implemented from
    `validate_and_normalize_dynamic_sd_schedule`; a TreeoptError names the broken one."""
    if not isinstance(ranges, list) or not ranges:
        raise TreeoptError("num_speculative_tokens_per_batch_size must be a non-empty list of [low, high, k]")
    parsed = []
    for r in ranges:
        if not isinstance(r, (list, tuple)) or len(r) != 3:
            raise TreeoptError(f"{r!r}: each range is [low, high, k]")
        low, high, k = map(int, r)
        if low <= 0 or high <= 0:
            raise TreeoptError(f"range ({low}, {high}) must be positive")
        if low > high:
            raise TreeoptError(f"range ({low}, {high}): low must be <= high")
        if k < 0:
            raise TreeoptError(f"range ({low}, {high}): k {k} must be >= 0")
        parsed.append((low, high, k))
    parsed.sort(key=lambda r: r[0])
    end = 0
    for low, high, _ in parsed:
        if low <= end:
            raise TreeoptError("batch-size ranges must be sorted and non-overlapping")
        end = high
    if parsed[0][0] != 1:
        raise TreeoptError("the first batch-size range must start at 1")
    return parsed


def sglang_args(drafter: str | None, k: int) -> list[str]:
    """SGLang's launch flags for a k-token top-1 chain (module docstring): k steps of topk 1,
    k + 1 draft tokens verified (the only value `_handle_eagle_family` keeps at topk 1)."""
    spec = check_serving("sglang", drafter)
    k = _chain_length(k, "sglang")
    return ["--speculative-algorithm", SGLANG_ALGORITHM[spec.kind], "--speculative-draft-model-path", str(spec.path),
            "--speculative-num-steps", str(k), "--speculative-eagle-topk", "1",
            "--speculative-num-draft-tokens", str(k + 1)]


def trtllm_eagle3_config(drafter: str | None, k: int) -> dict:
    """TensorRT-LLM's LLM API options for a k-token EAGLE-3 chain: {"speculative_config": {...}}."""
    spec = check_serving("trtllm-eagle3", drafter)
    k = _chain_length(k, "trtllm-eagle3")
    return {"speculative_config": {"decoding_type": "Eagle3", "max_draft_len": k, "speculative_model": str(spec.path)}}


def read_chain_length(format: str, text: str, source: str) -> tuple[int, dict]:
    """The chain length an SGLang flags file or a TensorRT-LLM options file drafts, and its other
    settings (what `treeopt.core.treefile` writes; vLLM's JSON is read with the tree files' JSON)."""
    try:
        if format == "sglang":
            args = shlex.split(text)
            flags = dict(zip(args[::2], args[1::2]))
            k = int(flags["--speculative-num-steps"])
            if flags.get("--speculative-eagle-topk", "1") != "1":
                raise ValueError("topk is not 1")
            return k, {"speculative_algorithm": flags.get("--speculative-algorithm"),
                       "model": flags.get("--speculative-draft-model-path")}
        config = json.loads(text)["speculative_config"]
        return int(config["max_draft_len"]), {"model": config.get("speculative_model")}
    except (ValueError, KeyError, TypeError) as e:
        raise TreeoptError(f"{source} is not a {ENGINE.get(format, format)} chain config ({type(e).__name__}): write "
                           f"it with `treeopt export TREE --format {format} --drafter KIND:PATH`") from None
