"""MetaCLIP's balancing math as plain functions (facebookresearch/MetaCLIP ``metaclip/metaclip1/balancing.py``,
``metaclip/curation/curate.py``: ``count_to_prob``, ``t_to_p``, ``p_to_t``).

count[e] = texts whose match set contains e; p[e] = min(1, t / count[e]) (1 for unmatched
entries, as upstream's ``count_to_prob``); a text with match set M is kept with probability
P = 1 − ∏_{e∈M}(1 − p[e]), and 0 when M is empty.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa


def _flat(matches) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a list<int> column or a list of lists."""
    if isinstance(matches, pa.ChunkedArray):
        matches = matches.combine_chunks()
    if isinstance(matches, (pa.ListArray, pa.LargeListArray)):
        offsets = matches.offsets.to_numpy().astype(np.int64)
        values = matches.values.to_numpy(zero_copy_only=False).astype(np.int64)
        values = values[offsets[0]:offsets[-1]]
        return values, offsets - offsets[0]
    lengths = np.fromiter((len(m) for m in matches), np.int64, len(matches))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = np.fromiter((i for m in matches for i in m), np.int64, int(offsets[-1]))
    return values, offsets


def count_entries(matches, n_entries: int) -> np.ndarray:
    """Per-entry text counts (each entry once per text, even if a match set repeats it)."""
    values, offsets = _flat(matches)
    if len(values) == 0:
        return np.zeros(n_entries, np.int64)
    if values.min() < 0 or values.max() >= n_entries:
        raise ValueError(f"entry ids must be in [0, {n_entries}), got {values.min()}..{values.max()}")
    row = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    pairs = np.unique(row * np.int64(n_entries) + values)  # once per (text, entry)
    return np.bincount(pairs % n_entries, minlength=n_entries).astype(np.int64)


def entry_probabilities(counts: np.ndarray, t: float) -> np.ndarray:
    """p[e] = min(1, t / count[e]) — upstream's ``count_to_prob`` (counts below t are raised to t).
    Entries with count 0 get 1 (0 when t ≤ 0, where upstream divides 0 by 0); no division warnings.

    t is a real number. Upstream raises the counts in place, in their integer array, so a fractional
    t is truncated there (t = 2.5: counts below it become 2, p = 1.25); for the integer t upstream
    always has, both agree. A deliberate difference: a t solved from a target size is fractional."""
    c = np.asarray(counts, dtype=np.float64)
    t = float(t)
    if t <= 0:
        return np.zeros(c.shape, np.float64)
    return t / np.maximum(c, t)


def keep_probability(matched_ids: Sequence[int], probs: np.ndarray) -> float:
    ids = sorted(set(int(i) for i in matched_ids))
    if not ids:
        return 0.0
    return float(1.0 - np.prod(1.0 - np.asarray(probs, np.float64)[ids]))


def keep_probabilities(matches, probs: np.ndarray) -> np.ndarray:
    """keep_probability for many texts at once: a segmented product of (1 − p) over the flattened
    match lists (``np.multiply.reduceat`` over the non-empty rows only; ids repeated within a list
    count once, as in keep_probability)."""
    values, offsets = _flat(matches)
    n = len(offsets) - 1
    out = np.zeros(n, np.float64)
    if len(values) == 0:
        return out
    lengths = np.diff(offsets)
    row = np.repeat(np.arange(n), lengths)
    step = np.diff(values)
    if len(step) and not np.all((step > 0) | (np.diff(row) > 0)):  # not sorted-unique within rows
        keys = np.unique(row * np.int64(len(probs)) + values)
        row, values = keys // len(probs), keys % len(probs)
        lengths = np.bincount(row, minlength=n)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
    miss = 1.0 - np.asarray(probs, np.float64)[values]
    has = lengths > 0
    # exact products (log1p sums would turn p = 1 into −inf and lose the last bits elsewhere)
    out[has] = 1.0 - np.multiply.reduceat(miss, offsets[:-1][has])
    return out


def tail_share(counts: np.ndarray, t: float) -> float:
    """Upstream's ``t_to_p``: the share of all matches that fall on entries with count < t."""
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    return float(c[c < t].sum() / total) if total else 0.0


def threshold_for_share(counts: np.ndarray, p: float) -> float:
    """Upstream's ``p_to_t``: over all entries' counts sorted ascending (zeros included), the count
    at which the cumulative match share is closest to p (the first such on ties)."""
    c = np.sort(np.asarray(counts, dtype=np.float64))
    total = c.sum()
    if not total:
        return 0.0
    share = np.cumsum(c) / total
    return float(c[int(np.abs(share - p).argmin())])


def language_threshold(english_counts: np.ndarray, language_counts: np.ndarray, t: float) -> int:
    """MetaCLIP 2 (upstream ``global_count``): ``p_to_t(language_counts, t_to_p(english_counts, t))``,
    the language's t at which its tail holds the share of matches English's tail (count < t, strict)
    holds. As upstream, the language's counts are sorted with their zeros (zero-count entries sit at
    the start with share 0, so when p is nearer 0 than the smallest non-zero share the answer is 0,
    where a nonzero-only sort would give the smallest non-zero count); ties → the first (smallest)
    count. Returns 0 for a language without matches."""
    return int(threshold_for_share(language_counts, tail_share(english_counts, t)))


def expected_kept(matches, counts: np.ndarray, t: float) -> float:
    return float(keep_probabilities(matches, entry_probabilities(counts, t)).sum())


def solve_threshold(matches_sample, counts: np.ndarray, target: float, iters: int = 60) -> float:
    """t such that the expected number of sample texts kept, Σ P(text; t) with p from the full
    ``counts``, is ``target`` (scale ``target`` to the sample yourself). Bisection: the expected
    number grows with t, from 0 at t = 0 to the number of matched texts at t = max count. The
    bracket is [0, max count] rather than [1, max count] so that small targets are reachable too;
    returns max count (≥ 1) when ``target`` ≥ the number of matched sample texts."""
    counts = np.asarray(counts)
    hi = float(max(counts.max(initial=0), 1))
    values, offsets = _flat(matches_sample)
    matched = int(np.count_nonzero(np.diff(offsets)))
    if target >= matched:
        return hi
    if target <= 0:
        return 0.0
    lo = 0.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if expected_kept(matches_sample, counts, mid) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-9 * hi:
            break
    return hi
