"""The calibration directory: the one place that knows its files. Everything reads it through here.

A calibration run writes into DIR:

- ``ranks.parquet``: one row per (prompt, position) of the base model's greedy continuation
  y_0..y_{T-1}. ``position`` = t is the index of the base model's next token y_t, i.e. the row is
  about the hidden state of the token just before y_t (the last prompt token when t = 0). Column
  ``r{k}`` (k = 1..K) is the 0-based rank of y_{t+k} in head k's distribution there, clipped to
  ``top_k`` (so ``r{k} == top_k`` is a miss), and -1 where y_{t+k} lies past the end of the
  continuation. A decoding step whose root token is y_t accepts tree path (i1, ..., id) exactly when
  r1..rd at t equal i1..id. No independence between heads is assumed.
- ``accuracy.csv``: a_k^(i), long form: head, rank, hits, positions, accuracy, cumulative.
- ``continuations.parquet``: prompt_id, instruction, prompt_ids, tokens (the continuation's ids), stopped
  (True when it ended at EOS rather than at max_new_tokens), source (the prompt's source in the prompt
  file, e.g. AlpacaEval's ``dataset`` field; "" where it has none).
- ``calibration.json``: model, heads, dataset, counts, top_k, max_new_tokens, seed, wall time, versions,
  and ``acceptance``: the rule the record models, ``greedy`` here (records without the key are greedy).

A teacher-forced calibration (``treeopt calibrate --teacher-forced DATA``, ``teacher_forced: true`` in
calibration.json) has the same files with a chat dataset's assistant turns in place of prompts and
continuations: a "prompt" is one assistant turn, its tokens the data's answer (not the base model's
greedy tokens, so its replay predicts decoding only as far as the data resembles the model's output).

A *typical* calibration (``treeopt calibrate --acceptance typical``, written by calibrate/typical.py,
which says what in it is exact and what is estimated) models Medusa's typical acceptance instead:

- ``typical.parquet``: one row per step of the decoder with the probe tree under the rule, per
  prompt: prompt_id, step, position (of the step's root in the output), token (the root), and
  ``a{i}`` (i = 0..n-1) for probe node i (``probe[i]`` in calibration.json): True when, in that step,
  node i's token passes the typical test under its parent's distribution,
  p > min(posterior_threshold, posterior_alpha * exp(-entropy)) at ``temperature``.
  A step accepts a node when it and all its ancestors pass.
- ``calibration.json``: as above, with ``acceptance: typical``, ``temperature``,
  ``posterior_threshold`` (epsilon), ``posterior_alpha`` (delta), ``seed`` (of the sampled roots),
  ``probe`` (the probe tree's rank paths, in column order), ``probe_internal`` (its nodes that have
  children) and ``probe_tokens_per_step`` (the probe decode's own).

Every record is checked as it is loaded (`load_calibration`, `load_typical`, `read_meta`): the columns
and types above, at least one row, ranks within MISSING..top_k, and calibration.json's counts and
settings (top_k, num_heads, num_tokens, num_prompts, num_steps) agreeing with the tables. An edited or
damaged record is a one-line error naming the file and what is wrong, never a changed prediction.
`check_heads` refuses a record made with other heads than a command names beside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from treeopt.core.errors import TreeoptError
from treeopt.core.fileio import atomic_write, write_text
from treeopt.core.tree import Tree

RANKS = "ranks.parquet"
TYPICAL = "typical.parquet"
ACCURACY = "accuracy.csv"
CONTINUATIONS = "continuations.parquet"
META = "calibration.json"
MISSING = -1  # the target token lies past the end of the continuation


def rank_columns(num_heads: int) -> list[str]:
    return [f"r{k}" for k in range(1, num_heads + 1)]


def accuracy_table(ranks: np.ndarray, top_k: int) -> pd.DataFrame:
    """a_k^(i) from a rank matrix [N, K]: each head counts only its own valid positions."""
    rows = []
    for k in range(ranks.shape[1]):
        col = ranks[:, k]
        valid = int((col != MISSING).sum())
        hits = np.bincount(col[(col >= 0) & (col < top_k)], minlength=top_k)[:top_k]
        acc = hits / max(valid, 1)
        for i in range(top_k):
            rows.append({"head": k + 1, "rank": i, "hits": int(hits[i]), "positions": valid,
                         "accuracy": float(acc[i]), "cumulative": float(acc[: i + 1].sum())})
    return pd.DataFrame(rows)


def prompt_folds(prompts: np.ndarray, k: int, seed: int = 0) -> list[np.ndarray]:
    """The prompt ids of `k` folds (k <= number of prompts): a seeded shuffle dealt round-robin."""
    perm = np.random.default_rng(seed).permutation(prompts)
    return [np.sort(perm[i::k]) for i in range(k)]


@dataclass(frozen=True)
class Calibration:
    """A calibration directory, loaded. `ranks` is [N, K] int16 (see the module docstring)."""

    ranks: np.ndarray  # [N, K]
    prompt_ids: np.ndarray  # [N]
    positions: np.ndarray  # [N]
    top_k: int
    meta: dict = field(default_factory=dict)
    directory: Path | None = None
    sources: np.ndarray | None = None  # [N] each row's prompt source; None when not recorded
    memo: dict = field(default_factory=dict, compare=False, repr=False)  # derived data cached by other layers

    @property
    def num_heads(self) -> int:
        return self.ranks.shape[1]

    @property
    def num_positions(self) -> int:
        return self.ranks.shape[0]

    @cached_property
    def accuracy(self) -> np.ndarray:
        """a[k, i]: probability that head k+1's rank-i token is the true one, over its valid positions."""
        t = accuracy_table(self.ranks, self.top_k)
        return t["accuracy"].to_numpy().reshape(self.num_heads, self.top_k)

    @property
    def prompts(self) -> np.ndarray:
        """[P] the distinct prompt ids, sorted."""
        return np.unique(self.prompt_ids)

    def subset(self, prompts: np.ndarray) -> "Calibration":
        """The rows of the given prompt ids (for held-out splits); the same object for the same ids, so
        what is cached on it (`memo`) is shared by every cross-validation over these folds."""
        key = ("subset", np.unique(prompts).tobytes())
        if key not in self.memo:
            keep = np.isin(self.prompt_ids, prompts)
            self.memo[key] = Calibration(self.ranks[keep], self.prompt_ids[keep], self.positions[keep], self.top_k,
                                         self.meta, self.directory, None if self.sources is None else self.sources[keep])
        return self.memo[key]

    def folds(self, k: int, seed: int = 0) -> list[np.ndarray]:
        return prompt_folds(self.prompts, k, seed)

    def source_groups(self) -> dict[str, np.ndarray]:
        """source -> its prompt ids (sorted by source); empty when sources were not recorded."""
        if self.sources is None:
            return {}
        return {str(s): np.unique(self.prompt_ids[self.sources == s]) for s in np.unique(self.sources)}

    def continuations(self) -> pd.DataFrame:
        if self.directory is None or not (self.directory / CONTINUATIONS).is_file():
            raise TreeoptError("this calibration has no continuations.parquet: re-run `treeopt calibrate`")
        try:
            conts = pd.read_parquet(self.directory / CONTINUATIONS)
        except Exception as e:  # pyarrow raises many types for damaged files
            raise _damaged(self.directory / CONTINUATIONS, f"it does not parse ({type(e).__name__})") from None
        if not {"prompt_id", "instruction"} <= set(conts.columns):
            raise _damaged(self.directory / CONTINUATIONS, "it lacks the column prompt_id or instruction")
        return conts


def read_meta(directory: str | Path) -> dict:
    """calibration.json of a calibration directory (greedy or typical), checked to be an object whose
    top_k is a whole number >= 1 (see `check_meta`)."""
    path = Path(directory) / META
    if not path.is_file():
        raise TreeoptError(f"{directory} is not a calibration directory (no {META}): "
                           "run `treeopt calibrate --output-dir DIR` and pass that DIR")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise TreeoptError(f"{path} is damaged (not JSON): re-run calibrate") from None
    return check_meta(meta, path)


def _damaged(path: Path, what: str, fix: str = "re-run `treeopt calibrate`") -> TreeoptError:
    return TreeoptError(f"{path} is damaged: {what}: {fix}")


def _whole(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_meta(meta, path: Path) -> dict:
    """`meta` (calibration.json at `path`) when it is an object with a whole top_k >= 1 and, where
    present, whole counts; else a one-line error naming the file and the field."""
    if not isinstance(meta, dict):
        raise _damaged(path, f"it holds a JSON {type(meta).__name__}, not an object")
    if "top_k" not in meta:
        raise _damaged(path, "it has no top_k")
    for key in ("top_k", "num_heads", "num_prompts", "num_tokens", "num_steps"):
        if key in meta and not (_whole(meta[key]) and meta[key] >= (1 if key in ("top_k", "num_heads") else 0)):
            raise _damaged(path, f"{key} is {meta[key]!r}, not a whole number >= {1 if key in ('top_k', 'num_heads') else 0}")
    settings = meta.get("settings", {})
    if not isinstance(settings, dict):
        raise _damaged(path, f"settings is a {type(settings).__name__}, not an object")
    for key in ("top_k", "num_heads"):  # the run's settings and its summary must agree
        if key in settings and key in meta and settings[key] != meta[key]:
            raise _damaged(path, f"{key} is {meta[key]} but its settings say {settings[key]}")
    return meta


def acceptance_of(meta: dict) -> str:
    """The acceptance rule a record models: greedy or typical."""
    return meta.get("acceptance", "greedy")


def check_rule(directory: str | Path, rule: str) -> dict:
    """The calibration.json of `directory`, or a one-line error when it records another rule than `rule`."""
    meta = read_meta(directory)
    if acceptance_of(meta) != rule:
        raise TreeoptError(f"{directory} records {acceptance_of(meta)} acceptance, not {rule}: pass "
                           f"--acceptance {acceptance_of(meta)}, or calibrate with --acceptance {rule}")
    return meta


def check_heads(meta: dict, directory: str | Path, heads: str, sha256: str) -> None:
    """A one-line error when the record at `directory` was made with other heads than `heads` (whose
    fingerprint is `sha256`, treeopt.decoding.heads.heads_sha256): its predictions are another drafter's.
    Records that do not fingerprint their heads pass."""
    theirs = (meta.get("settings") or {}).get("heads_sha256")
    if theirs and theirs != sha256:
        raise TreeoptError(f"{directory} was calibrated with heads {meta.get('heads', '?')} (sha256 {theirs[:12]}), "
                           f"not with --heads {heads} (sha256 {sha256[:12]}): pass --heads {meta.get('heads', '?')}, "
                           f"or calibrate with --heads {heads}")


def check_drafter(meta: dict, directory: str | Path, drafter: str, sha256: str | None) -> None:
    """A one-line error when the record at `directory` was made by another drafter than --drafter
    `drafter` (fingerprint `sha256`; None: heads, whose own check is check_heads). A record that names
    no drafter is the heads'."""
    theirs = (meta.get("settings") or {}).get("drafter") or "heads"
    kind = drafter.split(":", 1)[0]
    if theirs.split(":", 1)[0] != kind or (sha256 and (meta.get("settings") or {}).get("drafter_sha256") != sha256):
        raise TreeoptError(f"{directory} was calibrated with --drafter {theirs}, not --drafter {drafter}: pass "
                           f"--drafter {theirs}, or calibrate with --drafter {drafter}")


def _integer_columns(df: pd.DataFrame, columns: list[str], path: Path) -> None:
    """Every column named is present, of an integer type, with no missing value."""
    absent = [c for c in columns if c not in df.columns]
    if absent:
        raise _damaged(path, f"it lacks the column{'s' if len(absent) > 1 else ''} {', '.join(absent)}")
    for c in columns:
        if not pd.api.types.is_integer_dtype(df[c].dtype) or pd.api.types.is_bool_dtype(df[c].dtype):
            raise _damaged(path, f"column {c} is {df[c].dtype}, not integers")


def check_ranks(df: pd.DataFrame, meta: dict, path: Path) -> list[str]:
    """The rank columns r1..rK of ranks.parquet at `path` once the table is what the format says (module
    docstring): prompt_id, position and r1..rK integers, at least one row, ranks within MISSING..top_k,
    positions >= 0, and the counts of calibration.json (num_heads, num_tokens, num_prompts) its own."""
    top_k = meta["top_k"]
    cols = sorted((c for c in df.columns if c.startswith("r") and c[1:].isdigit()), key=lambda c: int(c[1:]))
    if not cols or cols != rank_columns(len(cols)):
        raise _damaged(path, f"its rank columns are {', '.join(cols) or 'none'}, not r1..rK")
    _integer_columns(df, ["prompt_id", "position", *cols], path)
    if len(df) == 0:
        raise _damaged(path, "it has no rows")
    ranks = df[cols].to_numpy()
    bad = (ranks < MISSING) | (ranks > top_k)
    if bad.any():
        row, k = np.argwhere(bad)[0]
        raise _damaged(path, f"rank {ranks[row, k]} in {cols[k]} (row {row}) is outside {MISSING}..{top_k} "
                             f"(top_k {top_k}, {MISSING} past the continuation)")
    if (df["position"] < 0).any() or (df["prompt_id"] < 0).any():
        raise _damaged(path, "it has a negative prompt_id or position")
    counts = {"num_heads": len(cols), "num_tokens": len(df)}
    for key, have in counts.items():
        if key in meta and meta[key] != have:
            raise _damaged(path, f"it has {have} {key.removeprefix('num_').replace('tokens', 'rows')} but {META} "
                                 f"says {key} {meta[key]}")
    if "num_prompts" in meta and int(df["prompt_id"].max()) >= meta["num_prompts"]:
        raise _damaged(path, f"prompt_id {int(df['prompt_id'].max())} is beyond {META}'s num_prompts "
                             f"{meta['num_prompts']}")
    return cols


def load_calibration(directory: str | Path) -> Calibration:
    """A greedy calibration directory, validated (see `check_meta`, `check_ranks`): a damaged or edited
    record is a one-line error naming the file and what is wrong, never a silent prediction."""
    directory = Path(directory)
    if (directory / META).is_file():
        check_rule(directory, "greedy")
    if not (directory / RANKS).is_file() or not (directory / META).is_file():
        raise TreeoptError(f"{directory} is not a calibration directory (no {RANKS} or {META}): "
                           "run `treeopt calibrate --output-dir DIR` and pass that DIR")
    meta = read_meta(directory)
    try:
        df = pd.read_parquet(directory / RANKS)
    except Exception as e:  # pyarrow raises many types for damaged files
        raise _damaged(directory / RANKS, f"it does not parse ({type(e).__name__})") from None
    cols = check_ranks(df, meta, directory / RANKS)
    prompt_ids = df["prompt_id"].to_numpy(np.int32)
    return Calibration(ranks=df[cols].to_numpy(np.int16), prompt_ids=prompt_ids,
                       positions=df["position"].to_numpy(np.int32), top_k=int(meta["top_k"]), meta=meta,
                       directory=directory, sources=_row_sources(directory, prompt_ids))


def _row_sources(directory: Path, prompt_ids: np.ndarray) -> np.ndarray | None:
    """[N] the `source` of each row's prompt, from continuations.parquet; None where it has no sources."""
    path = directory / CONTINUATIONS
    if not path.is_file():
        return None
    import pyarrow.parquet as pq

    try:
        if "source" not in pq.read_schema(path).names:
            return None
        conts = pd.read_parquet(path, columns=["prompt_id", "source"])
    except Exception as e:  # pyarrow raises many types for damaged files
        raise _damaged(path, f"it does not parse ({type(e).__name__})") from None
    if not conts["source"].astype(bool).any():
        return None
    by_prompt = dict(zip(conts["prompt_id"].to_numpy(), conts["source"].astype(str)))
    prompts, row = np.unique(prompt_ids, return_inverse=True)
    return np.array([by_prompt.get(p, "") for p in prompts.tolist()] or [""])[row]


def write_calibration(directory: str | Path, ranks: pd.DataFrame, continuations: pd.DataFrame, meta: dict) -> Path:
    """Write the final files of a run, each atomically. `ranks` has prompt_id, position, r1..rK."""
    directory = Path(directory)
    K = sum(1 for c in ranks.columns if c.startswith("r") and c[1:].isdigit())
    table = accuracy_table(ranks[rank_columns(K)].to_numpy(np.int16), int(meta["top_k"]))
    atomic_write(directory / RANKS, lambda p: ranks.to_parquet(p, index=False))
    atomic_write(directory / CONTINUATIONS, lambda p: continuations.to_parquet(p, index=False))
    atomic_write(directory / ACCURACY, lambda p: table.to_csv(p, index=False))
    write_text(directory / META, json.dumps(meta, indent=2) + "\n")
    return directory


@dataclass(frozen=True)
class TypicalRecord:
    """A typical calibration, loaded (see the module docstring); rows in (prompt, step) order."""

    flags: np.ndarray  # [N, n] bool: probe node i passes the typical test in the row's step
    prompt_ids: np.ndarray  # [N]
    positions: np.ndarray  # [N] the step's root position
    probe: Tree
    meta: dict = field(default_factory=dict)
    directory: Path | None = None

    @property
    def num_steps(self) -> int:
        return self.flags.shape[0]

    @property
    def num_heads(self) -> int:
        return int(self.meta.get("num_heads", self.probe.depth))

    @property
    def top_k(self) -> int:
        return self.probe.max_rank

    @property
    def rule(self) -> dict:
        """temperature, posterior_threshold, posterior_alpha, seed: what the record was made under."""
        return {k: self.meta[k] for k in ("temperature", "posterior_threshold", "posterior_alpha", "seed")}

    def subset(self, prompts: np.ndarray) -> "TypicalRecord":
        """The rows of the given prompt ids (for held-out splits)."""
        keep = np.isin(self.prompt_ids, prompts)
        return TypicalRecord(self.flags[keep], self.prompt_ids[keep], self.positions[keep], self.probe, self.meta,
                             self.directory)

    @cached_property
    def open(self) -> np.ndarray:
        """[N, n] bool: node i and all its ancestors pass, i.e. a step may accept node i."""
        out = self.flags.copy()
        for i, parent in enumerate(self.probe.parents):  # parents come first
            if parent >= 0:
                out[:, i] &= out[:, parent]
        return out


def flag_columns(num_nodes: int) -> list[str]:
    return [f"a{i}" for i in range(num_nodes)]


def load_typical(directory: str | Path) -> TypicalRecord:
    """A typical calibration directory, validated like `load_calibration`: calibration.json's probe a
    tree within its num_heads and top_k, typical.parquet with prompt_id, step, position (integers) and one
    boolean a{i} per probe node, at least one row, as many as num_steps says."""
    directory = Path(directory)
    meta = check_rule(directory, "typical")
    path, fix = directory / TYPICAL, "re-run `treeopt calibrate --acceptance typical`"
    for key in ("temperature", "posterior_threshold", "posterior_alpha"):
        if not isinstance(meta.get(key), (int, float)) or isinstance(meta.get(key), bool):
            raise _damaged(directory / META, f"{key} is {meta.get(key)!r}, not a number", fix)
    try:
        probe = Tree(tuple(map(tuple, meta["probe"])))
    except (KeyError, TypeError, ValueError, TreeoptError):
        raise _damaged(directory / META, "its probe is not a tree of rank paths", fix) from None
    if probe.max_rank > meta["top_k"] or probe.depth > meta.get("num_heads", probe.depth):
        raise _damaged(directory / META, f"its probe (depth {probe.depth}, ranks < {probe.max_rank}) exceeds "
                                         f"num_heads {meta.get('num_heads')} or top_k {meta['top_k']}", fix)
    if not path.is_file():
        raise TreeoptError(f"{directory} has no {TYPICAL}: {fix}")
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises many types for damaged files
        raise _damaged(path, f"it does not parse ({type(e).__name__})", fix) from None
    columns = flag_columns(len(probe))
    absent = [c for c in columns if c not in df.columns]
    if absent:
        raise _damaged(path, f"it lacks the flag column{'s' if len(absent) > 1 else ''} {', '.join(absent[:3])}"
                             f"{' ...' if len(absent) > 3 else ''} of the {len(probe)}-node probe", fix)
    _integer_columns(df, ["prompt_id", "step", "position"], path)
    wrong = [c for c in columns if not pd.api.types.is_bool_dtype(df[c].dtype)]
    if wrong:
        raise _damaged(path, f"column {wrong[0]} is {df[wrong[0]].dtype}, not booleans", fix)
    if len(df) == 0:
        raise _damaged(path, "it has no rows", fix)
    if "num_steps" in meta and meta["num_steps"] != len(df):
        raise _damaged(path, f"it has {len(df)} rows but {META} says num_steps {meta['num_steps']}", fix)
    flags = df[columns].to_numpy(bool)
    order = np.lexsort((df["step"].to_numpy(), df["prompt_id"].to_numpy()))
    return TypicalRecord(flags[order], df["prompt_id"].to_numpy(np.int32)[order],
                         df["position"].to_numpy(np.int32)[order],
                         probe, meta, directory)


def load_record(directory: str | Path) -> Calibration | TypicalRecord:
    """A greedy or a typical calibration, as its calibration.json says."""
    return load_typical(directory) if acceptance_of(read_meta(directory)) == "typical" else load_calibration(directory)
