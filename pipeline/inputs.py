"""Reading URL lists (img2dataset's input formats) and cutting them into input shards.

Runs on the driver before anything else: assigns each row its uid and img2dataset-style key, marks
exact repeats of an earlier (url, caption) and repairs captions (non-UTF-8 bytes, huge texts) with
a note, so that download only fetches and every row is accounted for from the start. A malformed
row stops the job, or with ``input.on_bad_row: skip`` is left out and reported.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pydantic import BaseModel, ConfigDict, Field, field_validator

from recap.pipeline.errors import UserError
from recap.pipeline.stage import SourceStage
from recap.pipeline.uid import make_uid, repeat_uid

csv.field_size_limit(sys.maxsize)  # huge captions are real input, truncated later with a note
BASE_COLUMNS = ("uid", "key", "url", "caption", "dup_of", "input_note")
DETAIL_MAX = 300


class InputError(UserError, ValueError):
    """A malformed input file; the message names the file and the line or row."""


@dataclass(frozen=True)
class BadRow:
    """A row that cannot be read. ``detail`` names the file and where the row starts."""

    location: str
    reason: str
    detail: str

    def as_dict(self) -> dict:
        detail = self.detail if len(self.detail) <= DETAIL_MAX else self.detail[:DETAIL_MAX - 1] + "…"
        return {"location": self.location, "reason": self.reason, "detail": detail}


Row = tuple[str, dict, bool]  # (location, fields, had_bad_utf8)


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
    tsv_quoting: Literal["none", "csv"] = Field(
        "none", description='none: a quote in a TSV is text (a caption may start with "); csv: quoted fields as in CSV, '
                            "for TSVs written by a csv writer")
    on_bad_row: Literal["fail", "skip"] = Field(
        "fail", description="fail: a malformed row stops the job; skip: it is left out and reported")

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

    def __init__(self, config, context):
        super().__init__(config, context)
        self._skipped: list[BadRow] = []

    def input_fingerprint(self, spec: InputSpec) -> str:
        return input_fingerprint(spec, self.config.samples_per_shard)

    def plan(self, spec: InputSpec) -> Iterator[pa.Table]:
        self._skipped = []
        return plan_shards(spec, self.config.samples_per_shard, self._skipped)

    def skipped_rows(self) -> list[dict]:
        """The rows ``on_bad_row: skip`` left out, in file order, once ``plan()`` has been read."""
        return [bad.as_dict() for bad in self._skipped]


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


def _dialect(fmt: str, spec: InputSpec) -> dict:
    if fmt == "csv":
        return {"delimiter": ",", "strict": True}
    if spec.tsv_quoting == "csv":
        return {"delimiter": "\t", "strict": True}
    # img2dataset's reader (pyarrow) parses quotes in TSV too: a caption starting with " loses it,
    # or runs on over the following rows. As text, every line stays its own row.
    return {"delimiter": "\t", "quoting": csv.QUOTE_NONE}


def _lines(data: bytes) -> tuple[list[str], set[int]]:
    """The file's lines as csv sees them (ended by \\n, \\r\\n or \\r), and the numbers of those with
    bad UTF-8, so that a note and a line number belong to one row."""
    text, bad = _text(data)
    lines = list(io.StringIO(text, newline=""))
    if not bad:
        return lines, set()
    return lines, {i for i, raw in enumerate(data.splitlines(), start=1) if _text(raw)[1]}


def _quote_error(path: str, start: int, end: int, e: csv.Error) -> BadRow:
    where = f"line {start}"
    if "unexpected end of data" in str(e):
        return BadRow(where, "unterminated_quote",
                      f"{path}: {where}: unterminated quote (the quoted field starting here never ends)")
    spans = f" at line {end}, in a quoted field that runs on from here: an unbalanced quote?" if end != start else ""
    return BadRow(where, "bad_quoting", f"{path}: {where}: bad quoting ({e}{spans})")


def _records(path: str, lines: list[str], dialect: dict) -> Iterator[tuple[int, int, list[str]] | BadRow]:
    """(first line, last line, fields) per record, in order."""
    offset = 0  # lines before the current reader's first
    reader = csv.reader(lines, **dialect)
    while True:
        start = offset + reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield _quote_error(path, start, offset + reader.line_num, e)
            # A broken quote may have run on to the end of the file: the next row starts on the
            # line after this one, as a line-oriented reader sees it.
            offset = start
            reader = csv.reader(map(lines.__getitem__, range(start, len(lines))), **dialect)
            continue
        yield start, offset + reader.line_num, fields


def _rows_delimited(path: str, data: bytes, dialect: dict) -> Iterator[Row | BadRow]:
    lines, bad_utf8 = _lines(data)
    records = _records(path, lines, dialect)
    header = next(records, None)
    if header is None:
        return
    if isinstance(header, BadRow):
        raise InputError(header.detail)
    names = header[2]
    for rec in records:
        if isinstance(rec, BadRow):
            yield rec
            continue
        start, end, fields = rec
        if not fields:
            continue
        where = f"line {start}"
        if len(fields) != len(names):
            yield BadRow(where, "wrong_field_count", f"{path}: {where}: expected {len(names)} fields "
                         f"({dialect['delimiter']!r}-separated, as in the header), found {len(fields)}")
            continue
        yield where, dict(zip(names, fields)), bool(bad_utf8) and not bad_utf8.isdisjoint(range(start, end + 1))


def _not_object(path: str, where: str, obj) -> BadRow:
    return BadRow(where, "not_an_object", f"{path}: {where}: expected a JSON object, found {type(obj).__name__}")


def _rows_jsonl(path: str, data: bytes) -> Iterator[Row | BadRow]:
    for i, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        text, bad = _text(raw)
        where = f"line {i}"
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            yield BadRow(where, "invalid_json", f"{path}: {where}: not valid JSON ({e.msg} at column {e.colno})")
            continue
        yield (where, obj, bad) if isinstance(obj, dict) else _not_object(path, where, obj)


def _rows_json(path: str, data: bytes) -> Iterator[Row | BadRow]:
    text, bad = _text(data)
    try:
        arr = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: line {e.lineno}, column {e.colno}: not valid JSON ({e.msg})") from None
    if not isinstance(arr, list):
        raise InputError(f"{path}: expected a JSON list of objects, found {type(arr).__name__}")
    for i, obj in enumerate(arr):
        where = f"item {i}"
        yield (where, obj, bad) if isinstance(obj, dict) else _not_object(path, where, obj)


def _rows_txt(data: bytes, url_col: str) -> Iterator[Row]:
    for i, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.strip()
        if raw:
            text, bad = _text(raw)
            yield f"line {i}", {url_col: text}, bad


def _rows_parquet(path: str, data: bytes) -> Iterator[Row]:
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{path}: not a readable parquet file: {e}") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"row {i}", row, False


def read_rows(spec: InputSpec) -> Iterator[Row | BadRow]:
    """(location, row dict, had_bad_utf8) for every input row, or a BadRow in its place, in file order."""
    fmt = detect_format(spec)
    try:
        with fsspec.open(spec.path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise InputError(f"{spec.path}: input file not found") from None
    path = spec.path
    yield from {
        "csv": lambda: _rows_delimited(path, data, _dialect(fmt, spec)),
        "tsv": lambda: _rows_delimited(path, data, _dialect(fmt, spec)),
        "json": lambda: _rows_json(path, data),
        "jsonl": lambda: _rows_jsonl(path, data),
        "txt": lambda: _rows_txt(data, spec.url_col),
        "parquet": lambda: _rows_parquet(path, data),
    }[fmt]()


def _as_str(value) -> tuple[str, bool] | None:
    """The value as text and whether it had bad UTF-8; None for a value that is not text."""
    if value is None:
        return "", False
    if isinstance(value, bytes):
        return _text(value)
    if isinstance(value, str):
        return value, False
    if isinstance(value, int | float):
        return str(value), False
    return None


def _check_columns(spec: InputSpec, row: dict, caption_col: str | None) -> None:
    """The first row's columns (a header's, for csv, tsv and parquet) against the settings: a
    missing column there is a setting to fix, not a bad row."""
    for col, setting in ((spec.url_col, "url_col"), (caption_col, "caption_col")):
        if col and col not in row:
            raise InputError(f"{spec.path}: no column {col!r} (input.{setting}); columns: {sorted(row)}")


def _read_row(spec: InputSpec, caption_col: str | None, where: str, row: dict, bad_utf8: bool) -> dict | BadRow:
    """uid, url, caption, input_note and the kept extra columns of one row."""
    if spec.url_col not in row:
        return BadRow(where, "no_url_column",
                      f"{spec.path}: {where}: no column {spec.url_col!r} (input.url_col); columns: {sorted(row)}")
    url, caption = row[spec.url_col], row.get(caption_col) if caption_col else None
    url_text, caption_text = _as_str(url), _as_str(caption)
    if url_text is None or caption_text is None:
        what, value = ("url", url) if url_text is None else ("caption", caption)
        return BadRow(where, f"{what}_not_text", f"{spec.path}: {where}: {what} is {type(value).__name__}, expected text")
    (url, bad_u), (caption, bad_c) = url_text, caption_text
    notes = []
    if bad_utf8 or bad_u or bad_c:
        notes.append("caption_not_utf8" if (bad_c or bad_utf8) else "url_not_utf8")
    uid = make_uid(url, caption)
    if len(caption) > spec.max_caption_chars:
        notes.append("caption_truncated")
        caption = caption[: spec.max_caption_chars]
    extras = {k: v for k, v in row.items() if k not in (spec.url_col, caption_col) and k not in BASE_COLUMNS
              and (spec.save_additional_columns is None or k in spec.save_additional_columns)}
    return {"uid": uid, "url": url.strip(), "caption": caption, "input_note": ",".join(notes) or None, **extras}


def _bad_row(spec: InputSpec, bad: BadRow, skipped: list[BadRow] | None) -> None:
    if spec.on_bad_row == "fail":
        raise InputError(bad.detail)
    if skipped is not None:
        skipped.append(bad)


def plan_rows(spec: InputSpec, skipped: list[BadRow] | None = None) -> Iterator[dict]:
    """Input rows with uid, dup_of and input_note, in file order (keys are added per shard); bad
    rows stop the plan, or with ``on_bad_row: skip`` go to ``skipped``."""
    caption_col = None if detect_format(spec) == "txt" else spec.caption_col
    first_seen: dict[bytes, str] = {}
    repeats: dict[bytes, int] = {}
    header_checked = False
    for item in read_rows(spec):
        if not isinstance(item, BadRow):
            if not header_checked:
                _check_columns(spec, item[1], caption_col)
                header_checked = True
            item = _read_row(spec, caption_col, *item)
        if isinstance(item, BadRow):
            _bad_row(spec, item, skipped)
            continue
        digest = bytes.fromhex(item["uid"])
        item["dup_of"] = None
        if digest in first_seen:
            repeats[digest] = repeats.get(digest, 0) + 1
            item["dup_of"] = first_seen[digest]
            item["uid"] = repeat_uid(item["uid"], repeats[digest])
        else:
            first_seen[digest] = item["uid"]
        yield item


def key_width(samples_per_shard: int) -> int:
    return max(1, math.ceil(math.log10(samples_per_shard))) if samples_per_shard > 1 else 1


def plan_shards(spec: InputSpec, samples_per_shard: int, skipped: list[BadRow] | None = None) -> Iterator[pa.Table]:
    """Input shards of ``samples_per_shard`` rows in file order, each with img2dataset-style keys;
    rows skipped by ``on_bad_row: skip`` are appended to ``skipped``."""
    width = key_width(samples_per_shard)
    batch: list[dict] = []
    shard = 0

    def flush() -> pa.Table:
        for i, r in enumerate(batch):
            r["key"] = f"{shard:05d}{i:0{width}d}"
        cols = list(BASE_COLUMNS) + sorted({c for r in batch for c in r} - set(BASE_COLUMNS))
        return pa.table({c: _column([r.get(c) for r in batch], c in BASE_COLUMNS) for c in cols})

    for row in plan_rows(spec, skipped):
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


def _fingerprinted_settings(spec: InputSpec, has_quote: bool) -> dict:
    """Settings added after datasets were first cut count only where they change the rows read,
    so that those datasets are not rebuilt for nothing."""
    settings = spec.model_dump(mode="json", exclude={"path", "kind", "on_bad_row", "tsv_quoting"})
    if spec.on_bad_row == "skip":
        settings["on_bad_row"] = "skip"
    # TSV quotes used to be parsed as in CSV (what tsv_quoting: csv does); only a TSV with a quote
    # in it can read differently as text.
    if has_quote and spec.tsv_quoting == "none" and detect_format(spec) == "tsv":
        settings["tsv_quoting"] = "none"
    return settings


def input_fingerprint(spec: InputSpec, samples_per_shard: int) -> str:
    """Changes when the input bytes or how they are read and cut change."""
    h = hashlib.sha256()
    has_quote = False
    with fsspec.open(spec.path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            has_quote = has_quote or b'"' in chunk
    h.update(json.dumps({"spec": _fingerprinted_settings(spec, has_quote), "sps": samples_per_shard}, sort_keys=True).encode())
    return h.hexdigest()[:16]
