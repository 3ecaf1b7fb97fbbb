"""Rule-based hard-negative captions (NegCLIP / ARO style; counts after "Teaching CLIP to Count to
Ten"), no model needed. Not a stage: the negatives stage calls ``make_negatives``.

Rules, each a type tag on what it makes:

- ``swap_nouns``: two nouns trade places ("a dog on a sofa" -> "a sofa on a dog");
- ``swap_attributes``: two attribute-object pairs trade attributes ("a red cube and a blue ball"
  -> "a blue cube and a red ball");
- ``replace_attribute`` / ``replace_noun``: one attribute or noun becomes a co-hyponym, a sibling
  under the same WordNet hypernym (red -> green: both "chromatic color"; circle -> ellipse's kin);
- ``shuffle``: the words in another order;
- ``count``: a number word or numeral becomes another count, "a cube" becomes "two cubes".

Word classes come from WordNet 3.0's index files when ``/usr/share/wordnet`` (Debian's
``wordnet-base``) or the configured directory has them, and from a small built-in lexicon
otherwise (colours, sizes, materials, shapes, common objects), so every rule works without it; the
built-in lexicon is also what co-hyponyms fall back to. Sentences have no parser here: a noun is a
word WordNet lists as a noun and not as an adjective, or one right after an attribute; an
attribute is an adjective (or colour) right before a noun. Crude, and enough for alt-text-like
captions; a rule that finds nothing to change makes nothing. Every choice is drawn from a
generator seeded by (job seed, uid), so the negatives of a sample never depend on anything else.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import numpy as np

RULES = ("swap_nouns", "swap_attributes", "replace_attribute", "replace_noun", "shuffle", "count")

# The built-in lexicon: enough for captions of everyday images and the demo world's shapes.
_GROUPS: dict[str, tuple[str, ...]] = {
    "colour": ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "grey",
               "gray", "cyan", "magenta"),
    "size": ("small", "large", "big", "little", "tiny", "huge"),
    "material": ("wooden", "metal", "plastic", "glass", "stone", "paper"),
    "shape": ("circle", "square", "triangle", "star", "cross", "hexagon", "rectangle", "ellipse", "pentagon",
              "diamond", "heart"),
    "animal": ("dog", "cat", "horse", "cow", "sheep", "bird", "bear", "elephant", "zebra", "giraffe"),
    "furniture": ("table", "chair", "sofa", "bed", "desk", "bench", "shelf"),
    "vehicle": ("car", "bus", "truck", "bicycle", "motorcycle", "train", "boat", "plane"),
    "place": ("background", "backdrop", "street", "beach", "field", "room", "kitchen", "park"),
    "person": ("man", "woman", "boy", "girl", "child", "person"),
}
_ATTR_GROUPS = ("colour", "size", "material")
_BUILTIN_ATTRS = {w for g in _ATTR_GROUPS for w in _GROUPS[g]}
_BUILTIN_NOUNS = {w for g, ws in _GROUPS.items() if g not in _ATTR_GROUPS for w in ws}
_STOP = {"a", "an", "the", "of", "on", "in", "at", "with", "and", "or", "to", "by", "for", "from", "is", "are",
         "its", "it", "this", "that", "these", "those", "some", "his", "her", "their", "as", "over", "under",
         "near", "next", "into", "onto", "plain", "showing", "drawn", "photo", "picture", "image", "illustration",
         "drawing", "art", "clip", "shape", "shapes", "object", "objects", "there", "which", "who", "very"}
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_PLURAL_ES = ("s", "x", "z", "ch", "sh")
MAX_WORDS = 48
_WORD = re.compile(r"[A-Za-z]+|\d+|[^A-Za-z\d]+")


# -- WordNet ------------------------------------------------------------------------------------------

@lru_cache(maxsize=4)
def _wordnet(directory: str) -> dict | None:
    """{'noun': lemmas, 'adj': lemmas, 'senses': lemma -> first noun synset, 'hyper': synset ->
    hypernyms, 'kids': synset -> hyponyms, 'words': synset -> single-word lemmas}; None without the files."""
    d = Path(directory)
    if not (d / "index.noun").is_file() or not (d / "data.noun").is_file():
        return None
    out: dict = {"noun": set(), "adj": set(), "senses": {}, "hyper": {}, "kids": {}, "words": {}}
    for pos, key in (("noun", "noun"), ("adj", "adj")):
        f = d / f"index.{pos}"
        if not f.is_file():
            continue
        with open(f, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("  "):
                    continue
                parts = line.split()
                if len(parts) < 4:
                    continue
                lemma = parts[0]
                out[key].add(lemma)
                if pos == "noun":
                    n_syn = int(parts[2])
                    out["senses"][lemma] = parts[-n_syn]  # the first (most frequent) sense
    with open(d / "data.noun", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("  "):
                continue
            parts = line.split("|", 1)[0].split()
            try:
                off, w_cnt = parts[0], int(parts[3], 16)
                words = [w.lower() for w in parts[4:4 + 2 * w_cnt:2] if "_" not in w and w.isalpha()]
                p = 4 + 2 * w_cnt
                p_cnt = int(parts[p])
                ptrs = parts[p + 1:p + 1 + 4 * p_cnt]
            except (IndexError, ValueError):
                continue
            out["words"][off] = words
            for k in range(0, len(ptrs), 4):
                if ptrs[k] in ("@", "@i") and ptrs[k + 2] == "n":
                    out["hyper"].setdefault(off, []).append(ptrs[k + 1])
                    out["kids"].setdefault(ptrs[k + 1], []).append(off)
    return out


class Lexicon:
    """Word classes and co-hyponyms: WordNet when its files are in ``wordnet_dir``, else built in."""

    def __init__(self, wordnet_dir: str | None):
        self.wn = _wordnet(wordnet_dir) if wordnet_dir else None

    def is_attribute(self, w: str) -> bool:
        if w in _STOP or w in NUMBER_WORDS or w.isdigit():
            return False
        return w in _BUILTIN_ATTRS or (self.wn is not None and w in self.wn["adj"])

    def is_noun(self, w: str) -> bool:
        if w in _STOP or w in NUMBER_WORDS or w.isdigit():
            return False
        if w in _BUILTIN_NOUNS:
            return True
        if self.wn is None:
            return False
        stem = _singular(w)
        return (w in self.wn["noun"] or stem in self.wn["noun"]) and w not in self.wn["adj"]

    def co_hyponyms(self, w: str) -> list[str]:
        """Siblings of ``w`` (same hypernym, another word), sorted; built-in group mates first."""
        out: list[str] = []
        for ws in _GROUPS.values():
            if w in ws:
                out.extend(x for x in ws if x != w and x not in ("gray", "grey"))
        if self.wn is not None and w in self.wn["senses"]:
            syn = self.wn["senses"][w]
            sib = set()
            for h in self.wn["hyper"].get(syn, []):
                for kid in self.wn["kids"].get(h, []):
                    if kid != syn:
                        sib.update(x for x in self.wn["words"].get(kid, []) if x != w)
            out.extend(sorted(sib - set(out)))
        return out


# -- tokens -------------------------------------------------------------------------------------------

def _tokens(text: str) -> list[str]:
    return _WORD.findall(text)


def _singular(w: str) -> str:
    if w.endswith("es") and w[:-2].endswith(_PLURAL_ES):
        return w[:-2]
    if w.endswith("s") and not w.endswith("ss") and len(w) > 3:
        return w[:-1]
    return w


def _plural(w: str) -> str:
    return w + "es" if w.endswith(_PLURAL_ES) else w + "s"


def _match_case(new: str, old: str) -> str:
    return new[:1].upper() + new[1:] if old[:1].isupper() else new


def _word_positions(toks: list[str]) -> list[int]:
    return [i for i, t in enumerate(toks) if t.isalpha()]


def _classes(toks: list[str], lex: Lexicon) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """(noun positions, attribute positions, (attribute, noun) pairs) in token indices."""
    words = _word_positions(toks)
    low = {i: toks[i].lower() for i in words}
    nouns, attrs, pairs = [], [], []
    for k, i in enumerate(words):
        nxt = words[k + 1] if k + 1 < len(words) else None
        if lex.is_attribute(low[i]) and nxt is not None and (lex.is_noun(low[nxt]) or lex.is_attribute(low[nxt])):
            attrs.append(i)
            # the attribute binds to the noun its run of attributes ends on
            j = k + 1
            while j < len(words) and lex.is_attribute(low[words[j]]) and not lex.is_noun(low[words[j]]):
                j += 1
            if j < len(words) and lex.is_noun(low[words[j]]):
                pairs.append((i, words[j]))
        elif lex.is_noun(low[i]):
            nouns.append(i)
    return nouns, attrs, pairs


# -- rules --------------------------------------------------------------------------------------------

def _swap_nouns(toks, lex, g):
    nouns, _, _ = _classes(toks, lex)
    distinct = [(a, b) for x, a in enumerate(nouns) for b in nouns[x + 1:]
                if _singular(toks[a].lower()) != _singular(toks[b].lower())]
    if not distinct:
        return None
    a, b = distinct[int(g.integers(len(distinct)))]
    out = list(toks)
    # each place keeps its grammatical number: "two circles ... a background" -> "two backgrounds ... a circle"
    wa, wb = toks[a].lower(), toks[b].lower()
    ba, bb = _singular(wa), _singular(wb)
    out[a] = _match_case(_plural(bb) if wa != ba else bb, toks[a])
    out[b] = _match_case(_plural(ba) if wb != bb else ba, toks[b])
    return _fix_article(_fix_article(out, a), b)


def _swap_attributes(toks, lex, g):
    _, _, pairs = _classes(toks, lex)
    cand = [(p, q) for x, p in enumerate(pairs) for q in pairs[x + 1:]
            if toks[p[0]].lower() != toks[q[0]].lower() and p[1] != q[1]]
    if not cand:
        return None
    (a, _), (b, _) = cand[int(g.integers(len(cand)))]
    out = list(toks)
    out[a], out[b] = _match_case(toks[b].lower(), toks[a]), _match_case(toks[a].lower(), toks[b])
    return out


def _replace(toks, lex, g, positions):
    opts = []
    for i in positions:
        w = toks[i].lower()
        plural = w != _singular(w) and w not in _BUILTIN_ATTRS
        base = _singular(w) if plural else w
        sibs = [s for s in lex.co_hyponyms(base) if s != base]
        if sibs:
            opts.append((i, sibs, plural))
    if not opts:
        return None
    i, sibs, plural = opts[int(g.integers(len(opts)))]
    new = sibs[int(g.integers(min(len(sibs), 8)))]  # the closest few: built-in mates come first
    out = list(toks)
    out[i] = _match_case(_plural(new) if plural else new, toks[i])
    return _fix_article(out, i)


def _fix_article(toks: list[str], i: int) -> list[str]:
    """'a' / 'an' before a replaced word agrees with it."""
    words = _word_positions(toks)
    k = words.index(i) if i in words else -1
    if k > 0 and toks[words[k - 1]].lower() in ("a", "an"):
        art = "an" if toks[i][:1].lower() in "aeio" else "a"
        toks[words[k - 1]] = _match_case(art, toks[words[k - 1]])
    return toks


def _replace_attribute(toks, lex, g):
    _, attrs, _ = _classes(toks, lex)
    return _replace(toks, lex, g, attrs)


def _replace_noun(toks, lex, g):
    nouns, _, _ = _classes(toks, lex)
    return _replace(toks, lex, g, nouns)


def _shuffle(toks, lex, g):
    words = _word_positions(toks)
    if len({toks[i].lower() for i in words}) < 3:
        return None
    perm = list(words)
    for _ in range(10):
        order = g.permutation(len(words))
        perm = [words[j] for j in order]
        if [toks[i].lower() for i in perm] != [toks[i].lower() for i in words]:
            break
    else:
        return None
    out = list(toks)
    for dst, src in zip(words, perm):
        out[dst] = toks[src].lower()
    out[words[0]] = _match_case(out[words[0]], toks[words[0]])
    return out


def _count(toks, lex, g):
    words = [i for i, t in enumerate(toks) if t.strip()]
    opts = []
    for k, i in enumerate(words):
        w = toks[i].lower()
        if w in NUMBER_WORDS or (w.isdigit() and len(w) <= 3):
            opts.append((i, "number"))
        elif w in ("a", "an") and k + 1 < len(words) and toks[words[k + 1]].isalpha():
            # "a cube" / "a red cube": the noun of the phrase becomes plural
            j = k + 1
            while j < len(words) and lex.is_attribute(toks[words[j]].lower()) and not lex.is_noun(toks[words[j]].lower()):
                j += 1
            if j < len(words) and lex.is_noun(toks[words[j]].lower()) and toks[words[j]].lower() not in _GROUPS["place"]:
                opts.append((i, words[j]))
    if not opts:
        return None
    i, kind = opts[int(g.integers(len(opts)))]
    out = list(toks)
    w = toks[i].lower()
    if kind == "number":
        n = NUMBER_WORDS.index(w) + 1 if w in NUMBER_WORDS else int(w)
        choices = [m for m in range(1, 11) if m != n]
        m = choices[int(g.integers(len(choices)))]
        if w.isdigit():
            out[i] = str(m)
        else:
            out[i] = _match_case(NUMBER_WORDS[m - 1], toks[i])
            # one <-> many keeps the noun's number right when the next word is a plain noun
            nxt = next((j for j in range(i + 1, len(toks)) if toks[j].isalpha()), None)
            if nxt is not None and lex.is_noun(toks[nxt].lower()):
                base = _singular(toks[nxt].lower())
                out[nxt] = base if m == 1 else _plural(base)
        return out
    m = 2 + int(g.integers(4))  # a -> two..five
    out[i] = _match_case(NUMBER_WORDS[m - 1], toks[i])
    out[kind] = _plural(toks[kind].lower())
    return out


_RULE_FNS = {"swap_nouns": _swap_nouns, "swap_attributes": _swap_attributes, "replace_attribute": _replace_attribute,
             "replace_noun": _replace_noun, "shuffle": _shuffle, "count": _count}


def make_negatives(text: str, rules: tuple[str, ...] | list[str], g: np.random.Generator, lex: Lexicon,
                   ) -> list[tuple[str, str]]:
    """(negative, type) for each rule that changes ``text``, in ``rules`` order; at most one per
    rule, never the text itself nor a repeat."""
    toks = _tokens(text or "")
    # the rules read the head of a caption (a text encoder sees 77 tokens anyway): a huge caption
    # costs no more than a short one, and pairs of its nouns stay few
    cut = [i for i, t in enumerate(toks) if t.isalpha()]
    tail = toks[cut[MAX_WORDS]:] if len(cut) > MAX_WORDS else []
    toks = toks[:len(toks) - len(tail)]
    out: list[tuple[str, str]] = []
    seen = {" ".join((text or "").lower().split())}
    for rule in rules:
        res = _RULE_FNS[rule](toks, lex, g)
        if res is None:
            continue
        neg = "".join(res + tail)
        key = " ".join(neg.lower().split())
        if key in seen:
            continue
        seen.add(key)
        out.append((neg, rule))
    return out
