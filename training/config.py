"""The settings of a heads-training run, and where its files go."""

from __future__ import annotations

from dataclasses import dataclass

from treeopt.core.errors import TreeoptError
from treeopt.core.settings import DEFAULT_MODEL, at_least, positive

MAGPIE = "magpie"
SHARD = "shard-{:05d}.safetensors"
HELD_OUT_EVERY = 33  # ~3% of the sequences, picked by a hash of (shard, index)


@dataclass
class TrainConfig:
    work: str  # holds data/ shards, checkpoints and the log
    heads_out: str | None = None  # where the final heads are saved (Medusa layout)
    model: str = DEFAULT_MODEL
    prompts: str = MAGPIE  # `magpie`, a .json/.jsonl file, or a Hugging Face dataset id
    num_prompts: int = 2000  # sequences to generate (an upper bound with magpie: duplicates are dropped)
    max_new_tokens: int = 192
    batch_size: int = 48  # sequences per generation batch (one shard)
    magpie_temperature: float = 1.0
    magpie_top_p: float = 0.95
    magpie_max_tokens: int = 64
    num_heads: int = 4
    num_layers: int = 1
    epochs: float = 2.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_tokens: int = 2048  # hidden rows per optimizer step
    full_vocab: bool = False  # softmax over the whole vocabulary; False: over the tokens the training data holds
    distill: float = 0.5  # weight a of the KL to the base model's distribution (0: hard targets only)
    decay: float = 0.8  # head k's loss weight is decay**k
    seed: int = 0
    device: str = "cpu"
    checkpoint_every_s: float = 180.0
    max_train_s: float | None = None  # stop training (and checkpoint) after this long; resume later
    max_gen_s: float | None = None  # stop generating after this long; the shards so far are the data
    eval_prompts: int = 40  # AlpacaEval prompts x eval_tokens for the report's metric (0: skip); never trained on
    eval_tokens: int = 128
    max_steps: int | None = None  # stop training after this many steps in this run (checkpointed); resume later
    stage: str = "all"  # all, data (generate shards only) or train (train on the shards there are)

    OPTION = {"work": "--output-dir", "heads_out": "--save-heads"}

    def __post_init__(self):
        """Every number checked before a model loads (`treeopt train-heads` reads these)."""
        if self.stage not in ("all", "data", "train"):
            raise TreeoptError(f"unknown --stage {self.stage!r}: use all, data or train")
        at_least(self, num_prompts=1, max_new_tokens=1, batch_size=1, magpie_max_tokens=1, num_heads=1, num_layers=1,
                 batch_tokens=1, eval_prompts=0, eval_tokens=1, weight_decay=0, max_steps=1)
        positive(self, "epochs", "lr", "magpie_temperature", "magpie_top_p", "checkpoint_every_s", "max_train_s",
                 "max_gen_s")
        if not 0 <= self.distill <= 1:
            raise TreeoptError(f"--distill is {self.distill}: pass a weight between 0 and 1")
        if not 0 < self.decay <= 1:
            raise TreeoptError(f"decay is {self.decay}: pass a weight in (0, 1]")


@dataclass
class DrafterTrainConfig(TrainConfig):
    """`treeopt train-drafter`: the data stage of TrainConfig (its data fields), then a drafter of `kind`
    trained on it (treeopt.training.eagle3); the heads' own fields (num_heads, distill, ...) are unused."""

    kind: str = "eagle3"
    drafter_out: str | None = None  # where the final drafter is saved (vLLM's EAGLE-3 layout)
    draft_vocab: int = 8192  # the drafter's vocabulary: the most frequent continuation tokens
    steps: int = 3  # training-time test: unrolled steps (depths trained)
    aux_layers: tuple[int, ...] | None = None  # None: vLLM's default (2, L/2, L-3)
    batch_sequences: int = 4  # texts per optimizer step
    epochs: float = 4.0
    lr: float = 1e-3
    num_prompts: int = 576

    OPTION = {"work": "--output-dir", "drafter_out": "--save-drafter"}

    def __post_init__(self):
        super().__post_init__()
        if self.kind != "eagle3":
            raise TreeoptError(f"unknown --kind {self.kind!r}: train-drafter trains eagle3 drafters")
        at_least(self, draft_vocab=1, steps=1, batch_sequences=1)
