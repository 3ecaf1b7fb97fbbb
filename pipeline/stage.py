"""The Stage contract: what a stage declares and the hooks the runner calls.

A stage module holds a pydantic config model and a Stage subclass, nothing else. Stages are
found through the ``recap.stages`` entry-point group, so the engine never imports one by name.

Output contract of ``process`` (and of ``apply`` for global stages): exactly one row per input
row, with ``uid``, the declared ``writes`` columns, and optionally

* ``_drop``   (string) — reason the sample leaves the pipeline; null when it is kept;
* ``_detail`` (string) — free text for the ledger (error message, score, ...);
* ``_note``   (string) — reason for a ``note`` ledger row on a kept sample (lost something).

The runner checks that contract, writes kept rows to the sidecar and drops/notes to the ledger,
so every sample is accounted for at every stage.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

DROP = "_drop"
DETAIL = "_detail"
NOTE = "_note"
CONTROL_COLUMNS = (DROP, DETAIL, NOTE)
IMAGE_COLUMN = "jpg"  # reading it makes the runner load image bytes from the shard tar


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cpus: float = Field(1.0, ge=0)
    gpus: float = Field(0.0, ge=0)
    memory: int = Field(0, ge=0, description="bytes; 0 = no reservation")


class StageConfig(BaseModel):
    """Base of every stage config: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")
    resources: Resources | None = None
    batch_size: int | None = Field(None, ge=1)
    concurrency: int | None = Field(None, ge=1, description="actor-pool size for stages with setup()")


@dataclass(frozen=True)
class StageContext:
    """What a stage may know about the job it runs in (never the shard order)."""

    job_name: str
    seed: int
    stage: str
    dataset: str
    n_inputs: int = 0  # rows in the planned input: lets a global stage size a uniform sample


class Stage:
    name: ClassVar[str] = ""
    Config: ClassVar[type[StageConfig]] = StageConfig
    kind: ClassVar[Literal["source", "map", "global"]] = "map"
    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()
    # Global stages: per-row columns partial() computes and apply() receives back (see partial).
    carry: ClassVar[tuple[str, ...]] = ()
    default_batch_size: ClassVar[int] = 1024
    default_resources: ClassVar[Resources] = Resources()
    # Run as an actor pool that keeps setup()'s work (a model) across shards? None = yes iff the
    # stage overrides setup(); cheap setups (a parser, an HTTP session) may set False to run as tasks.
    stateful: ClassVar[bool | None] = None
    # Bump when the stage's output changes for the same config, so resumed datasets redo it.
    version: ClassVar[str] = "1"
    # Config fields that change how fast, never what (threads, pool sizes): not part of the hash.
    hash_exclude: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: StageConfig, context: StageContext):
        self.config = config
        self.ctx = context

    # -- declarations -------------------------------------------------------------------------
    @property
    def resources(self) -> Resources:
        return self.config.resources or self.default_resources

    @classmethod
    def runs_as_actor(cls) -> bool:
        return cls.stateful if cls.stateful is not None else cls.setup is not Stage.setup

    @property
    def batch_size(self) -> int:
        return self.config.batch_size or self.default_batch_size

    # -- hooks --------------------------------------------------------------------------------
    def setup(self) -> None:
        """Once per worker, before the first batch: load models here, never on the driver."""

    def process(self, batch: pa.Table) -> pa.Table:  # map and source stages
        raise NotImplementedError

    def teardown(self) -> None:
        """Once per worker, after the last batch."""

    # global stages: per-shard partials -> reduce -> per-shard apply
    def partial(self, batch: pa.Table) -> Any:
        """A JSON-serialisable summary of one whole shard (called once per shard).

        It may instead return ``(summary, rows)`` where ``rows`` is a table with ``uid`` and the
        per-row columns the stage declares in ``carry``: the engine commits them with the partial
        and hands them to ``apply`` as extra columns, so costly per-row work (balancing's
        sub-string matching) runs once, not in both passes."""
        raise NotImplementedError

    def reduce(self, partials: list[Any]) -> Any:
        """Combine all partials (in shard order) into a JSON-serialisable state. Runs in a Ray task
        with the stage's resources, after setup()."""
        raise NotImplementedError

    def apply(self, batch: pa.Table, state: Any) -> pa.Table:
        """Like process, with the reduced state."""
        raise NotImplementedError

    def reduce_outputs(self, state: Any) -> dict[str, bytes]:
        """Extra files (name -> bytes) committed beside ``stages/<stage>/state.json`` with the
        reduced state, for users and tools (balancing's ``entry_counts.json``)."""
        return {}

    @classmethod
    def summarize(cls, dataset: Any, n_shards: int) -> dict | None:
        """Extra lines for `recap inspect` (e.g. balancing's head/tail effect); None for none."""
        return None

    # source stages write shards; they may add img2dataset-style per-shard stats
    def shard_stats(self, out: pa.Table, duration: float) -> dict:
        return {}


class UnknownStage(KeyError):
    pass


_registered: dict[str, type[Stage]] = {}


def register(cls: type[Stage]) -> type[Stage]:
    """Register a stage class in-process (tests, notebooks); entry points cover installed ones."""
    _registered[cls.name] = cls
    return cls


@functools.cache
def _entry_point_stages() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group="recap.stages")}


def available_stages() -> list[str]:
    return sorted(set(_entry_point_stages()) | set(_registered))


def get_stage_class(name: str) -> type[Stage]:
    if name in _registered:
        return _registered[name]
    ep = _entry_point_stages().get(name)
    if ep is None:
        raise UnknownStage(name)
    cls = ep.load()
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        raise TypeError(f"entry point recap.stages:{name} -> {cls!r} is not a Stage subclass")
    return cls
