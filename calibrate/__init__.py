"""Calibration: run the base model and the heads over prompts and record, per position, the rank each head
gives the token the model emits (`run`, `ranks`), or, teacher-forced, the tokens of a chat dataset's assistant
turns (`teacher`). Both split their shards over the processes `accelerate launch` starts. It produces the record
that `treeopt.core.record` defines."""
