"""The ``webdataset`` source: curate webdataset tars you already have (img2dataset's output,
DataComp's shards, your own), read in place, never downloaded again.

``input.kind: webdataset``; ``input.paths`` is a list, glob or brace pattern of tar paths or fsspec
URLs (``s3://bucket/{00000..01023}.tar``). One input shard per tar. The plan reads each tar's member
list and its json/txt members (the images only for samples with neither uid nor URL), plus
img2dataset's Parquet beside the tar (same name, ``.parquet``) when there is one; ``process`` reads
each image member at its recorded offset, bounded by its size, and checks that Pillow reads it whole.

A sample's uid:

1. the source's own uid: a ``uid`` field of its json, or of the Parquet beside the tar (DataComp's);
2. else ``make_uid(url, caption)`` when it has a URL: the uid a download of that URL and caption
   gives, so the same sample has the same uid whether recap or img2dataset downloaded it;
3. else a hash of (tar path, key, image bytes); (tar path, key) for a sample dropped before its
   image is read.

A uid seen earlier in the input gets a repeat uid and is dropped as ``duplicate_input``, as repeated
rows of a URL list are.

By default the dataset references each tar in place (the engine records its size and checks it on
every read). ``webdataset: {copy: true}`` writes ``shards/NNNNN.tar`` instead. A tar that cannot be
read back in place exactly as it was checked is copied whatever the setting, and its
``shards/NNNNN_stats.json`` says why: a compressed or damaged tar, a member over
``max_member_bytes``, or member names that do not split at their first dot into the sample's key
and extension.

Ledger reasons: ``unsafe_path`` (a ``..`` component or an absolute name), ``link_member`` (symbolic
or hard link: never followed), ``special_member`` (device, fifo), ``duplicate_key`` (a key met
earlier in the tar, or two members of one name), ``bad_key`` (a dot in a directory of the name),
``member_too_large``, ``truncated``, ``bad_json``, ``no_image``, ``no_caption``, the image check's
``decode_error``, ``not_an_image`` and ``decompression_bomb``, and ``duplicate_input``. A file that
holds no sample (not a tar, an unsupported compression, an empty tar) and the unreadable rest of a
damaged tar are reported as skipped input (``input/_skipped.jsonl``).
"""
from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import re
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any, Literal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator

from recap.pipeline.inputs import InputError
from recap.pipeline.stage import IMAGE_COLUMN, SourceStage, StageConfig
from recap.pipeline.uid import make_uid
from recap.pipeline.verdicts import CONTROL_COLUMNS, DROP, control, verdicts
from recap.stages.source_files import (SUCCESS, InputFile, StatusIndex, UniqueUids, check_image, clip, content_uid, expand_paths,
                                       free_name, mixed_column, text_of)

FAILED = "failed"
# webdataset's split of a member name into the sample's key and the member's extension
_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
_OPENERS: dict[str, Callable[[IO[bytes]], IO[bytes]]] = {
    "gzip": lambda f: gzip.GzipFile(fileobj=f, mode="rb"),
    "bz2": lambda f: bz2.BZ2File(f, mode="rb"),
    "xz": lambda f: lzma.LZMAFile(f, mode="rb"),
}
_READ_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError)
# what the plan carries for process and leaves out of the index
_INTERNAL = ("_src_offset", "_src_size", "_src_tar_size", "_src_compression", "_src_copy", "_src_drop",
             "_src_detail", "_src_note")
_OUTPUT = ("key", "source_key", "member", "tar", "url", "caption", "status", "error_message", "width", "height",
           "original_width", "original_height", "sha256", IMAGE_COLUMN)
_RESERVED = frozenset(("uid", *_OUTPUT, *_INTERNAL, *CONTROL_COLUMNS))
# metadata fields that become the source's own columns rather than extra ones
_CONSUMED = frozenset(("uid", "key", "url", "status", "error_message", "width", "height",
                       "original_width", "original_height"))


class WebDatasetInput(BaseModel):
    """The job's ``input:`` for existing webdataset tars."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["webdataset"] = "webdataset"
    paths: str | list[str] = Field(..., description="tar paths or fsspec URLs: a list, a glob or a brace pattern")
    image_extensions: list[str] = Field(["jpg", "jpeg", "png", "webp"], min_length=1,
                                        description="the image member: the first of these a sample has")
    caption_field: str | None = Field(None, description="None: the .txt member (without one, the json's caption); "
                                                        "a name: that field of the sample's json (or of the "
                                                        "Parquet beside the tar)")
    metadata_parquet: bool = Field(True, description="read img2dataset's Parquet beside each tar when there is one")

    @field_validator("image_extensions")
    @classmethod
    def _lower(cls, v: list[str]) -> list[str]:
        return [e.lower().lstrip(".") for e in v]


class WebDatasetConfig(StageConfig):
    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)
    copy_shards: bool = Field(False, alias="copy",
                              description="write shards/NNNNN.tar instead of referencing each tar in place")
    max_member_bytes: int = Field(64 << 20, ge=1, description="larger image/json/txt members are dropped unread")
    max_image_pixels: int = Field(89_478_485, gt=0, description="larger images are decompression bombs")
    plan_threads: int = Field(8, ge=1, description="tars whose member lists are read at once while planning")


class TarChanged(RuntimeError):
    """A tar changed between the plan and the read: its samples are no longer the planned ones."""


# -- scanning a tar ---------------------------------------------------------------------------------

@dataclass
class _Member:
    name: str
    ext: str
    kind: Literal["file", "link", "special"]
    offset: int
    size: int
    data: bytes | None = None  # json and txt members, read while scanning


@dataclass
class _Sample:
    source_key: str
    key: str
    members: list[_Member] = field(default_factory=list)
    problem: tuple[str, str] | None = None

    def files(self) -> dict[str, _Member]:
        return {m.ext.lower(): m for m in self.members if m.kind == "file"}


@dataclass
class _Scan:
    file: InputFile
    compression: str | None = None
    samples: list[_Sample] = field(default_factory=list)
    damage: str | None = None  # why the tar could not be read to its end
    damage_at: int | None = None
    split_names: Counter = field(default_factory=Counter)  # (key, ext) as a first-dot split gives, regular files
    largest: int = 0
    unusable: tuple[str, str] | None = None  # the file holds no tar: (reason, detail)


def _compression(head: bytes) -> str | None:
    return next((name for magic, name in _MAGIC.items() if head.startswith(magic)), None)


_SEPARATOR = re.compile(r"[/\\]")
_DRIVE = re.compile(r"^[A-Za-z]:")


def _unsafe(name: str) -> bool:
    return name.startswith(("/", "\\")) or ".." in _SEPARATOR.split(name) or _DRIVE.match(name) is not None


def _normal_key(source_key: str) -> str:
    # `tar -C dir -cf x.tar .` prefixes every name with ./ ; the key is the same sample without it
    while source_key.startswith("./"):
        source_key = source_key[2:]
    return source_key


def _open_stream(raw: IO[bytes], compression: str | None) -> IO[bytes]:
    return _OPENERS[compression](raw) if compression else raw


# Reading the headers ourselves rather than through tarfile: the plan reads every header of every
# tar on the driver before any shard starts, and tarfile's pure-Python TarInfo costs several times
# what a sample's header is worth. The format is small: 512-byte headers, POSIX ustar with its
# prefix, GNU long names, pax records.
_BLOCK = 512
_KINDS = {b"0": "file", b"\0": "file", b"7": "file", b"1": "link", b"2": "link", b"5": "dir"}
_META_TYPES = {b"L", b"K", b"x", b"g"}  # GNU long name/link, pax extended/global header
_NO_DATA = {b"1", b"2", b"3", b"4", b"5", b"6"}


class _NotATar(Exception):
    pass


class _Damaged(Exception):
    def __init__(self, offset: int, why: str):
        super().__init__(why)
        self.offset, self.why = offset, why


@dataclass(frozen=True)
class _Header:
    name: str
    kind: Literal["file", "link", "special", "dir"]
    offset: int  # of the data
    size: int


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes over 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _valid(buf: bytes) -> bool:
    stored = _octal(buf[148:156])
    unsigned = sum(buf[:148]) + 256 + sum(buf[156:])
    return stored == unsigned or stored == unsigned - 256 * sum(1 for b in buf if b >= 128)


def _pax(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        length = int(data[pos:data.index(b" ", pos)])
        key, _, value = data[data.index(b" ", pos) + 1: pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _read_exact(stream: IO[bytes], offset: int, size: int) -> bytes:
    try:
        stream.seek(offset)
        data = stream.read(size)
    except _READ_ERRORS as e:
        raise _Damaged(offset, f"{type(e).__name__}: {e}") from None
    if len(data) != size:
        raise _Damaged(offset, f"{len(data)} of {size} bytes at byte {offset}: the file ends first")
    return data


def tar_headers(stream: IO[bytes], file_size: int | None) -> Iterator[_Header]:
    """Every member header, in order. ``_NotATar`` when the first block is no tar header;
    ``_Damaged`` at the first header or data that cannot be read (after yielding the member
    whose data is cut, so that its sample is known)."""
    offset, name, pax_size = 0, None, None
    while True:
        try:
            stream.seek(offset)
            buf = stream.read(_BLOCK)
        except _READ_ERRORS as e:
            if offset == 0:
                raise _NotATar(f"{type(e).__name__}: {e}") from None
            raise _Damaged(offset, f"{type(e).__name__}: {e}") from None
        if len(buf) < _BLOCK:
            if offset == 0:
                raise _NotATar("empty file" if not buf else "shorter than one tar header")
            raise _Damaged(offset, "it ends without the end-of-archive blocks (cut between two members?)" if not buf
                           else f"a member header cut short at byte {offset}")
        if buf.count(0) == _BLOCK:
            return
        try:
            ok, size, kind = _valid(buf), _octal(buf[124:136]), buf[156:157]
        except ValueError:
            ok = False
        if not ok:
            if offset == 0:
                raise _NotATar("the first block is not a tar header")
            raise _Damaged(offset, f"unreadable member header at byte {offset}")
        data = offset + _BLOCK
        if kind in _META_TYPES:
            meta = _read_exact(stream, data, size) if size <= 1 << 20 else b""
            try:
                if kind == b"L":
                    name = _text(meta)
                elif kind == b"x":
                    records = _pax(meta)
                    name = records.get("path", name)
                    pax_size = int(records["size"]) if "size" in records else pax_size
            except ValueError:
                raise _Damaged(offset, f"unreadable extended header at byte {offset}") from None
            offset = data + -(-size // _BLOCK) * _BLOCK
            continue
        if name is None:
            name = _text(buf[0:100])
            if buf[257:263] == b"ustar\0" and buf[345:500].strip(b"\0"):
                name = _text(buf[345:500]) + "/" + name
        size = pax_size if pax_size is not None else size
        member_kind = _KINDS.get(kind, "special")
        # as tarfile: links, devices, directories and fifos have no data, whatever the size field says
        has_data = member_kind == "file" or kind not in _NO_DATA
        yield _Header(name.rstrip("/") if member_kind == "dir" else name, member_kind, data,
                      size if member_kind == "file" else 0)
        if has_data and file_size is not None and data + size > file_size:
            raise _Damaged(data, f"{name!r} runs past the end of the file")
        offset = data + (-(-size // _BLOCK) * _BLOCK if has_data else 0)
        name, pax_size = None, None


class _Scanner:
    """One pass over a tar's headers: members grouped into samples as webdataset groups them
    (consecutive members of one key), json and txt members read, nothing else."""

    def __init__(self, scan: _Scan, spec: WebDatasetInput, cfg: WebDatasetConfig):
        self.scan, self.spec, self.cfg = scan, spec, cfg
        self.seen: set[str] = set()
        self.current: _Sample | None = None
        self.read_exts = {"json", "txt"}

    def run(self, stream: IO[bytes]) -> None:
        size = self.scan.file.size if self.scan.compression is None else None
        try:
            for header in tar_headers(stream, size):
                self._member(stream, header)
        except _Damaged as e:
            self.scan.damage, self.scan.damage_at = e.why, e.offset
            if self.current is not None:
                self.current.problem = ("truncated", f"the tar is damaged at byte {e.offset}: {e.why}")
        self._close()

    def _member(self, stream: IO[bytes], header: _Header) -> None:
        if header.kind == "dir":
            return
        match = _NAME.match(header.name)
        if match is None:  # no extension: part of no sample (webdataset skips it too)
            return
        source_key, ext = match.groups()
        if self.current is None or source_key != self.current.source_key:
            self._close()
            self.current = _Sample(source_key, _normal_key(source_key))
        sample = self.current
        member = _Member(header.name, ext, header.kind, header.offset, header.size)
        sample.members.append(member)  # before any read: a truncated member still belongs to its sample
        if header.kind != "file":
            return
        self.scan.split_names[tuple(header.name.partition(".")[::2])] += 1
        self.scan.largest = max(self.scan.largest, header.size)
        lower = ext.lower()
        if sample.problem is None and sum(m.kind == "file" and m.ext.lower() == lower for m in sample.members) > 1:
            sample.problem = ("duplicate_key", f"two members {header.name!r} in one sample")
        if lower in self.read_exts and header.size <= self.cfg.max_member_bytes:
            member.data = _read_exact(stream, header.offset, header.size)

    def _close(self) -> None:
        sample, self.current = self.current, None
        if sample is None:
            return
        if sample.key in self.seen and sample.problem is None:
            sample.problem = ("duplicate_key", f"key {sample.key!r} met earlier in the tar "
                                               f"(a sample's members must be consecutive)")
        self.seen.add(sample.key)
        self.scan.samples.append(sample)


def _scan(raw: IO[bytes], file: InputFile, spec: WebDatasetInput, cfg: WebDatasetConfig
          ) -> tuple[_Scan, IO[bytes] | None]:
    """The tar's samples, and the (decompressed) stream they were read from."""
    scan = _Scan(file)
    scan.compression = _compression(raw.read(6))
    raw.seek(0)
    if scan.compression == "zstd":
        scan.unusable = ("unsupported_compression", f"{file.url}: zstd-compressed; decompress it first")
        return scan, None
    stream = _open_stream(raw, scan.compression)
    try:
        _Scanner(scan, spec, cfg).run(stream)
    except _NotATar as e:
        what = f"{scan.compression}-compressed, and inside not" if scan.compression else "not"
        scan.unusable = ("not_a_tar", f"{file.url}: {what} a tar archive ({e})")
        return scan, None
    if not scan.samples and scan.damage is None:
        scan.unusable = ("empty_tar", f"{file.url}: a tar with no sample in it")
    return scan, stream


def scan_tar(file: InputFile, spec: WebDatasetInput, cfg: WebDatasetConfig) -> _Scan:
    with fsspec.open(file.url, "rb") as raw:
        return _scan(raw, file, spec, cfg)[0]


# -- samples -> rows --------------------------------------------------------------------------------

def _parquet_beside(file: InputFile) -> dict[str, dict]:
    """key -> row of img2dataset's Parquet beside the tar, when there is one."""
    base = re.sub(r"\.tar(\.gz|\.bz2|\.xz)?$", "", file.url)
    path = base + ".parquet"
    if path == file.url:
        return {}
    fs, p = fsspec.core.url_to_fs(path)
    if not fs.exists(p):
        return {}
    try:
        with fs.open(p, "rb") as f:
            table = pq.read_table(f)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: the Parquet beside {file.url} is unreadable: {e}") from None
    if "key" not in table.column_names:
        return {}
    return {str(r["key"]): r for r in table.to_pylist() if r["key"] is not None}


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None and not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None


@dataclass
class _Row:
    base_uid: str
    key: str
    source_key: str
    member: str | None
    offset: int | None
    size: int | None
    url: str | None
    caption: str | None
    meta: dict
    drop: tuple[str, str] | None = None
    note: str | None = None


class _Rows:
    """A scanned tar's samples as input rows: uid, caption and metadata, and what is wrong."""

    def __init__(self, scan: _Scan, spec: WebDatasetInput, cfg: WebDatasetConfig, side: dict[str, dict],
                 stream: IO[bytes] | None):
        self.scan, self.spec, self.cfg, self.side, self.stream = scan, spec, cfg, side, stream

    def rows(self) -> list[_Row]:
        out = [self._row(s) for s in self.scan.samples]
        if self.scan.damage is not None:
            out += self._lost(seen={s.source_key for s in self.scan.samples} | {s.key for s in self.scan.samples})
        return out

    def _row(self, sample: _Sample) -> _Row:
        files = sample.files()
        meta, bad_json = self._meta(sample, files.get("json"))
        caption, note = self._caption(files.get("txt"), meta)
        image = next((files[e] for e in self.spec.image_extensions if e in files), None)
        url = meta.get("url") if isinstance(meta.get("url"), str) else None
        problem = self._problem(sample, files, image, caption, bad_json)
        uid = self._uid(meta, url, caption, sample, image if problem is None else None)
        # the uid from the URL as given, the column stripped: what a download of it records
        return _Row(uid, sample.key, sample.source_key, image.ext if image else None,
                    image.offset if image else None, image.size if image else None,
                    url.strip() if url is not None else None, caption, meta, problem, note)

    def _problem(self, sample: _Sample, files: dict[str, _Member], image: _Member | None, caption: str | None,
                 bad_json: str | None) -> tuple[str, str] | None:
        unsafe = next((m.name for m in sample.members if _unsafe(m.name)), None)
        if unsafe is not None:
            return "unsafe_path", f"member {unsafe!r} leaves the archive's directory"
        link = next((m.name for m in sample.members if m.kind == "link"), None)
        if link is not None:
            return "link_member", f"member {link!r} is a link (never followed)"
        special = next((m.name for m in sample.members if m.kind == "special"), None)
        if special is not None:
            return "special_member", f"member {special!r} is not a regular file"
        if sample.problem is not None:  # found while scanning: a repeated key, the damage
            return sample.problem
        limit = self.cfg.max_member_bytes
        big = next((m for m in (image, files.get("json"), files.get("txt")) if m and m.size > limit), None)
        if big is not None:
            return "member_too_large", f"{big.name!r}: {big.size} bytes > max_member_bytes {self.cfg.max_member_bytes}"
        if bad_json is not None:
            return "bad_json", bad_json
        if image is None:
            return "no_image", f"no {'/'.join(self.spec.image_extensions)} member (has: {sorted(files) or 'none'})"
        if caption is None:
            where = f"field {self.spec.caption_field!r}" if self.spec.caption_field else ".txt member"
            return "no_caption", f"no {where}"
        if not sample.key or "." in sample.key:
            return "bad_key", f"key {sample.key!r}: a dot in a directory of the name (or no key at all)"
        return None

    def _meta(self, sample: _Sample, member: _Member | None) -> tuple[dict, str | None]:
        meta: dict = {}
        bad = None
        if member is not None and member.data is not None:
            try:
                parsed = json.loads(text_of(member.data)[0])
                if isinstance(parsed, dict):
                    meta = parsed
                else:
                    bad = f"{member.name!r}: a JSON {type(parsed).__name__}, not an object"
            except json.JSONDecodeError as e:
                bad = f"{member.name!r}: not valid JSON ({e.msg} at line {e.lineno})"
        for k, v in self.side.get(sample.source_key, self.side.get(sample.key, {})).items():
            meta.setdefault(k, v)
        return meta, bad

    def _caption(self, txt: _Member | None, meta: dict) -> tuple[str | None, str | None]:
        if self.spec.caption_field is None and txt is not None and txt.data is not None:
            text, bad = text_of(txt.data)
            return text, "caption_not_utf8" if bad else None
        value = meta.get(self.spec.caption_field or "caption")  # without a .txt: the json's caption
        if value is None or isinstance(value, str):
            return value, None
        return json.dumps(value, default=str) if not isinstance(value, int | float) else str(value), None

    def _uid(self, meta: dict, url: str | None, caption: str | None, sample: _Sample, image: _Member | None) -> str:
        if meta.get("uid") is not None:
            return str(meta["uid"])
        if url is not None:
            return make_uid(url, caption)
        data = self._read(image) if image is not None else None
        return content_uid(self.scan.file.url, sample.key, data) if data is not None \
            else content_uid(self.scan.file.url, sample.key)

    def _read(self, member: _Member) -> bytes | None:
        if self.stream is None:
            return None
        try:
            self.stream.seek(member.offset)
            data = self.stream.read(member.size)
        except _READ_ERRORS:
            return None
        return data if len(data) == member.size else None

    def _lost(self, seen: set[str]) -> list[_Row]:
        """Samples the Parquet beside a damaged tar lists as written, not found before the damage."""
        out = []
        for key, meta in self.side.items():
            if key in seen or meta.get("status", SUCCESS) != SUCCESS:
                continue
            url = meta.get("url") if isinstance(meta.get("url"), str) else None
            caption = meta.get(self.spec.caption_field or "caption")
            caption = caption if isinstance(caption, str) else None
            uid = str(meta["uid"]) if meta.get("uid") is not None else make_uid(url, caption) if url \
                else content_uid(self.scan.file.url, key)
            out.append(_Row(uid, key, key, None, None, None, url, caption, dict(meta),
                            ("truncated", f"listed in the Parquet beside the tar, after the damage at byte "
                                          f"{self.scan.damage_at}: {self.scan.damage}")))
        return out


def _copy_reason(scan: _Scan, rows: list[_Row], cfg: WebDatasetConfig) -> str | None:
    """Why the dataset cannot read this tar in place and get exactly the checked members back, or
    None. In place, a later stage finds a sample's image by splitting member names at the first
    dot and reading the whole tar uncompressed."""
    if scan.compression:
        return f"{scan.compression}-compressed"
    if scan.damage is not None:
        return f"damaged at byte {scan.damage_at}: {scan.damage}"
    if scan.largest > cfg.max_member_bytes:
        return f"a member of {scan.largest} bytes > max_member_bytes"
    for r in rows:
        if r.drop is None and (r.key != r.source_key or scan.split_names[(r.key, r.member)] != 1):
            return f"member names a first-dot split does not give back unambiguously (sample {r.source_key!r})"
    return None


def read_tar_rows(file: InputFile, spec: WebDatasetInput, cfg: WebDatasetConfig
                  ) -> tuple[_Scan, list[_Row], str | None]:
    """(the scan, its rows, why it must be copied) for one tar, in one pass over it (and a
    second over the images of samples whose uid is their content)."""
    side = _parquet_beside(file) if spec.metadata_parquet else {}
    with fsspec.open(file.url, "rb") as raw:
        scan, stream = _scan(raw, file, spec, cfg)
        if scan.unusable is not None:
            return scan, [], None
        rows = _Rows(scan, spec, cfg, side, stream).rows()
    return scan, rows, _copy_reason(scan, rows, cfg)


# -- the table --------------------------------------------------------------------------------------

def _meta_columns(rows: list[_Row], spec: WebDatasetInput) -> dict[str, pa.Array]:
    consumed = _CONSUMED | {spec.caption_field or "caption"}
    names: list[str] = []
    for r in rows:
        names += [k for k in r.meta if k not in consumed and k not in names]
    out: dict[str, pa.Array] = {}
    for name in names:
        out[free_name(name, _RESERVED | set(out))] = mixed_column([r.meta.get(name) for r in rows])
    return out


def shard_table(scan: _Scan, rows: list[_Row], copy_reason: str | None, spec: WebDatasetInput) -> pa.Table:
    n = len(rows)
    s = pa.string()
    cols: dict[str, pa.Array] = {
        "uid": pa.array([r.base_uid for r in rows], s),
        "key": pa.array([r.key for r in rows], s),
        "source_key": pa.array([r.source_key for r in rows], s),
        "member": pa.array([r.member for r in rows], s),
        "tar": pa.array([scan.file.url] * n, s),
        "url": pa.array([r.url for r in rows], s),
        "caption": pa.array([r.caption for r in rows], s),
        "original_width": pa.array([_int(r.meta.get("original_width")) for r in rows], pa.int32()),
        "original_height": pa.array([_int(r.meta.get("original_height")) for r in rows], pa.int32()),
        "_src_offset": pa.array([r.offset for r in rows], pa.int64()),
        "_src_size": pa.array([r.size for r in rows], pa.int64()),
        "_src_tar_size": pa.array([scan.file.size] * n, pa.int64()),
        "_src_compression": pa.array([scan.compression] * n, s),
        "_src_copy": pa.array([copy_reason] * n, s),
        "_src_drop": pa.array([r.drop[0] if r.drop else None for r in rows], s),
        "_src_detail": pa.array([clip(r.drop[1]) if r.drop else None for r in rows], s),
        "_src_note": pa.array([r.note for r in rows], s),
    }
    return pa.table({**cols, **_meta_columns(rows, spec)})


def _ordered(fn: Callable, items: list, threads: int) -> Iterator:
    """fn over items on a few threads, results in item order, a bounded number ahead."""
    with ThreadPoolExecutor(threads) as pool:
        window: deque = deque()
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) > 2 * threads:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def _skipped(scan: _Scan, rows: int) -> dict | None:
    if scan.unusable is not None:
        return {"location": scan.file.url, "reason": scan.unusable[0], "detail": scan.unusable[1]}
    if scan.damage is not None:
        return {"location": f"{scan.file.url} byte {scan.damage_at}", "reason": "truncated_tar",
                "detail": clip(f"{scan.file.url}: damaged at byte {scan.damage_at} ({scan.damage}); {rows} samples "
                               f"read before it, the rest of the tar is unreadable")}
    return None


# -- the stage --------------------------------------------------------------------------------------

class WebDatasetSource(StatusIndex, SourceStage):
    name = "webdataset_tars"  # the package's name is not free: the manifest records its version
    input_kind = "webdataset"
    InputConfig = WebDatasetInput
    Config = WebDatasetConfig
    origin_column = "url"
    member_column = "member"
    default_batch_size = 1 << 30  # one call per tar: one pass over it
    hash_exclude = frozenset({"plan_threads"})

    def __init__(self, config, context):
        super().__init__(config, context)
        self._skipped: list[dict] = []
        self._stored: str = "reference"

    @classmethod
    def section(cls) -> str:
        return "webdataset"

    def writes(self) -> tuple[str, ...]:
        return _OUTPUT

    # -- plan ----------------------------------------------------------------------------------
    def input_fingerprint(self, spec: WebDatasetInput) -> str:
        # The tars' names, not their bytes: reading every tar on each run would cost a full pass.
        # A tar that changes afterwards is caught by its size, when read (TarChanged, or the
        # engine's check of a referenced tar).
        files = [f.url for f in expand_paths(spec.paths)]
        payload = {"files": files, "input": spec.model_dump(mode="json", exclude={"paths"}),
                   "max_member_bytes": self.config.max_member_bytes}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def plan(self, spec: WebDatasetInput) -> Iterator[pa.Table]:
        self._skipped = []
        files = expand_paths(spec.paths)
        uids = UniqueUids()
        scans = _ordered(lambda f: read_tar_rows(f, spec, self.config), files, self.config.plan_threads)
        for scan, rows, copy_reason in scans:
            skipped = _skipped(scan, sum(1 for s in scan.samples if s.problem is None or s.problem[0] != "truncated"))
            if skipped is not None:
                self._skipped.append(skipped)
            if not rows:
                continue
            yield shard_table(scan, _unique(rows, uids), copy_reason, spec)

    def skipped_rows(self) -> list[dict]:
        return list(self._skipped)

    # -- process -------------------------------------------------------------------------------
    def process(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        drops = batch.column("_src_drop").to_pylist()
        details = batch.column("_src_detail").to_pylist()
        images: list[bytes | None] = [None] * n
        sizes: list[tuple[int | None, int | None]] = [(None, None)] * n
        for i, data, reason, detail in self._read_images(batch, drops):
            if reason is None:
                check = check_image(data, self.config.max_image_pixels)
                reason, detail, sizes[i] = check.reason, check.detail, (check.width, check.height)
            if reason is None:
                images[i] = data
            else:
                drops[i], details[i], sizes[i] = reason, detail, (None, None)
        return self._table(batch, images, sizes, drops, details)

    def _read_images(self, batch: pa.Table, drops: list) -> Iterator[tuple[int, bytes | None, str | None, str | None]]:
        """(row, bytes, reason, detail) for each row still to be read, tar by tar, in offset order."""
        tars = batch.column("tar").to_pylist()
        offsets = batch.column("_src_offset").to_pylist()
        sizes = batch.column("_src_size").to_pylist()
        planned = batch.column("_src_tar_size").to_pylist()
        compression = batch.column("_src_compression").to_pylist()
        todo = sorted((tars[i], offsets[i], i) for i in range(batch.num_rows) if drops[i] is None)
        for url in dict.fromkeys(t for t, _, _ in todo):
            rows = [i for t, _, i in todo if t == url]
            fs, path = fsspec.core.url_to_fs(url)
            size = int(fs.info(path)["size"])
            with fs.open(path, "rb") as raw:
                if size != planned[rows[0]]:
                    raise TarChanged(f"{url}: changed since the input was planned ({size} bytes, "
                                     f"{planned[rows[0]]} then): restore it, or run again with --overwrite")
                stream = _open_stream(raw, compression[rows[0]])
                for i in rows:
                    yield (i, *_read_member(stream, offsets[i], sizes[i]))

    def _table(self, batch: pa.Table, images: list, sizes: list, drops: list, details: list) -> pa.Table:
        ok = [d is None for d in drops]
        ow = [w if w is not None else s[0] for w, s in zip(batch.column("original_width").to_pylist(), sizes)]
        oh = [h if h is not None else s[1] for h, s in zip(batch.column("original_height").to_pylist(), sizes)]
        passed = ("key", "source_key", "member", "tar", "url", "caption")
        cols: dict[str, Any] = {name: batch.column(name) for name in passed}
        cols.update({
            "status": pa.array([SUCCESS if k else FAILED for k in ok], pa.string()),
            "error_message": pa.array(_messages(ok, drops, details), pa.string()),
            "width": pa.array([s[0] for s in sizes], pa.int32()),
            "height": pa.array([s[1] for s in sizes], pa.int32()),
            "original_width": pa.array([w if k else None for w, k in zip(ow, ok)], pa.int32()),
            "original_height": pa.array([h if k else None for h, k in zip(oh, ok)], pa.int32()),
            "sha256": pa.array([hashlib.sha256(b).hexdigest() if b is not None else None for b in images], pa.string()),
            IMAGE_COLUMN: pa.array(images, pa.binary()),
        })
        for name in batch.column_names:
            if name not in cols and name not in _INTERNAL and name != "uid":
                cols[name] = batch.column(name)
        notes = batch.column("_src_note").to_pylist()
        return verdicts(batch.column("uid"), cols, drop=drops, detail=[clip(d) for d in details],
                        note=[nt if k else None for nt, k in zip(notes, ok)])

    def source_tar(self, batch: pa.Table) -> str | None:
        copy_reason = batch.column("_src_copy")[0].as_py() if batch.num_rows else "empty"
        if self.config.copy_shards or copy_reason is not None:
            self._stored = "copy" + (f" ({copy_reason})" if copy_reason else "")
            return None
        self._stored = "reference"
        return batch.column("tar")[0].as_py()

    def shard_stats(self, out: pa.Table, duration: float) -> dict:
        reasons = Counter(r if r is not None else SUCCESS for r in control(out, DROP).to_pylist())
        tars = sorted(set(out.column("tar").to_pylist())) if out.num_rows else []
        return {"count": out.num_rows, "successes": reasons[SUCCESS], "failed": out.num_rows - reasons[SUCCESS],
                "duration": duration, "status_dict": dict(sorted(reasons.items())), "tar": tars[0] if tars else None,
                "stored": self._stored}


def _messages(ok: list[bool], drops: list, details: list) -> list[str | None]:
    return [None if k else clip(f"{r}: {d}" if d else r) for k, r, d in zip(ok, drops, details)]


def _read_member(stream: IO[bytes], offset: int, size: int) -> tuple[bytes | None, str | None, str | None]:
    """A member's bytes, read to its recorded size and no further."""
    try:
        stream.seek(offset)
        data = stream.read(size)
    except _READ_ERRORS as e:
        return None, "truncated", clip(f"reading {size} bytes at byte {offset}: {type(e).__name__}: {e}")
    if len(data) != size:
        return None, "truncated", f"{len(data)} of {size} bytes at byte {offset}: the tar ends first"
    return data, None, None


def _unique(rows: list[_Row], uids: UniqueUids) -> list[_Row]:
    for r in rows:
        uid, first = uids.add(r.base_uid)
        r.base_uid = uid
        if first is not None and r.drop is None:
            r.drop = ("duplicate_input", first)
    return rows


__all__ = ("WebDatasetSource", "WebDatasetInput", "WebDatasetConfig", "TarChanged", "scan_tar")
