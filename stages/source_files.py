"""What source stages share (not a stage itself): img2dataset's ``status`` column as the index's
kept mark (every source, downloads included), and for the sources that read existing files in
place, the input's paths (lists, globs and brace patterns over any fsspec filesystem), the image
check, uids that stay unique when a sample repeats, and columns built from values of mixed types."""
from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
from braceexpand import braceexpand
from PIL import Image, UnidentifiedImageError

from recap.pipeline.imaging import WEB_FORMATS, sniff
from recap.pipeline.inputs import InputError
from recap.pipeline.uid import repeat_uid

DETAIL_MAX = 500
SUCCESS = "success"  # img2dataset's status of a sample that stays


class StatusIndex:
    """For a source whose index marks the samples that stay with ``status == "success"``."""

    @classmethod
    def kept(cls, index: pa.Table) -> pa.Array:
        return pc.fill_null(pc.equal(index.column("status"), SUCCESS), False)


_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class InputFile:
    url: str  # an absolute local path, or a URL with its protocol
    size: int


def expand_paths(paths: str | list[str]) -> list[InputFile]:
    """Every file the patterns name, in the order given (a glob's matches sorted), each once.
    A pattern that matches nothing is the user's to fix: ``InputError`` naming it."""
    patterns = [paths] if isinstance(paths, str) else list(paths)
    if not patterns:
        raise InputError("input.paths: no paths given")
    out: dict[str, InputFile] = {}
    for pattern in patterns:
        names = list(braceexpand(pattern))
        for f in _globbed(names) + _listed([n for n in names if not _is_glob(n)]):
            out.setdefault(f.url, f)
    return list(out.values())


def _is_glob(path: str) -> bool:
    return any(c in _GLOB_CHARS for c in path.split("://", 1)[-1])


def _url(fs: fsspec.AbstractFileSystem, path: str, remote: bool) -> str:
    return fs.unstrip_protocol(path) if remote else os.path.abspath(path)


def _globbed(names: list[str]) -> list[InputFile]:
    out = []
    for name in (n for n in names if _is_glob(n)):
        fs, path = fsspec.core.url_to_fs(name)
        found = fs.glob(path, detail=True)
        files = sorted((p, info) for p, info in found.items() if info.get("type") == "file")
        if not files:
            raise InputError(f"input.paths: no file matches {name!r}")
        out += [InputFile(_url(fs, p, "://" in name), int(info["size"])) for p, info in files]
    return out


def _listed(names: list[str]) -> list[InputFile]:
    """Named files, found through one listing per directory: a brace pattern over a thousand
    objects costs one request, not a thousand."""
    listings: dict[tuple[str, str], dict[str, dict]] = {}
    out, missing = [], []
    for name in names:
        fs, path = fsspec.core.url_to_fs(name)
        parent = fs._parent(path)
        key = (fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0], parent)
        if key not in listings:
            try:
                listings[key] = {fs._strip_protocol(i["name"]): i for i in fs.ls(parent, detail=True)}
            except (FileNotFoundError, NotADirectoryError):
                listings[key] = {}
        info = listings[key].get(fs._strip_protocol(path))
        if info is None or info.get("type") != "file":
            missing.append(name)
            continue
        out.append(InputFile(_url(fs, path, "://" in name), int(info["size"])))
    if missing:
        more = f" ({len(missing)} of {len(names)} named files are missing)" if len(missing) > 1 else ""
        raise InputError(f"input.paths: {missing[0]}: no such file{more}")
    return out


@dataclass(frozen=True)
class ImageCheck:
    reason: str | None
    detail: str | None = None
    width: int | None = None
    height: int | None = None
    ext: str | None = None  # the extension its format is stored under (jpg, png, ...)


_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff",
        "AVIF": "avif", "ICO": "ico"}


def check_image(data: bytes, max_image_pixels: int) -> ImageCheck:
    """Whether Pillow reads the whole image: restricted to web formats, with a decompression-bomb
    limit. The bytes are never changed: a source read in place keeps them as they are.

    A JPEG is decoded at 1/8 scale: every entropy-coded block is still read and checked (a
    truncated or broken stream fails as in a full decode), only the inverse DCT and the colour
    conversion, most of the cost, are skipped; reading stored shards is bound by this check."""
    if not data:
        return ImageCheck("not_an_image", "empty member")
    try:
        img = Image.open(io.BytesIO(data), formats=WEB_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return ImageCheck("decompression_bomb", clip(str(e)))
    except Exception as e:  # noqa: BLE001 - a bad image is data, not a bug
        announced = sniff(data)
        if announced is None:
            start = data[:40].decode("latin-1").replace("\r", " ").replace("\n", " ").strip()
            return ImageCheck("not_an_image", clip(f"starts with {start!r}"))
        if isinstance(e, UnidentifiedImageError):  # its message names a BytesIO's memory address
            return ImageCheck("decode_error", f"{announced}: no decoder accepts the data")
        return ImageCheck("decode_error", clip(f"{announced}: {type(e).__name__}: {e}"))
    with img:
        width, height = img.size
        if width * height > max_image_pixels:
            return ImageCheck("decompression_bomb", f"{width}x{height} = {width * height} pixels > {max_image_pixels}")
        fmt = img.format
        if fmt in ("JPEG", "MPO"):
            img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
        try:
            img.load()
        except Exception as e:  # noqa: BLE001
            return ImageCheck("decode_error", clip(f"{fmt}: {type(e).__name__}: {e}"))
    return ImageCheck(None, None, width, height, _EXT.get(fmt, "img"))


def content_uid(*parts: str | bytes) -> str:
    """128-bit hex id of the parts, NUL-separated: for samples with neither a uid nor a URL."""
    h = hashlib.sha256()
    for i, p in enumerate(parts):
        if i:
            h.update(b"\x00")
        h.update(p.encode("utf-8", "surrogatepass") if isinstance(p, str) else p)
    return h.hexdigest()[:32]


class UniqueUids:
    """The uids of one input, in input order: a repeat of an earlier uid gets a repeat uid (as a
    URL list's repeated rows do) and names the first, so every row stays accounted for."""

    def __init__(self) -> None:
        self._first: set[str] = set()
        self._repeats: dict[str, int] = {}

    def add(self, uid: str) -> tuple[str, str | None]:
        """(the row's uid, the uid it repeats or None)."""
        if uid not in self._first:
            self._first.add(uid)
            return uid, None
        n = self._repeats[uid] = self._repeats.get(uid, 0) + 1
        return repeat_uid(uid, n), uid


def mixed_column(values: list) -> pa.Array:
    """Metadata values keep their scalar type; nested values (lists, objects), and a field whose
    type differs from row to row, are carried as JSON text: the same in every shard, and
    writable whatever their shape (an empty object is no Parquet type)."""
    if not any(isinstance(v, dict | list) for v in values):
        try:
            arr = pa.array(values)
            return arr.cast(pa.string()) if pa.types.is_null(arr.type) else arr
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
            pass
    return pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v, default=str, sort_keys=True)
                     for v in values], pa.string())


def free_name(name: str, taken: Iterable[str]) -> str:
    """A metadata field named like one of the source's own columns keeps its data under
    ``input_<name>``."""
    taken = set(taken)
    while name in taken:
        name = "input_" + name
    return name


def clip(text: str | None) -> str | None:
    return text if text is None or len(text) <= DETAIL_MAX else text[: DETAIL_MAX - 1] + "…"


def text_of(raw: bytes) -> tuple[str, bool]:
    """UTF-8 text, and whether invalid bytes had to be replaced (the caller notes it)."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True
