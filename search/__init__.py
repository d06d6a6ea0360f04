"""Search: acceptance models (acceptance), the greedy grower (grow), baselines, tree sizing for a machine
(budget, per batch size), the size sweep (sweep), a tree per batch size (schedule), tree comparison
(evaluate), deployment targets (targets), the consumers' own tree handling (consumers) and the CLI
twins (api)."""
