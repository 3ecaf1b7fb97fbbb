"""Space-delimited keys matched over a whole batch with numpy: exact token look-ups and a trie of
token ids, no Python object per match.

Why it is exact: a key ``" " + x + " "`` occurs in a spaced text T (which begins and ends with a
space) iff ``x.split(" ")`` is a run of consecutive tokens of T, a token being what lies between
two consecutive spaces of T. Both spaces of the key are spaces of T, and the spaces of x are
exactly the spaces of T in between. Every MetaCLIP 1 key has that form, and so has MetaCLIP 2's
for an entry with no CJK-like end.

Why not Aho-Corasick for these too: the automaton hands back one Python tuple per match (about
15 per caption), which costs more than the scan itself; here a batch is a few numpy passes over its
bytes and tokens. A batch is one byte buffer of spaced texts, each followed by ``"\\n"`` (which
``spacing`` leaves in no text, and no key here contains), so no run crosses two texts.

Tokens are compared as UTF-8 bytes. A token of up to 7 bytes is its own 64-bit key (its bytes, and
its length in the top byte); a longer one is hashed, looked up, then compared chunk by chunk, so a
hash collision never makes a match.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

_SHORT = 7  # bytes that fit a key beside the length byte
_MASK = np.array([(1 << (8 * n)) - 1 for n in range(8)] + [(1 << 64) - 1], dtype=np.uint64)
_TOP = np.arange(9, dtype=np.uint64) << np.uint64(56)  # the length, in the top byte


def padded(data: np.ndarray) -> np.ndarray:
    """A copy with 8 zero bytes after the end, so an 8-byte word can be read at any offset."""
    buf = np.zeros(len(data) + 8, np.uint8)
    buf[:len(data)] = data
    return buf


def split(buf: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(token starts, token lengths) of ``buf[:n]``, tokens being what lies between two spaces."""
    spaces = np.flatnonzero(buf[:n] == 32)
    starts = spaces[:-1] + 1
    return starts, spaces[1:] - starts


def _words(buf: np.ndarray) -> np.ndarray:
    """``words[i]`` = the little-endian 64-bit word at byte i (a view, one byte apart)."""
    return np.ndarray((len(buf) - 7,), dtype="<u8", buffer=buf, strides=(1,))


def _chunk(words: np.ndarray, starts: np.ndarray, lengths: np.ndarray, j: int) -> np.ndarray:
    """Each token's j-th 8-byte chunk, bytes past its end zeroed."""
    return words[starts + 8 * j] & _MASK[np.clip(lengths - 8 * j, 0, 8)]


class _Hash:
    """A 64-bit hash of a token's chunks; constants drawn from a seed (redrawn if two vocabulary
    tokens collide)."""

    def __init__(self, seed: int):
        self.k = np.random.default_rng(seed).integers(1, 1 << 63, 3, dtype=np.uint64) | np.uint64(1)

    def __call__(self, words: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        h = _chunk(words, starts, lengths, 0) * self.k[0]
        rest = np.flatnonzero(lengths > 8)
        j = 1
        while rest.size:
            h[rest] = (h[rest] ^ _chunk(words, starts[rest], lengths[rest], j)) * self.k[1]
            j += 1
            rest = rest[lengths[rest] > 8 * j]
        h ^= lengths.astype(np.uint64) * self.k[2]
        return h ^ (h >> np.uint64(31))


def _lookup(index: pd.Index, values: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """values[position of each key in index], -1 where absent (the hash table is built once per index)."""
    return values[index.get_indexer(keys)]  # values ends with -1, which position -1 picks


def _distinct(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct keys, sorted; the index of each key among them). Sort-based: ``np.unique``
    with ``return_inverse`` hashes, and is several times slower here."""
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    new = np.empty(len(keys), bool)
    new[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
    inverse = np.empty(len(keys), np.int64)
    inverse[order] = np.cumsum(new) - 1
    return ordered[new], inverse


def _with_missing(a: Sequence[int] | np.ndarray, dtype=np.int64) -> np.ndarray:
    return np.append(np.asarray(a, dtype), -1).astype(dtype)


class TokenVocab:
    """Token (bytes, no space) → id, in the order given; ``ids`` looks up every token of a batch."""

    def __init__(self, tokens: Sequence[bytes]):
        self.size = len(tokens)
        buf = padded(np.frombuffer(b" " + b" ".join(tokens) + b" ", np.uint8))
        starts, lengths = split(buf, len(buf) - 8)
        starts, lengths = starts[:self.size], lengths[:self.size]  # no tokens: b"  " is not one empty token
        self.max_len = int(lengths.max(initial=0))
        short = lengths <= _SHORT
        ids = np.arange(self.size)
        words = _words(buf)
        self._short = pd.Index(self._short_keys(words, starts[short], lengths[short]))
        self._short_ids = _with_missing(ids[short])
        long = ~short
        self._buf, self._starts, self._lengths = buf, starts[long], lengths[long]
        self._long_ids = _with_missing(ids[long])
        seed = 0
        while True:  # tokens differ, so some constants give them all different hashes
            self._hash = _Hash(seed)
            hashes = self._hash(words, self._starts, self._lengths)
            ordered = np.sort(hashes)
            if not np.any(ordered[1:] == ordered[:-1]):
                break
            seed += 1
        self._long = pd.Index(hashes)
        for index in (self._short, self._long):  # build the hash tables now, not on the first batch
            index.get_indexer(index[:1])

    @staticmethod
    def _short_keys(words: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Exact for tokens of up to 7 bytes. A longer token gets 8 or'ed into its top byte, so its key
        is never a short token's."""
        length = np.minimum(lengths, 8)
        keys = words[starts]
        keys &= _MASK[length]
        keys |= _TOP[length]
        return keys

    def ids(self, buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The id of each token ``buf[starts[i]:starts[i] + lengths[i]]``, -1 if not in the vocabulary."""
        if not self.size or not len(starts):
            return np.full(len(starts), -1, np.int64)
        words = _words(buf)
        out = _lookup(self._short, self._short_ids, self._short_keys(words, starts, lengths))
        if len(self._lengths):
            long = np.flatnonzero(lengths > _SHORT)
            long = long[lengths[long] <= self.max_len]
            at = self._long.get_indexer(self._hash(words, starts[long], lengths[long]))
            found = at >= 0
            long, at = long[found], at[found]
            same = self._same(words, starts[long], lengths[long], at)
            out[long[same]] = self._long_ids[at[same]]
        return out

    def _same(self, words: np.ndarray, starts: np.ndarray, lengths: np.ndarray, at: np.ndarray) -> np.ndarray:
        """Whether each text token has exactly the bytes of long vocabulary token ``at``."""
        ok = lengths == self._lengths[at]
        mine = _words(self._buf)
        todo = np.flatnonzero(ok)
        j = 0
        while todo.size:
            s, n = starts[todo], lengths[todo]
            differ = _chunk(words, s, n, j) != _chunk(mine, self._starts[at[todo]], n, j)
            ok[todo[differ]] = False
            j += 1
            todo = todo[~differ & (n > 8 * j)]
        return ok


class TokenTrie:
    """Entries as sequences of token ids; ``match`` finds every run of a batch's tokens that is one."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, entry_ids: np.ndarray, n_tokens: int):
        """Sequence s is ``tokens[offsets[s]:offsets[s + 1]]`` (distinct, none empty) and spells entry
        ``entry_ids[s]``. Built a level at a time: the nodes at depth d are the distinct (node at
        depth d - 1, d-th token) pairs of the sequences that long."""
        self.n_tokens = n_tokens
        lengths = np.diff(offsets)
        size = int(lengths.sum()) + 1  # at most one node per token, plus the root
        terminal = np.full(size + 1, -1, np.int64)  # the last slot answers node -1
        inner = np.zeros(size + 1, bool)  # whether the node has children
        first = np.full(n_tokens + 1, -1, np.int64)  # the last slot answers token id -1
        edge_keys, edge_nodes = [], []
        node = np.zeros(len(lengths), np.int64)  # where each sequence has got to: the root
        alive = np.arange(len(lengths))
        n_nodes, depth = 1, 0
        while alive.size:
            tok = tokens[offsets[alive] + depth]
            pairs, child = _distinct(node[alive] * n_tokens + tok)
            child += n_nodes
            n_nodes += len(pairs)
            inner[node[alive]] = True
            if depth == 0:
                first[pairs] = np.arange(n_nodes - len(pairs), n_nodes)
            else:
                edge_keys.append(pairs)
                edge_nodes.append(np.arange(n_nodes - len(pairs), n_nodes))
            node[alive] = child
            done = lengths[alive] == depth + 1
            terminal[child[done]] = entry_ids[alive[done]]
            alive = alive[~done]
            depth += 1
        inner[0] = False  # the root's children are looked up through ``first``
        self._first = first
        self._terminal = np.append(terminal[:n_nodes], -1)
        self._inner = np.append(inner[:n_nodes], False)
        # the first step, straight from token ids
        self._first_entry = self._terminal[first]
        self._first_inner = self._inner[first]
        self._edges = pd.Index(np.concatenate(edge_keys) if edge_keys else np.zeros(0, np.int64))
        self._child = _with_missing(np.concatenate(edge_nodes) if edge_nodes else [])
        self._edges.get_indexer(self._edges[:1])

    def match(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index of the first token, entry id) for every run of ``tokens`` (ids, -1: unknown) that
        spells an entry."""
        entry = self._first_entry[tokens]
        hit = np.flatnonzero(entry >= 0)
        positions, found = [hit], [entry[hit]]
        pos = np.flatnonzero(self._first_inner[tokens])
        node = self._first[tokens[pos]]
        step = 1
        while pos.size:
            nxt = pos + step
            keep = nxt < len(tokens)
            pos, node, nxt = pos[keep], node[keep], nxt[keep]
            tok = tokens[nxt]
            keep = tok >= 0
            pos, node, tok = pos[keep], node[keep], tok[keep]
            node = _lookup(self._edges, self._child, node * self.n_tokens + tok)
            keep = node >= 0
            pos, node = pos[keep], node[keep]
            self._emit(positions, found, pos, node)
            keep = self._inner[node]
            pos, node = pos[keep], node[keep]
            step += 1
        return np.concatenate(positions), np.concatenate(found)

    def _emit(self, positions: list, found: list, pos: np.ndarray, node: np.ndarray) -> None:
        entry = self._terminal[node]
        hit = np.flatnonzero(entry >= 0)
        positions.append(pos[hit])
        found.append(entry[hit])
