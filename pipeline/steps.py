"""One unit of work: (stage, shard). Runs on a Ray worker; reads the shard's inputs, calls the
stage, checks its output contract, and commits sidecar + ledger (+ tar for the source stage)."""
from __future__ import annotations

import hashlib
import json
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from recap.pipeline.ledger import ledger_table
from recap.pipeline.shards import read_tar, sample_json, write_tar
from recap.pipeline.ray_cluster import current_node
from recap.pipeline.stage import IMAGE_COLUMN, GlobalStage, SourceStage, Stage, StageConfig, StageContext
from recap.pipeline.stage_data import StageData, carry_rel, partial_rel
from recap.pipeline.storage import Dataset, json_bytes, shard_name, table_bytes
from recap.pipeline.verdicts import CONTROL_COLUMNS, DETAIL, DROP, NOTE, control

HASH_META = b"recap.config_hash"
# what a later stage needs to find a sample's image in the shard tar, whichever source wrote it
IMAGE_EXT_META = b"recap.image_ext"
KEY_COLUMN_META = b"recap.key_column"
MEMBER_COLUMN_META = b"recap.member_column"  # per-row image member, when the source has one
SOURCE_TAR_META = b"recap.source_tar"  # the referenced tar of a source read in place
IN_PLACE_META = b"recap.images_in_place"  # images stay in the source's own files (source_files)
# Columns of the source stage that stay out of the per-sample json (bytes) or are its own keys.
_NOT_IN_SAMPLE_JSON = {IMAGE_COLUMN}


class ContractError(RuntimeError):
    pass


class StepFailure(RuntimeError):
    """A stage raised on a shard. The message names both; the traceback is in logs/failures/."""


def hashed_config(config: StageConfig, cls: type[Stage]) -> dict:
    """The part of a stage's config that decides its output (not threads, pools or resources)."""
    exclude = {"resources", "batch_size", "concurrency"} | set(cls.hash_exclude)
    return config.model_dump(mode="json", exclude=exclude)


def config_hash(prev: str, name: str, config: StageConfig, cls: type[Stage]) -> str:
    """Chained: a changed stage changes its own hash and every later one, never an earlier one."""
    payload = {"prev": prev, "stage": name, "version": cls.version, "config": hashed_config(config, cls)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class StepSpec:
    dataset: Dataset
    stage_cls: type[Stage]
    config: StageConfig
    context: StageContext
    config_hash: str
    phase: str  # source | map | partial | apply
    source_cls: type[SourceStage]  # says which rows of the shard index are kept
    previous: list[str] = field(default_factory=list)  # sidecar stages before this one, in order
    verify: bool = False  # resume: re-hash committed files instead of checking their sizes

    @property
    def label(self) -> str:
        """The step as Ray's operators and the progress lines name it: ``balance.apply``."""
        return f"{self.name}.{self.phase}" if self.stage_cls.kind == "global" else self.name

    @property
    def name(self) -> str:
        return self.context.stage

    @property
    def step(self) -> str:
        """Name of the commit folder: the stage, or ``stage.partial`` for a global stage's first pass."""
        return f"{self.name}.partial" if self.phase == "partial" else self.name


# -- inputs -----------------------------------------------------------------------------------------

def _take_by_uid(base_uids: pa.Array, table: pa.Table) -> pa.Table:
    idx = pc.index_in(base_uids, value_set=table.column("uid"))
    if idx.null_count:
        raise ContractError("a sidecar lacks uids that its successor kept: the dataset is inconsistent")
    return table.take(idx)


def load_input(ds: Dataset, shard: int, source: type[SourceStage], previous: list[str],
               reads: tuple[str, ...], optional: tuple[str, ...] = ()) -> pa.Table:
    """The samples still in the pipeline after ``previous``, with the columns ``reads`` names
    (all columns when it is empty) and those of ``optional`` that an earlier stage wrote, in shard
    order."""
    base = ds.read_table(Dataset.index_rel(shard))
    base = base.filter(source.kept(base))
    sidecars = [ds.read_table(Dataset.sidecar_rel(p, shard)) for p in previous]
    if sidecars:
        base = _take_by_uid(sidecars[-1].column("uid"), base)  # the last stage's kept set, in shard order
    uids = base.column("uid")
    for sc in sidecars:
        taken = _take_by_uid(uids, sc)
        for name in taken.column_names:
            if name == "uid":
                continue
            col = taken.column(name)
            if name in base.column_names:
                base = base.set_column(base.column_names.index(name), name, col)
            else:
                base = base.append_column(name, col)
    if reads:
        wanted = [c for c in base.column_names if c == "uid" or c in reads or c in optional]
        missing = [c for c in reads if c not in base.column_names and c != IMAGE_COLUMN]
        if missing:
            raise ContractError(f"reads columns no earlier stage wrote: {missing}")
        base = base.select(wanted)
    if IMAGE_COLUMN in reads:
        base = base.append_column(IMAGE_COLUMN, _images(ds, shard, base, source))
    return base


def _images(ds: Dataset, shard: int, table: pa.Table, source: type[SourceStage]) -> pa.Array:
    meta = ds.read_schema(Dataset.index_rel(shard)).metadata or {}
    if meta.get(IN_PLACE_META):
        record = checked_source_files(ds.read_json(Dataset.source_rel(shard)))
        rows = _take_by_uid(table.column("uid"), ds.read_table(Dataset.index_rel(shard)))
        return pa.array(source.read_in_place(rows, record), pa.binary())
    ext = meta.get(IMAGE_EXT_META, b"jpg").decode()
    key = meta.get(KEY_COLUMN_META, b"key").decode()
    member = meta.get(MEMBER_COLUMN_META, b"").decode() or None
    wanted = [c for c in (key, member) if c and c not in table.column_names]
    if wanted:
        index = ds.read_table(Dataset.index_rel(shard), columns=["uid", *wanted])
        taken = _take_by_uid(table.column("uid"), index)
        table = table.select(["uid", *[c for c in (key, member) if c and c in table.column_names]])
        for c in wanted:
            table = table.append_column(c, taken.column(c))
    members = read_tar(_tar_bytes(ds, shard, meta))
    keys = table.column(key).to_pylist()
    exts = table.column(member).to_pylist() if member else [ext] * len(keys)
    return pa.array([members.get(k, {}).get(e) for k, e in zip(keys, exts)], pa.binary())


class SourceChanged(RuntimeError):
    """A tar the dataset references in place is no longer the one that was read."""


def _tar_bytes(ds: Dataset, shard: int, meta: dict) -> bytes:
    url = meta.get(SOURCE_TAR_META)
    if url is None:
        return ds.read_bytes(Dataset.tar_rel(shard))
    url = url.decode()
    recorded = ds.read_json(Dataset.source_rel(shard))
    with fsspec.open(url, "rb") as f:
        data = f.read()
    if len(data) != recorded["size"]:
        raise SourceChanged(f"{url}: the source shard changed since it was read ({len(data)} bytes, "
                            f"{recorded['size']} when read): restore it, or run again with --overwrite")
    return data


def files_record(record: dict) -> dict:
    """A source's ``source_files`` record with each file's size when read, the form committed."""
    files = []
    for url in record["files"]:
        fs, path = fsspec.core.url_to_fs(url)
        files.append({"url": url, "size": int(fs.info(path)["size"])})
    return {**record, "files": files}


def checked_source_files(recorded: dict) -> dict:
    """The committed record, the files' sizes checked (a stat, not a read), as ``source_files``
    returned it (``files`` a list of URLs)."""
    for f in recorded["files"]:
        fs, path = fsspec.core.url_to_fs(f["url"])
        try:
            size = int(fs.info(path)["size"])
        except FileNotFoundError:
            size = None
        if size != f["size"]:
            now = "is gone" if size is None else f"is {size} bytes"
            raise SourceChanged(f"{f['url']}: the source file changed since it was read (it {now}, {f['size']} "
                                f"bytes when read): restore it, or run again with --overwrite")
    return {**recorded, "files": [f["url"] for f in recorded["files"]]}


def source_record(url: str) -> dict:
    """What a referenced tar is checked against on every read (its size; the store's ETag or
    mtime are informative: a copied file keeps its bytes, not its mtime)."""
    fs, path = fsspec.core.url_to_fs(url)
    info = fs.info(path)
    return {"url": url, "size": int(info["size"])}


# -- the stage call ---------------------------------------------------------------------------------

def _batches(table: pa.Table, size: int):
    for start in range(0, max(table.num_rows, 1), size):
        yield table.slice(start, size)


def check_output(stage: Stage, inp: pa.Table, out: Any) -> pa.Table:
    who = f"stage {stage.ctx.stage!r}"
    if not isinstance(out, pa.Table):
        raise ContractError(f"{who}: process() returned {type(out).__name__}, expected pyarrow.Table")
    if "uid" not in out.column_names:
        raise ContractError(f"{who}: output has no uid column")
    if out.num_rows != inp.num_rows or not out.column("uid").equals(inp.column("uid")):
        raise ContractError(f"{who}: output must have one row per input row, same uids in the same order "
                            f"(got {out.num_rows} rows for {inp.num_rows})")
    missing = [c for c in stage.writes() if c not in out.column_names]
    if missing:
        raise ContractError(f"{who}: output lacks declared columns {missing}")
    return out


# What a stage may not publish over: the engine's own folders and files.
ENGINE_PATHS = ("input", "shards", "stages", "ledger", "commits", "logs", "manifest.json", ".tmp", "_lease.json")


def published(stage: Stage, files: Any, shard: int | None) -> dict[str, bytes]:
    """A stage's published files, checked: relative paths outside the engine's folders, bytes;
    ``{shard}`` filled in."""
    who = f"stage {stage.ctx.stage!r}"
    if not isinstance(files, dict):
        raise ContractError(f"{who}: published files must be a dict of path -> bytes, got {type(files).__name__}")
    out = {}
    for rel, data in files.items():
        name = rel.replace("{shard}", shard_name(shard)) if shard is not None else rel
        parts = name.split("/")
        if not name or name.startswith("/") or ".." in parts or parts[0] in ENGINE_PATHS \
                or not isinstance(data, (bytes, bytearray)):
            raise ContractError(f"{who}: cannot publish {rel!r}: expected bytes at a relative path outside "
                                f"the engine's folders ({', '.join(ENGINE_PATHS)})")
        out[name] = bytes(data)
    return out


def commit_replacing(ds: Dataset, step: str, shard: int, config_hash: str, files: dict[str, bytes], counts: dict,
                     keep: frozenset[str] = frozenset()) -> dict:
    """Commit, then remove the files the step's previous commit of this shard published and this
    one does not (a product re-packed into fewer shards), except those in ``keep``: a rerun with
    another config never leaves a stale file where readers look."""
    try:
        old = set(ds.read_json(Dataset.commit_rel(step, shard)).get("files", {}))
    except (OSError, ValueError):
        old = set()
    marker = ds.commit(step, shard, config_hash, files, counts)
    for rel in sorted(old - set(files) - keep):
        if rel.split("/")[0] not in ENGINE_PATHS:
            ds.remove(rel)
    return marker


def split_partial(stage: GlobalStage, table: pa.Table, result: Any,
                  shard: int | None = None) -> tuple[Any, pa.Table | None, dict[str, bytes]]:
    """A partial's (summary, carried rows, published files); the rows checked against the stage's
    ``carry``."""
    files: dict[str, bytes] = {}
    if isinstance(result, tuple) and len(result) == 3:
        files = published(stage, result[2], shard)
        result = result[0] if result[1] is None else (result[0], result[1])
    carry = stage.carry()
    if not carry:
        return result, None, files
    who = f"stage {stage.ctx.stage!r}"
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], pa.Table)):
        raise ContractError(f"{who}: declares carry {list(carry)}, so partial() must return (summary, rows)")
    rows = result[1]
    if rows.num_rows != table.num_rows or "uid" not in rows.column_names \
            or not rows.column("uid").equals(table.column("uid")):
        raise ContractError(f"{who}: partial()'s rows must have one row per input row, same uids in the same order")
    missing = [c for c in carry if c not in rows.column_names]
    if missing:
        raise ContractError(f"{who}: partial()'s rows lack carried columns {missing}")
    return result[0], rows.select(["uid", *carry]), files


def with_carry(stage: GlobalStage, table: pa.Table, carried: pa.Table) -> pa.Table:
    """The apply input plus the columns the partial carried, matched by uid."""
    taken = _take_by_uid(table.column("uid"), carried)
    for name in stage.carry():
        table = table.append_column(name, taken.column(name))
    return table


def run_stage(stage: Stage, table: pa.Table, phase: str, state: Any = None,
              shard: int | None = None) -> tuple[pa.Table | None, list]:
    """Run process/partial/apply over the shard in batches of the stage's batch size. A partial
    runs once per shard (the reduce never sees batch boundaries); its returned list holds the
    summary, then the carried rows (with ``carry``), then the published files (when any)."""
    if phase == "partial":
        summary, rows, files = split_partial(stage, table, stage.partial(table), shard)
        return None, [summary] + ([] if rows is None else [rows]) + ([files] if files else [])
    outs = []
    for b in _batches(table, stage.batch_size):
        out = stage.apply(b, state) if phase == "apply" else stage.process(b)
        outs.append(check_output(stage, b, out))
    out = pa.concat_tables(outs, promote_options="permissive") if len(outs) > 1 else outs[0]
    return out, []


def _split(out: pa.Table, stage_name: str) -> tuple[pa.Array, pa.Table, dict]:
    """(kept mask, ledger rows, counts) from the control columns."""
    drop, detail, note = (control(out, c) for c in (DROP, DETAIL, NOTE))
    kept = pc.is_null(drop)
    ledger = ledger_table(out.column("uid"), stage_name, drop, detail, note)
    dropped = Counter(r for r in drop.to_pylist() if r is not None)
    notes = Counter(n for v in note.to_pylist() if v for n in v.split(","))
    counts = {"in": out.num_rows, "kept": out.num_rows - sum(dropped.values()),
              "dropped": dict(sorted(dropped.items())), "notes": dict(sorted(notes.items()))}
    return kept, ledger, counts


def _with_hash(table: pa.Table, h: str, extra: dict[bytes, bytes] | None = None) -> pa.Table:
    return table.replace_schema_metadata({HASH_META: h.encode(), **(extra or {})})


# -- the step ---------------------------------------------------------------------------------------

class StepRunner:
    """Runs one step over shards. Used as a Ray Data callable class (kept alive for stateful
    stages, so setup() runs once per worker) or called once per task."""

    def __init__(self, spec: StepSpec):
        self.spec = spec
        self.stage: Stage | None = None
        self.state: Any = None

    def _ensure_stage(self) -> Stage:
        if self.stage is None:
            stage = self.spec.stage_cls(self.spec.config, self.spec.context)
            stage.setup()  # if it raises, the next shard tries again rather than using a half-set-up stage
            if self.spec.phase == "apply":
                self.state = StageData(self.spec.dataset, self.spec.name, 0).state()
            self.stage = stage
        return self.stage

    def close(self) -> None:
        if self.stage is not None:
            self.stage.teardown()
            self.stage = None

    def __del__(self):  # Ray Data has no teardown hook for callable classes
        try:
            self.close()
        except Exception:
            pass

    def __call__(self, batch: pa.Table) -> pa.Table:
        for shard in batch.column("shard").to_pylist():
            self.run_shard(int(shard))
        return batch

    def run_shard(self, shard: int) -> dict:
        spec, ds = self.spec, self.spec.dataset
        marker = ds.committed(spec.step, shard, spec.config_hash, verify=spec.verify)
        if marker is not None:
            return marker["counts"]
        started = time.time()
        try:
            counts = self._run(shard)
        except Exception as e:
            tb = traceback.format_exc()
            msg = f"stage {spec.name!r} failed on shard {shard_name(shard)}: {type(e).__name__}: {e}"
            try:
                ds.write_bytes(f"logs/failures/{spec.step}-{shard_name(shard)}.txt", (msg + "\n\n" + tb).encode())
            except Exception:
                pass
            raise StepFailure(msg) from e
        # where it ran: the manifest says which node ran each (step, shard)
        ds.write_json(f"logs/timings/{spec.step}/{shard_name(shard)}.json",
                      {"seconds": round(time.time() - started, 3), "in": counts.get("in", 0), "node": current_node()})
        return counts

    def _run(self, shard: int) -> dict:
        spec, ds = self.spec, self.spec.dataset
        stage = self._ensure_stage()
        if spec.phase == "source":
            return self._run_source(stage, shard)
        table = load_input(ds, shard, spec.source_cls, spec.previous, stage.reads(), stage.optional_reads())
        if spec.phase == "partial":
            _, partials = run_stage(stage, table, "partial", shard=shard)
            files = partials.pop() if isinstance(partials[-1], dict) and len(partials) > 1 else {}
            if stage.carry():
                files[carry_rel(spec.name, shard)] = table_bytes(partials.pop())
            files[partial_rel(spec.name, shard)] = json_bytes(partials)
            return commit_replacing(ds, spec.step, shard, spec.config_hash, files, {"in": table.num_rows})["counts"]
        if spec.phase == "apply" and stage.carry():
            table = with_carry(stage, table, ds.read_table(carry_rel(spec.name, shard)))
        out, _ = run_stage(stage, table, spec.phase, self.state)
        kept, ledger, counts = _split(out, spec.name)
        side = out.filter(kept).select(["uid"] + list(stage.writes()))
        files = {
            Dataset.ledger_rel(spec.name, shard): table_bytes(ledger),
            Dataset.sidecar_rel(spec.name, shard): table_bytes(_with_hash(side, spec.config_hash)),
        }
        return ds.commit(spec.step, shard, spec.config_hash, files, counts)["counts"]

    def _run_source(self, stage: Stage, shard: int) -> dict:
        spec, ds = self.spec, self.spec.dataset
        table = ds.read_table(Dataset.input_rel(shard))
        started = time.time()
        out, _ = run_stage(stage, table, "map")
        duration = time.time() - started
        kept, ledger, counts = _split(out, spec.name)
        if not pc.all(pc.equal(stage.kept(out), kept)).as_py() and out.num_rows:
            raise ContractError(f"stage {spec.name!r}: kept() must be true exactly for the rows without a drop reason")
        image_ext, key, text = stage.image_member(), stage.key_column, stage.text_column
        meta_cols = [c for c in out.column_names if c not in CONTROL_COLUMNS and c not in _NOT_IN_SAMPLE_JSON]
        ok = out.filter(kept)
        meta = {IMAGE_EXT_META: image_ext.encode(), KEY_COLUMN_META: key.encode()}
        if stage.member_column:
            meta[MEMBER_COLUMN_META] = stage.member_column.encode()
        referenced = stage.source_tar(table)
        in_place = stage.source_files(out) if referenced is None else None
        if in_place is not None:
            meta[IN_PLACE_META] = b"1"
            shard_files = {Dataset.source_rel(shard): json_bytes(files_record(in_place))}
        elif referenced is None:
            rows, images = ok.select(meta_cols).to_pylist(), ok.column(IMAGE_COLUMN).to_pylist()
            exts = ok.column(stage.member_column).to_pylist() if stage.member_column else [image_ext] * len(rows)
            shard_files = {Dataset.tar_rel(shard): write_tar(
                (r[key], {e: img, "txt": (r.get(text) or "").encode("utf-8"), "json": sample_json(r)})
                for r, img, e in zip(rows, images, exts))}
        else:
            meta[SOURCE_TAR_META] = referenced.encode()
            shard_files = {Dataset.source_rel(shard): json_bytes(source_record(referenced))}
        index = _with_hash(out.select(meta_cols), spec.config_hash, meta)
        stats = {"shard": shard_name(shard), **stage.shard_stats(out, duration)}
        ds.write_json(Dataset.stats_rel(shard), stats)  # not part of the commit: timings vary run to run
        files = {
            **shard_files,
            Dataset.ledger_rel(spec.name, shard): table_bytes(ledger),
            Dataset.index_rel(shard): table_bytes(index),
        }
        return ds.commit(spec.step, shard, spec.config_hash, files, counts)["counts"]
