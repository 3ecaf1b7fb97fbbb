"""The ``parquet_images`` source: curate Parquet tables that hold the images themselves (a Hugging
Face ``datasets`` export, a table you wrote), without a download.

``input.kind: parquet``; ``input.paths`` is a list, glob or brace pattern of Parquet files (local or
fsspec URLs). The image column holds the bytes, or a struct with ``bytes`` and ``path`` as
``datasets`` stores images (``path`` relative to the Parquet file, used when ``bytes`` is null);
a caption column; every other column (or those ``input.columns`` names) is carried into the index.
Rows are cut into input shards of ``rows_per_shard`` across files, in file order. The images stay
where they are: the dataset references the Parquet files (``shards/NNNNN.source.json``: their URLs
and sizes, checked on every later read) and each index row names its ``source_file`` and
``source_row``; later stages read the image column's row groups they need. ``parquet: {copy: true}``
writes each shard's tar instead (``{key}.{jpg|png|...}`` after the image's format), and so does a
shard holding an image read from a ``path`` beside the table (that file is not referenced).

The columns are checked in every file's footer before anything runs: a missing or mistyped column
is an ``InputError`` naming the file and the column.

A row's uid: the ``uid`` column when the table has one; else ``make_uid(url, caption)`` when it has
a ``url`` column (the uid a download of that URL and caption gives); else a hash of (file, row
number). A uid seen earlier in the input gets a repeat uid and is dropped as ``duplicate_input``.

Ledger reasons: ``no_image`` (null bytes and path), ``image_not_found``, ``image_path_unsupported``
(a URL rather than a path: never fetched), ``image_too_large`` (over ``max_image_bytes``, read no
further), ``no_caption``, the image check's ``decode_error``, ``not_an_image`` and
``decompression_bomb``, and ``duplicate_input``.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import posixpath
from collections import Counter
from collections.abc import Iterator
from typing import Any, Literal

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from recap.pipeline.inputs import InputError, key_width
from recap.pipeline.stage import IMAGE_COLUMN, SourceStage, StageConfig
from recap.pipeline.uid import make_uid
from recap.pipeline.verdicts import CONTROL_COLUMNS, DROP, control, verdicts
from recap.stages.source_files import (SUCCESS, InputFile, StatusIndex, UniqueUids, check_image, clip, content_uid,
                                      expand_paths, free_name)

FAILED = "failed"
_INTERNAL = ("_src_file", "_src_row", "_src_file_size", "_src_image_column", "_src_drop", "_src_detail")
_OUTPUT = ("key", "member", "url", "caption", "source_file", "source_row", "status", "error_message", "width",
           "height", "original_width", "original_height", "sha256", IMAGE_COLUMN)
_RESERVED = frozenset(("uid", *_OUTPUT, *_INTERNAL, *CONTROL_COLUMNS))


class ParquetInput(BaseModel):
    """The job's ``input:`` for Parquet tables of images."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["parquet"] = "parquet"
    paths: str | list[str] = Field(..., description="Parquet files: a list, a glob or a brace pattern")
    image_column: str = Field("image", description="bytes, or a struct of bytes and path (datasets' Image)")
    caption_column: str = "caption"
    url_column: str = Field("url", description="used for uids when the table has it")
    uid_column: str = Field("uid", description="the table's own uids, used when the table has it")
    columns: list[str] | None = Field(None, description="extra columns to carry; None: every other column")


class ParquetConfig(StageConfig):
    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)
    copy_shards: bool = Field(False, alias="copy",
                              description="write shards/NNNNN.tar instead of referencing the Parquet files in place")
    rows_per_shard: int = Field(10_000, ge=1)
    max_image_bytes: int = Field(64 << 20, ge=1, description="larger images are dropped unread")
    max_image_pixels: int = Field(89_478_485, gt=0, description="larger images are decompression bombs")


class ParquetChanged(RuntimeError):
    """A Parquet file changed between the plan and the read."""


# -- the files and their columns --------------------------------------------------------------------

def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)


def _is_bytes(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)


def _image_type_ok(t: pa.DataType) -> bool:
    if _is_bytes(t):
        return True
    if not pa.types.is_struct(t):
        return False
    fields = {t.field(i).name: t.field(i).type for i in range(t.num_fields)}
    has = [f for f in ("bytes", "path") if f in fields]
    return bool(has) and ("bytes" not in fields or _is_bytes(fields["bytes"]) or pa.types.is_null(fields["bytes"])) \
        and ("path" not in fields or _is_text(fields["path"]))


def check_schema(url: str, schema: pa.Schema, spec: ParquetInput) -> None:
    """The user's column settings against one file's schema, before any row is read."""
    def fail(column: str, setting: str, why: str) -> None:
        raise InputError(f"{url}: column {column!r} (input.{setting}) {why}; columns: {schema.names}")

    for column, setting, ok, want in (
            (spec.image_column, "image_column", _image_type_ok, "binary, or a struct with bytes and/or path"),
            (spec.caption_column, "caption_column", _is_text, "string")):
        if column not in schema.names:
            fail(column, setting, "is missing")
        if not ok(schema.field(column).type):
            fail(column, setting, f"is {schema.field(column).type}, expected {want}")
    for column, setting in ((spec.url_column, "url_column"), (spec.uid_column, "uid_column")):
        if column in schema.names and not _is_text(schema.field(column).type):
            fail(column, setting, f"is {schema.field(column).type}, expected string")
    for column in spec.columns or ():
        if column not in schema.names:
            fail(column, "columns", "is missing")


def _footer(file: InputFile, spec: ParquetInput) -> tuple[pa.Schema, int]:
    fs, path = fsspec.core.url_to_fs(file.url)
    try:
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
            schema = meta.schema.to_arrow_schema()
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{file.url}: not a readable Parquet file ({e})") from None
    check_schema(file.url, schema, spec)
    return schema, meta.num_rows


def _extra_columns(schema: pa.Schema, spec: ParquetInput) -> list[str]:
    own = {spec.image_column, spec.caption_column, spec.url_column, spec.uid_column}
    wanted = spec.columns if spec.columns is not None else schema.names
    return [c for c in wanted if c not in own]


# -- the plan ---------------------------------------------------------------------------------------

def _uids(file: InputFile, table: pa.Table, first_row: int, spec: ParquetInput) -> list[str]:
    n = table.num_rows
    own = table.column(spec.uid_column).to_pylist() if spec.uid_column in table.column_names else [None] * n
    urls = table.column(spec.url_column).to_pylist() if spec.url_column in table.column_names else [None] * n
    captions = table.column(spec.caption_column).to_pylist()
    return [u if u is not None else make_uid(url, cap) if url is not None else content_uid(file.url, str(first_row + i))
            for i, (u, url, cap) in enumerate(zip(own, urls, captions))]


def _rows(file: InputFile, table: pa.Table, first_row: int, spec: ParquetInput, uids: UniqueUids) -> pa.Table:
    """A slice of one file as input rows (keys come per shard)."""
    n = table.num_rows
    drops, details, out_uids = [], [], []
    captions = table.column(spec.caption_column).to_pylist()
    for uid, cap in zip(_uids(file, table, first_row, spec), captions):
        uid, first = uids.add(uid)
        out_uids.append(uid)
        reason = "no_caption" if cap is None else "duplicate_input" if first is not None else None
        drops.append(reason)
        details.append(None if reason is None else f"column {spec.caption_column!r} is null" if cap is None else first)
    s = pa.string()
    cols: dict[str, Any] = {
        "uid": pa.array(out_uids, s),
        "url": table.column(spec.url_column).cast(s) if spec.url_column in table.column_names else pa.nulls(n, s),
        "caption": table.column(spec.caption_column).cast(s),
        "_src_file": pa.array([file.url] * n, s),
        "_src_row": pa.array(range(first_row, first_row + n), pa.int64()),
        "_src_file_size": pa.array([file.size] * n, pa.int64()),
        "_src_image_column": pa.array([spec.image_column] * n, s),  # process sees the rows, not the input config
        "_src_drop": pa.array(drops, s),
        "_src_detail": pa.array(details, s),
    }
    for name in _extra_columns(table.schema, spec):
        cols[free_name(name, _RESERVED | set(cols))] = table.column(name)
    return pa.table(cols)


def _shard(parts: list[pa.Table], shard: int, width: int) -> pa.Table:
    try:
        table = pa.concat_tables(parts, promote_options="permissive") if len(parts) > 1 else parts[0]
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        files = sorted({f for p in parts for f in p.column("_src_file").to_pylist()})
        raise InputError(f"{', '.join(files)}: an extra column has different types in these files ({e}); "
                         f"name the columns to carry with input.columns") from None
    keys = pa.array([f"{shard:05d}{i:0{width}d}" for i in range(table.num_rows)], pa.string())
    return table.add_column(1, "key", keys).combine_chunks()


# -- the stage --------------------------------------------------------------------------------------

class ParquetSource(StatusIndex, SourceStage):
    name = "parquet_images"
    input_kind = "parquet"
    InputConfig = ParquetInput
    Config = ParquetConfig
    origin_column = "source_file"
    member_column = "member"
    default_batch_size = 1 << 30  # one call per shard: each row group read once

    @classmethod
    def section(cls) -> str:
        return "parquet"

    def writes(self) -> tuple[str, ...]:
        return _OUTPUT

    # -- plan ----------------------------------------------------------------------------------
    def _files(self, spec: ParquetInput) -> list[tuple[InputFile, int]]:
        return [(f, _footer(f, spec)[1]) for f in expand_paths(spec.paths)]

    def input_fingerprint(self, spec: ParquetInput) -> str:
        # names, sizes and row counts from the footers, which are read to check the columns anyway
        files = [(f.url, f.size, rows) for f, rows in self._files(spec)]
        payload = {"files": files, "input": spec.model_dump(mode="json", exclude={"paths"}),
                   "rows_per_shard": self.config.rows_per_shard}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def plan(self, spec: ParquetInput) -> Iterator[pa.Table]:
        per = self.config.rows_per_shard
        width = key_width(per)
        uids = UniqueUids()
        parts: list[pa.Table] = []
        pending = shard = 0
        for file, _ in self._files(spec):
            for table, first_row in _read_without_images(file, spec, per):
                while table.num_rows:
                    take = table.slice(0, per - pending)
                    parts.append(_rows(file, take, first_row, spec, uids))
                    pending += take.num_rows
                    table, first_row = table.slice(take.num_rows), first_row + take.num_rows
                    if pending == per:
                        yield _shard(parts, shard, width)
                        parts, pending, shard = [], 0, shard + 1
        if parts:
            yield _shard(parts, shard, width)

    # -- process -------------------------------------------------------------------------------
    def process(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        self._from_path = False
        self._column = batch.column("_src_image_column")[0].as_py() if n else None
        drops = batch.column("_src_drop").to_pylist()
        details = batch.column("_src_detail").to_pylist()
        images: list[bytes | None] = [None] * n
        checks: list = [None] * n
        for i, data, reason, detail in self._read_images(batch, drops):
            if reason is None:
                check = check_image(data, self.config.max_image_pixels)
                reason, detail, checks[i] = check.reason, check.detail, check
            if reason is None:
                images[i] = data
            else:
                drops[i], details[i], checks[i] = reason, detail, None
        return self._table(batch, images, checks, drops, details)

    def _read_images(self, batch: pa.Table, drops: list) -> Iterator[tuple[int, bytes | None, str | None, str | None]]:
        files = batch.column("_src_file").to_pylist()
        rows = batch.column("_src_row").to_pylist()
        planned = batch.column("_src_file_size").to_pylist()
        column = batch.column("_src_image_column")[0].as_py() if batch.num_rows else None
        todo: dict[str, list[int]] = {}
        for i in range(batch.num_rows):
            if drops[i] is None:
                todo.setdefault(files[i], []).append(i)
        for url, idx in todo.items():
            fs, path = fsspec.core.url_to_fs(url)
            size = int(fs.info(path)["size"])
            if size != planned[idx[0]]:
                raise ParquetChanged(f"{url}: changed since the input was planned ({size} bytes, {planned[idx[0]]} "
                                     f"then): restore it, or run again with --overwrite")
            values = _image_values(fs, path, column, [rows[i] for i in idx])
            for i, value in zip(idx, values):
                if isinstance(value, dict) and value.get("bytes") is None and value.get("path"):
                    self._from_path = True
                yield (i, *self._image(fs, path, value))

    def _image(self, fs: fsspec.AbstractFileSystem, parquet_path: str, value: Any
               ) -> tuple[bytes | None, str | None, str | None]:
        if isinstance(value, dict):
            if value.get("bytes") is not None:
                value = value["bytes"]
            elif value.get("path"):
                return _read_path(fs, parquet_path, value["path"], self.config.max_image_bytes)
            else:
                value = None
        if value is None:
            return None, "no_image", "the image column is null"
        if len(value) > self.config.max_image_bytes:
            return None, "image_too_large", f"{len(value)} bytes > max_image_bytes {self.config.max_image_bytes}"
        return value, None, None

    def _table(self, batch: pa.Table, images: list, checks: list, drops: list, details: list) -> pa.Table:
        ok = [d is None for d in drops]
        w = pa.array([c.width if c else None for c in checks], pa.int32())
        h = pa.array([c.height if c else None for c in checks], pa.int32())
        cols: dict[str, Any] = {
            "key": batch.column("key"),
            "member": pa.array([c.ext if c else None for c in checks], pa.string()),
            "url": batch.column("url"),
            "caption": batch.column("caption"),
            "source_file": batch.column("_src_file"),
            "source_row": batch.column("_src_row"),
            "status": pa.array([SUCCESS if k else FAILED for k in ok], pa.string()),
            "error_message": pa.array([None if k else clip(f"{r}: {d}" if d else r)
                                       for k, r, d in zip(ok, drops, details)], pa.string()),
            "width": w, "height": h, "original_width": w, "original_height": h,
            "sha256": pa.array([hashlib.sha256(b).hexdigest() if b is not None else None for b in images], pa.string()),
            IMAGE_COLUMN: pa.array(images, pa.binary()),
        }
        for name in batch.column_names:
            if name not in cols and name not in _INTERNAL and name != "uid":
                cols[name] = batch.column(name)
        return verdicts(batch.column("uid"), cols, drop=drops, detail=[clip(d) for d in details])

    def source_files(self, batch: pa.Table) -> dict | None:
        if self.config.copy_shards or getattr(self, "_from_path", False):
            self._stored = "copy" + (" (an image read from a path beside the table)" if self._from_path else "")
            return None
        self._stored = "reference"
        kept = batch.filter(pc.is_null(control(batch, DROP)))
        return {"files": sorted(set(kept.column("source_file").to_pylist())), "column": self._column}

    @classmethod
    def read_in_place(cls, rows: pa.Table, record: dict) -> list[bytes | None]:
        files = rows.column("source_file").to_pylist()
        numbers = rows.column("source_row").to_pylist()
        todo: dict[str, list[int]] = {}
        for i, url in enumerate(files):
            todo.setdefault(url, []).append(i)
        out: list[bytes | None] = [None] * rows.num_rows
        for url, idx in todo.items():
            fs, path = fsspec.core.url_to_fs(url)
            for i, value in zip(idx, _image_values(fs, path, record["column"], [numbers[i] for i in idx])):
                out[i] = value.get("bytes") if isinstance(value, dict) else value
        return out

    def shard_stats(self, out: pa.Table, duration: float) -> dict:
        reasons = Counter(r if r is not None else SUCCESS for r in control(out, DROP).to_pylist())
        return {"count": out.num_rows, "successes": reasons[SUCCESS], "failed": out.num_rows - reasons[SUCCESS],
                "duration": duration, "status_dict": dict(sorted(reasons.items())),
                "stored": getattr(self, "_stored", None)}


def _read_without_images(file: InputFile, spec: ParquetInput, batch_rows: int) -> Iterator[tuple[pa.Table, int]]:
    """(rows, number of the first) of one file, every column but the image."""
    fs, path = fsspec.core.url_to_fs(file.url)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = [c for c in pf.schema_arrow.names if c != spec.image_column]
        first = 0
        for rb in pf.iter_batches(batch_size=batch_rows, columns=names):
            yield pa.Table.from_batches([rb]), first
            first += rb.num_rows


def _image_values(fs: fsspec.AbstractFileSystem, path: str, column: str, rows: list[int]) -> list:
    """The image column's values at ``rows`` (ascending or not), reading only their row groups."""
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        starts, total = [], 0
        for g in range(pf.metadata.num_row_groups):
            starts.append(total)
            total += pf.metadata.row_group(g).num_rows
        by_group: dict[int, list[int]] = {}
        for r in rows:
            g = _group_of(starts, r)
            by_group.setdefault(g, []).append(r)
        values: dict[int, Any] = {}
        for g, wanted in sorted(by_group.items()):
            col = pf.read_row_group(g, columns=[column]).column(0)
            taken = col.take(pa.array([r - starts[g] for r in wanted], pa.int64())).to_pylist()
            values.update(zip(wanted, taken))
    return [values[r] for r in rows]


def _group_of(starts: list[int], row: int) -> int:
    return bisect.bisect_right(starts, row) - 1


def _read_path(fs: fsspec.AbstractFileSystem, parquet_path: str, image_path: str, limit: int
               ) -> tuple[bytes | None, str | None, str | None]:
    """An image stored beside the Parquet file, on its filesystem, read to ``limit`` bytes at most."""
    if "://" in image_path:
        return None, "image_path_unsupported", f"{image_path!r} is a URL, not a path beside the Parquet file"
    full = image_path if image_path.startswith("/") else posixpath.join(posixpath.dirname(parquet_path), image_path)
    try:
        size = int(fs.info(full)["size"])
        if size > limit:
            return None, "image_too_large", f"{image_path}: {size} bytes > max_image_bytes {limit}"
        with fs.open(full, "rb") as f:
            data = f.read(limit + 1)  # the file may have grown since its size was asked
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None, "image_not_found", f"{image_path} (looked for {full})"
    if len(data) > limit:
        return None, "image_too_large", f"{image_path}: over max_image_bytes {limit}"
    return data, None, None
