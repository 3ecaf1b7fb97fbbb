"""WordNet 3.0 lemma names straight from the database files (``data.noun``, ``data.verb``, ``data.adj``,
``data.adv``; Debian's ``wordnet-base`` installs them in /usr/share/wordnet), without NLTK.

A data line is ``offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] p_cnt ... | gloss``
with ``w_cnt`` in two hex digits; the licence header lines start with two spaces. Adjective words may
carry a syntactic marker, ``(a)``, ``(p)`` or ``(ip)``, which is not part of the word.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

DEFAULT_WORDNET = "/usr/share/wordnet"
POS_FILES = ("noun", "verb", "adj", "adv")
_MARKER = re.compile(r"\((a|p|ip)\)$")
NAME_KINDS = ("lemmas", "synsets")


class WordNetMissing(FileNotFoundError):
    pass


def _synset_words(directory: str) -> Iterator[list[str]]:
    d = Path(directory)
    files = [d / f"data.{pos}" for pos in POS_FILES]
    if not any(f.is_file() for f in files):
        raise WordNetMissing(f"{directory}: no WordNet data.noun/data.verb/data.adj/data.adv files; install them with "
                             "`apt-get install wordnet-base` (Debian/Ubuntu, into /usr/share/wordnet) or pass --wordnet DIR")
    for f in files:
        if not f.is_file():
            continue
        with open(f, encoding="utf-8", errors="replace") as fh:
            for n, line in enumerate(fh, 1):
                if line.startswith("  ") or not line.strip():
                    continue  # licence header
                parts = line.split(" ")
                try:
                    w_cnt = int(parts[3], 16)
                    words = parts[4:4 + 2 * w_cnt:2]
                    ok = w_cnt > 0 and len(words) == w_cnt and all(int(x, 16) >= 0 for x in parts[5:5 + 2 * w_cnt:2]) \
                        and parts[4 + 2 * w_cnt].isdigit()  # then p_cnt, 3 decimal digits
                except (IndexError, ValueError):
                    ok = False
                if not ok:
                    raise ValueError(f"{f}:{n}: not a WordNet data line: {line[:80]!r}")
                yield [_MARKER.sub("", w) for w in words]


def wordnet_names(directory: str = DEFAULT_WORDNET, kind: str = "lemmas") -> list[str]:
    """``lemmas``: every lemma of every synset (case kept), underscores as spaces.
    ``synsets``: one name per synset as upstream MetaCLIP's ``wordnet_synsets`` gets it from NLTK:
    ``ss.name()`` (the first lemma, lower-cased by NLTK) cut at its first ``.``, underscores as spaces
    (so ``St._Louis`` gives ``st``, as upstream)."""
    if kind not in NAME_KINDS:
        raise ValueError(f"kind must be one of {NAME_KINDS}, got {kind!r}")
    out: list[str] = []
    for words in _synset_words(directory):
        if kind == "lemmas":
            out.extend(w.replace("_", " ") for w in words)
        else:
            out.append(words[0].lower().split(".", 1)[0].replace("_", " "))
    return out
