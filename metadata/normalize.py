"""MetaCLIP's text preparation, spacing and entry keys — the whole matching semantics, in one place.

Verified against facebookresearch/MetaCLIP (commit f47f784):
- ``metaclip/metaclip1/substr_matching.py`` (``spacing``, ``substr_matching``),
  ``metaclip/metaclip1/substr_matching_ahocorasick.py`` and ``metaclip/metaclip1/indexing/substr_indexing.py``
  (``build_index``): MetaCLIP 1;
- ``metaclip/curation/substr_matching.py`` (``spacing``, ``is_punctuation``, ``is_cjk_or_similar``,
  ``get_spaced_metadata``, ``substr_match``) and ``metaclip/curation/curate.py`` (``count_per_shard``):
  MetaCLIP 2 (worldwide).

Entry e matches a text iff ``entry_key(e, mode)`` is a substring of ``spacing(prepare(text, mode))``.

``prepare`` (per mode, as each upstream pipeline calls its matcher):
- ``metaclip1``: the text as it is. ``substr_indexing.build_index`` passes each text straight to
  ``substr_matching``, which pads and spaces it without stripping. (``cc_matching.py``'s Common
  Crawl parsers strip alt-texts while extracting them from HTML; that is text extraction, before the
  matcher, not part of it.)
- ``metaclip2``: ``text.strip()``, Python's own (every code point for which ``str.isspace()`` holds:
  ``\\t \\n \\v \\f \\r``, ``\\x1c``–``\\x1f``, space, U+0085, U+00A0, U+1680, U+2000–U+200A, U+2028,
  U+2029, U+202F, U+205F, U+3000), as ``curate.py``'s ``count_per_shard`` does before ``substr_match``.
  It differs from metaclip1 only at the ends of a text: whitespace there that ``spacing`` keeps (U+3000,
  U+00A0, ``\\v`` …) is stripped in metaclip2 only, so ``"\\u3000dog"`` matches ``dog`` in
  metaclip2, not in metaclip1, and ``"hot dog\\u3000"`` matches ``hot dog`` and ``dog`` in metaclip2
  only; spaces, tabs and newlines there change the matches of entries that begin or end with a
  space themselves, and of no other.

``spacing``: ``" " + text + " "``, then each of ``, . ; : ? ! ` `` (in that order) is replaced by
itself padded with one space each side, then ``\\t \\n \\r`` become single spaces. Nothing else: no
case folding, no Unicode normalisation, no collapsing of spaces.

Entry keys: MetaCLIP 1 matches ``" " + e + " "``. MetaCLIP 2 leaves the space out on a side whose end
character (``e[0]`` on the left, ``e[-1]`` on the right) is "CJK or similar": the code point ranges
below (CJK ideographs, their extensions A–F, compatibility ideographs, radicals, Kangxi radicals,
ideographic description characters; Thai, Lao, Myanmar, Khmer, Tibetan) or punctuation, i.e. one of
ASCII ``string.punctuation`` or upstream's 25 full-width/CJK marks. As upstream: Hiragana, Katakana,
Hangul and the CJK symbols block (U+3000–U+303F) are *not* in the set (so 「。」 counts only because
it is listed among the marks), and other Unicode punctuation (e.g. ``¿``, ``«``) is not punctuation.

Deliberate differences from upstream (each one a case upstream's code gets wrong or crashes on):
- A duplicated entry: every copy matches (each id is in the match set), as in upstream's reference
  loop (``substr_matching.py``); upstream's automaton keeps only the last copy's id, because
  ``add_word`` on an existing key replaces its value. So a concept listed twice weighs twice in P,
  as the loop's definition says, and ``entry_counts.json`` has one key for it.
- The empty entry never matches, in both modes. MetaCLIP 1's key for it is two spaces, which
  ``spacing`` makes out of nearly every text: one that is empty, starts or ends with a space, tab,
  newline or one of the seven padded marks, or has two of those side by side (``", "`` or a final
  ``"."`` is enough). A match by punctuation, not by concept, that would let texts without a real
  match be kept. MetaCLIP 2 crashes on it (``e[0]``).
- A missing text (``None``, an Arrow null) matches nothing. Upstream's f-string pads ``None`` into
  ``" None "`` (MetaCLIP 1 would match an entry ``None``; MetaCLIP 2's ``strip`` crashes).
- t is a real number (balancing: p = min(1, t / count)). Upstream's ``count_to_prob`` writes t into
  the integer count array, so a fractional t is truncated there: t = 2.5 gives p = 2.5 / 2 = 1.25
  for counts below 2.5, a probability above 1. Upstream's t is an integer (20k, 170k, or a count
  from ``p_to_t``), where both agree; recap's t can be solved from a target size, so it is fractional.
"""
from __future__ import annotations

import functools
import string
import sys
from collections.abc import Sequence

MODES = ("metaclip1", "metaclip2")

PUNCTS_TO_WRAP = (",", ".", ";", ":", "?", "!", "`")
CHARS_TO_SPACE = ("\t", "\n", "\r")
# what ``str.strip()`` removes, for kernels that take an explicit set (pyarrow's utf8_trim)
WHITESPACE = "".join(c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace())

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


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def prepare(text: str, mode: str = "metaclip1") -> str:
    """The text the mode's upstream pipeline hands its matcher: stripped in metaclip2 only."""
    return text.strip() if check_mode(mode) == "metaclip2" else text


def spacing(text: str) -> str:
    """MetaCLIP's ``spacing``: upstream's chain of ``str.replace`` (for short texts, quicker than one
    ``str.translate`` with multi-character replacements)."""
    text = f" {text} "
    for c in PUNCTS_TO_WRAP:
        text = text.replace(c, f" {c} ")
    for c in CHARS_TO_SPACE:
        text = text.replace(c, " ")
    return text


def normalize(text: str, mode: str = "metaclip1") -> str:
    """The string entry keys are searched in: ``spacing(prepare(text, mode))``."""
    return spacing(prepare(text, mode))


def is_punctuation(ch: str) -> bool:
    return ch in _PUNCT


@functools.lru_cache(maxsize=1 << 16)
def is_cjk_or_similar(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in CJK_RANGES) or ch in _PUNCT


def entry_key(entry: str, mode: str = "metaclip1") -> str | None:
    """The string whose presence in ``normalize(text, mode)`` means ``entry`` matches; None: never
    matches (the empty entry, or not a string)."""
    check_mode(mode)
    if not isinstance(entry, str) or not entry:
        return None
    if mode == "metaclip1":
        return f" {entry} "
    left = "" if is_cjk_or_similar(entry[0]) else " "
    right = "" if is_cjk_or_similar(entry[-1]) else " "
    return f"{left}{entry}{right}"


def entry_keys(entries: Sequence[str], mode: str = "metaclip1") -> list[str | None]:
    """``entry_key`` of every entry (quicker than one call each)."""
    if check_mode(mode) == "metaclip1":
        return [f" {e} " if isinstance(e, str) and e else None for e in entries]
    cjk = is_cjk_or_similar
    return [("" if cjk(e[0]) else " ") + e + ("" if cjk(e[-1]) else " ") if isinstance(e, str) and e else None
            for e in entries]


def as_text(t) -> str | None:
    """None stays None; bytes are decoded as UTF-8 (invalid bytes → U+FFFD); other objects → str."""
    if t is None or isinstance(t, str):
        return t
    if isinstance(t, (bytes, bytearray, memoryview)):
        return bytes(t).decode("utf-8", errors="replace")
    return str(t)
