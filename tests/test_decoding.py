"""Tree decoder: buffers, tree attention vs path-alone forwards, lossless greedy, typical acceptance."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from treeopt.decoding.buffers import tree_buffers
from treeopt.decoding.decoder import Acceptance, TreeDecoder, decode, greedy_reference
from treeopt.core.errors import TreeoptError
from treeopt.decoding.heads import random_heads
from treeopt.core.tree import Tree

EOS = 2


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def heads(tiny_llama):
    return random_heads(tiny_llama, num_heads=4, seed=1)


@pytest.fixture(scope="module")
def fast_llama():
    """The tiny Llama as the AVX2 decode-time load makes it (PackedLinear linears): its TreeDecoder
    steps run decoding/fast.py's written-out forward."""
    from conftest import make_tiny_llama
    from treeopt.decoding.models import packed_linears

    return packed_linears(make_tiny_llama())


LOADS = ["tiny_llama", "fast_llama"]  # transformers' forward (the reference), the written-out one


def prompt(seed: int, length: int = 7) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (length,), generator=g).tolist()


# ---- buffers ------------------------------------------------------------------------------------


def test_buffers_of_a_small_tree_by_hand():
    b = tree_buffers(Tree(((0,), (1,), (0, 0), (0, 1))))
    assert b.top_k == 2 and b.num_nodes == 5
    assert b.parent.tolist() == [0, 0, 0, 1, 1]
    assert b.depth.tolist() == [0, 1, 1, 2, 2]
    assert b.candidate_index.tolist() == [0, 1, 2, 3]  # head1 rank0, head1 rank1, head2 rank0, head2 rank1
    assert b.mask.int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 0, 1, 0, 0],
        [1, 1, 0, 1, 0],
        [1, 1, 0, 0, 1],
    ]
    assert b.paths.tolist() == [[0, 2, 0], [0, 1, 3], [0, 1, 4]]  # leaves 2, 3, 4
    assert b.path_valid.int().tolist() == [[1, 1, 0], [1, 1, 1], [1, 1, 1]]


def test_buffers_candidate_index_uses_top_k_stride():
    b = tree_buffers(Tree(((0,), (0, 2))), top_k=3)
    assert b.candidate_index.tolist() == [0, 3 + 2]
    with pytest.raises(TreeoptError, match="top-k"):
        tree_buffers(Tree(((0,), (0, 2))), top_k=2)


def test_buffers_of_the_empty_tree():
    b = tree_buffers(Tree(()))
    assert b.num_nodes == 1 and b.paths.tolist() == [[0]] and b.mask.tolist() == [[True]]


# ---- tree attention: every node's logits equal its path run alone ---------------------------------


@st.composite
def trees(draw, max_depth: int = 4, max_rank: int = 3, max_nodes: int = 14):
    paths: list[tuple[int, ...]] = []
    for parent, rank in draw(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, max_rank - 1)),
                                      max_size=max_nodes)):
        base = () if parent % (len(paths) + 1) == 0 else paths[parent % (len(paths) + 1) - 1]
        path = base + (rank,)
        if len(path) <= max_depth and path not in paths:
            paths.append(path)
    return Tree(tuple(paths))


@pytest.mark.parametrize("load", LOADS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=trees(), context=st.integers(1, 12), seed=st.integers(0, 1000))
def test_tree_forward_equals_each_path_alone(request, tiny_llama, heads, load, tree, context, seed):
    """Every node's logits equal the reference model's on its path alone (transformers' forward, F.linear)."""
    dec = TreeDecoder(request.getfixturevalue(load), heads, tree)
    assert (dec.fast is not None) == (load == "fast_llama")
    N = dec.buf.num_nodes
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, 97, (context,), generator=g)
    tokens = torch.randint(0, 97, (N,), generator=g)  # [N] any token per node
    with torch.inference_mode():
        dec._prepare(context + N)
        dec.prefill(prefix)
        logits, _, _ = dec.tree_forward(tokens)  # [N, V]
        for i in range(N):
            chain, j = [i], i
            while j != 0:
                j = int(dec.buf.parent[j])
                chain.append(j)
            alone = torch.cat([prefix, tokens[chain[::-1]]])[None]
            want = tiny_llama(alone).logits[0, -1]
            torch.testing.assert_close(logits[i], want, atol=1e-4, rtol=1e-4)


# ---- lossless greedy decoding -------------------------------------------------------------------


TREES = {
    "plain": Tree(()),
    "chain": Tree.chain(4),
    "cartesian": Tree.cartesian([2, 3]),
    "wide": Tree.cartesian([16, 4, 2]),  # random heads still hit often on a 97-token vocabulary
    "sparse": Tree(((0,), (5,), (5, 1), (5, 1, 0), (2,), (2, 3))),
}


@pytest.mark.parametrize("load", LOADS)
@pytest.mark.parametrize("name", list(TREES))
def test_greedy_is_lossless_vs_generate(request, tiny_llama, heads, name, load):
    dec = TreeDecoder(request.getfixturevalue(load), heads, TREES[name], stop_ids={EOS})
    accepted = 0
    for s in range(3):
        p = prompt(s, 5 + s)
        want = greedy_reference(tiny_llama, p, 32, {EOS}).tokens
        got = dec.generate(p, 32)
        assert got.tokens == want, f"prompt {s}"
        assert got.steps == len(got.accepted) and sum(got.accepted) + got.steps >= len(got.tokens)
        accepted += sum(got.accepted)
    if name == "wide":
        assert accepted > 10  # the acceptance and KV-compaction paths were really exercised


@pytest.mark.slow  # compiling takes a minute or more on a busy CPU
@pytest.mark.parametrize("load", LOADS)
def test_compiled_greedy_is_lossless_vs_plain(load, tiny_llama, heads, request):
    """fp32, compiled (transformers' forward; on the AVX2 load its PackedLinears trace as F.linear): the
    tree's output equals plain greedy decoding's (compiled too and HF generate's), with one compile per
    step and shape, none while decoding."""
    model = request.getfixturevalue(load)
    plain = TreeDecoder(model, heads, Tree(()), stop_ids={EOS}, compiled=True)
    tree = TreeDecoder(model, heads, TREES["wide"], stop_ids={EOS}, compiled=True)
    for s in range(3):
        p = prompt(s, 5 + s)
        want = greedy_reference(tiny_llama, p, 32, {EOS}).tokens
        assert plain.generate(p, 32).tokens == want
        assert tree.generate(p, 32).tokens == want, f"prompt {s}"
        if s == 0:
            compile_s = tree.compile_s
    assert compile_s > 0 and tree.compile_s == compile_s  # compiled at the first text only
    assert tree.verify.fn is not tree.verify.eager and plain.verify.fn is not plain.verify.eager  # no eager fallback


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_fused_heads_equal_separate_heads(tiny_llama, heads, monkeypatch, compiled):
    """A small tree projects the heads inside the verification step (one pass over the vocabulary
    matrix); the candidates, hence the steps and the output, are those of the separate heads step."""
    tree = Tree.cartesian([4])  # 5 rows x depth 1 <= FUSED_ROWS
    fused = TreeDecoder(tiny_llama, heads, tree, stop_ids={EOS}, compiled=compiled)
    monkeypatch.setattr(TreeDecoder, "FUSED_ROWS", 0)
    separate = TreeDecoder(tiny_llama, heads, tree, stop_ids={EOS}, compiled=compiled)
    assert fused.fused and not separate.fused
    for s in range(2):
        a, b = fused.generate(prompt(s), 32), separate.generate(prompt(s), 32)
        assert a.tokens == b.tokens == greedy_reference(tiny_llama, prompt(s), 32, {EOS}).tokens
        assert a.accepted == b.accepted and sum(a.accepted) > 0


def test_stop_token_and_max_new_tokens_match_generate(tiny_llama, heads):
    p = prompt(3)
    free = greedy_reference(tiny_llama, p, 30, {EOS}).tokens
    stop = free[12]  # pretend this token is EOS: both must stop right after it
    want = greedy_reference(tiny_llama, p, 30, {stop}).tokens
    got = decode(tiny_llama, heads, TREES["wide"], p, 30, stop_ids={stop})
    assert got.tokens == want and got.tokens[-1] == stop and got.stopped
    short = decode(tiny_llama, heads, TREES["wide"], p, 5, stop_ids={EOS})
    assert short.tokens == free[:5]


def test_tree_deeper_than_heads_is_a_one_line_error(tiny_llama, heads):
    with pytest.raises(TreeoptError, match="deep"):
        TreeDecoder(tiny_llama, heads, Tree.chain(5))


# ---- typical acceptance -------------------------------------------------------------------------


def test_typical_is_seeded(tiny_llama, heads):
    tree = TREES["wide"]
    runs = [TreeDecoder(tiny_llama, heads, tree, Acceptance("typical", temperature=1.0, seed=s), {EOS})
            .generate(prompt(1), 40).tokens for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_typical_at_tiny_temperature_is_greedy(tiny_llama, heads):
    # the tiny model's top-2 logits can be 6e-4 apart: the temperature must be far below that
    p = prompt(2)
    got = decode(tiny_llama, heads, TREES["wide"], p, 40, Acceptance("typical", temperature=1e-5), {EOS})
    assert got.tokens == greedy_reference(tiny_llama, p, 40, {EOS}).tokens


def test_typical_needs_positive_temperature():
    with pytest.raises(TreeoptError, match="temperature"):
        Acceptance("typical", temperature=0)


# ---- half precision -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs(dtype):
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama().to(dtype)
    heads = random_heads(model, num_heads=4, seed=1)  # fp32: the decoder casts a copy
    dec = TreeDecoder(model, heads, TREES["wide"], stop_ids={EOS})
    got = dec.generate(prompt(0), 24)
    assert dec.cache.tensors()[0].dtype == dtype and dec.tree_bias.dtype == dtype
    assert 1 <= len(got.tokens) <= 24 and all(0 <= t < 97 for t in got.tokens)
    want = greedy_reference(model, prompt(0), 24, {EOS}).tokens
    assert got.tokens[:3] == want[:3]  # a flip can come later; the first tokens agree


# ---- the bundled model ----------------------------------------------------------------------------


@pytest.mark.slow
def test_lossless_on_bundled_model(smollm2):
    from treeopt.decoding.models import chat_prompt, stop_token_ids

    model, tok = smollm2.model, smollm2.tokenizer
    heads = random_heads(model, num_heads=4)
    stops = stop_token_ids(model, tok)
    p = chat_prompt(tok, "Name three primary colors.")
    want = greedy_reference(model, p, 32, stops).tokens
    got = decode(model, heads, Tree.cartesian([4, 2, 2]), p, 32, stop_ids=stops)
    assert got.tokens == want


def test_fast_forward_gives_transformers_hidden_states(tiny_llama, fast_llama):
    """decoding/fast.py over a prompt: the last hidden states and those entering each layer (a drafter's
    aux_layers) equal transformers' forward of the same weights."""
    from treeopt.decoding.cache import TreeCache
    from treeopt.decoding.decoder import additive_mask
    from treeopt.decoding.fast import FastLlama

    ids = torch.tensor(prompt(3, 9))  # [P]
    P, capacity = ids.shape[0], 16
    cache = TreeCache(2, capacity)
    positions = torch.arange(P)
    cache.place(positions)
    bias = additive_mask(torch.arange(capacity)[None, :] <= positions[:, None], torch.float32)  # [P, capacity]
    with torch.inference_mode():
        hidden, aux = FastLlama.of(fast_llama)(ids, bias, positions, cache, (1, 0))
        want = tiny_llama.model(ids[None], output_hidden_states=True)
    torch.testing.assert_close(hidden, want.last_hidden_state[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux, torch.cat([want.hidden_states[1][0], want.hidden_states[0][0]], -1),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_fast_forward_is_lossless_on_bundled_model(smollm2):
    """The AVX2 decode-time load (decoding/fast.py's forward): a tree's output equals the float32 reference's
    plain greedy decoding."""
    from treeopt.decoding.models import chat_prompt, decode_path, load_model, stop_token_ids

    if not decode_path(torch.device("cpu")).packed_linears:
        pytest.skip("this CPU's default decode path is not the float32 AVX2 one")
    fast = load_model("smollm2-135m", device="cpu", attention="decode").model
    tok = smollm2.tokenizer
    stops = stop_token_ids(smollm2.model, tok)
    heads = random_heads(fast, num_heads=4)
    for question in ("Name three primary colors.", "Explain what a CPU cache is."):
        p = chat_prompt(tok, question)
        want = greedy_reference(smollm2.model, p, 48, stops).tokens
        dec = TreeDecoder(fast, heads, Tree.cartesian([4, 2, 2]), stop_ids=stops)
        assert dec.fast is not None
        assert dec.generate(p, 48).tokens == want
