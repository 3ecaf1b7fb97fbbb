"""Per-row verdicts: a stage says, for each row, keep, drop (a reason and a detail) or note (kept,
but something was lost); ``verdicts`` turns that into the output table the engine reads.

The three control columns are the whole contract between a stage's output and the ledger; only
this module and the engine's step spell them.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

DROP = "_drop"      # reason the sample leaves the pipeline; null when it is kept
DETAIL = "_detail"  # free text for the ledger (error message, score, ...)
NOTE = "_note"      # comma-separated reasons for ``note`` rows on a kept sample
CONTROL_COLUMNS = (DROP, DETAIL, NOTE)

Reasons = Sequence[str | None] | pa.Array | None


def verdicts(uid: pa.Array | pa.ChunkedArray | Sequence[str], columns: Mapping[str, Any] | None = None, *,
             drop: Reasons = None, detail: Reasons = None, note: Reasons = None) -> pa.Table:
    """The output of ``process``/``apply``: ``uid``, the stage's columns (arrays or lists), and the
    verdicts, one per row (``None`` = keep / no detail / no note). Omitted verdicts keep every row."""
    table = {"uid": uid, **(columns or {})}
    for name, values in ((DROP, drop), (DETAIL, detail), (NOTE, note)):
        if values is not None:
            table[name] = values if isinstance(values, pa.Array | pa.ChunkedArray) else pa.array(values, pa.string())
    if "uid" in (columns or {}):
        raise ValueError("columns must not hold uid: it is the first argument")
    return pa.table(table)


def control(out: pa.Table, name: str) -> pa.Array:
    """One control column of a stage's output, as strings (all null when the stage left it out)."""
    if name not in out.column_names:
        return pa.nulls(out.num_rows, pa.string())
    return out.column(name).combine_chunks().cast(pa.string())
