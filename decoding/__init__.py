"""The engine: loading the model and the heads, the KV caches, Medusa tree decoding, batched greedy
generation and the latency profile. Imports only `treeopt.core`.

- `decoding.models.load_model(name, device_map=, max_memory=)`: the bundled GGUF, a local directory or a hub id,
  on one device or spread over GPUs by accelerate; `chat_prompt`, `stop_token_ids`, `layer_devices`.
- `decoding.heads.resolve_heads(spec, model)`: Medusa heads in either published layout.
- `decoding.buffers.tree_buffers(tree)`: the tree's mask, depths, candidate indices, root-to-leaf paths.
- `decoding.cache.TreeCache` / `SlotCache`: preallocated KV caches (transformers `Cache` subclasses).
- `decoding.decoder.TreeDecoder(model, heads, tree, Acceptance(...)).generate(prompt_ids, max_new_tokens)`,
  `decode(...)`, `greedy_reference(...)` (plain `model.generate`), `run_decode(...)` (`treeopt decode`).
- `decoding.generate.greedy_continuations(...)`: the batched greedy loop calibration and training use.
- `decoding.profile.run_profile(...)` (`treeopt profile`), `profile_latency(...)` (per tree size and batch size).
"""
