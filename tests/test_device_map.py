"""--device-map / --max-memory (accelerate placement), and the caches' per-device buffers, on CPU."""

import pytest
import torch

import treeopt.decoding.decoder
import treeopt.decoding.models
from treeopt.decoding.decoder import TreeDecoder
from treeopt.decoding.generate import greedy_continuations
from treeopt.decoding.heads import random_heads
from treeopt.decoding.models import load_model, parse_max_memory
from treeopt.core.errors import TreeoptError
from treeopt.core.tree import Tree

pytestmark = pytest.mark.usefixtures("one_thread")
TREE = Tree.cartesian([2, 2])
PROMPTS = [[1, 5, 9, 13], [1, 7], [1, 20, 21, 22, 23, 24]]


def test_parse_max_memory():
    assert parse_max_memory("0=20GiB, 1=18GiB,cpu=64GiB") == {0: "20GiB", 1: "18GiB", "cpu": "64GiB"}
    assert parse_max_memory(None) is None
    with pytest.raises(TreeoptError, match="DEVICE=SIZE"):
        parse_max_memory("20GiB")


def test_max_memory_needs_device_map(tiny_model_dir):
    with pytest.raises(TreeoptError, match="--device-map"):
        load_model(str(tiny_model_dir), device="cpu", max_memory="cpu=1GiB")


def test_model_over_max_memory_is_one_line(tiny_model_dir):
    with pytest.raises(TreeoptError, match="does not fit .* raise --max-memory"):
        load_model(str(tiny_model_dir), device_map="auto", max_memory="cpu=20KB")


def test_device_map_auto_decodes_like_a_plain_load(tiny_model_dir):
    plain = load_model(str(tiny_model_dir), device="cpu")
    mapped = load_model(str(tiny_model_dir), device_map="auto", max_memory="cpu=2GiB")
    assert {p.device.type for p in mapped.model.parameters()} == {"cpu"}
    heads = random_heads(plain.model, seed=3)
    a = TreeDecoder(plain.model, heads, TREE, stop_ids=()).generate(PROMPTS[0], 24)
    b = TreeDecoder(mapped.model, heads, TREE, stop_ids=()).generate(PROMPTS[0], 24)
    assert a.tokens == b.tokens and a.accepted == b.accepted


def two_devices(monkeypatch):
    """Pretend the tiny Llama's two layers sit on two devices ('cpu' and 'cpu:0': one CPU, two names),
    so every cache keeps two buffers, as on two GPUs."""
    split = lambda model: [torch.device("cpu"), torch.device("cpu", 0)]  # noqa: E731
    monkeypatch.setattr(treeopt.decoding.models, "layer_devices", split)
    monkeypatch.setattr(treeopt.decoding.decoder, "layer_devices", split)


def test_tree_decoding_over_two_devices_equals_one(tiny_llama, monkeypatch):
    heads = random_heads(tiny_llama, seed=3)
    one = TreeDecoder(tiny_llama, heads, TREE, stop_ids=())
    ref = one.generate(PROMPTS[2], 24)
    two_devices(monkeypatch)
    split = TreeDecoder(tiny_llama, heads, TREE, stop_ids=())
    out = split.generate(PROMPTS[2], 24)
    assert out.tokens == ref.tokens and out.accepted == ref.accepted


def test_batched_generation_over_two_devices_equals_one(tiny_llama, monkeypatch):
    ref = [c.tokens for c in greedy_continuations(tiny_llama, PROMPTS, 12, set(), batch_size=2)]
    two_devices(monkeypatch)
    split = [c.tokens for c in greedy_continuations(tiny_llama, PROMPTS, 12, set(), batch_size=2)]
    assert split == ref


def test_cli_decode_and_profile_take_device_map(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from treeopt.cli import app

    common = ["--model", str(tiny_model_dir), "--heads", "random", "--device-map", "auto", "--max-memory", "cpu=2GiB"]
    r = CliRunner().invoke(app, ["decode", "w5 w6", "--tree", "[[0], [1], [0, 0]]", "--max-new-tokens", "8", *common])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["profile", "--sizes", "0,2", "--context", "8", "--repeats", "1",
                                 "-o", str(tmp_path / "lat.csv"), *common])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "lat.csv").is_file()
