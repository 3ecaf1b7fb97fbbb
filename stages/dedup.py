"""Exact image deduplication across the whole dataset (a global stage): of all samples whose
stored image bytes hash the same, the one with the smallest uid stays — a choice that depends
only on the data, never on shard order or worker count."""
from __future__ import annotations

import pyarrow as pa

from recap.pipeline.stage import GlobalStage, StageConfig
from recap.pipeline.verdicts import verdicts


class DedupConfig(StageConfig):
    pass


def _merge(into: dict[str, list], h: str, uid: str, n: int) -> None:
    if h in into:
        into[h] = [min(into[h][0], uid), into[h][1] + n]
    else:
        into[h] = [uid, n]


class DedupStage(GlobalStage):
    name = "dedup"
    Config = DedupConfig

    def reads(self) -> tuple[str, ...]:
        return ("sha256",)

    def partial(self, batch: pa.Table) -> dict[str, list]:
        """sha256 -> [smallest uid, count] for this batch."""
        seen: dict[str, list] = {}
        for uid, h in zip(batch.column("uid").to_pylist(), batch.column("sha256").to_pylist()):
            if h is not None:
                _merge(seen, h, uid, 1)
        return seen

    def reduce(self, partials: list[dict[str, list]]) -> dict[str, str]:
        """Only hashes seen more than once: the state stays small when duplicates are rare."""
        total: dict[str, list] = {}
        for part in partials:
            for h, (uid, n) in part.items():
                _merge(total, h, uid, n)
        return {h: uid for h, (uid, n) in sorted(total.items()) if n > 1}

    def apply(self, batch: pa.Table, state: dict[str, str]) -> pa.Table:
        drops, details = [], []
        for uid, h in zip(batch.column("uid").to_pylist(), batch.column("sha256").to_pylist()):
            winner = state.get(h) if h is not None else None
            keep = winner is None or winner == uid
            drops.append(None if keep else "duplicate_image")
            details.append(None if keep else f"same bytes as {winner}")
        return verdicts(batch.column("uid"), drop=drops, detail=details)
