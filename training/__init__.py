"""Heads training (`treeopt train-heads`): settings (config), data shards (data), the loop and its evaluation (train)."""
