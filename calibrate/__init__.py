"""Calibration: run the base model and the heads over prompts and record, per position, the rank each head
gives the token the model emits (`run`, `ranks`). It produces the record that `treeopt.core.record` defines."""
