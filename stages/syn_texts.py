"""The synthetic texts an enrichment stage may have written, in the one order the negatives stage
(``neg_of``) and the reinforce stage (``syn_text``, ``text_emb`` rows) both follow. Not a stage.

Each column is optional: a job without recaptioning has none, and a sample whose LLM call failed
has a null. A value may be one string or a list of strings; empty strings are left out.
"""
from __future__ import annotations

from typing import Any

# column -> syn_source, in syn_text order
SYN_COLUMNS: tuple[tuple[str, str], ...] = (("syn_text_caption", "caption"), ("syn_text_rewrite", "rewrite"),
                                            ("long_positive", "long"))
# HQ-CLIP's fields, stored in syn.json beside syn_text (long ones as one string, short ones as
# tag lists); long_positive is also a synthetic positive above
HQ_COLUMNS = ("long_positive", "long_negative", "short_positive", "short_negative")
# LLM-written negatives and their types (parallel lists)
LLM_NEG_COLUMNS = ("neg_text_llm", "neg_type_llm")


def texts(value: Any) -> list[str]:
    """A cell as a list of non-empty strings (None, a string, or a list of them)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, str) and v.strip()]
    return []


def syn_texts(row: dict) -> tuple[list[str], list[str]]:
    """(syn_text, syn_source) of one row, in SYN_COLUMNS order."""
    out, src = [], []
    for col, source in SYN_COLUMNS:
        for t in texts(row.get(col)):
            out.append(t)
            src.append(source)
    return out, src
