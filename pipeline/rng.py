"""Seeded randomness: every draw comes from (job seed, stage, uid), so results never depend on
worker count, batch boundaries or the order shards finish in."""
from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np


def _digest(seed: int, stage: str, uid: str) -> bytes:
    return hashlib.sha256(f"{seed}\x00{stage}\x00{uid}".encode()).digest()


def uniform(seed: int, stage: str, uids: Iterable[str]) -> np.ndarray:
    """One U[0, 1) draw per uid (53-bit resolution, like numpy's doubles)."""
    out = [(int.from_bytes(_digest(seed, stage, u)[:8], "big") >> 11) * (1.0 / (1 << 53)) for u in uids]
    return np.asarray(out, dtype=np.float64)


def generator(seed: int, stage: str, uid: str) -> np.random.Generator:
    """A numpy Generator for a sample that needs more than one draw (augmentations, sampling)."""
    return np.random.default_rng(int.from_bytes(_digest(seed, stage, uid)[:16], "big"))
