"""Resumable stages: a directory of outputs, a manifest of what made them, and parts marked done.

Every long job in treeopt (calibrate's shards, bench's rows, the demo's stages, heads training's data)
is a `Stage`. Its manifest records the settings that made its outputs (parameters, input hashes,
versions that matter); work is done in parts, and a part's marker (a small JSON file) is written
last and atomically, after the part's own files, so a run killed at any moment resumes at the first
part without a marker and never mixes the outputs of two different settings:

    stage = Stage(out / "shards", settings, what="calibration").open()
    for part in parts:
        if stage.done(part):
            continue
        ...write the part's files atomically (fileio.atomic_write)...
        stage.finish(part, {"tokens": n}, files=[...the part's files...])

A part's marker may fingerprint the part's files (rows, bytes, sha256: treeopt.core.validate): a part
whose file was truncated, damaged or replaced since is not done any more, and `why_not_done` says why.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from treeopt.core.errors import TreeoptError
from treeopt.core.fileio import write_text
from treeopt.core.validate import fingerprint, problem

MANIFEST = "manifest.json"
PART = ".done.json"  # a part's marker: `<part>.done.json`
FILES = "_files"  # in a marker: {path relative to the stage directory: fingerprint} of the part's files


def differences(old: Mapping, new: Mapping, most: int = 3) -> str:
    """'nodes 16 -> 8, seed 0 -> 1' for the keys whose values differ ('' when none do)."""
    keys = [k for k in dict.fromkeys([*new, *old]) if old.get(k) != new.get(k)]
    shown = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:most])
    return shown + (f" and {len(keys) - most} more" if len(keys) > most else "")


@dataclass(frozen=True)
class Stage:
    """The outputs under `directory` of one set of `settings` (JSON-able), resumable part by part."""

    directory: Path
    settings: Mapping[str, Any]
    what: str = "run"  # how messages name it: "calibration", "bench", ...
    manifest_name: str = MANIFEST
    elsewhere: str = "pass another output directory"  # how the user's command picks another directory

    def __post_init__(self):
        object.__setattr__(self, "directory", Path(self.directory))
        object.__setattr__(self, "settings", json.loads(json.dumps(dict(self.settings), default=str)))

    @property
    def manifest(self) -> Path:
        return self.directory / self.manifest_name

    def recorded(self) -> dict | None:
        """The settings in the manifest; None when there is none; TreeoptError when it is damaged."""
        if not self.manifest.is_file():
            return None
        try:
            doc = json.loads(self.manifest.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise TreeoptError(f"{self.manifest} is damaged: delete it (its {self.what} is redone) "
                               f"or {self.elsewhere}") from None
        if not isinstance(doc, dict):
            raise TreeoptError(f"{self.manifest} is not a manifest: delete it or {self.elsewhere}")
        return doc

    def mismatch(self) -> str:
        """Why the outputs there were made by other settings ('' when they match or there are none yet)."""
        old = self.recorded()
        return "" if old is None or old == self.settings else differences(old, self.settings)

    def open(self, restart: bool = False) -> "Stage":
        """Claim the directory for these settings. Outputs of other settings raise a one-line error
        naming the difference, or with `restart` are removed (parts and manifest) and redone."""
        why = self.mismatch()
        if why:
            if not restart:
                raise TreeoptError(f"{self.directory} holds a {self.what} made with other settings ({why}): "
                                   f"{self.elsewhere}, or the same settings to resume it")
            self.clear()
        if self.recorded() is None:
            write_text(self.manifest, json.dumps(self.settings, indent=1, sort_keys=True) + "\n")
        return self

    def clear(self) -> None:
        """Forget every part and the manifest (the parts' own files are overwritten when redone)."""
        for marker in self.directory.glob(f"*{PART}"):
            marker.unlink()
        self.manifest.unlink(missing_ok=True)

    def _marker(self, part: str) -> Path:
        return self.directory / f"{part}{PART}"

    def done(self, part: str) -> bool:
        return not self.why_not_done(part)

    def why_not_done(self, part: str) -> str:
        """'' when `part` is done; else why not: it never finished, or one of its files is damaged."""
        doc = self._read(part)
        if doc is None:
            return f"its marker {self._marker(part)} is damaged" if self._marker(part).exists() else "it did not finish"
        for rel, expected in doc.get(FILES, {}).items():
            why = problem(self.directory / rel, expected)
            if why:
                return f"{os.path.normpath(self.directory / rel)} {why}"
        return ""

    def info(self, part: str) -> dict | None:
        """What `finish` recorded for the part; None when it has no readable marker."""
        doc = self._read(part)
        return None if doc is None else {k: v for k, v in doc.items() if k != FILES}

    def _read(self, part: str) -> dict | None:
        try:
            doc = json.loads(self._marker(part).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        return doc if isinstance(doc, dict) else None

    def finish(self, part: str, info: Mapping[str, Any] | None = None, files: Iterable[str | Path] = ()) -> None:
        """Mark `part` done: call it after the part's own `files` are written (they are fingerprinted)."""
        doc = dict(info or {})
        prints = {os.path.relpath(f, self.directory): fingerprint(f) for f in files}
        if prints:
            doc[FILES] = prints
        write_text(self._marker(part), json.dumps(doc, default=str) + "\n")

    def _marked(self) -> list[str]:
        return sorted(p.name[: -len(PART)] for p in self.directory.glob(f"*{PART}"))

    def parts(self) -> list[str]:
        """The parts done, in name order."""
        return [part for part in self._marked() if self.done(part)]

    def broken(self) -> dict[str, str]:
        """The parts once marked done that are not any more (a damaged marker or file): part -> why."""
        whys = {part: self.why_not_done(part) for part in self._marked()}
        return {part: why for part, why in whys.items() if why}
