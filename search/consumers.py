"""The consumers' own handling of an exported tree, re-implemented from their sources (read, not
copied), so tests can round-trip every export through it.

Each consumer function takes the exported text and the number of heads, and returns the tree the
consumer actually builds as a `Built`: how many candidate tokens it verifies per step, and every
node it can accept as the path of (head, rank) tokens from the root. It raises `Rejected` where the
consumer's code would raise or fail a check. A tree deploys unchanged iff every consumer of its
target returns `intended(tree)`.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from functools import cmp_to_key

from treeopt.search.targets import TARGETS
from treeopt.core.errors import TreeoptError
from treeopt.core.tree import Tree
from treeopt.core.treefile import format_tree

Token = tuple[int, int]  # (head, rank): the rank-th candidate of head `head` (0-based)


class Rejected(Exception):
    """The consumer's own code raises, asserts or fails a check on this input."""


@dataclass(frozen=True)
class Built:
    tokens: int  # candidate tokens verified per step (root excluded)
    paths: frozenset[tuple[Token, ...]]  # each acceptable node as its root path of tokens


def intended(tree: Tree) -> Built:
    """What a consumer should build from `tree`: node (r1, ..., rd) reads head j's rank r_j."""
    return Built(tree.num_nodes, frozenset(tuple(enumerate(p)) for p in tree.paths))


def _literal(text: str):
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError) as e:
        raise Rejected(f"not a literal: {e}") from None


def _python_choices(text: str) -> list[list[int]]:
    """`medusa_choices` of a Python file, as Medusa gets it by importing the file (literal values only)."""
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "medusa_choices" for t in node.targets):
            return [list(p) for p in ast.literal_eval(node.value)]
    raise Rejected("no medusa_choices in the file")


MEDUSA_TOPK = 10  # medusa/model/utils.py: TOPK = 10


def medusa(text: str, num_heads: int) -> Built:
    """FasterDecoding/Medusa at e2a5d20, `medusa/model/utils.py`.

    `generate_medusa_buffers`: sorts the choices by (length, path), counts nodes per depth (a skipped
    depth indexes past `depth_counts`), finds each ancestor with `list.index` (a missing one raises
    ValueError; an empty list fails at `max()` of the retrieve paths), and gives the node of level i
    (0-based) and last rank r the candidate index r + TOPK * i + 1. `generate_candidates`: the
    candidates are the base token and `topk(medusa_logits, TOPK)` of each head flattened, 1 + TOPK *
    heads of them; index c > 0 is head (c - 1) // TOPK's rank (c - 1) % TOPK, and an index past the end
    raises IndexError. So rank >= TOPK reads a later head's token, and too deep a node overruns."""
    choices = sorted(_python_choices(text), key=lambda x: (len(x), x))
    if not choices:
        raise Rejected("max() of an empty sequence (no retrieve paths)")
    depths = [len(p) for p in choices]
    if sorted(set(depths)) != list(range(1, max(depths) + 1)):
        raise Rejected("IndexError: a depth is skipped (depth_counts[depth - 1])")
    candidates = 1 + MEDUSA_TOPK * num_heads

    def token(path: list[int]) -> Token:
        index = path[-1] + MEDUSA_TOPK * (len(path) - 1) + 1
        if index >= candidates:
            raise Rejected(f"IndexError: candidate index {index} of {candidates}")
        return (index - 1) // MEDUSA_TOPK, (index - 1) % MEDUSA_TOPK

    paths = set()
    for p in choices:
        for c in range(1, len(p)):
            if p[:c] not in choices:
                raise Rejected(f"ValueError: {p[:c]} is not in list")
        paths.add(tuple(token(p[:c]) for c in range(1, len(p) + 1)))
    return Built(len(choices), frozenset(paths))


TRTLLM_MAX_DRAFT_LEN = 63  # examples/medusa/convert_checkpoint.py: --max_medusa_token_len 63
PREFIX_CHUNK_BITS, PREFIX_MAX_VALUE = 4, 16  # cpp/.../speculativeChoicesUtils.h


def _prefix(choice: list[int], length: int) -> int:
    """TensorRT-LLM's `computePrefix`: the first `length` ranks packed 4 bits each (checked <= 16)."""
    if length * PREFIX_CHUNK_BITS > 64:
        raise Rejected("TLLM_CHECK: choices deeper than the prefix can fit")
    key = 0
    for i, r in enumerate(choice[:length]):
        if r > PREFIX_MAX_VALUE:
            raise Rejected(f"TLLM_CHECK: node degree {r} larger than the prefix can fit")
        key |= r << PREFIX_CHUNK_BITS * (length - 1 - i)
    return key


def trtllm_cpp(text: str, num_heads: int, max_draft_len: int = TRTLLM_MAX_DRAFT_LEN) -> Built:
    """TensorRT-LLM's C++ runtime (`ModelRunnerCpp`, inflight batching):
    `cpp/tensorrt_llm/runtime/utils/speculativeChoicesUtils.cpp`, `initTensorsFromChoices`.

    The string is read with `ast.literal_eval` (`examples/run.py`). Checks: at most
    `max_draft_len` choices; every rank <= 16 and depth <= 16 (`computePrefix`); depths grow one at
    a time and stay <= the heads (`maxDraftPathLen`). Choices are sorted by (depth, prefix key); a
    node's parent is looked up by its prefix key in the previous level's map, whose `operator[]`
    yields 0, the root, when the parent is missing: such a node is attached to the root. A node of
    depth d with last rank r reads head d's rank r (tree id = sum of earlier levels' top-k + r)."""
    choices = [list(c) for c in _literal(text)]
    if len(choices) > max_draft_len:
        raise Rejected(f"TLLM_CHECK: {len(choices)} choices > maxDecodingDraftTokens {max_draft_len}")
    keys = [_prefix(c, len(c)) for c in choices]
    order = sorted(range(len(choices)), key=lambda i: (len(choices[i]), keys[i]))
    path_of = {0: ()}  # linear index -> token path; 0 is the root
    depth, prev, cur = 1, {0: 0}, {}
    for n, i in enumerate(order, start=1):
        c = choices[i]
        if len(c) != depth:
            if len(c) != depth + 1:
                raise Rejected("TLLM_CHECK: depth + 1 == curDepth")
            if len(c) > num_heads:
                raise Rejected("TLLM_CHECK: choices require larger maxPathLen than the engine was built with")
            prev, cur, depth = cur, {}, depth + 1
        cur[keys[i]] = n
        parent = prev.get(_prefix(c, len(c) - 1), 0)
        path_of[n] = path_of[parent] + ((len(c) - 1, c[-1]),)
    return Built(len(choices), frozenset(p for n, p in path_of.items() if n))


def _path_order(a: list[int], b: list[int]) -> int:
    """TensorRT-LLM's `path_sorter`: by the first differing rank; 0 when one is a prefix of the other."""
    for x, y in zip(a, b):
        if x != y:
            return -1 if x < y else 1
    return 0


def trtllm_python(text: str, num_heads: int) -> Built:
    """TensorRT-LLM's Python runtime (`--use_py_session`, which its Medusa example requires):
    `tensorrt_llm/runtime/medusa_utils.py`, `_medusa_setup`.

    `expand_choices_if_needed` adds every prefix unless the first multi-rank choice finds its first
    rank as a choice; `choices_2_paths` keeps the choices that are no other's prefix (the leaf paths)
    and counts distinct prefixes per level (an IndexError past the heads); `get_medusa_topks`: top-k
    per level = largest rank + 1; `get_medusa_tree`: level-1 tree ids are 0..topk1-1, one per rank
    whether listed or not, and a level-1 node is referred to by its rank; deeper nodes get ids in
    leaf-path order and are referred to as (nodes counted on earlier levels + their order). So when
    the first level is not 0..m-1 the ids and the references disagree (altered or out of range)."""
    choices = [list(c) for c in _literal(text)]
    if not choices:
        raise Rejected("assert len(medusa_choices) > 0")
    first_multi = next((c for c in choices if len(c) > 1), None)
    if first_multi is None or [first_multi[0]] not in choices:  # path-only style: expand
        choices = [list(p) for p in {tuple(c[:d]) for c in choices for d in range(1, len(c) + 1)}]
    choices = sorted(choices, key=cmp_to_key(_path_order))
    level_counts, seen, leaves = [0] * num_heads, set(), {}
    for c in sorted(choices, key=len, reverse=True):
        if tuple(c) not in seen:
            leaves[tuple(c)] = c
        for i in range(len(c)):
            if tuple(c[: i + 1]) not in seen:
                seen.add(tuple(c[: i + 1]))
                if i >= num_heads:
                    raise Rejected("IndexError: level_counts")
                level_counts[i] += 1
    paths = sorted(leaves.values(), key=cmp_to_key(_path_order))
    topks = [max((p[i] + 1 for p in paths if len(p) > i), default=0) for i in range(num_heads)]
    tokens: list[Token] = [(0, r) for r in range(topks[0])]  # tree ids as (head, rank)
    refs = [[p[0]] for p in paths]  # node references along each leaf path
    for i in range(1, num_heads):
        last, count = None, -1
        for p, ref in zip(paths, refs):
            if i < len(p):
                if last != (tuple(p[:i]), p[i]):
                    tokens.append((i, p[i]))
                    last, count = (tuple(p[:i]), p[i]), count + 1
                ref.append(sum(level_counts[:i]) + count)
    if any(r >= len(tokens) for ref in refs for r in ref):
        raise Rejected("IndexError: a node reference past the tree ids (get_medusa_mask)")
    built = {tuple(tokens[r] for r in ref[:d]) for ref in refs for d in range(1, len(ref) + 1)}
    return Built(len(tokens), frozenset(built))


def trtllm(text: str, num_heads: int) -> Built:
    """TensorRT-LLM: the tree both runtimes build, or Rejected when they differ."""
    cpp, py = trtllm_cpp(text, num_heads), trtllm_python(text, num_heads)
    if cpp != py:
        raise Rejected("the C++ and Python runtimes build different trees")
    return cpp


VLLM_SPECULATIVE_KEYS = {"method", "model", "num_speculative_tokens", "num_speculative_tokens_per_batch_size"}


def vllm(text: str, num_heads: int) -> Built:
    """vLLM 0.32 with Medusa heads, from the `--speculative-config` JSON.

    `vllm/config/speculative.py`: `SpeculativeConfig` is a pydantic dataclass with extra="forbid"
    (`vllm/config/utils.py`, `config`), so a key it lacks (`speculative_token_tree`, gone with its tree
    attention) is rejected; `_verify_args` requires `num_speculative_tokens` > 0; `__post_init__` sets
    the Medusa config's `num_heads` to it, so vLLM builds k heads and `DefaultModelLoader` fails on
    weights a k > `num_heads` checkpoint lacks. `vllm/v1/spec_decode/medusa.py`,
    `MedusaProposer.propose`: draft token j is head j's argmax, a top-1 chain of k tokens."""
    try:
        config = json.loads(text)
        n = config["num_speculative_tokens"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise Rejected(f"not a speculative config: {e}") from None
    extra = set(config) - VLLM_SPECULATIVE_KEYS - {"draft_tensor_parallel_size", "quantization", "revision"}
    if extra:
        raise Rejected(f"pydantic ValidationError: unexpected keyword argument(s) {sorted(extra)}")
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise Rejected(f"ValueError: Expected num_speculative_tokens to be greater than zero ({n})")
    if n > num_heads:
        raise Rejected(f"ValueError: {n} Medusa heads built, the checkpoint holds {num_heads} (weights not initialized)")
    return Built(n, frozenset(tuple((j, 0) for j in range(d)) for d in range(1, n + 1)))


def chain(text: str, num_heads: int) -> Built:
    """Servers that draft a top-1 chain of a given length (TGI `--speculate L`, llama.cpp
    `--draft-max L`): draft step j proposes its top-1 token; the chain file's `chain_length` is L."""
    try:
        length = json.loads(text)["chain_length"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise Rejected(f"not a chain file: {e}") from None
    if not isinstance(length, int) or length < 1:
        raise Rejected(f"chain length {length!r} is not a positive integer")
    return Built(length, frozenset(tuple((j, 0) for j in range(d)) for d in range(1, length + 1)))


CONSUMERS = {"medusa": medusa, "trtllm": trtllm, "vllm": vllm, "chain": chain}  # by target name


def deploys(tree: Tree, target: str, num_heads: int) -> bool:
    """True iff the consumer of `target` builds `tree` exactly from its export."""
    try:
        return CONSUMERS[target](format_tree(tree, TARGETS[target].format), num_heads) == intended(tree)
    except (Rejected, TreeoptError):  # TreeoptError: the format cannot hold the tree (a chain file)
        return False
