"""treeopt's ground floor: the tree value type and its files, the calibration record, replay, prompts,
atomic files and resumable stages. Pure Python + numpy/pandas: nothing here imports torch or a package above."""
