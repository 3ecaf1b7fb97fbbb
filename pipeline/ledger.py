"""The ledger: one ``drop`` row per sample that leaves the pipeline at a stage, and ``note`` rows
for samples that stay but lost something (a truncated caption, a failed LLM call)."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

LEDGER_SCHEMA = pa.schema([
    ("uid", pa.string()),
    ("stage", pa.string()),
    ("action", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
])
MAX_DETAIL = 1000


def _clip(s: str | None) -> str | None:
    return s if s is None or len(s) <= MAX_DETAIL else s[: MAX_DETAIL - 3] + "..."


def ledger_table(uids: pa.Array, stage: str, drop: pa.Array, detail: pa.Array, note: pa.Array) -> pa.Table:
    """Rows in sample order: a sample's drop, then its notes."""
    rows: dict[str, list] = {n: [] for n in LEDGER_SCHEMA.names}
    has_any = pc.or_(pc.is_valid(drop), pc.is_valid(note))
    idx = pc.indices_nonzero(has_any).to_pylist()
    u, d, dt, nt = (a.take(pa.array(idx, pa.int64())).to_pylist() for a in (uids, drop, detail, note))
    for uid, reason, det, notes in zip(u, d, dt, nt):
        if reason is not None:
            for k, v in zip(LEDGER_SCHEMA.names, (uid, stage, "drop", reason, _clip(det))):
                rows[k].append(v)
        for n in (notes.split(",") if notes else []):
            for k, v in zip(LEDGER_SCHEMA.names, (uid, stage, "note", n, None if reason is not None else _clip(det))):
                rows[k].append(v)
    return pa.table(rows, schema=LEDGER_SCHEMA)
