"""Tree files: read and write a `Tree` as JSON, as a Python file for the Medusa repo, as
TensorRT-LLM's `--medusa_choices` string, as vLLM's `--speculative-config`, or as a top-1 chain
length. All round-trip (paths and their order).

- ``json``: ``{"medusa_choices": [[0], [0, 0], ...], "nodes": N, "predicted_tokens_per_step": x,
  "acceptance": "greedy" or "typical" (the rule the tree was searched for; typical adds temperature,
  posterior_threshold, posterior_alpha, seed), "acceptance_model": ..., "calibration": ...,
  "best_chain_length": c, ...}``.
- ``python``: ``medusa_choices = [[0], [0, 0], ...]`` (drops into medusa/model/medusa_choices.py),
  plus ``treeopt_meta = {...}``. Read with `ast.literal_eval`, never executed.
- ``trtllm``: one line ``[[0], [0, 0], [1]]``, for ``--medusa_choices`` of TensorRT-LLM's TensorRT-engine
  Medusa path (``trtllm-build`` engines; the releases before that backend's removal,
  NVIDIA/TensorRT-LLM#15918: current TensorRT-LLM reads no tree). TensorRT-LLM sorts the paths itself
  and accepts leaf-only lists: the reader adds missing ancestors.
- ``vllm``: ``{"method": "medusa", "num_speculative_tokens": k}``, vLLM's ``--speculative-config``
  (add ``"model"``: the heads from ``treeopt export-heads --format vllm``, or name them with the
  drafter ``heads:DIR``; other drafters: ``eagle3``, ``draft_model``, ``ngram``). vLLM (>= 0.32, which
  dropped ``speculative_token_tree`` with its tree attention) drafts a top-1 chain of k tokens for every
  method, so only a chain is written so, and the file holds nothing else: vLLM's `SpeculativeConfig`
  forbids unknown keys.
- ``sglang``: SGLang's launch flags for a top-1 chain of L tokens with EAGLE-3 or a draft model, on
  one line (``python -m sglang.launch_server --model-path MODEL $(cat FILE)``); ``trtllm-eagle3``:
  TensorRT-LLM's LLM API options, ``{"speculative_config": {"decoding_type": "Eagle3", "max_draft_len":
  L, "speculative_model": DIR}}`` (JSON, which ``trtllm-serve --extra_llm_api_options`` reads as YAML).
  vLLM's, SGLang's and TensorRT-LLM's configs name the drafter (the metadata's ``drafter``, e.g.
  ``eagle3:DIR``; heads when none): their fields and rules are `treeopt.core.serving`'s.
- ``chain``: ``{"chain_length": L, "predicted_tokens_per_step": x, ...}`` for servers that draft a
  top-1 chain (TGI ``--speculate L``, llama.cpp ``--draft-max L``); only a chain can be written so.

Which consumer accepts which tree is `treeopt.search.targets`' business; these writers only format.

A tree spec (`read_tree`) is a file path, ``file.py:name`` for one list of a Python file, the name
of a published Medusa tree (``mc_sim_7b_63``, see `treeopt.core.published`), or a literal list string.
"""

from __future__ import annotations

import ast
import json
import shlex
from pathlib import Path

from treeopt.core.errors import TreeoptError
from treeopt.core.fileio import write_text
from treeopt.core.published import PUBLISHED
from treeopt.core.serving import ENGINE, read_chain_length, sglang_args, trtllm_eagle3_config, vllm_config
from treeopt.core.tree import Tree

FORMATS = ("json", "python", "trtllm", "vllm", "chain", "sglang", "trtllm-eagle3")
SUFFIX_FORMAT = {".json": "json", ".py": "python", ".txt": "trtllm", ".args": "sglang", ".yaml": "trtllm-eagle3",
                 ".yml": "trtllm-eagle3"}
FIX = "write medusa_choices as a list of rank paths, e.g. [[0], [0, 0], [1]]"


def _choices(obj, source: str) -> list[list[int]]:
    """Check that `obj` is a list of non-empty lists of non-negative ints."""
    if not isinstance(obj, (list, tuple)):
        raise TreeoptError(f"{source}: medusa_choices is a {type(obj).__name__}, not a list: {FIX}")
    for p in obj:
        if not isinstance(p, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in p):
            raise TreeoptError(f"{source}: {p!r} is not a list of integer ranks: {FIX}")
    return [list(p) for p in obj]


def _literal(text: str, source: str):
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise TreeoptError(f"{source} is not a literal list of rank paths: {FIX}") from None


def parse_trtllm(text: str, source: str = "medusa_choices string") -> Tree:
    """TensorRT-LLM's `--medusa_choices` string: any order, leaf-only lists allowed."""
    return Tree.from_choices(_choices(_literal(text, source), source), complete=True)


def parse_python(text: str, name: str | None = None, source: str = "python file") -> tuple[Tree, dict]:
    """`medusa_choices = [...]` (or the list called `name`) from Python source, without running it."""
    try:
        module = ast.parse(text)
    except SyntaxError as e:
        raise TreeoptError(f"{source} is not valid Python (line {e.lineno}): {FIX}") from None
    lists: dict[str, ast.expr] = {}
    for node in module.body:
        if isinstance(node, ast.Assign):
            lists.update({t.id: node.value for t in node.targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            lists[node.target.id] = node.value
    meta = lists.pop("treeopt_meta", None)
    if name is None:
        candidates = [n for n, v in lists.items() if isinstance(v, (ast.List, ast.Tuple))]
        name = "medusa_choices" if "medusa_choices" in lists else (candidates[0] if len(candidates) == 1 else None)
        if name is None:
            raise TreeoptError(f"{source} has no `medusa_choices = [...]`: add it, or pick a list with "
                               f"FILE.py:NAME (lists there: {', '.join(candidates) or 'none'})")
    if name not in lists:
        raise TreeoptError(f"{source} has no list named {name!r}: pick one of {', '.join(lists) or 'none'}")
    try:
        value = ast.literal_eval(lists[name])
        meta = ast.literal_eval(meta) if meta is not None else {}
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise TreeoptError(f"{source}: {name} is not a literal list (no names or calls): {FIX}") from None
    return Tree.from_choices(_choices(value, source)), meta if isinstance(meta, dict) else {}


def parse_json(text: str, source: str = "json file") -> tuple[Tree, dict]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise TreeoptError(f"{source} is not valid JSON (line {e.lineno}): write a tree file with "
                           "`treeopt search -o tree.json` or fix the syntax") from None
    if isinstance(obj, list):  # a bare medusa_choices list
        return Tree.from_choices(_choices(obj, source)), {}
    if isinstance(obj, dict) and "speculative_token_tree" in obj:
        raise TreeoptError(f"{source} holds speculative_token_tree, which vLLM >= 0.32 rejects (it drafts a top-1 "
                           "chain): re-export with `treeopt export TREE --format vllm` (a chain)")
    if isinstance(obj, dict) and "num_speculative_tokens" in obj and "medusa_choices" not in obj:  # vLLM's config
        return _chain(obj["num_speculative_tokens"], source), {k: v for k, v in obj.items() if k != "num_speculative_tokens"}
    if isinstance(obj, dict) and "chain_length" in obj:
        return _chain(obj["chain_length"], source), {k: v for k, v in obj.items() if k != "chain_length"}
    if not isinstance(obj, dict) or "medusa_choices" not in obj:
        raise TreeoptError(f"{source} has no \"medusa_choices\" key: {FIX}")
    meta = {k: v for k, v in obj.items() if k != "medusa_choices"}
    tree = Tree.from_choices(_choices(obj["medusa_choices"], source))
    for key, have in (("nodes", tree.num_nodes), ("depth", tree.depth)):  # a tree file's own summary
        if key in meta and meta[key] != have:
            raise TreeoptError(f"{source} is damaged: it says {key} {meta[key]!r} but its medusa_choices have "
                               f"{have}: write it again (`treeopt search -o FILE`, `treeopt export`)")
    return tree, meta


def _chain(length, source: str) -> Tree:
    if not isinstance(length, int) or isinstance(length, bool) or length < 0:
        raise TreeoptError(f"{source}: chain length {length!r} is not a whole number: write e.g. 3")
    return Tree.chain(length)


def read_tree_meta(spec: str | Path) -> tuple[Tree, dict]:
    """A tree and the metadata stored with it (empty for formats that hold none); see `read_tree`."""
    spec = str(spec)
    path, name = spec, ""
    head, sep, tail = spec.rpartition(":")
    if sep and head.endswith(".py") and tail.isidentifier():
        path, name = head, tail
    file = Path(path)
    if file.is_dir():
        raise TreeoptError(f"tree file {file} is a directory: pass a .json/.py/.txt tree file")
    if file.is_file():
        try:
            text = file.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise TreeoptError(f"cannot read tree file {file} ({type(e).__name__}): pass a text tree file") from None
        fmt = SUFFIX_FORMAT.get(file.suffix.lower(), "trtllm")
        try:
            if fmt == "json":
                return parse_json(text, str(file))
            if fmt == "python":
                return parse_python(text, name or None, str(file))
            if fmt in ("sglang", "trtllm-eagle3"):
                k, meta = read_chain_length(fmt, text, str(file))
                return _chain(k, str(file)), meta
            return parse_trtllm(text, str(file)), {}
        except TreeoptError as e:  # the tree's own checks (treeopt.core.tree) do not know the file
            if str(file) in str(e):
                raise
            raise TreeoptError(f"{file}: {e}", e.exit_code) from None
    if spec in PUBLISHED:
        return Tree(tuple(map(tuple, PUBLISHED[spec]))), {"source": f"published Medusa tree {spec}"}
    if spec.lstrip().startswith(("[", "(")):
        return parse_trtllm(spec), {}
    raise TreeoptError(f"tree {spec!r} not found: pass a .json/.py/.txt tree file, a published tree name "
                       f"({', '.join(PUBLISHED)}) or a list string like '[[0], [0, 0]]'")


def read_tree(spec: str | Path, num_heads: int | None = None, top_k: int | None = None) -> Tree:
    """Read a tree from a file (.json, .py, other = TensorRT-LLM string), `file.py:name`, a published
    tree name or a literal list string; check it fits `num_heads` heads and top-`top_k` if given."""
    return checked(read_tree_meta(spec)[0], spec, num_heads, top_k)


def checked(tree: Tree, spec: str | Path, num_heads: int | None = None, top_k: int | None = None) -> Tree:
    """`tree.check(num_heads, top_k)`, its one-line error naming the tree's file (or spec)."""
    try:
        return tree.check(num_heads, top_k)
    except TreeoptError as e:
        name = str(spec) if Path(str(spec)).is_file() or len(str(spec)) < 60 else str(spec)[:57] + "..."
        raise TreeoptError(f"{name}: {e}") from None


def _plain(meta: dict) -> dict:
    """Metadata as plain JSON values (numpy scalars and arrays, paths become floats, lists, strings)."""
    def default(x):
        return x.tolist() if hasattr(x, "tolist") else str(x)
    return json.loads(json.dumps(meta, default=default))


def _json_lines(obj: dict) -> str:
    """One key per line, lists kept on one line: readable and still plain JSON."""
    return "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in obj.items()) + "\n}\n"


def format_tree(tree: Tree, format: str = "json", **meta) -> str:
    """The text of a tree file in `format` (see FORMATS and the module docstring)."""
    choices = json.dumps(tree.choices)
    meta = _plain(meta)
    if format == "json":
        return _json_lines({"medusa_choices": tree.choices, "nodes": tree.num_nodes, "depth": tree.depth, **meta})
    if format in ("vllm", "chain", "sglang", "trtllm-eagle3") and tree != Tree.chain(tree.num_nodes):
        who = f"{ENGINE[format]} drafts" if format in ENGINE else "a chain file holds"
        raise TreeoptError(f"{who} a top-1 chain only, the tree branches: search with --target "
                           f"{'vllm' if format == 'vllm' else 'chain'}")
    drafter = meta.get("drafter")
    if format == "vllm":
        return _json_lines(vllm_config(drafter, tree.num_nodes))
    if format == "sglang":
        return shlex.join(sglang_args(drafter, tree.num_nodes)) + "\n"
    if format == "trtllm-eagle3":
        options = trtllm_eagle3_config(drafter, tree.num_nodes)
        return "{\n  \"speculative_config\": " + json.dumps(options["speculative_config"]) + "\n}\n"
    if format == "chain":
        return _json_lines({"chain_length": tree.num_nodes, **meta})
    if format == "python":
        info = ", ".join(f"{k.replace('_', ' ')} {v:.3g}" if isinstance(v, float) else f"{k.replace('_', ' ')} {v}"
                         for k, v in meta.items() if k in ("predicted_tokens_per_step", "acceptance", "temperature", "acceptance_model",
                                          "calibration"))
        return (f"# Medusa tree written by treeopt: {tree.num_nodes} nodes, depth {tree.depth}"
                + (f"; {info}" if info else "") + ".\n"
                "# Drop-in for the Medusa repo (medusa/model/medusa_choices.py); read back with ast, never run.\n"
                f"medusa_choices = {choices}\n"
                f"treeopt_meta = {meta!r}\n")
    if format == "trtllm":
        return choices + "\n"
    raise TreeoptError(f"unknown tree format {format!r}: use --format {', '.join(FORMATS)}")


def file_format(path: str | Path, format: str | None = None) -> str:
    """`format`, or the one the suffix implies (.json, .py, .args, .yaml, else trtllm)."""
    return format or SUFFIX_FORMAT.get(Path(path).suffix.lower(), "trtllm")


def write_tree(tree: Tree, path: str | Path, format: str | None = None, **meta) -> Path:
    """Write `tree` atomically in `format` (default: from the suffix, see `file_format`)."""
    return write_text(Path(path), format_tree(tree, file_format(path, format), **meta))
