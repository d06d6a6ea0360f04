"""Search: acceptance models (acceptance), the greedy grower (grow), baselines, tree sizing for a machine\n(budget), the size sweep (sweep), tree comparison (evaluate) and the CLI twins (api)."""
