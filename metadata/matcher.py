"""MetaCLIP sub-string matching on one Aho-Corasick automaton (pyahocorasick).

Semantics: see ``metadata.normalize``. Entry e matches a text iff ``entry_key(e, mode)`` occurs in
``spacing(text)``; every occurrence counts, overlaps included (``Automaton.iter``, never
``iter_long``). Unlike upstream's automaton, where a duplicated entry keeps only its last id, every
copy of a duplicated entry matches — the naive definition. Empty entries never match.

pyahocorasick, not ahocorasick_rs: the latter does overlapping matches too and scanned ~10% faster
in bench/metaclip_match.py (≈60k vs ≈55k texts/s, 500k entries), but builds slower (2.5 s vs 1.7 s)
and is not a project dependency; the gain is within run-to-run noise on a shared machine.

The automaton's value for a key is the smallest id of the entries having that key; ids of further
copies are kept aside and added after the scan, so the common case is a set comprehension.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import ahocorasick
import numpy as np
import pyarrow as pa

from recap.metadata.normalize import MODES, as_text, entry_key, spacing


class Matcher:
    """``Matcher(entries, mode).match(texts)`` → sorted unique entry ids per text; ``match_arrow`` →
    an Arrow ``list<int32>`` column. Build once per worker (500k entries: a few seconds); pickling
    ships the entry list (8.6 MB for 500k) and rebuilds the automaton (~2 s round trip); pickling
    the pyahocorasick automaton itself round-trips a little faster (~1.3 s) but is ~141 MB to ship
    to every worker (bench/metaclip_match.py), so it is not done."""

    def __init__(self, entries: Sequence[str], mode: str = "metaclip1"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.entries = list(entries)
        self.mode = mode
        self._build()

    def _build(self) -> None:
        first: dict[str, int] = {}
        extra: dict[int, list[int]] = {}
        for i, e in enumerate(self.entries):
            key = entry_key(e, self.mode)
            if key is None:
                continue
            j = first.setdefault(key, i)
            if j != i:
                extra.setdefault(j, []).append(i)
        auto = ahocorasick.Automaton(ahocorasick.STORE_INTS)
        add = auto.add_word
        for key, i in first.items():
            add(key, i)
        if first:
            auto.make_automaton()
        self._auto = auto if first else None
        self._extra = extra

    def __getstate__(self) -> dict:
        return {"entries": self.entries, "mode": self.mode}

    def __setstate__(self, state: dict) -> None:
        self.entries, self.mode = state["entries"], state["mode"]
        self._build()

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"Matcher({len(self.entries)} entries, mode={self.mode!r})"

    def _scan(self, text: str) -> list[int]:
        found = {i for _, i in self._auto.iter(spacing(text))}
        if self._extra and found:
            extra = self._extra
            for i in [i for i in found if i in extra]:
                found.update(extra[i])
        return sorted(found)

    def match_one(self, text) -> list[int]:
        text = as_text(text)
        if text is None or self._auto is None:
            return []
        return self._scan(text)

    def match(self, texts: Iterable) -> list[list[int]]:
        return [self.match_one(t) for t in texts]

    def match_arrow(self, column: pa.Array | pa.ChunkedArray) -> pa.ListArray:
        """A string/binary column → ``list<int32>``; nulls and texts without a match give empty lists."""
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks() if column.num_chunks else pa.array([], pa.string())
        texts = column.to_pylist()
        n = len(texts)
        lengths = np.zeros(n, dtype=np.int64)
        values: list[int] = []
        if self._auto is not None:
            scan, extend = self._scan, values.extend
            for row, t in enumerate(texts):
                if t is None:
                    continue
                if t.__class__ is not str:
                    t = as_text(t)
                ids = scan(t)
                if ids:
                    lengths[row] = len(ids)
                    extend(ids)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int32()))
