"""Is an output file still what was written? Parse it by its kind, count its rows, compare its bytes.

A stage records a `fingerprint` of each file it made; before reusing the file it asks `problem`, so
a truncated bench.csv, a corrupt tree.json or a half-copied shard is redone with the reason, never
taken as done."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def rows(path: str | Path) -> int:
    """Rows of a data file (parquet and CSV rows, the items of a JSON list, 1 for another JSON value,
    lines of anything else); raises when the file does not parse."""
    import pandas as pd

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return len(pd.read_parquet(path))
    if suffix == ".csv":
        return len(pd.read_csv(path))
    if suffix == ".json":
        doc = json.loads(path.read_text(encoding="utf-8"))
        return len(doc) if isinstance(doc, list) else 1
    return path.read_bytes().count(b"\n")


def fingerprint(path: str | Path) -> dict:
    """What `problem` checks a file against later: its rows, size and sha256."""
    return {"rows": rows(path), "bytes": Path(path).stat().st_size, "sha256": sha256_file(path)}


def problem(path: str | Path, expected: dict) -> str:
    """Why `path` is no longer the file `expected` fingerprinted ('' when it is): 'is missing', 'does not
    parse (ParserError)', 'has 2 rows, 5 were written', 'differs from what was written'."""
    path = Path(path)
    if not path.is_file():
        return "is missing"
    if path.stat().st_size == expected.get("bytes") and sha256_file(path) == expected.get("sha256"):
        return ""
    try:
        n = rows(path)
    except Exception as e:  # pandas, pyarrow and json raise many types for a damaged file
        return f"does not parse ({type(e).__name__})"
    if n != expected.get("rows"):
        return f"has {n} rows, {expected.get('rows')} were written"
    return f"differs from what was written ({path.stat().st_size} bytes, {expected.get('bytes')} were written)"


def cut_short(path: str | Path) -> bool:
    """True when a non-empty text file does not end with a newline: treeopt's CSV and JSON files all do,
    so one that does not was cut mid-row (a truncated copy, a full disk)."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1) != b"\n"


def table_problem(path: str | Path, columns: Iterable[str], integers: Iterable[str] = (),
                  numbers: Iterable[str] = ()):
    """(table, '') for a CSV file that is whole: it parses, ends with a newline, has `columns` and at
    least one row, and `integers` / `numbers` (some of the columns) hold one on every row; else
    (None, what is wrong: 'is cut short (no newline at its end)', 'lacks columns [...]', ...)."""
    import pandas as pd

    path, integers, numbers = Path(path), tuple(integers), tuple(numbers)
    try:
        df = pd.read_csv(path)
    except Exception as e:  # pandas raises many types for damaged files
        return None, f"does not parse ({type(e).__name__})"
    if cut_short(path):
        return None, "is cut short (no newline at its end)"
    absent = [c for c in columns if c not in df.columns]
    if absent:
        return None, f"lacks the column{'s' if len(absent) > 1 else ''} {', '.join(absent)}"
    if df.empty:
        return None, "has no rows"
    for c in [*integers, *numbers]:
        values = pd.to_numeric(df[c], errors="coerce")
        bad = values.isna() | ((values % 1 != 0) if c in integers else False)
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            return None, f"row {row + 1} has {df[c].iloc[row]!r} in {c}, not {'an integer' if c in integers else 'a number'}"
    return df, ""
