"""Search: acceptance models (acceptance), the greedy grower (grow), baselines, tree sizing for a machine\n(budget, per batch size), the size sweep (sweep), a tree per batch size (schedule), tree comparison
(evaluate) and the CLI twins (api)."""
