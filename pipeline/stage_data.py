"""What a stage may read of its own files, handed to it by the engine: its reduced state, the rows
its partial carried, its kept rows, and (in reduce) its input rows again. Stages never spell
dataset paths themselves."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from recap.pipeline.storage import Dataset, shard_name


def state_rel(stage: str) -> str:
    return f"stages/{stage}/state.json"


def partial_rel(stage: str, shard: int) -> str:
    return f"stages/{stage}/partials/{shard_name(shard)}.json"


def carry_rel(stage: str, shard: int) -> str:
    return f"stages/{stage}/carry/{shard_name(shard)}.parquet"


def output_rel(stage: str, name: str) -> str:
    return f"stages/{stage}/{name}"


@dataclass
class StageData:
    """One stage's committed files in one dataset."""

    dataset: Dataset
    stage: str
    n_shards: int
    # (shard, columns) -> the stage's input rows; set by the engine for reduce
    read_inputs: Callable[[int, tuple[str, ...]], pa.Table] | None = None

    def has_state(self) -> bool:
        return self.dataset.exists(state_rel(self.stage))

    def state(self) -> Any:
        """A global stage's reduced state."""
        return self.dataset.read_json(state_rel(self.stage))["state"]

    def carried(self, shard: int, columns: list[str] | None = None) -> pa.Table | None:
        """The rows the partial pass carried for ``shard`` (every input row), or None."""
        rel = carry_rel(self.stage, shard)
        return self.dataset.read_table(rel, columns=columns) if self.dataset.exists(rel) else None

    def kept(self, shard: int, columns: list[str] | None = None) -> pa.Table | None:
        """The stage's sidecar for ``shard``: its kept rows and the columns it wrote, or None."""
        rel = Dataset.sidecar_rel(self.stage, shard)
        return self.dataset.read_table(rel, columns=columns) if self.dataset.exists(rel) else None

    def published(self, rel: str) -> bytes:
        """A file the stage's partial published at ``rel`` (a packed tar), read back: what a reduce
        reads to re-pack a product across shards."""
        return self.dataset.read_bytes(rel)

    def inputs(self, shard: int, columns: list[str]) -> pa.Table:
        """The rows ``partial`` saw for ``shard`` (``uid`` and ``columns``, which the stage must
        read): what a reduce reads instead of carrying columns an earlier stage already stored."""
        if self.read_inputs is None:
            raise RuntimeError("a stage's inputs are readable in reduce only")
        return self.read_inputs(shard, tuple(columns))
