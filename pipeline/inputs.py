"""Reading URL lists (img2dataset's input formats) and cutting them into input shards.

Runs on the driver before anything else: assigns each row its uid and img2dataset-style key, marks
exact repeats of an earlier (url, caption) and repairs captions (non-UTF-8 bytes, huge texts) with
a note, so that download only fetches and every row is accounted for from the start.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import sys
from collections.abc import Iterator
from typing import Literal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pydantic import BaseModel, ConfigDict, Field, field_validator

from recap.pipeline.stage import SourceStage
from recap.pipeline.uid import make_uid, repeat_uid

csv.field_size_limit(sys.maxsize)  # huge captions are real input, truncated later with a note
BASE_COLUMNS = ("uid", "key", "url", "caption", "dup_of", "input_note")


class InputError(ValueError):
    """A malformed input file; the message names the file and the line or row."""


class InputSpec(BaseModel):
    """The job's ``input:`` for a URL list (``input.kind: urls``, the default)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["urls"] = "urls"
    path: str = Field(..., description="URL list: txt, csv, tsv, json, jsonl or parquet (local path or fsspec URL)")
    format: str = Field("auto", description="auto (from the extension), txt, csv, tsv, json, jsonl, parquet")
    url_col: str = "url"
    caption_col: str | None = "caption"
    save_additional_columns: list[str] | None = Field(
        None, description="extra columns to keep; None keeps every other column (img2dataset keeps only those named)")
    max_caption_chars: int = Field(16384, ge=1, description="longer captions are truncated, with a ledger note")

    @field_validator("format")
    @classmethod
    def _known_format(cls, v: str) -> str:
        allowed = {"auto", "txt", "csv", "tsv", "json", "jsonl", "parquet"}
        if v not in allowed:
            raise ValueError(f"must be one of {sorted(allowed)}")
        return v


class UrlListSource(SourceStage):
    """A source that reads a URL list (``input.kind: urls``) cut every ``samples_per_shard`` rows
    of its config. Its shards' rows: uid, key, url, caption, dup_of, input_note, extra columns."""

    input_kind = "urls"
    InputConfig = InputSpec

    def input_fingerprint(self, spec: InputSpec) -> str:
        return input_fingerprint(spec, self.config.samples_per_shard)

    def plan(self, spec: InputSpec) -> Iterator[pa.Table]:
        return plan_shards(spec, self.config.samples_per_shard)


def detect_format(spec: InputSpec) -> str:
    if spec.format != "auto":
        return spec.format
    name = spec.path.lower().split("?", 1)[0]
    for ext in ("parquet", "jsonl", "json", "tsv", "csv", "txt"):
        if name.endswith("." + ext):
            return ext
    raise InputError(f"{spec.path}: cannot tell the input format from the name; set input.format")


def _text(raw: bytes) -> tuple[str, bool]:
    """Decode as UTF-8; invalid bytes become U+FFFD and the caller records a note."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def _rows_delimited(path: str, data: bytes, delimiter: str) -> Iterator[tuple[int, dict, bool]]:
    text, bad = _text(data)
    # Per-line decoding keeps the bad-UTF-8 flag on the row it belongs to.
    bad_lines: set[int] = set()
    if bad:
        for i, line in enumerate(data.split(b"\n"), start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                bad_lines.add(i)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        raise InputError(f"{path}: line 1: {e}") from None
    width = len(header)
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise InputError(f"{path}: line {reader.line_num}: {e}") from None
        if not fields:
            continue
        if len(fields) != width:
            raise InputError(f"{path}: line {reader.line_num}: expected {width} fields ({delimiter!r}-separated, as in the header), found {len(fields)}")
        yield reader.line_num, dict(zip(header, fields)), any(n in bad_lines for n in range(start, reader.line_num + 1))


def _rows_json(path: str, data: bytes, lines: bool) -> Iterator[tuple[int, dict, bool]]:
    if lines:
        for i, raw in enumerate(data.split(b"\n"), start=1):
            if not raw.strip():
                continue
            text, bad = _text(raw)
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}: line {i}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{path}: line {i}: expected a JSON object, found {type(obj).__name__}")
            yield i, obj, bad
        return
    text, bad = _text(data)
    try:
        arr = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(arr, list):
        raise InputError(f"{path}: expected a JSON list of objects, found {type(arr).__name__}")
    for i, obj in enumerate(arr):
        if not isinstance(obj, dict):
            raise InputError(f"{path}: item {i}: expected a JSON object, found {type(obj).__name__}")
        yield i, obj, bad


def _rows_txt(path: str, data: bytes, url_col: str) -> Iterator[tuple[int, dict, bool]]:
    for i, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.strip()
        if raw:
            text, bad = _text(raw)
            yield i, {url_col: text}, bad


def read_rows(spec: InputSpec) -> Iterator[tuple[str, dict, bool]]:
    """(location, row dict, had_bad_utf8) for every input row, in file order."""
    fmt = detect_format(spec)
    try:
        with fsspec.open(spec.path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise InputError(f"{spec.path}: input file not found") from None
    if fmt == "parquet":
        try:
            table = pq.read_table(io.BytesIO(data))
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"{spec.path}: not a readable parquet file: {e}") from None
        for i, row in enumerate(table.to_pylist()):
            yield f"row {i}", row, False
        return
    rows = {
        "csv": lambda: _rows_delimited(spec.path, data, ","),
        "tsv": lambda: _rows_delimited(spec.path, data, "\t"),
        "json": lambda: _rows_json(spec.path, data, lines=False),
        "jsonl": lambda: _rows_json(spec.path, data, lines=True),
        "txt": lambda: _rows_txt(spec.path, data, spec.url_col),
    }[fmt]()
    for line, row, bad in rows:
        yield f"line {line}", row, bad


def _as_str(value, what: str, where: str, path: str) -> tuple[str, bool]:
    if value is None:
        return "", False
    if isinstance(value, bytes):
        return _text(value)
    if isinstance(value, str):
        return value, False
    if isinstance(value, int | float):
        return str(value), False
    raise InputError(f"{path}: {where}: {what} is {type(value).__name__}, expected text")


def plan_rows(spec: InputSpec) -> Iterator[dict]:
    """Input rows with uid, dup_of and input_note, in file order (keys are added per shard)."""
    caption_col = None if detect_format(spec) == "txt" else spec.caption_col
    first_seen: dict[bytes, str] = {}
    repeats: dict[bytes, int] = {}
    header_checked = False
    for where, row, bad_utf8 in read_rows(spec):
        if not header_checked:
            if spec.url_col not in row:
                raise InputError(f"{spec.path}: no column {spec.url_col!r} (input.url_col); columns: {sorted(row)}")
            if caption_col and caption_col not in row:
                raise InputError(f"{spec.path}: no column {caption_col!r} (input.caption_col); columns: {sorted(row)}")
            header_checked = True
        url, bad_u = _as_str(row.get(spec.url_col), "url", where, spec.path)
        caption, bad_c = _as_str(row.get(caption_col) if caption_col else None, "caption", where, spec.path)
        notes = []
        if bad_utf8 or bad_u or bad_c:
            notes.append("caption_not_utf8" if (bad_c or bad_utf8) else "url_not_utf8")
        uid = make_uid(url, caption)
        if len(caption) > spec.max_caption_chars:
            notes.append("caption_truncated")
            caption = caption[: spec.max_caption_chars]
        digest = bytes.fromhex(uid)
        dup_of = None
        if digest in first_seen:
            repeats[digest] = repeats.get(digest, 0) + 1
            dup_of = first_seen[digest]
            uid = repeat_uid(uid, repeats[digest])
        else:
            first_seen[digest] = uid
        extras = {k: v for k, v in row.items() if k not in (spec.url_col, caption_col)
                  and (spec.save_additional_columns is None or k in spec.save_additional_columns)}
        yield {"uid": uid, "url": url.strip(), "caption": caption, "dup_of": dup_of,
               "input_note": ",".join(notes) or None, **{f"{k}": v for k, v in extras.items() if k not in BASE_COLUMNS}}


def key_width(samples_per_shard: int) -> int:
    return max(1, math.ceil(math.log10(samples_per_shard))) if samples_per_shard > 1 else 1


def plan_shards(spec: InputSpec, samples_per_shard: int) -> Iterator[pa.Table]:
    """Input shards of ``samples_per_shard`` rows in file order, each with img2dataset-style keys."""
    width = key_width(samples_per_shard)
    batch: list[dict] = []
    shard = 0

    def flush() -> pa.Table:
        for i, r in enumerate(batch):
            r["key"] = f"{shard:05d}{i:0{width}d}"
        cols = list(BASE_COLUMNS) + sorted({c for r in batch for c in r} - set(BASE_COLUMNS))
        return pa.table({c: _column([r.get(c) for r in batch], c in BASE_COLUMNS) for c in cols})

    for row in plan_rows(spec):
        batch.append(row)
        if len(batch) == samples_per_shard:
            yield flush()
            shard += 1
            batch = []
    if batch:
        yield flush()


def _column(values: list, is_base: bool) -> pa.Array:
    """Extra columns keep their type; a column of mixed types is carried as text rather than lost."""
    if is_base:
        return pa.array(values, pa.string())
    try:
        arr = pa.array(values)
        return arr.cast(pa.string()) if pa.types.is_null(arr.type) else arr
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
        return pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v, default=str) for v in values], pa.string())


def input_fingerprint(spec: InputSpec, samples_per_shard: int) -> str:
    """Changes when the input bytes or how they are read and cut change."""
    h = hashlib.sha256()
    with fsspec.open(spec.path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    h.update(json.dumps({"spec": spec.model_dump(mode="json", exclude={"path", "kind"}), "sps": samples_per_shard}, sort_keys=True).encode())
    return h.hexdigest()[:16]
