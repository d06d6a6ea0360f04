"""Instructions to run the model on: AlpacaEval (through `datasets`), a local file, or a hub dataset."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from treeopt.core.env import DATA_DIR
from treeopt.core.errors import TreeoptError

ALPACA_EVAL = "alpaca_eval"  # tatsu-lab/alpaca_eval on the Hugging Face hub
FIELDS = ("instruction", "prompt")
SOURCE_FIELDS = ("dataset", "source")  # a record's source (AlpacaEval: helpful_base, koala, oasst, ...)
OFFLINE_PROMPTS = DATA_DIR / "prompts" / "offline.json"  # general instructions for the demo offline


def local_alpaca_eval() -> Path | None:
    """The copy of AlpacaEval beside a checkout (../shared/data/alpaca_eval.json), if there is one."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        path = base.parent / "shared" / "data" / "alpaca_eval.json"
        if path.is_file():
            return path
    return None


def default_prompts() -> str:
    """What commands read when no --prompts is given: the local AlpacaEval copy, else the hub's."""
    path = local_alpaca_eval()
    return str(path) if path else ALPACA_EVAL


def load_instructions(source: str = ALPACA_EVAL, limit: int | None = None, offset: int = 0) -> list[str]:
    """Instructions from `source`: `alpaca_eval`, a .json/.jsonl file whose records have an `instruction`
    or `prompt` field, or a Hugging Face dataset id. `offset`/`limit` take a slice."""
    end = None if limit is None else offset + limit
    return load_prompts(source)[0][offset:end]


def load_prompts(source: str = ALPACA_EVAL) -> tuple[list[str], list[str]]:
    """All (instructions, sources) of `source` (see `load_instructions`); a record's source is its
    `dataset` or `source` field, "" where it has neither."""
    records = read_records(source)
    instructions = [_field(r, source, n) for n, r in enumerate(records)]
    if not instructions:
        raise TreeoptError(f"{source} holds no records: pass a file with at least one instruction")
    sources = [next((str(r[f]) for f in SOURCE_FIELDS if isinstance(r, dict) and r.get(f)), "") for r in records]
    return instructions, sources


def stratified_sample(sources: list[str], n: int, seed: int = 0) -> list[int]:
    """Indices of `n` records drawn at random (seeded) so that each source gets its share of `n`
    (largest remainders round it), in file order. Without sources: a plain random draw."""
    rng = np.random.default_rng(seed)
    groups = {s: np.flatnonzero(np.array(sources) == s) for s in dict.fromkeys(sources)}  # source -> indices
    n = min(n, len(sources))
    quota = np.array([len(g) for g in groups.values()]) * n / len(sources)
    take = np.floor(quota).astype(int)
    take[np.argsort(take - quota, kind="stable")[: n - take.sum()]] += 1  # largest remainders first
    picked = [rng.choice(g, k, replace=False) for g, k in zip(groups.values(), take)]
    return sorted(int(i) for i in np.concatenate(picked))


def normalized(text: str) -> str:
    """Prompt text for overlap checks: lower case, whitespace collapsed."""
    return re.sub(r"\s+", " ", text).strip().lower()


def overlap(measured: list[str], calibrated: list[str]) -> int:
    """How many of the `measured` prompts appear (normalized exact text) among the `calibrated` ones."""
    seen = {normalized(t) for t in calibrated}
    return sum(normalized(t) in seen for t in measured)


def overlap_warning(n: int, total: int, what: str) -> str:
    """The warning line for `n` of `total` `what` prompts that were also calibrated on ("" when none)."""
    if not n:
        return ""
    return (f"warning: {n} of the {total} {what} prompts are also in the calibration (same text): those "
            "figures are not held out; measure on prompts the calibration has not seen")


def read_records(source: str) -> list:
    """The records of a .json/.jsonl file, or of a Hugging Face dataset id (its eval split, else its first)."""
    path = Path(source).expanduser()
    if path.suffix in (".json", ".jsonl") or path.exists():
        return _read_file(path)
    return _read_hub(source)


def _field(record, source, n) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        for f in FIELDS:
            if isinstance(record.get(f), str) and record[f].strip():
                return record[f]
    raise TreeoptError(f"{source}: record {n} has no non-empty `instruction` or `prompt` field: add one")


def _read_file(path: Path) -> list:
    if path.is_dir():
        raise TreeoptError(f"prompts file {path} is a directory: pass a .json or .jsonl file in it")
    if not path.is_file():
        raise TreeoptError(f"prompts file {path} not found: pass an existing .json or .jsonl file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TreeoptError(f"{path} is not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x}; a binary file?): "
                           "pass a .json or .jsonl file of instructions") from None
    if not text.strip():
        raise TreeoptError(f"{path} is empty: pass a file with at least one instruction")
    if path.suffix == ".jsonl":
        return [_json(line, path, n) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    data = _json(text, path)
    if isinstance(data, dict):  # {"data": [...]} or {"instructions": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else [data]
    return data


def _json(text: str, path: Path, line: int = 1):
    """json.loads(text), where `text` starts at line `line` of `path`; a one-line error naming the file's line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        kind = "JSON lines" if path.suffix == ".jsonl" else "JSON"
        raise TreeoptError(f"{path} is not valid {kind} (line {line + e.lineno - 1}: {e.msg}): fix the file") from None


def _read_hub(name: str) -> list:
    from treeopt.core.env import hub_reachable

    repo, config = ("tatsu-lab/alpaca_eval", "alpaca_eval") if name == ALPACA_EVAL else (name, None)
    if not hub_reachable():
        raise TreeoptError(f"cannot reach the Hugging Face hub to load {repo!r}: pass --prompts PATH "
                           "to a local .json/.jsonl file with an `instruction` field")
    try:
        import datasets

        ds = datasets.load_dataset(repo, config)
    except Exception as e:  # datasets raises many types (connection, missing config, scripts)
        raise TreeoptError(f"cannot load dataset {repo!r} ({type(e).__name__}): pass --prompts PATH to a local "
                           ".json/.jsonl file") from None
    split = "eval" if "eval" in ds else next(iter(ds))
    return list(ds[split])

