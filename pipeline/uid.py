"""Stable sample ids: derived from the source (URL + caption), never from position."""
from __future__ import annotations

import hashlib


def make_uid(url: str | None, caption: str | None) -> str:
    """128-bit hex id of (url, caption). The NUL separator keeps ("ab", "c") apart from ("a", "bc")."""
    h = hashlib.sha256()
    h.update((url or "").encode("utf-8", "surrogatepass"))
    h.update(b"\x00")
    h.update((caption or "").encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:32]


def repeat_uid(uid: str, occurrence: int) -> str:
    """Id of the n-th (n >= 1) repeat of the same (url, caption) in the input: unique, still stable."""
    return hashlib.sha256(f"{uid}#{occurrence}".encode()).hexdigest()[:32]
