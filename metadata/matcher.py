"""MetaCLIP sub-string matching over whole batches.

Semantics: see ``metadata.normalize``. Entry e matches a text iff ``entry_key(e, mode)`` occurs in
``normalize(text, mode)``; every occurrence counts, overlaps included (``hot dog`` also matches
``dog``). Every copy of a duplicated entry matches; the empty entry and missing texts never do.

How: a batch (a column, or a list made one) is prepared (nulls as "", stripped in metaclip2) and
padded by pyarrow into one byte buffer, each text followed by a separator; spacing is then one
``bytes.replace`` per mark over the whole buffer. Keys are first rewritten to equivalent ones with
a space at each end where possible (``searchable``). Those with a space at both ends (all of
MetaCLIP 1's, and MetaCLIP 2's unless an end is CJK-like) are found by ``metadata.tokens``: token
look-ups and a trie of token ids, in numpy. The rest (a CJK-like end, which can sit inside a word)
by one pyahocorasick ``Automaton.iter`` over the whole buffer (never ``iter_long``: overlaps
count). The (text, entry) pairs are sorted and made unique in numpy, then become list offsets.
"""
from __future__ import annotations

import contextlib
import gc
import itertools
import re
from collections.abc import Iterable, Sequence

import ahocorasick
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recap.metadata import tokens as tk
from recap.metadata.normalize import CHARS_TO_SPACE, PUNCTS_TO_WRAP, WHITESPACE, as_text, check_mode, entry_keys

_SEPARATOR = "\n"


_SPECIAL = frozenset(PUNCTS_TO_WRAP + CHARS_TO_SPACE)
_MARK_TOUCHING = re.compile("[^ ][{m}]|[{m}][^ ]".format(m=re.escape("".join(PUNCTS_TO_WRAP))))


def searchable(key: str | None) -> str | None:
    """A key that occurs in exactly the same spaced texts as ``key`` and has a space at each end
    where it can (so that more keys take the token path), or None if it occurs in none.

    In a spaced text, each of the padded marks has a space on both sides and there is no tab,
    newline or carriage return. So a key that starts (ends) with a mark occurs where the key with a
    space before (after) it does, and a key with a mark beside anything but a space never occurs."""
    if key is None or _SPECIAL.isdisjoint(key):  # the common case: nothing to rewrite or rule out
        return key
    if "\t" in key or "\n" in key or "\r" in key:
        return None
    if key[0] in PUNCTS_TO_WRAP:
        key = " " + key
    if key[-1] in PUNCTS_TO_WRAP:
        key += " "
    return None if _MARK_TOUCHING.search(key) else key


class Matcher:
    """``Matcher(entries, mode).match(texts)`` → sorted unique entry ids per text; ``match_arrow`` →
    an Arrow ``list<int32>`` column (what the balance stage uses; ``match`` and ``match_one`` go
    through it). Build once per worker (500k entries: a few seconds); pickling ships the entry list
    (8.6 MB for 500k) and rebuilds."""

    def __init__(self, entries: Sequence[str], mode: str = "metaclip1"):
        self.mode = check_mode(mode)
        self.entries = list(entries)
        self._build()

    # -- building ---------------------------------------------------------------------------------
    def _build(self) -> None:
        keys = [searchable(k) for k in entry_keys(self.entries, self.mode)]
        # key → the first entry having it (inserted last-to-first, so the first one stays)
        first = dict(zip(reversed(keys), range(len(keys) - 1, -1, -1)))
        first.pop(None, None)
        spaced = {k: i for k, i in first.items() if len(k) > 1 and k[0] == " " == k[-1]}
        self._build_tokens(spaced)
        self._build_automaton({k: i for k, i in first.items() if k not in spaced})
        self._build_copies(keys, first)
        self._any = bool(first)
        self._bits = max(1, len(self.entries).bit_length())  # a (text, entry) pair is text << bits | entry

    def _build_tokens(self, keys: dict[str, int]) -> None:
        """The token vocabulary and the trie of the keys with a space at both ends."""
        inner = [k[1:-1] for k in keys]
        sizes = np.fromiter((s.count(" ") + 1 for s in inner), np.int64, len(inner))
        tokens = " ".join(inner).split(" ") if inner else []
        vocab = list(dict.fromkeys(tokens))
        ids = {t: i for i, t in enumerate(vocab)}
        codes = np.fromiter(map(ids.__getitem__, tokens), np.int64, len(tokens))
        self._vocab = tk.TokenVocab([t.encode("utf-8", "surrogatepass") for t in vocab])
        self._trie = None
        if keys:
            offsets = np.concatenate([[0], np.cumsum(sizes)])
            self._trie = tk.TokenTrie(codes, offsets, np.fromiter(keys.values(), np.int64, len(keys)), len(vocab))

    def _build_automaton(self, keys: dict[str, int]) -> None:
        self._auto = None
        if keys:
            self._auto = ahocorasick.Automaton(ahocorasick.STORE_INTS)
            for key, i in keys.items():
                self._auto.add_word(key, i)
            self._auto.make_automaton()

    def _build_copies(self, keys: list[str | None], first: dict[str, int]) -> None:
        """CSR of the later entries with the same key as entry i: ``_copies[_copy_at[i]:_copy_at[i + 1]]``."""
        copies: dict[int, list[int]] = {}
        if len(first) < len(keys) - keys.count(None):
            for i, k in enumerate(keys):
                if k is not None and first[k] != i:
                    copies.setdefault(first[k], []).append(i)
        counts = np.zeros(len(self.entries), np.int64)
        for i, more in copies.items():
            counts[i] = len(more)
        self._copy_at = np.concatenate([[0], np.cumsum(counts)])
        self._copies = np.asarray([j for i in sorted(copies) for j in copies[i]], np.int64)

    def __getstate__(self) -> dict:
        return {"entries": self.entries, "mode": self.mode}

    def __setstate__(self, state: dict) -> None:
        self.entries, self.mode = state["entries"], state["mode"]
        self._build()

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"Matcher({len(self.entries)} entries, mode={self.mode!r})"

    # -- matching ---------------------------------------------------------------------------------
    def match_one(self, text) -> list[int]:
        return self.match([text])[0]

    def match(self, texts: Iterable) -> list[list[int]]:
        texts = list(texts)
        column, prepared = self._column(texts)
        rows, ids = self._match(column, prepared)
        ids, at = ids.tolist(), _offsets(len(texts), rows).tolist()
        with _no_gc():
            return [ids[a:b] for a, b in zip(at[:-1], at[1:])]

    def match_arrow(self, column: pa.Array | pa.ChunkedArray) -> pa.ListArray:
        """A string/binary column → ``list<int32>``; nulls and texts without a match give empty lists.
        Bytes that are not UTF-8 match on what decodes (U+FFFD for the rest)."""
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks() if column.num_chunks else pa.array([], pa.string())
        if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
            column = _decoded(column)
        rows, ids = self._match(column, False)
        return pa.ListArray.from_arrays(pa.array(_offsets(len(column), rows), pa.int32()),
                                        pa.array(ids.astype(np.int32), pa.int32()))

    def _column(self, texts: list) -> tuple[pa.Array, bool]:
        """(the texts as an Arrow array, whether they are prepared already)."""
        try:
            return pa.array(texts, pa.string()), False  # strings and None, or UTF-8 bytes (the same text)
        except (pa.ArrowException, TypeError, UnicodeEncodeError):
            texts = [as_text(t) for t in texts]
        try:
            return pa.array(texts, pa.string()), False
        except UnicodeEncodeError:  # lone surrogates: Arrow strings cannot hold them, bytes can
            return self._surrogate_bytes(texts), True

    def _surrogate_bytes(self, texts: list[str | None]) -> pa.Array:
        if self.mode == "metaclip2":
            texts = [None if t is None else t.strip() for t in texts]
        return pa.array([None if t is None else t.encode("utf-8", "surrogatepass") for t in texts], pa.binary())

    def _match(self, column: pa.Array, prepared: bool) -> tuple[np.ndarray, np.ndarray]:
        """(rows, ids) of every match, by row then id. ``column``: string, or binary already prepared
        (UTF-8, surrogates passed)."""
        rows, ids = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        if self._any:
            for start, stop in _chunks(column):
                r, i = self._match_chunk(column.slice(start, stop - start), prepared)
                rows.append(r + start)
                ids.append(i)
        return np.concatenate(rows), np.concatenate(ids)

    def _match_chunk(self, column: pa.Array, prepared: bool) -> tuple[np.ndarray, np.ndarray]:
        batch = _Batch(column, self.mode == "metaclip2" and not prepared)
        pairs = [self._token_pairs(batch), self._automaton_pairs(batch)]
        rows, ids = _unique_pairs(np.concatenate(pairs), self._bits)
        if column.null_count:  # a null is matched as "" (which nothing matches) but is not one
            keep = column.is_valid().to_numpy(zero_copy_only=False)[rows]
            rows, ids = rows[keep], ids[keep]
        return self._with_copies(rows, ids)

    def _token_pairs(self, batch: _Batch) -> np.ndarray:
        if self._trie is None:
            return np.zeros(0, np.int64)
        pos, ids = self._trie.match(self._vocab.ids(batch.buf, batch.starts, batch.lengths))
        return batch.token_rows[pos] << self._bits | ids

    def _automaton_pairs(self, batch: _Batch) -> np.ndarray:
        if self._auto is None:
            return np.zeros(0, np.int64)
        found = np.fromiter(itertools.chain.from_iterable(self._auto.iter(batch.text())), np.int64)
        ends, ids = found[0::2], found[1::2]
        return np.searchsorted(batch.separators(), ends) << self._bits | ids

    def _with_copies(self, rows: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not len(self._copies):
            return rows, ids
        n_more = self._copy_at[ids + 1] - self._copy_at[ids]
        has = n_more > 0
        if not has.any():
            return rows, ids
        more = n_more[has]
        at = np.repeat(self._copy_at[ids[has]] - np.cumsum(more) + more, more) + np.arange(more.sum())
        extra = np.repeat(rows[has], more) << self._bits | self._copies[at]
        return _unique_pairs(np.concatenate([rows << self._bits | ids, extra]), self._bits)


class _Batch:
    """A column as MetaCLIP spaces it (nulls as "", stripped in metaclip2), in one byte buffer: each
    text padded with a space each side, then the separator. Its tokens (what lies between two
    spaces), with the text each belongs to."""

    def __init__(self, column: pa.Array, strip: bool):
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            if column.null_count:
                column = pc.fill_null(column, "")
            if strip:
                column = pc.utf8_trim(column, characters=WHITESPACE)
            column = column.view(pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary())
        elif column.null_count:
            column = pc.fill_null(column, pa.scalar(b"", column.type))
        # 0xFF (in no UTF-8 text) stands for the separator until spacing has replaced the texts' own
        padded = pc.binary_join_element_wise(pa.scalar(b" ", column.type), column, pa.scalar(b" \xff", column.type),
                                             pa.scalar(b"", column.type))
        data = _values(padded)
        for c in PUNCTS_TO_WRAP:  # one pass per mark over the whole batch, as upstream does per text
            data = data.replace(c.encode(), f" {c} ".encode())
        data = data.translate(_SPACES)
        self.size = len(data)
        self.buf = tk.padded(np.frombuffer(data, np.uint8))
        self.starts, self.lengths = tk.split(self.buf, self.size)
        separator = (self.lengths == 1) & (self.buf[self.starts] == ord(_SEPARATOR))
        self.token_rows = np.cumsum(separator) - separator
        self._separators = self.starts[separator]

    def text(self) -> str:
        return self.buf[:self.size].tobytes().decode("utf-8", "surrogatepass")

    def separators(self) -> np.ndarray:
        """The code point index of each text's separator (automaton positions are code points)."""
        at = np.append(self._separators, self.size - 1)  # the last one is followed by no token
        continuing = np.flatnonzero((self.buf[:self.size] & 0xC0) == 0x80)  # bytes inside a character
        return at - np.searchsorted(continuing, at) if len(continuing) else at


_SPACES = bytes.maketrans("".join(CHARS_TO_SPACE).encode() + b"\xff", b" " * len(CHARS_TO_SPACE) + _SEPARATOR.encode())


def _values(column: pa.Array) -> bytes:
    """The bytes of a binary array's values, back to back."""
    large = pa.types.is_large_binary(column.type)
    offsets = np.frombuffer(column.buffers()[1], np.int64 if large else np.int32, len(column) + 1 + column.offset)
    lo, hi = int(offsets[column.offset]), int(offsets[-1])
    data = column.buffers()[2]
    return data.slice(lo, hi - lo).to_pybytes() if data is not None else b""


CHUNK_BYTES = 1 << 19  # per pass: the numpy arrays of a chunk stay in cache (a whole 100k-text column is 1.5x slower)


def _chunks(column: pa.Array) -> list[tuple[int, int]]:
    """Row ranges of about CHUNK_BYTES of text each (at least one row)."""
    n = len(column)
    if not n:
        return []
    large = pa.types.is_large_string(column.type) or pa.types.is_large_binary(column.type)
    offsets = np.frombuffer(column.buffers()[1], np.int64 if large else np.int32, n + 1 + column.offset)[column.offset:]
    cuts = np.searchsorted(offsets, np.arange(offsets[0], offsets[-1], CHUNK_BYTES)[1:])
    bounds = np.unique(np.concatenate([[0], np.clip(cuts, 1, n), [n]]))
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def _decoded(column: pa.Array) -> pa.Array:
    """A binary column as strings: zero-copy when it is UTF-8, else decoded with U+FFFD."""
    target = pa.large_string() if pa.types.is_large_binary(column.type) else pa.string()
    try:
        return column.cast(target)
    except pa.ArrowInvalid:
        return pa.array([as_text(b) for b in column.to_pylist()], target)


def _unique_pairs(keys: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, ids) of the distinct keys ``row << bits | id``, by row then id. (Sorting and comparing
    neighbours: quicker than ``np.unique``, which hashes first.)"""
    keys = np.sort(keys)
    if len(keys):
        keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]
    return keys >> bits, keys & ((1 << bits) - 1)


@contextlib.contextmanager
def _no_gc():
    """The cyclic collector paused: lists of ints hold no cycle, and its passes over a batch's new
    lists (one per text) cost more than making them."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _offsets(n: int, rows: np.ndarray) -> np.ndarray:
    """List offsets for n rows from the (sorted) row of each value."""
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(np.bincount(rows, minlength=n), out=offsets[1:])
    return offsets
