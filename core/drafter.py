"""What `--drafter` names (torch-free: the settings check it): a kind and its checkpoint or n-gram lengths.
The drafters themselves are treeopt.decoding.drafters."""

from __future__ import annotations

from dataclasses import dataclass

from treeopt.core.errors import TreeoptError

KINDS = ("heads", "ngram", "draft", "eagle3")
NGRAM_DEFAULT = (5, 5)  # vLLM's prompt_lookup_min/max when neither is given (SpeculativeConfig)


@dataclass(frozen=True)
class DrafterSpec:
    """What `--drafter` names: kind, and its path (draft: the model; heads: a directory, else --heads)
    or its n-gram lengths."""

    kind: str = "heads"
    path: str | None = None  # heads/eagle3: None = the ones shipped for the bundled model
    min_n: int = NGRAM_DEFAULT[0]
    max_n: int = NGRAM_DEFAULT[1]

    def __str__(self) -> str:
        if self.kind == "ngram":
            return f"ngram:{self.min_n}-{self.max_n}"
        return self.kind + (f":{self.path}" if self.path else "")


def parse_drafter(text: str | None) -> DrafterSpec:
    """`heads`, `heads:DIR`, `ngram`, `ngram:N`, `ngram:MIN-MAX`, `draft:MODEL`, `eagle3`, `eagle3:DIR` -> DrafterSpec."""
    text = (text or "heads").strip()
    kind, _, rest = text.partition(":")
    fix = "pass --drafter heads, ngram[:MIN-MAX], draft:MODEL or eagle3[:DIR]"
    if kind not in KINDS:
        raise TreeoptError(f"unknown --drafter {text!r}: {fix}")
    if kind == "ngram":
        if not rest:
            return DrafterSpec("ngram")
        lo, _, hi = rest.partition("-")
        try:
            lo, hi = int(lo), int(hi or lo)
        except ValueError:
            raise TreeoptError(f"--drafter {text!r}: give the n-gram lengths as ngram:MIN-MAX, e.g. ngram:2-4") from None
        if not 1 <= lo <= hi:
            raise TreeoptError(f"--drafter {text!r}: n-gram lengths need 1 <= MIN <= MAX, e.g. ngram:2-4")
        return DrafterSpec("ngram", min_n=lo, max_n=hi)
    if kind == "draft" and not rest:
        raise TreeoptError("--drafter draft needs its model: pass --drafter draft:MODEL (a directory or a hub id)")
    return DrafterSpec(kind, rest or None)


def drafter_of(meta: dict) -> str:
    """The drafter a calibration record names (`--drafter`, treeopt.core.drafter); heads when it names none."""
    return (meta.get("settings") or {}).get("drafter") or "heads"
