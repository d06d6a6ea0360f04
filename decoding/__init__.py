"""The engine: loading the model and the heads, the KV caches, Medusa tree decoding, batched greedy
generation and the latency profile. Imports only `treeopt.core`.

- `treeopt.decoding.models.load_model(name, device_map=, max_memory=)`: the bundled GGUF, a local directory or a hub id,
  on one device or spread over GPUs by accelerate (`--dtype auto`: bfloat16 where the device computes it
  natively); `chat_prompt`, `stop_token_ids`, `layer_devices`.
- `treeopt.decoding.heads.resolve_heads(spec, model)`: Medusa heads in either published layout.
- `treeopt.decoding.drafters.resolve_drafter(spec, model)`: what drafts a tree's nodes behind one interface
  (Medusa heads, vLLM's n-gram prompt lookup, a draft model), for the decoder and for calibration.
- `treeopt.decoding.buffers.tree_buffers(tree)`: the tree's mask, depths, candidate indices, root-to-leaf paths.
- `treeopt.decoding.cache.TreeCache` (static) / `SlotCache`: preallocated KV caches (transformers `Cache` subclasses).
- `treeopt.decoding.decoder.TreeDecoder(model, heads, tree, Acceptance(...), compiled=...).generate(prompt_ids, max_new_tokens)`
  (an empty tree is plain greedy decoding on the same path), `decode(...)`, `greedy_reference(...)` (plain
  `model.generate`), `run_decode(...)` (`treeopt decode`).
- `treeopt.decoding.generate.greedy_continuations(...)`: the batched greedy loop calibration and training use.
- `treeopt.decoding.profile.run_profile(...)` (`treeopt profile`), `profile_latency(...)` (per tree size and batch size);
  `treeopt.decoding.roofline`: the machine's bandwidth and GEMM peaks, and the least time a step can take.
"""
