"""EDA, the rule-based rewriting baseline the LaCLIP paper compares against (Wei & Zou, "EDA: Easy
Data Augmentation Techniques", 2019): each rewrite applies one of synonym replacement, random
insertion (of a synonym of a word of the text), random swap and random deletion, to about
``alpha`` of the words.

Synonyms come from WordNet's database files when they are installed (Debian's ``wordnet-base``,
``/usr/share/wordnet``, read with ``recap.metadata.wordnet``); without them a small built-in table
of common caption words serves, and texts with none of its words get swaps and deletions only. The
draws come from the request's seed, which the stage derives from (job seed, stage, uid, sample
index): the same text and seed always give the same rewrites, on any worker.
"""
from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from recap.models.textgen.base import OnReply, Reply, Request

log = logging.getLogger("recap")

OPS = ("synonym_replacement", "random_insertion", "random_swap", "random_deletion")

STOPWORDS = frozenset("""a an the and or but if of at by for with about against between into through during before
after above below to from up down in out on off over under again further then once here there when where why how
all any both each few more most other some such no nor not only own same so than too very s t can will just don
should now i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers
herself it its itself they them their theirs themselves what which who whom this that these those am is are was
were be been being have has had having do does did doing""".split())

# Used when WordNet's files are missing: words that captions of photos and clip art use often.
BUILTIN_SYNONYMS: dict[str, tuple[str, ...]] = {
    "photo": ("picture", "image", "photograph", "shot"), "picture": ("photo", "image", "illustration"),
    "image": ("picture", "photo", "graphic"), "small": ("little", "tiny", "miniature"),
    "little": ("small", "tiny"), "large": ("big", "huge", "sizable"), "big": ("large", "huge"),
    "medium": ("mid-sized", "moderate"), "circle": ("disc", "round"), "square": ("box", "quadrate"),
    "star": ("asterisk",), "ring": ("band", "hoop"), "arrow": ("pointer",), "oval": ("ellipse",),
    "diamond": ("rhombus", "lozenge"), "cross": ("crucifix",), "crescent": ("sickle",),
    "gray": ("grey",), "grey": ("gray",), "red": ("crimson", "scarlet"), "blue": ("azure", "navy"),
    "green": ("emerald",), "yellow": ("golden", "lemon"), "purple": ("violet", "mauve"),
    "pink": ("rosy",), "brown": ("chocolate", "tan"), "black": ("dark", "ebony"), "white": ("pale", "snowy"),
    "orange": ("amber", "tangerine"), "background": ("backdrop", "setting"), "shape": ("form", "figure"),
    "shapes": ("forms", "figures"), "beautiful": ("lovely", "pretty"), "man": ("person", "guy"),
    "woman": ("lady", "person"), "dog": ("puppy", "hound"), "cat": ("kitten", "feline"), "car": ("automobile", "vehicle"),
    "house": ("home", "building"), "street": ("road", "avenue"), "sitting": ("seated", "resting"),
    "standing": ("upright", "positioned"), "view": ("scene", "vista"), "old": ("aged", "vintage"),
    "new": ("fresh", "modern"), "bright": ("vivid", "brilliant"), "drawing": ("sketch", "illustration"),
}

_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


@functools.cache
def wordnet_synonyms(directory: str) -> dict[str, tuple[str, ...]] | None:
    """word (lower case) -> its synonyms over all its synsets, or None when WordNet is not there."""
    # the metadata builder's reader of the database files, synset by synset
    from recap.metadata.wordnet import WordNetMissing, _synset_words

    try:
        table: dict[str, set[str]] = {}
        for words in _synset_words(directory):
            # proper names (Edward D. White for "white") make no caption rewrite
            names = [w.replace("_", " ") for w in words if w.islower() and not any(c.isdigit() for c in w)]
            for w in names:
                table.setdefault(w.lower(), set()).update(n for n in names if n.lower() != w.lower())
    except WordNetMissing:
        return None
    return {w: tuple(sorted(s)) for w, s in table.items() if s}


def synonym_table(wordnet_dir: str | None) -> tuple[dict[str, tuple[str, ...]], str]:
    """(table, where it came from): WordNet when its files are there, else the built-in table."""
    if wordnet_dir and Path(wordnet_dir).is_dir():
        table = wordnet_synonyms(wordnet_dir)
        if table:
            return table, f"wordnet:{wordnet_dir}"
    return BUILTIN_SYNONYMS, "builtin"


def _synonyms(word: str, table: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    core = _WORD.search(word)
    return table.get(core.group(0).lower(), ()) if core else ()


def _replace_core(word: str, new: str) -> str:
    """Put ``new`` where the word's letters are, keeping punctuation around it."""
    m = _WORD.search(word)
    return word[:m.start()] + new + word[m.end():] if m else new


def synonym_replacement(words: list[str], n: int, rng: np.random.Generator, table) -> list[str]:
    out = list(words)
    candidates = [i for i, w in enumerate(out) if _WORD.search(w) and _WORD.search(w).group(0).lower() not in STOPWORDS
                  and _synonyms(w, table)]
    for i in rng.permutation(candidates)[:n] if candidates else ():
        syns = _synonyms(out[i], table)
        out[i] = _replace_core(out[i], syns[int(rng.integers(len(syns)))])
    return out


def random_insertion(words: list[str], n: int, rng: np.random.Generator, table) -> list[str]:
    out = list(words)
    for _ in range(n):
        with_syns = [w for w in out if _synonyms(w, table)]
        if not with_syns:
            break
        syns = _synonyms(with_syns[int(rng.integers(len(with_syns)))], table)
        out.insert(int(rng.integers(len(out) + 1)), syns[int(rng.integers(len(syns)))])
    return out


def random_swap(words: list[str], n: int, rng: np.random.Generator) -> list[str]:
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n):
        i, j = (int(x) for x in rng.choice(len(out), 2, replace=False))
        out[i], out[j] = out[j], out[i]
    return out


def random_deletion(words: list[str], p: float, rng: np.random.Generator) -> list[str]:
    if len(words) <= 1:
        return list(words)
    keep = rng.random(len(words)) >= p
    if not keep.any():
        keep[int(rng.integers(len(words)))] = True
    return [w for w, k in zip(words, keep) if k]


def eda_rewrite(text: str, rng: np.random.Generator, table: dict[str, tuple[str, ...]], alpha: float = 0.1) -> tuple[str, str]:
    """(rewrite, the operation applied). Operations are tried in a random order until one changes
    the text; a text none can change (one word, no synonyms) comes back as it is (``none``)."""
    words = text.split()
    if not words:
        return text, "none"
    n = max(1, int(round(alpha * len(words))))
    for op in rng.permutation(len(OPS)):
        name = OPS[int(op)]
        if name == "synonym_replacement":
            new = synonym_replacement(words, n, rng, table)
        elif name == "random_insertion":
            new = random_insertion(words, n, rng, table)
        elif name == "random_swap":
            new = random_swap(words, n, rng)
        else:
            new = random_deletion(words, max(alpha, 1.0 / len(words)), rng)
        if new != words:
            return " ".join(new), name
    return text, "none"


class EdaBackend:
    """A ``TextGenerator`` with no model: rewrites each request's ``source`` text by EDA."""

    def __init__(self, wordnet_dir: str | None = "/usr/share/wordnet", alpha: float = 0.1):
        self.table, self.synonyms_from = synonym_table(wordnet_dir)
        self.alpha = alpha
        self.model_id = f"eda:{self.synonyms_from}:{alpha}"

    def generate(self, requests: Sequence[Request], on_reply: OnReply | None = None) -> list[Reply]:
        out = []
        for i, req in enumerate(requests):
            text, op = eda_rewrite(req.source, np.random.default_rng(req.seed), self.table, self.alpha)
            reply = Reply(text=text, meta={"op": op})
            out.append(reply)
            if on_reply is not None:
                on_reply(i, reply)
        return out

    def close(self) -> None:
        pass
