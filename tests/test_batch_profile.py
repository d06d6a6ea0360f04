"""`treeopt profile --serving-batches`: the batched tree forward it times, and the CSV's batch_size column."""

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from treeopt.decoding.decoder import TreeDecoder
from treeopt.decoding.heads import random_heads
from treeopt.decoding.profile import batch_tree_forward
from treeopt.cli import app
from treeopt.core.tree import Tree

pytestmark = pytest.mark.usefixtures("one_thread")


def test_batched_tree_forward_equals_each_path_alone(tiny_llama):
    """Row b, node i of the batched forward = the model run on row b's prefix + node i's path alone."""
    from transformers import DynamicCache

    dec = TreeDecoder(tiny_llama, random_heads(tiny_llama), Tree(((0,), (1,), (0, 0), (1, 2), (0, 0, 1))))
    B, context, N = 3, 7, dec.buf.num_nodes
    g = torch.Generator().manual_seed(0)
    prefix, tokens = torch.randint(0, 97, (B, context), generator=g), torch.randint(0, 97, (B, N), generator=g)
    with torch.inference_mode():
        cache = DynamicCache()
        tiny_llama.model(input_ids=prefix, **{dec.cache_argument: cache}, use_cache=True)
        for _ in range(2):  # the second time over the cache cut back after the first
            logits = tiny_llama.lm_head(batch_tree_forward(dec, cache, tokens, context))  # [B, N, V]
            cache.crop(-N)
            for b in range(B):
                for i in range(N):
                    chain = [i]
                    while chain[-1] != 0:
                        chain.append(int(dec.buf.parent[chain[-1]]))
                    want = tiny_llama(torch.cat([prefix[b], tokens[b, chain[::-1]]])[None]).logits[0, -1]
                    torch.testing.assert_close(logits[b, i], want, atol=1e-4, rtol=1e-4)


def test_profile_cli_batch_sizes(tiny_model_dir, tmp_path):
    from treeopt.search.budget import read_latencies

    out = tmp_path / "latency.csv"
    r = CliRunner().invoke(app, ["profile", "--model", str(tiny_model_dir), "--heads", "random", "--sizes", "0,4",
                                 "--serving-batches", "1,3", "--context", "8", "--repeats", "1", "--device", "cpu",
                                 "-o", str(out)])
    assert r.exit_code == 0, r.output
    df = pd.read_csv(out)
    assert list(zip(df["batch_size"], df["nodes"])) == [(1, 0), (1, 4), (3, 0), (3, 4)] and (df["forward_ms"] > 0).all()
    assert {b: lat.nodes.tolist() for b, lat in read_latencies(out).items()} == {1: [0, 4], 3: [0, 4]}
