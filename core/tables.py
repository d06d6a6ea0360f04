"""Tables as plain aligned text, for every command's output."""

from __future__ import annotations

import numpy as np
import pandas as pd


def render_table(df: pd.DataFrame, digits: int = 3) -> str:
    """Plain aligned text: numbers right-aligned with `digits` decimals, text left-aligned."""
    def fmt(v) -> str:
        if isinstance(v, (float, np.floating)):
            return "" if np.isnan(v) else f"{v:.{digits}f}"
        return str(v)

    cols = list(df.columns)
    cells = [cols] + [[fmt(v) for v in row] for row in zip(*(df[c].tolist() for c in cols))]
    width = [max(len(r[i]) for r in cells) for i in range(len(cols))]
    numeric = [pd.api.types.is_numeric_dtype(df[c]) for c in cols]
    return "\n".join("  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(r, width, numeric)).rstrip()
                     for r in cells)
