"""MetaCLIP sub-string matching, exactly as published, on an Aho-Corasick automaton.

Semantics (checked against facebookresearch/MetaCLIP ``metaclip/substr_matching.py`` and
``metaclip/curation/substr_matching.py``):

- the text is surrounded by one space, each of ``, . ; : ? ! ` `` is padded with a space on both
  sides, and ``\\t \\n \\r`` become spaces; nothing else (no case folding, no Unicode
  normalisation, no collapsing of spaces);
- ``metaclip1``: entry e matches iff ``" " + e + " "`` is a (case-sensitive) substring;
- ``metaclip2``: the space on a side of the entry is left out when the entry's character on that
  side is CJK-like (CJK ideographs, Thai, Lao, Burmese, Khmer, Tibetan) or punctuation.

Every entry id whose key occurs matches (overlaps included). Unlike upstream's automaton, where a
duplicated entry keeps only its last id, every copy of a duplicated entry matches — the naive
definition above. An empty entry never matches.
"""
from __future__ import annotations

import string
from collections.abc import Iterable, Sequence

import ahocorasick
import numpy as np
import pyarrow as pa

MODES = ("metaclip1", "metaclip2")
_WRAP = str.maketrans({c: f" {c} " for c in ",.;:?!`"} | {"\t": " ", "\n": " ", "\r": " "})
# MetaCLIP 2's punctuation: ASCII punctuation plus these full-width/CJK marks
_EXTRA_PUNCT = frozenset("，。、；：？！“”‘’（）【】《》〈〉「」『』～—")
_CJK_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF), (0x2CEB0, 0x2EBEF), (0xF900, 0xFAFF), (0x2E80, 0x2EFF), (0x2F00, 0x2FDF),
    (0x2FF0, 0x2FFF),
    (0x0E00, 0x0E7F), (0x0E80, 0x0EFF), (0x1000, 0x109F), (0x1780, 0x17FF), (0x0F00, 0x0FFF),  # Thai, Lao, Burmese, Khmer, Tibetan
)


def normalize(text: str) -> str:
    """MetaCLIP's ``spacing``. (Padding before turning tabs into spaces gives the same string as
    upstream's order: the two replacement sets do not overlap.)"""
    return f" {text} ".translate(_WRAP)


def is_cjk_or_punct(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES) or ch in string.punctuation or ch in _EXTRA_PUNCT


def entry_key(entry: str, mode: str = "metaclip1") -> str | None:
    """The string whose presence in the normalised text means ``entry`` matches; None: never."""
    if not entry:
        return None
    if mode == "metaclip1":
        return f" {entry} "
    left = "" if is_cjk_or_punct(entry[0]) else " "
    right = "" if is_cjk_or_punct(entry[-1]) else " "
    return f"{left}{entry}{right}"


def _as_text(t) -> str | None:
    if t is None:
        return None
    if isinstance(t, (bytes, bytearray, memoryview)):
        return bytes(t).decode("utf-8", errors="replace")
    return t if isinstance(t, str) else str(t)


class Matcher:
    """``Matcher(entries, mode).match(texts)`` → sorted entry ids per text; ``match_arrow`` → an
    Arrow ``list<int32>`` column. Built once (500k entries in seconds); pickles by rebuilding."""

    def __init__(self, entries: Sequence[str], mode: str = "metaclip1"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.entries = list(entries)
        self.mode = mode
        self._build()

    def _build(self) -> None:
        ids_by_key: dict[str, list[int]] = {}
        for i, e in enumerate(self.entries):
            key = entry_key(e, self.mode) if isinstance(e, str) else None
            if key is not None:
                ids_by_key.setdefault(key, []).append(i)
        auto = ahocorasick.Automaton()
        # value = a small tuple of ids: duplicated entries all match
        for key, ids in ids_by_key.items():
            auto.add_word(key, tuple(ids))
        if len(auto):
            auto.make_automaton()
        self._auto = auto if len(auto) else None

    def __getstate__(self) -> dict:
        return {"entries": self.entries, "mode": self.mode}

    def __setstate__(self, state: dict) -> None:
        self.entries, self.mode = state["entries"], state["mode"]
        self._build()

    def __len__(self) -> int:
        return len(self.entries)

    def match_one(self, text) -> list[int]:
        text = _as_text(text)
        if text is None or self._auto is None:
            return []
        found: set[int] = set()
        for _, ids in self._auto.iter(normalize(text)):
            found.update(ids)
        return sorted(found)

    def match(self, texts: Iterable) -> list[list[int]]:
        return [self.match_one(t) for t in texts]

    def match_arrow(self, column: pa.Array | pa.ChunkedArray) -> pa.ListArray:
        """Nulls and texts without a match give empty lists (never nulls)."""
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks() if column.num_chunks else pa.array([], pa.string())
        if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
            texts = [None if b is None else b.decode("utf-8", errors="replace") for b in column.to_pylist()]
        else:
            texts = column.to_pylist()
        offsets = np.zeros(len(texts) + 1, dtype=np.int32)
        values: list[int] = []
        auto = self._auto
        for n, t in enumerate(texts):
            if t is not None and auto is not None:
                found: set[int] = set()
                for _, ids in auto.iter(normalize(t if isinstance(t, str) else str(t))):
                    found.update(ids)
                values.extend(sorted(found))
            offsets[n + 1] = len(values)
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int32()))
