"""Medusa tree decoding, its benchmark and its latency profile.

- `decoding.buffers.tree_buffers(tree)`: the tree's mask, depths, candidate indices, root-to-leaf paths.
- `decoding.cache.TreeCache`: a preallocated KV cache (a transformers `Cache`) with `commit(slots)`.
- `decoding.decoder.TreeDecoder(model, heads, tree, Acceptance(...)).generate(prompt_ids, max_new_tokens)`,
  `decode(...)`, `greedy_reference(...)` (plain `model.generate`), `run_decode(...)` (`treeopt decode`).
- `decoding.bench.run_bench(...)` (`treeopt bench`), `bench_decoding(...)` on a loaded model.
- `decoding.profile.run_profile(...)` (`treeopt profile`), `profile_latency(...)`.
"""
