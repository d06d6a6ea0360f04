"""Search: acceptance models (acceptance), the greedy grower (grow), baselines, tree sizing for a machine
(budget), the size sweep (sweep), tree comparison (evaluate), deployment targets (targets) and the
consumers' own tree handling (consumers), and the CLI twins (api)."""
