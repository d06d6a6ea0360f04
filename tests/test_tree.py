"""Tree and tree files: validation, prefix validity, round trips of every format, malformed files."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from treeopt.core.errors import TreeoptError
from treeopt.core.published import BASELINES, PUBLISHED
from treeopt.core.tree import Tree
from treeopt.core.treefile import FORMATS, format_tree, parse_trtllm, read_tree, read_tree_meta, write_tree


@st.composite
def trees(draw, max_nodes: int = 40, max_rank: int = 5, max_depth: int = 5):
    """A random tree grown in insertion order: each new node is a fresh child of an existing node."""
    n = draw(st.integers(0, max_nodes))
    seed = draw(st.integers(0, 2**32 - 1))
    rng, paths, have = random.Random(seed), [], set()
    for _ in range(n * 4):
        if len(paths) == n:
            break
        parent = rng.choice([()] + paths)
        child = parent + (rng.randrange(max_rank),)
        if len(child) <= max_depth and child not in have:
            paths.append(child)
            have.add(child)
    return Tree(tuple(paths))


def one_line_error(fn, *args, match: str = ""):
    with pytest.raises(TreeoptError, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


@settings(max_examples=60, deadline=None)
@given(trees())
def test_prefixes_are_trees_and_parents_come_first(tree):
    for m in range(len(tree) + 1):
        prefix = tree[:m]  # validated on construction
        assert prefix.paths == tree.paths[:m]
    for i, parent in enumerate(tree.parents):
        assert parent < i
        assert parent == -1 or tree.paths[parent] == tree.paths[i][:-1]


@settings(max_examples=60, deadline=None)
@given(trees() | st.integers(0, 5).map(Tree.chain), st.sampled_from(FORMATS))
def test_every_format_round_trips(tmp_path_factory, tree, fmt):
    path = tmp_path_factory.mktemp("t") / {"python": "tree.py", "trtllm": "tree.txt", "sglang": "tree.args",
                                           "trtllm-eagle3": "tree.yaml"}.get(fmt, "tree.json")
    serving = {"sglang": "eagle3:/e", "trtllm-eagle3": "eagle3:/e"}.get(fmt)  # engines that serve no Medusa heads
    if fmt in ("chain", "vllm", "sglang", "trtllm-eagle3") and tree != Tree.chain(len(tree)):
        one_line_error(lambda: write_tree(tree, path, fmt, drafter=serving),
                       match=f"--target {'vllm' if fmt == 'vllm' else 'chain'}")
        return
    if fmt in ("vllm", "sglang", "trtllm-eagle3") and len(tree) == 0:
        one_line_error(lambda: write_tree(tree, path, fmt, drafter=serving), match="plain decoding")
        return
    write_tree(tree, path, fmt, predicted_tokens_per_step=2.5, acceptance_model="empirical",
               **({"drafter": serving} if serving else {}))
    back, meta = read_tree_meta(path)
    assert back == tree and back.paths == tree.paths  # same paths, same (greedy) order
    if fmt in ("json", "python", "chain"):
        assert meta["predicted_tokens_per_step"] == 2.5 and meta["acceptance_model"] == "empirical"
    if fmt == "vllm":  # only the keys vLLM's SpeculativeConfig takes
        assert meta == {"method": "medusa"} and json.loads(path.read_text())["num_speculative_tokens"] == len(tree)


@settings(max_examples=60, deadline=None)
@given(trees(), st.randoms(use_true_random=False))
def test_trtllm_reads_sorted_shuffled_and_leaf_only_lists(tree, rnd):
    shuffled = list(tree.paths)
    rnd.shuffle(shuffled)
    leaves = [p for p in tree.paths if not any(q[:-1] == p for q in tree.paths)]
    for choices in (sorted(tree.paths), shuffled, leaves):
        back = parse_trtllm(json.dumps([list(p) for p in choices]))
        assert set(back.paths) == set(tree.paths)  # and Tree() checked parents-before-children


def test_json_is_medusa_choices_plus_metadata(tmp_path):
    tree = Tree.chain(3)
    write_tree(tree, tmp_path / "t.json", nodes_requested=3, calibration="dir")
    obj = json.loads((tmp_path / "t.json").read_text())
    assert obj["medusa_choices"] == [[0], [0, 0], [0, 0, 0]] and obj["nodes"] == 3 and obj["calibration"] == "dir"


def test_python_file_is_never_executed_and_drops_into_medusa(tmp_path):
    f = tmp_path / "choices.py"
    f.write_text("import os\nmedusa_choices = [[0], (1,), [0, 0]]\nraise SystemExit('executed')\n")
    assert read_tree(f).paths == ((0,), (1,), (0, 0))
    text = format_tree(Tree.cartesian([2, 2]), "python")
    namespace: dict = {}
    exec(compile(text, "t", "exec"), namespace)  # the written file is plain Python Medusa can import
    assert namespace["medusa_choices"] == [[0], [1], [0, 0], [0, 1], [1, 0], [1, 1]]


def test_published_trees_and_named_lists(tmp_path):
    assert set(BASELINES) <= set(PUBLISHED)
    for name, choices in PUBLISHED.items():
        tree = read_tree(name)
        assert tree.choices == choices and tree.num_nodes == len(choices)
    f = tmp_path / "medusa_choices.py"
    f.write_text("a = [[0], [1]]\nb = [(0,), (0, 0)]\n")
    assert read_tree(f"{f}:b").paths == ((0,), (0, 0))
    one_line_error(read_tree, f, match="FILE.py:NAME")  # two lists, none named medusa_choices
    one_line_error(read_tree, f"{f}:c", match="no list named 'c'")
    assert read_tree("[[0], [0, 1]]").paths == ((0,), (0, 1))  # leaf-only literal string


@pytest.mark.parametrize("text, suffix, match", [
    ("{not json", ".json", "not valid JSON"),
    ('{"nodes": 3}', ".json", "no \"medusa_choices\""),
    ('{"medusa_choices": [[0], ["a"]]}', ".json", "not a list of integer ranks"),
    ('{"medusa_choices": [[0], [true]]}', ".json", "not a list of integer ranks"),
    ('{"medusa_choices": 5}', ".json", "not a list"),
    ('{"medusa_choices": [[0], [0, 0], [0, 0]]}', ".json", "appears twice"),
    ('{"medusa_choices": [[0], [1, 0]]}', ".json", "parent"),
    ('{"medusa_choices": [[0], [-1]]}', ".json", "negative"),
    ('{"medusa_choices": [[0], []]}', ".json", "empty path"),
    ("medusa_choices = list(range(3))", ".py", "not a literal list"),
    ("medusa_choices = [[0]", ".py", "not valid Python"),
    ("x = 1", ".py", "no `medusa_choices"),
    ("[[0], [0, 0", ".txt", "not a literal list"),
    ("[[0], 'a']", ".txt", "not a list of integer ranks"),
    ('{"speculative_token_tree": "[(0,), (0, 0)]"}', ".json", "vLLM >= 0.32 rejects"),
    ('{"chain_length": 2.5}', ".json", "not a whole number"),
])
def test_malformed_files_give_one_line_errors(tmp_path, text, suffix, match):
    f = tmp_path / f"tree{suffix}"
    f.write_text(text)
    one_line_error(read_tree, f, match=match)


def test_checks_against_heads_and_top_k(tmp_path):
    write_tree(Tree.cartesian([3, 2, 2]), tmp_path / "t.json")
    assert read_tree(tmp_path / "t.json", num_heads=3, top_k=3).num_nodes == 3 + 6 + 12
    one_line_error(read_tree, tmp_path / "t.json", 2, None, match="only 2 heads")
    one_line_error(read_tree, tmp_path / "t.json", 3, 2, match="raise --top-k to 3")
    one_line_error(read_tree, tmp_path / "missing.json", match="not found")
    one_line_error(format_tree, Tree.chain(1), "yaml", match="use --format")
