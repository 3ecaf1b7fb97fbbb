"""HQ-CLIP's short tags for the trainer: the tag vocabulary and each sample's tag ids.

Reinforced shards carry, in ``syn.json``, ``short_positive`` (tags the recaptioner saw in the
image) and ``short_negative`` (plausible tags it did not). The short-tag loss
(``trainer.losses.ShortTagLoss``) scores a multi-label head over a fixed vocabulary: given as a
JSON list of strings, or made from the data — the ``max_tags`` most frequent positive tags with at
least ``min_count`` samples, ties broken alphabetically, so every rank builds the same list.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence

import fsspec


class TagVocabError(ValueError):
    pass


def _tags(syn: dict | None, field: str) -> list[str]:
    v = (syn or {}).get(field)
    return [t.strip() for t in v if isinstance(t, str) and t.strip()] if isinstance(v, list) else []


def load_tag_vocab(path: str) -> list[str]:
    try:
        with fsspec.open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise TagVocabError(f"{path}: no such tag vocabulary") from None
    except ValueError as e:
        raise TagVocabError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, list):
        raise TagVocabError(f"{path}: expected a JSON list of tag strings, got a {type(data).__name__}")
    for i, t in enumerate(data):
        if not isinstance(t, str) or not t.strip():
            raise TagVocabError(f"{path}: item {i} is {t!r}, expected a non-empty string")
    if len(set(data)) != len(data):
        dup = next(t for t, n in Counter(data).items() if n > 1)
        raise TagVocabError(f"{path}: tag {dup!r} appears more than once")
    if not data:
        raise TagVocabError(f"{path}: the tag vocabulary is empty")
    return [t.strip() for t in data]


def build_tag_vocab(shards: Sequence[str], max_tags: int, min_count: int = 1) -> list[str]:
    """The most frequent ``short_positive`` tags over all shards (one count per sample)."""
    from recap.pipeline.reinforced import decode_sample, iter_raw

    counts: Counter = Counter()
    for url in shards:
        for key, members in iter_raw(url, Counter()):
            s = decode_sample(key, members, required=(), decode_npz=False)
            if s is not None:
                counts.update(set(_tags(s.get("syn"), "short_positive")))
    ranked = sorted((t for t, n in counts.items() if n >= min_count), key=lambda t: (-counts[t], t))
    if not ranked:
        raise TagVocabError(f"no sample has short_positive tags (syn.json) with >= {min_count} samples: "
                            "the short-tag loss has nothing to learn")
    return ranked[:max_tags]


def tag_ids(syn: dict | None, index: dict[str, int]) -> tuple[list[int], list[int]]:
    """(positive ids, negative ids) of a sample; tags outside the vocabulary are left out."""
    pos = sorted({index[t] for t in _tags(syn, "short_positive") if t in index})
    neg = sorted({index[t] for t in _tags(syn, "short_negative") if t in index} - set(pos))
    return pos, neg
