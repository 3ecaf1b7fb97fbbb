"""The source stage: fetch each URL, check and resize the image, one output row per input row.

The mechanics live in pipeline/fetch.py (HTTP, SSRF guard, retries, limits) and
pipeline/imaging.py (content checks, img2dataset's Resizer). Output columns follow img2dataset's
parquet (status, error_message, width, height, original_width, original_height, sha256), with the
image bytes in ``jpg`` whatever the encode format (``image_ext`` names the tar member).
"""
from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator, model_validator

from recap.pipeline.fetch import DEFAULT_USER_AGENT, Fetcher, FetchConfig, FetchResult, parse_host_entry
from recap.pipeline.inputs import UrlListSource
from recap.pipeline.stage import IMAGE_COLUMN, StageConfig
from recap.pipeline.verdicts import CONTROL_COLUMNS, DROP, control, verdicts
from recap.stages.source_files import SUCCESS, StatusIndex

Interpolation = Literal["nearest", "linear", "bilinear", "cubic", "bicubic", "area", "lanczos", "lanczos4"]
BASE_COLUMNS = ("uid", "key", "url", "caption", "dup_of", "input_note")
_DETAIL_MAX = 500
FAILED_DOWNLOAD, FAILED_RESIZE = "failed_to_download", "failed_to_resize"


class DownloadConfig(StageConfig):
    # resizing and encoding: img2dataset's options and defaults
    image_size: int = Field(256, ge=1)
    resize_mode: Literal["no", "keep_ratio", "center_crop", "border", "keep_ratio_largest"] = "border"
    resize_only_if_bigger: bool = False
    upscale_interpolation: Interpolation = "lanczos"
    downscale_interpolation: Interpolation = "area"
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=0, le=100, description="jpg/webp quality 0-100; png: compression 0-9")
    skip_reencode: bool = False
    min_image_size: int = Field(0, ge=0)
    max_image_area: float = Field(math.inf, gt=0)
    max_aspect_ratio: float = Field(math.inf, gt=0)
    max_image_pixels: int = Field(89_478_485, gt=0, description="larger images are decompression bombs")
    extract_exif: bool = Field(False, description="add an `exif` column (img2dataset's format)")
    # how the URL list is cut into shards
    samples_per_shard: int = Field(10_000, ge=1)
    # fetching
    timeout: float = Field(10.0, gt=0, description="seconds per request: connect + headers + body, redirects included")
    connect_timeout: float = Field(5.0, gt=0)
    retries: int = Field(2, ge=0, description="retries after timeouts, connection errors, 429 and 5xx")
    backoff: float = Field(0.5, ge=0, description="seconds before the first retry, doubling")
    max_bytes: int = Field(16 << 20, gt=0)
    max_redirects: int = Field(5, ge=0)
    threads: int = Field(32, ge=1, description="concurrent requests per shard")
    per_host_connections: int = Field(8, ge=1)
    user_agent: str = Field(DEFAULT_USER_AGENT, min_length=1)
    respect_opt_out: bool = Field(True, description="honour X-Robots-Tag noai/noimageai/noindex/noimageindex")
    ssrf_guard: bool = Field(True, description="refuse loopback/private/link-local/... addresses")
    allow_hosts: list[str] = Field(default_factory=list, description="'host' or 'host:port' exempt from ssrf_guard")

    @field_validator("resize_mode", mode="before")
    @classmethod
    def _yaml_no(cls, v):
        return "no" if v is False else v  # YAML 1.1 reads a bare `no` as false

    @field_validator("allow_hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        for entry in v:
            parse_host_entry(entry)
        return v

    @model_validator(mode="after")
    def _png_quality(self) -> DownloadConfig:
        if self.encode_format == "png" and self.encode_quality > 9:
            raise ValueError("encode_quality: for png it is the compression level, 0-9")
        return self

    def fetch_config(self) -> FetchConfig:
        return FetchConfig(**self.model_dump(include=set(FetchConfig.model_fields) & set(type(self).model_fields)))


@dataclass
class _Row:
    """One sample's outcome."""

    status: str
    reason: str | None = None
    detail: str | None = None
    data: bytes | None = None
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    exif: str | None = None


class DownloadStage(StatusIndex, UrlListSource):
    name = "download"
    Config = DownloadConfig
    origin_column = "url"
    default_batch_size = 10_000  # one batch per default shard: no thread-pool tail per batch
    hash_exclude = frozenset({"threads", "per_host_connections"})

    def __init__(self, config, context):
        super().__init__(config, context)
        self._fetcher: Fetcher | None = None
        self._images = None

    def writes(self) -> tuple[str, ...]:
        return ("key", "url", "caption", "status", "error_message", "width", "height", "original_width",
                "original_height", "sha256", IMAGE_COLUMN)

    def image_member(self) -> str:
        return self.config.encode_format

    def setup(self) -> None:
        from recap.pipeline.imaging import ImageProcessor

        cfg: DownloadConfig = self.config
        self._fetcher = Fetcher(cfg.fetch_config())
        self._images = ImageProcessor(
            image_size=cfg.image_size, resize_mode=cfg.resize_mode, resize_only_if_bigger=cfg.resize_only_if_bigger,
            upscale_interpolation=cfg.upscale_interpolation, downscale_interpolation=cfg.downscale_interpolation,
            encode_format=cfg.encode_format, encode_quality=cfg.encode_quality, skip_reencode=cfg.skip_reencode,
            min_image_size=cfg.min_image_size, max_image_area=cfg.max_image_area,
            max_aspect_ratio=cfg.max_aspect_ratio, max_image_pixels=cfg.max_image_pixels,
            extract_exif=cfg.extract_exif)

    def teardown(self) -> None:
        if self._fetcher is not None:
            self._fetcher.close()
            self._fetcher = None

    # -- process -------------------------------------------------------------------------------
    def process(self, batch: pa.Table) -> pa.Table:
        if self._fetcher is None:
            self.setup()
        n = batch.num_rows
        urls = _column(batch, "url", n)
        dup_of = _column(batch, "dup_of", n)
        todo = [i for i in range(n) if dup_of[i] is None]
        outcomes: list[_Row] = [_Row(FAILED_DOWNLOAD, "duplicate_input", dup_of[i]) for i in range(n)]
        fetched = self._fetcher.fetch_many([urls[i] for i in todo], then=self._finish)
        for i, row in zip(todo, fetched):
            outcomes[i] = row
        return self._table(batch, outcomes)

    def _finish(self, fetched: FetchResult) -> _Row:
        """In the fetch thread: turn one fetch into one outcome (the decode overlaps other waits)."""
        try:
            if not fetched.ok:
                return _Row(FAILED_DOWNLOAD, fetched.reason, fetched.detail)
            img = self._images(fetched.data, fetched.headers.get("content-type"))
            if not img.ok:
                return _Row(FAILED_RESIZE, img.reason, img.detail)
            return _Row(SUCCESS, data=img.data, width=img.width, height=img.height,
                        original_width=img.original_width, original_height=img.original_height,
                        exif=img.meta.get("exif"))
        except Exception as e:  # noqa: BLE001 - every row gets a reason; a bug shows as one
            return _Row(FAILED_RESIZE, "resize_error", f"{type(e).__name__}: {e}")

    def _table(self, batch: pa.Table, rows: list[_Row]) -> pa.Table:
        n = batch.num_rows
        kept = [r.status == SUCCESS for r in rows]
        notes = _column(batch, "input_note", n)
        cols: dict[str, pa.Array] = {
            "key": _string(batch, "key", n),
            "url": _string(batch, "url", n),
            "caption": _string(batch, "caption", n),
            "status": pa.array([r.status for r in rows], pa.string()),
            "error_message": pa.array([None if r.status == SUCCESS else _message(r) for r in rows], pa.string()),
            "width": pa.array([r.width for r in rows], pa.int32()),
            "height": pa.array([r.height for r in rows], pa.int32()),
            "original_width": pa.array([r.original_width for r in rows], pa.int32()),
            "original_height": pa.array([r.original_height for r in rows], pa.int32()),
            "sha256": pa.array([hashlib.sha256(r.data).hexdigest() if r.data else None for r in rows], pa.string()),
            IMAGE_COLUMN: pa.array([r.data for r in rows], pa.binary()),
        }
        if self.config.extract_exif:
            cols["exif"] = pa.array([r.exif for r in rows], pa.string())
        for name in batch.column_names:
            if name in BASE_COLUMNS:
                continue
            out_name = name
            while out_name in cols or out_name in CONTROL_COLUMNS or out_name == "uid":
                out_name = "input_" + out_name  # a user column named like ours keeps its data
            cols[out_name] = batch.column(name)
        return verdicts(_string(batch, "uid", n), cols,
                        drop=[None if r.status == SUCCESS else r.reason for r in rows],
                        detail=[None if r.status == SUCCESS else _clip(r.detail) for r in rows],
                        note=[note if ok else None for note, ok in zip(notes, kept)])

    # -- stats -----------------------------------------------------------------------------------
    def shard_stats(self, out: pa.Table, duration: float) -> dict:
        status = Counter(out.column("status").to_pylist())
        reasons = Counter(r if r is not None else SUCCESS for r in control(out, DROP).to_pylist())
        return {
            "count": out.num_rows,
            "successes": status[SUCCESS],
            "failed_to_download": status[FAILED_DOWNLOAD],
            "failed_to_resize": status[FAILED_RESIZE],
            "duration": duration,
            "status_dict": dict(sorted(reasons.items())),
        }


def _column(batch: pa.Table, name: str, n: int) -> list:
    return batch.column(name).to_pylist() if name in batch.column_names else [None] * n


def _string(batch: pa.Table, name: str, n: int) -> pa.Array:
    if name not in batch.column_names:
        return pa.nulls(n, pa.string())
    col = batch.column(name)
    return pc.cast(col, pa.string()).combine_chunks() if col.type != pa.string() else col.combine_chunks()


def _clip(text: str | None) -> str | None:
    return text if text is None or len(text) <= _DETAIL_MAX else text[: _DETAIL_MAX - 1] + "…"


def _message(row: _Row) -> str:
    return _clip(f"{row.reason}: {row.detail}" if row.detail else row.reason)
