"""The roofline's step cost, counted by hand on the tiny model."""

from __future__ import annotations

from treeopt.decoding.heads import random_heads
from treeopt.decoding.roofline import Machine, step_cost


def test_step_cost_counts_weights_kv_and_heads(tiny_llama):
    c = tiny_llama.config
    weights = sum(p.numel() for p in tiny_llama.parameters()) - tiny_llama.get_input_embeddings().weight.numel()
    plain = step_cost(tiny_llama, nodes=0, context=0)
    assert plain.bytes == weights * 4 and plain.flops == 2 * weights + 2 * 2 * 1 * 1 * c.num_hidden_layers * c.hidden_size
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 10 * 4
    assert step_cost(tiny_llama, nodes=0, context=10).bytes == plain.bytes + kv
    heads = random_heads(tiny_llama, num_heads=4)
    tree = step_cost(tiny_llama, nodes=3, context=0, heads=heads, depth=2)
    blocks = 2 * (c.hidden_size ** 2 + c.hidden_size)  # two heads' ResBlocks
    vocab = tiny_llama.get_output_embeddings().weight.numel()
    assert tree.bytes == plain.bytes + (blocks + vocab) * 4  # the shared lm_head read a second time
    base = step_cost(tiny_llama, nodes=3, context=0)
    assert tree.flops == base.flops + 2 * (blocks + 2 * vocab)  # one node through 2 heads and the lm_head
    fused = step_cost(tiny_llama, nodes=3, context=0, heads=heads, depth=2, fused=True)
    assert fused.bytes == plain.bytes + blocks * 4  # one pass over the lm_head projects the heads' rows too
    assert fused.flops == base.flops + 2 * 4 * (blocks + 2 * vocab)  # every one of the 4 rows
    machine = Machine("cpu", 1, bandwidth_gbs=1.0, peak_gflops={"float32": 1e9})
    assert tree.ms(machine, tiny_llama.dtype) == tree.bytes / 1e6  # memory-bound at this peak


def test_draft_cost_is_one_forward_per_level(tiny_llama):
    from treeopt.core.tree import Tree
    from treeopt.decoding.drafters import DraftModelDrafter, Eagle3Drafter, NgramDrafter
    from treeopt.decoding.eagle3 import for_model
    from treeopt.decoding.roofline import draft_cost

    tree = Tree(((0,), (1,), (0, 0), (0, 1), (0, 0, 0)))  # 3 levels; the root, (0,) and (0, 0) have children
    ngram = draft_cost(NgramDrafter(), Tree.chain(3), 100)
    assert ngram.bytes == ngram.flops == 0  # no model
    eagle = for_model(tiny_llama, draft_vocab_size=40, aux_layers=(0, 1, 1))
    params = sum(p.numel() for p in eagle.parameters())  # the shared embedding is the base model's, not its own
    c = eagle.config
    cost = draft_cost(Eagle3Drafter(eagle, tiny_llama), tree, 0)
    assert cost.bytes == 3 * params * 4 and cost.flops == 2 * 3 * params  # 3 forwards of 1 row each
    kv = 2 * c.num_key_value_heads * c.head_dim * 10 * 4
    assert draft_cost(Eagle3Drafter(eagle, tiny_llama), tree, 10).bytes == cost.bytes + 3 * kv
    draft = draft_cost(DraftModelDrafter(tiny_llama), Tree.chain(2), 0)
    weights = sum(p.numel() for p in tiny_llama.parameters()) - tiny_llama.get_input_embeddings().weight.numel()
    assert draft.bytes == 2 * weights * 4 and draft_cost(DraftModelDrafter(tiny_llama), Tree(()), 0).bytes == 0
