"""The Stage API: three small bases by kind, and the registry that finds stages by name.

* ``SourceStage`` cuts the job's input into shards and turns each input shard into samples: one
  output row per input row, the image bytes in ``jpg`` (the engine writes the tar and the index).
* ``MapStage`` sees each shard on its own, streaming: ``process(batch) -> batch``.
* ``GlobalStage`` needs the whole dataset first: ``partial`` per shard, one ``reduce``, then
  ``apply`` per shard with the reduced state.

Every stage declares a pydantic config, the columns it reads and writes (methods: they may depend
on the config), resources, and optionally ``setup``/``teardown`` (once per worker: load models
there, never on the driver). Output rows carry their verdicts (``pipeline.verdicts``): the engine
writes kept rows to the stage's sidecar and drops and notes to the ledger, so every sample is
accounted for at every stage. Stages are found through the ``recap.stages`` entry-point group, so
the engine never imports one by name.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from recap.pipeline.verdicts import CONTROL_COLUMNS, DETAIL, DROP, NOTE  # noqa: F401 - re-exported for stages

if TYPE_CHECKING:
    from recap.pipeline.stage_data import StageData

IMAGE_COLUMN = "jpg"  # reading it makes the engine load image bytes from the shard tar


class JobFilePath:
    """Marks a config field as a path to a local file that belongs with the job (metadata lists,
    prompts): a relative value is looked up beside the job file first, then in the working
    directory, so a job runs from any directory."""


LocalPath = Annotated[str, JobFilePath()]


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
    # (name, config as JSON) of the stages before this one in the job, in job order
    earlier: tuple[tuple[str, str], ...] = ()

    def earlier_config(self, name: str) -> dict | None:
        """The config (as the manifest records it) of the last stage called ``name`` that runs
        before this one in the job, or None: what a stage that describes the job's product (the
        generators of its texts) reads, without the engine knowing which stages those are."""
        for stage, config in reversed(self.earlier):
            if stage == name:
                return json.loads(config)
        return None


class Stage:
    """What every kind shares. Subclass one of the kinds below, not this."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[StageConfig]] = StageConfig
    kind: ClassVar[Literal["source", "map", "global"]]
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
    def reads(self) -> tuple[str, ...]:
        """Columns of earlier stages this one needs (``jpg`` loads the image bytes); () = all."""
        return ()

    def optional_reads(self) -> tuple[str, ...]:
        """Columns read when an earlier stage of the job wrote them, left out silently when none did
        (optional enrichments: a stage that packs whatever texts the job produced)."""
        return ()

    def writes(self) -> tuple[str, ...]:
        """Columns this stage adds to its sidecar."""
        return ()

    @property
    def resources(self) -> Resources:
        return self.config.resources or self.default_resources

    @property
    def batch_size(self) -> int:
        return self.config.batch_size or self.default_batch_size

    @classmethod
    def runs_as_actor(cls) -> bool:
        return cls.stateful if cls.stateful is not None else cls.setup is not Stage.setup

    # -- hooks --------------------------------------------------------------------------------
    def setup(self) -> None:
        """Once per worker, before the first batch: load models here, never on the driver."""

    def teardown(self) -> None:
        """Once per worker, after the last batch."""

    # -- recap inspect ------------------------------------------------------------------------
    @classmethod
    def summarize(cls, data: StageData) -> dict | None:
        """The stage's own view of its effect for `recap inspect --json` (None: nothing to add)."""
        return None

    @classmethod
    def summary_lines(cls, summary: dict) -> list[str]:
        """``summarize``'s result as lines of `recap inspect`'s text report."""
        return [f"  {cls.name}: {summary}"[:400]]


class MapStage(Stage):
    """Per shard, streaming: one output row per input row, same uids in the same order."""

    kind = "map"

    def process(self, batch: pa.Table) -> pa.Table:
        raise NotImplementedError


class GlobalStage(Stage):
    """Per-shard partials -> one reduce -> per-shard apply."""

    kind = "global"
    default_batch_size = 1 << 20  # apply sees whole shards unless the config says otherwise
    data: StageData | None = None  # set by the engine for reduce

    def carry(self) -> tuple[str, ...]:
        """Per-row columns ``partial`` computes and ``apply`` gets back (see ``partial``)."""
        return ()

    def partial(self, batch: pa.Table) -> Any:
        """A JSON-serialisable summary of one whole shard (called once per shard).

        With ``carry``, it returns ``(summary, rows)``, ``rows`` a table with ``uid`` and the carried
        columns: the engine commits them with the partial and hands them to ``apply`` as extra
        columns, so costly per-row work (balancing's matching) runs once, not in both passes.

        It may also return ``(summary, rows, files)`` (``rows`` None without ``carry``): ``files``
        maps paths relative to the dataset, outside the engine's own folders, to bytes the stage
        publishes for this shard (a product such as a packed tar); ``{shard}`` in a path becomes the
        shard's name (``00042``). They are committed with the partial, so a rerun redoes a shard
        whose file is missing or cut short, and never leaves one half-written."""
        raise NotImplementedError

    def reduce(self, partials: list[Any]) -> Any:
        """Combine all partials (in shard order) into a JSON-serialisable state. Runs in a Ray task
        with the stage's resources, after setup(). ``self.data`` (a ``StageData``) reads the rows
        the partials carried, shard by shard, when the partials alone are not enough (an exact
        quantile: the histograms find the cut's bin, the carried rows settle it), so the partials
        stay small at any scale."""
        raise NotImplementedError

    def reduce_outputs(self, state: Any) -> dict[str, bytes]:
        """Extra files (name -> bytes) committed beside the reduced state, for users and tools
        (balancing's ``entry_counts.json``)."""
        return {}

    def publish(self, state: Any) -> dict[str, bytes]:
        """Files at paths relative to the dataset (outside the engine's own folders), committed with
        the reduce: the dataset-level part of a product whose shards ``partial`` published."""
        return {}

    def apply(self, batch: pa.Table, state: Any) -> pa.Table:
        """Like ``MapStage.process``, with the reduced state."""
        raise NotImplementedError


class SourceStage(Stage):
    """Turns the job's input into samples. It declares its own job-file section (``section``), the
    input kind it reads (``input.kind``) and that input's config model, how the input is cut into
    shards, which tar member holds the image, and which rows of its index count as kept."""

    kind = "source"
    input_kind: ClassVar[str] = ""
    InputConfig: ClassVar[type[BaseModel]] = BaseModel
    # columns of the output that name each sample's tar members and fill its .txt member
    key_column: ClassVar[str] = "key"
    text_column: ClassVar[str] = "caption"
    # a column that says where a sample came from (a URL, a file), shown with `recap inspect --samples`
    origin_column: ClassVar[str | None] = None
    # a column naming each row's image member (``jpg``, ``png``, ...) when they differ from row to row
    member_column: ClassVar[str | None] = None

    @classmethod
    def section(cls) -> str:
        """The top-level job-file key that holds this stage's config."""
        return cls.name

    def input_fingerprint(self, spec: BaseModel) -> str:
        """Changes iff the input or the way it is cut changes (then the dataset is rebuilt)."""
        raise NotImplementedError

    def plan(self, spec: BaseModel) -> Iterator[pa.Table]:
        """The input cut into shards, on the driver: tables with at least ``uid``, in order."""
        raise NotImplementedError

    def skipped_rows(self) -> list[dict]:
        """After ``plan``: the input rows it left out as unreadable (``input.on_bad_row: skip``),
        each ``{"location", "reason", "detail"}``; the engine reports them."""
        return []

    def process(self, batch: pa.Table) -> pa.Table:
        """One output row per input row: ``uid``, the key and text columns, ``jpg`` (bytes, null
        for a dropped row), index columns, and verdicts."""
        raise NotImplementedError

    def source_tar(self, batch: pa.Table) -> str | None:
        """Read in place: the local path or fsspec URL of an existing tar holding this input shard's
        samples as ``{key}.{member}``, which the dataset then references (with its size, checked on
        every read) instead of writing ``shards/NNNNN.tar``. None, the default: the engine writes
        the shard tar from the ``jpg`` column."""
        return None

    def source_files(self, batch: pa.Table) -> dict | None:
        """Read in place from files that are not tars (Parquet tables of image bytes): a JSON-able
        record of where this input shard's images stay, ``{"files": [url, ...], ...}`` plus whatever
        ``read_in_place`` needs to find them. The engine adds each file's size (checked on every
        read), commits the record instead of writing ``shards/NNNNN.tar``, and later stages get the
        images through ``read_in_place``. None, the default: the tar is written (or referenced)."""
        return None

    @classmethod
    def read_in_place(cls, rows: pa.Table, record: dict) -> list[bytes | None]:
        """The image bytes of ``rows`` (index rows, every index column) of a shard whose images
        ``source_files`` left in place, ``record`` being what it returned."""
        raise NotImplementedError

    def image_member(self) -> str:
        """The extension of the image member in the tar (``jpg``, ``png``, ``webp``)."""
        return "jpg"

    @classmethod
    def kept(cls, index: pa.Table) -> pa.Array:
        """Which rows of a committed index are samples that stay (a boolean mask)."""
        raise NotImplementedError

    def shard_stats(self, out: pa.Table, duration: float) -> dict:
        """Optional per-shard stats file beside the shard (img2dataset's ``_stats.json``)."""
        return {}


KINDS: dict[str, type[Stage]] = {"source": SourceStage, "map": MapStage, "global": GlobalStage}


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
    if not (isinstance(cls, type) and any(issubclass(cls, k) for k in KINDS.values())):
        raise TypeError(f"entry point recap.stages:{name} -> {cls!r} is not a SourceStage, MapStage or GlobalStage")
    return cls


def source_stages() -> dict[str, type[SourceStage]]:
    """input kind -> the source stage that reads it."""
    out = {}
    for name in available_stages():
        try:
            cls = get_stage_class(name)
        except (ImportError, TypeError):
            continue
        if issubclass(cls, SourceStage):
            out[cls.input_kind] = cls
    return out
