"""MetaCLIP's text spacing and entry keys — the whole matching semantics, in one place.

Verified against facebookresearch/MetaCLIP (commit f47f784):
- ``metaclip/metaclip1/substr_matching.py`` (``spacing``, ``substr_matching``): MetaCLIP 1;
- ``metaclip/curation/substr_matching.py`` (``spacing``, ``is_punctuation``, ``is_cjk_or_similar``,
  ``get_spaced_metadata``): MetaCLIP 2 (worldwide).

``spacing``: ``" " + text + " "``, then each of ``, . ; : ? ! ` `` (in that order) is replaced by
itself padded with one space each side, then ``\\t \\n \\r`` become single spaces. Nothing else: no
case folding, no Unicode normalisation, no collapsing of spaces. One ``str.translate`` gives the same
string as upstream's sequence of ``str.replace`` calls: no replacement introduces a character another
one replaces.

Entry keys: MetaCLIP 1 matches ``" " + e + " "``. MetaCLIP 2 leaves the space out on a side whose end
character (``e[0]`` on the left, ``e[-1]`` on the right) is "CJK or similar": the code point ranges
below (CJK ideographs, their extensions A–F, compatibility ideographs, radicals, Kangxi radicals,
ideographic description characters; Thai, Lao, Myanmar, Khmer, Tibetan) or punctuation, i.e. one of
ASCII ``string.punctuation`` or upstream's 25 full-width/CJK marks. As upstream: Hiragana, Katakana,
Hangul and the CJK symbols block (U+3000–U+303F) are *not* in the set (so 「。」 counts only because
it is listed among the marks), and other Unicode punctuation (e.g. ``¿``, ``«``) is not punctuation.
An empty entry never matches (upstream would crash on ``e[0]``).
"""
from __future__ import annotations

import functools
import string

MODES = ("metaclip1", "metaclip2")

PUNCTS_TO_WRAP = (",", ".", ";", ":", "?", "!", "`")
CHARS_TO_SPACE = ("\t", "\n", "\r")
_SPACING = str.maketrans({c: f" {c} " for c in PUNCTS_TO_WRAP} | {c: " " for c in CHARS_TO_SPACE})

# upstream's ``additional_punctuation``, in its order
ADDITIONAL_PUNCTUATION = frozenset(["，", "。", "、", "；", "：", "？", "！", "“", "”", "‘", "’", "（", "）",
                                    "【", "】", "《", "》", "〈", "〉", "「", "」", "『", "』", "～", "—"])
_PUNCT = frozenset(string.punctuation) | ADDITIONAL_PUNCTUATION
CJK_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF), (0x2CEB0, 0x2EBEF), (0xF900, 0xFAFF), (0x2E80, 0x2EFF), (0x2F00, 0x2FDF),
    (0x2FF0, 0x2FFF),
    (0x0E00, 0x0E7F),  # Thai
    (0x0E80, 0x0EFF),  # Lao
    (0x1000, 0x109F),  # Burmese (Myanmar)
    (0x1780, 0x17FF),  # Khmer
    (0x0F00, 0x0FFF),  # Tibetan
)


def spacing(text: str) -> str:
    """MetaCLIP's ``spacing`` (identical output)."""
    return f" {text} ".translate(_SPACING)


normalize = spacing


def is_punctuation(ch: str) -> bool:
    return ch in _PUNCT


@functools.lru_cache(maxsize=1 << 16)
def is_cjk_or_similar(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in CJK_RANGES) or ch in _PUNCT


def entry_key(entry: str, mode: str = "metaclip1") -> str | None:
    """The string whose presence in ``spacing(text)`` means ``entry`` matches; None: never matches."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(entry, str) or not entry:
        return None
    if mode == "metaclip1":
        return f" {entry} "
    left = "" if is_cjk_or_similar(entry[0]) else " "
    right = "" if is_cjk_or_similar(entry[-1]) else " "
    return f"{left}{entry}{right}"


def as_text(t) -> str | None:
    """None stays None; bytes are decoded as UTF-8 (invalid bytes → U+FFFD); other objects → str."""
    if t is None or isinstance(t, str):
        return t
    if isinstance(t, (bytes, bytearray, memoryview)):
        return bytes(t).decode("utf-8", errors="replace")
    return str(t)
