"""Score filtering (global): keep the samples whose score (``clip_score`` by default) is at least a
threshold, or the top fraction of the dataset, exactly and whatever the number of workers.

Rules for ``top_fraction`` f over the N samples with a finite score:

- ``exact``: exactly ceil(f·N) samples stay, best first; among equal scores the smaller uid wins,
  so the cut is the same for any sharding, batching or worker count.
- ``datacomp``: DataComp's rule (``baselines/apply_filter.py``): the threshold is the
  (int(N·f) + 1)-th largest score and every score at least that high stays, so ties at the
  threshold all stay. At f = 1 DataComp's script indexes past the end; here everything stays.

A NaN, infinite or missing score never enters the quantile: such a sample is dropped as
``nonfinite_score`` and N counts only the finite ones. (DataComp's N counts NaN rows too, which
then fail ``>= threshold``; the two agree whenever every score is finite, which the clip stage
guarantees by dropping non-finite embeddings.)

How the cut is found with bounded memory: scores map to sort keys whose byte order is "best
first" (score descending, then uid ascending). The partial sends a sparse histogram of each
shard's keys on their first 16 bits, and carries the scores to the reduce. The reduce finds the
16-bit bin holding the cut, then reads the carried scores (``self.data``) bin by bin, 16 bits
deeper each pass, until the bin is small enough to sort in memory (``collect_limit`` rows): a radix
select. Memory stays at one shard plus 65536 counters plus that many rows, at any dataset size.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from recap.pipeline.stage import GlobalStage, StageConfig
from recap.pipeline.stage_data import StageData
from recap.pipeline.verdicts import verdicts

CARRIED = "filter_score"  # the score as the partial saw it, for the reduce's passes
_DIGITS = 1 << 16
_SCORE_BYTES = 10  # 2 bytes of a float32 key (the partial's histogram), then the exact float64 key
_UID_BYTES = 16  # a uid is 128 bits of hex


class FilterConfig(StageConfig):
    column: str = Field("clip_score", description="the score to filter on (any numeric column)")
    threshold: float | None = Field(None, description="keep samples with column >= threshold")
    top_fraction: float | None = Field(None, gt=0, le=1, description="keep this fraction of the samples, best first")
    rule: Literal["exact", "datacomp"] = Field("exact", description="how top_fraction cuts (see the module docstring)")

    @model_validator(mode="after")
    def _one_cut(self) -> FilterConfig:
        if (self.threshold is None) == (self.top_fraction is None):
            raise ValueError("set exactly one of threshold and top_fraction")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be a finite number (got {self.threshold})")
        if self.column == CARRIED:
            raise ValueError(f"column {CARRIED!r} is the name the stage uses for its own carried scores")
        return self


# -- sort keys ------------------------------------------------------------------------------------

def scores(column: pa.ChunkedArray | pa.Array, name: str) -> np.ndarray:
    """float64 scores, NaN where missing."""
    if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type) or pa.types.is_decimal(column.type)):
        raise ValueError(f"filter.column {name!r} is {column.type}, not a number")
    return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64, copy=True)


def _ordered(bits: np.ndarray, sign: int) -> np.ndarray:
    """IEEE bits -> unsigned keys in the floats' order (negatives flipped, positives' sign set)."""
    return np.where(bits & sign, ~bits, bits | sign)


def score_keys(x: np.ndarray) -> np.ndarray:
    """(n, 10) uint8 sort keys of finite scores, best (largest) first in byte order: 2 bytes of the
    float32 key (what the partial's histogram sees), then the float64 key. float32 rounding is
    monotone, so the pair orders exactly as x does."""
    x = x + 0.0  # -0.0 -> 0.0: equal scores get equal keys
    with np.errstate(over="ignore"):
        k32 = _ordered(x.astype(np.float32).view(np.uint32), np.uint32(1 << 31))
    k64 = _ordered(x.view(np.uint64), np.uint64(1 << 63))
    top = (np.uint32(0xFFFF) - (k32 >> np.uint32(16))).astype(">u2")
    rest = (~k64).astype(">u8")
    return np.concatenate([top.view(np.uint8).reshape(-1, 2), rest.view(np.uint8).reshape(-1, 8)], axis=1)


def uid_keys(uids: list[str]) -> np.ndarray:
    """(n, 16) uint8: a uid's 128 bits, so byte order is uid order."""
    try:
        raw = b"".join(bytes.fromhex(u) for u in uids)
    except (TypeError, ValueError):
        raw = b""
    if len(raw) != _UID_BYTES * len(uids):
        raise ValueError("uids must be 32 hex digits (the engine's make_uid) for the exact rule's tie-break")
    return np.frombuffer(raw, np.uint8).reshape(-1, _UID_BYTES)


def key_score(key: bytes) -> float:
    """The score a key's float64 part encodes."""
    k = ~np.frombuffer(key[2:_SCORE_BYTES], ">u8").astype(np.uint64)[0]
    bits = k ^ np.uint64(1 << 63) if k & np.uint64(1 << 63) else ~k
    return float(np.array([bits], np.uint64).view(np.float64)[0])


def _digit(keys: np.ndarray, level: int) -> np.ndarray:
    return (keys[:, 2 * level].astype(np.int64) << 8) | keys[:, 2 * level + 1]


def _sparse(counts: np.ndarray) -> dict[str, list[int]]:
    ids = np.nonzero(counts)[0]
    return {"ids": ids.tolist(), "n": counts[ids].tolist()}


def _add(into: np.ndarray, sparse: dict[str, list[int]]) -> None:
    if sparse["ids"]:
        np.add.at(into, np.asarray(sparse["ids"], np.int64), np.asarray(sparse["n"], np.int64))


def exact_count(fraction: float, n: int) -> int:
    """ceil(f·N) with f read as the decimal it was written as (0.1 is 1/10, not 0.1000000000000000055)."""
    return math.ceil(Fraction(repr(fraction)) * n)


def datacomp_rank(fraction: float, n: int) -> int:
    """DataComp's threshold index plus one, in its float arithmetic: int(len(df) * fraction) + 1."""
    return int(n * fraction) + 1


def _detail(column: str, v: float, t: float | None, show) -> str:
    if not math.isfinite(v):
        return f"{column} = {v}"
    if v == t:
        return f"{column} = {show(v)} = threshold (tie, broken by uid)"
    return f"{column} = {show(v)} < threshold {show(t)}" if t is not None else f"{column} = {show(v)}, no finite scores"


# -- the stage ------------------------------------------------------------------------------------

class FilterStage(GlobalStage):
    name = "filter"
    Config = FilterConfig
    collect_limit = 1 << 20  # rows of the cut's bin the reduce sorts in memory; fewer mean more passes

    def reads(self) -> tuple[str, ...]:
        return (self.config.column,)

    def carry(self) -> tuple[str, ...]:
        return (CARRIED,) if self.config.top_fraction is not None else ()

    def _scores(self, batch: pa.Table) -> np.ndarray:
        return scores(batch.column(self.config.column), self.config.column)

    def partial(self, batch: pa.Table):
        x = self._scores(batch)
        finite = np.isfinite(x)
        summary = {"n": batch.num_rows, "finite": int(finite.sum()),
                   "min": float(x[finite].min()) if finite.any() else None,
                   "max": float(x[finite].max()) if finite.any() else None}
        if not self.carry():
            return summary  # a fixed threshold needs no quantile
        # sparse: CLIP scores touch a few hundred of the 65536 bins, so a partial stays a few KB
        summary["hist"] = _sparse(np.bincount(_digit(score_keys(x[finite]), 0), minlength=_DIGITS))
        # float32 scores (clip_score) travel as float32: lossless, and half the bytes the reduce reads
        kind = pa.float32() if batch.column(self.config.column).type == pa.float32() else pa.float64()
        carried = pa.array(x.astype(kind.to_pandas_dtype()), kind)
        return summary, pa.table({"uid": batch.column("uid"), CARRIED: carried})

    # -- reduce: the radix select ---------------------------------------------------------------
    def _candidates(self, prefix: bytes, width: int):
        """Per shard, the full-width keys (``width`` bytes) of finite rows whose keys start with ``prefix``."""
        want = np.frombuffer(prefix, np.uint8)
        for shard in range(self.data.n_shards):
            cols = [CARRIED, "uid"] if width > _SCORE_BYTES else [CARRIED]
            table = self.data.carried(shard, cols)
            if table is None or not table.num_rows:
                continue
            x = table.column(CARRIED).to_numpy(zero_copy_only=False).astype(np.float64)
            rows = np.nonzero(np.isfinite(x))[0]
            keys = score_keys(x[rows])
            on_score = want[:_SCORE_BYTES]
            hit = (keys[:, :len(on_score)] == on_score).all(axis=1)
            keys, rows = keys[hit], rows[hit]
            if width > _SCORE_BYTES:  # uids only for the rows still in the running
                uids = table.column("uid").take(pa.array(rows, pa.int64())).to_pylist()
                keys = np.concatenate([keys, uid_keys(uids)], axis=1)
                keys = keys[(keys[:, _SCORE_BYTES:len(want)] == want[_SCORE_BYTES:]).all(axis=1)]
            yield keys[:, :width]

    def _select(self, hist: np.ndarray, rank: int, width: int) -> bytes:
        """The key (``width`` bytes) of the rank-th best finite row, 1-based."""
        prefix = b""
        while True:
            cum = np.cumsum(hist)
            digit = int(np.searchsorted(cum, rank))
            rank -= int(cum[digit - 1]) if digit else 0
            prefix += digit.to_bytes(2, "big")
            if len(prefix) == width:
                return prefix
            if hist[digit] <= self.collect_limit:
                keys = np.concatenate(list(self._candidates(prefix, width)) or [np.zeros((0, width), np.uint8)])
                order = np.lexsort(keys.T[::-1])
                return bytes(keys[order[rank - 1]])
            level = len(prefix) // 2
            hist = np.zeros(_DIGITS, np.int64)
            for keys in self._candidates(prefix, 2 * level + 2):
                hist += np.bincount(_digit(keys, level), minlength=_DIGITS)

    def reduce(self, partials: list[dict]) -> dict:
        cfg: FilterConfig = self.config
        n = sum(p["finite"] for p in partials)
        state = {"column": cfg.column, "samples": sum(p["n"] for p in partials), "finite": n,
                 "nonfinite": sum(p["n"] - p["finite"] for p in partials),
                 "min": min((p["min"] for p in partials if p["min"] is not None), default=None),
                 "max": max((p["max"] for p in partials if p["max"] is not None), default=None)}
        if cfg.threshold is not None:
            return {**state, "rule": "threshold", "threshold": float(cfg.threshold)}
        state.update(rule=cfg.rule, top_fraction=cfg.top_fraction, cut_uid=None)
        hist = np.zeros(_DIGITS, np.int64)
        for p in partials:
            _add(hist, p["hist"])
        if cfg.rule == "exact":
            k = exact_count(cfg.top_fraction, n)
            state["keep"] = k
            if 0 < k < n:
                key = self._select(hist, k, _SCORE_BYTES + _UID_BYTES)
                state["threshold"], state["cut_uid"] = key_score(key), key[_SCORE_BYTES:].hex()
            else:
                state["threshold"] = state["min"]  # all finite rows stay (or there are none)
        else:
            r = datacomp_rank(cfg.top_fraction, n)
            state["rank"] = r
            state["threshold"] = key_score(self._select(hist, r, _SCORE_BYTES)) if r <= n else state["min"]
        return state

    # -- apply ----------------------------------------------------------------------------------
    def apply(self, batch: pa.Table, state: dict) -> pa.Table:
        x = self._scores(batch)
        finite = np.isfinite(x)
        t = state["threshold"]
        keep = finite & (x >= t) if t is not None else np.zeros(len(x), bool)
        if state.get("cut_uid") is not None:
            uids = np.asarray(batch.column("uid").to_pylist(), dtype=object)
            keep = finite & ((x > t) | ((x == t) & (uids <= state["cut_uid"])))
        drops = np.where(finite, "below_threshold", "nonfinite_score").astype(object)
        drops[keep] = None
        col = state["column"]
        # the shortest text that reads back as the same value: float32's for a float32 column
        show = (lambda v: str(np.float32(v))) if batch.column(col).type == pa.float32() else repr
        details = [None if d is None else _detail(col, v, t, show) for d, v in zip(drops, x.tolist())]
        return verdicts(batch.column("uid"), drop=drops.tolist(), detail=details)

    # -- recap inspect --------------------------------------------------------------------------
    @classmethod
    def summarize(cls, data: StageData) -> dict | None:
        if not data.has_state():
            return None
        return data.state()

    @classmethod
    def summary_lines(cls, summary: dict) -> list[str]:
        s = summary
        t = "none" if s.get("threshold") is None else f"{s['threshold']:.6g}"
        if s["rule"] == "threshold":
            how = f"{s['column']} >= {t}"
        else:
            how = f"top {s['top_fraction']:g} of {s['column']} ({s['rule']}"
            how += f": {s['keep']} of {s['finite']})" if s["rule"] == "exact" else f": threshold at rank {s['rank']})"
            how += f", threshold {t}"
            if s.get("cut_uid"):
                how += f", ties at it broken by uid (<= {s['cut_uid']})"
        span = f" in [{s['min']:.6g}, {s['max']:.6g}]" if s["finite"] else ""
        return [f"  {cls.name}: {how}; {s['finite']} finite scores{span}, {s['nonfinite']} non-finite dropped"]
