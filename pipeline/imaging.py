"""Image checks before resizing, and img2dataset's own Resizer for the resizing.

``check_and_prepare`` decides whether fetched bytes are a usable image: content sniffing (the
Content-Type header is often wrong), a decompression-bomb limit applied here rather than through
Pillow's process-wide ``MAX_IMAGE_PIXELS``, a full decode (truncated files are errors, never
grey-filled), and EXIF orientation. Everything after that (resize modes, interpolation, encoding,
size and aspect-ratio limits) is ``img2dataset.resizer.Resizer``, unchanged.

Reasons: not_an_image, decode_error, decompression_bomb, image_too_small, image_area_too_large,
aspect_ratio_too_large, resize_error.
"""
from __future__ import annotations

import io
import json
import os
import threading
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home on import

from PIL import Image, ImageOps, UnidentifiedImageError  # noqa: E402

# Formats a web image may be. Restricting Image.open to them keeps exotic decoders (EPS runs
# Ghostscript, FITS, ...) away from untrusted bytes.
WEB_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF", "ICO")
# Handed to the Resizer (OpenCV) as fetched; anything else is re-encoded losslessly to PNG first.
_PASSTHROUGH_FORMATS = {"JPEG", "MPO", "PNG", "WEBP", "BMP"}
_PASSTHROUGH_MODES = {"1", "L", "P", "RGB", "RGBA", "LA", "CMYK"}
_ORIENTATION = 0x0112

_RESIZER_ERRORS = {
    "image too small": "image_too_small",
    "image area too large": "image_area_too_large",
    "aspect ratio too large": "aspect_ratio_too_large",
    "image decoding error": "decode_error",
}


@dataclass
class ImageResult:
    data: bytes | None
    reason: str | None = None
    detail: str | None = None
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.reason is None


# -- sniffing ------------------------------------------------------------------------------------

def sniff(data: bytes) -> str | None:
    """The image format the leading bytes announce, or None (HTML, JSON, text, ...)."""
    head = data[:32]
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:2] == b"BM" and head[6:10] == b"\0\0\0\0":  # reserved bytes: keeps "BM..." text out
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1"):
        return "AVIF"
    if head[:4] == b"\x00\x00\x01\x00":
        return "ICO"
    return None


def _describe(data: bytes, content_type: str | None) -> str:
    start = data[:40].decode("latin-1").replace("\r", " ").replace("\n", " ").strip()
    return f"Content-Type {content_type or 'missing'}, starts with {start!r}"


# -- the checks ----------------------------------------------------------------------------------

def check_and_prepare(data: bytes, content_type: str | None, max_image_pixels: int, *, exif: bool = False
                      ) -> tuple[bytes | None, str | None, str | None, dict[str, Any]]:
    """(bytes for the Resizer, reason, detail, meta). The bytes are the input unless the image had
    to be rotated (EXIF orientation) or converted for OpenCV; meta holds format, mode, size,
    orientation and, when ``exif``, img2dataset-style EXIF json."""
    meta: dict[str, Any] = {}
    if not data:
        return None, "not_an_image", "empty body", meta
    announced = sniff(data)
    try:
        img = _open(data)
    except _BombError as e:
        return None, "decompression_bomb", str(e), meta
    except Exception as e:  # noqa: BLE001 - a bad image is data, not a bug
        if announced is None:
            return None, "not_an_image", _describe(data, content_type), meta
        if isinstance(e, UnidentifiedImageError):  # its message names a BytesIO's memory address
            return None, "decode_error", f"{announced}: no decoder accepts the data", meta
        return None, "decode_error", f"{announced}: {type(e).__name__}: {e}"[:500], meta
    with img:
        meta.update(format=img.format, mode=img.mode, width=img.width, height=img.height)
        pixels = img.width * img.height
        if pixels > max_image_pixels:
            return None, "decompression_bomb", f"{img.width}x{img.height} = {pixels} pixels > {max_image_pixels}", meta
        try:
            img.load()  # the full decode: truncated or corrupt data fails here
        except Exception as e:  # noqa: BLE001
            return None, "decode_error", f"{img.format}: {type(e).__name__}: {e}"[:500], meta
        orientation = _orientation(img)
        meta["orientation"] = orientation
        if exif:
            meta["exif"] = exif_json(data)
        if orientation != 1:
            return _png(ImageOps.exif_transpose(img)), None, None, meta
        if img.format not in _PASSTHROUGH_FORMATS or img.mode not in _PASSTHROUGH_MODES or _png16(data):
            return _png(img), None, None, meta
    return data, None, None, meta


class _BombError(Exception):
    pass


def _open(data: bytes) -> Image.Image:
    """Image.open restricted to web formats. Pillow's own bomb check (the process-wide
    MAX_IMAGE_PIXELS) runs inside open(): its error, and its warning where the process's warning
    filters make that an error, both mean decompression_bomb. We do not wrap open() in
    ``warnings.catch_warnings``: it swaps process-wide state and is not thread-safe. The rule is
    the size test in check_and_prepare, with the caller's limit."""
    try:
        return Image.open(io.BytesIO(data), formats=WEB_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _BombError(str(e)) from None


def _png16(data: bytes) -> bool:
    # Pillow reads 16-bit RGB(A) PNGs as 8-bit modes, OpenCV keeps 16 bits and cannot encode a JPEG from them.
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 24 and data[24] == 16


def _orientation(img: Image.Image) -> int:
    try:
        value = int(img.getexif().get(_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block must not cost the image
        return 1
    return value if 1 <= value <= 8 else 1


def _png(img: Image.Image) -> bytes:
    """Lossless hand-over to OpenCV: first frame, 8-bit, alpha kept (the Resizer mattes it on white)."""
    if img.mode not in ("L", "RGB", "RGBA"):
        img = img.convert("RGBA" if ("A" in img.getbands() or "transparency" in img.info) else "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def exif_json(data: bytes) -> str | None:
    """EXIF tags as img2dataset stores them (exifread, values as strings), or None."""
    try:
        import exifread

        tags = exifread.process_file(io.BytesIO(data), details=False)
        return json.dumps({k: str(v).strip() for k, v in tags.items() if v is not None}, sort_keys=True)
    except Exception:  # noqa: BLE001
        return None


# -- resizing ------------------------------------------------------------------------------------

def resizer_reason(error: str) -> str:
    return _RESIZER_ERRORS.get(error.strip().lower(), "resize_error")


class ImageProcessor:
    """check_and_prepare, then img2dataset's Resizer. Build once per worker; call from any thread."""

    def __init__(self, *, image_size: int = 256, resize_mode: str = "border", resize_only_if_bigger: bool = False,
                 upscale_interpolation: str = "lanczos", downscale_interpolation: str = "area",
                 encode_format: str = "jpg", encode_quality: int = 95, skip_reencode: bool = False,
                 min_image_size: int = 0, max_image_area: float = float("inf"),
                 max_aspect_ratio: float = float("inf"), max_image_pixels: int = 89_478_485,
                 extract_exif: bool = False, decode_slots: int = 2):
        from img2dataset.resizer import Resizer

        self.resizer = Resizer(image_size=image_size, resize_mode=resize_mode,
                               resize_only_if_bigger=resize_only_if_bigger,
                               upscale_interpolation=upscale_interpolation,
                               downscale_interpolation=downscale_interpolation, encode_quality=encode_quality,
                               encode_format=encode_format, skip_reencode=skip_reencode,
                               min_image_size=min_image_size, max_image_area=max_image_area,
                               max_aspect_ratio=max_aspect_ratio)
        self.max_image_pixels = max_image_pixels
        self.extract_exif = extract_exif
        # The Resizer redirects the process's stdout/stderr file descriptors around each call
        # (SuppressStdoutStderr); two threads doing that at once can leave them pointing at
        # /dev/null for good. img2dataset calls it from one thread; so do we, through this lock.
        self._lock = threading.Lock()
        # A full decode of a large image costs hundreds of MB; with 32 fetch threads, unbounded
        # decoding could hold 32 of them at once. More decodes than cores buys nothing anyway.
        self._decode_slots = threading.BoundedSemaphore(decode_slots)

    def __call__(self, data: bytes, content_type: str | None = None) -> ImageResult:
        try:
            with self._decode_slots:
                return self._process(data, content_type)
        except Exception as e:  # noqa: BLE001 - every sample gets a reason, never an exception
            return ImageResult(None, "resize_error", f"{type(e).__name__}: {e}"[:500])

    def _process(self, data: bytes, content_type: str | None) -> ImageResult:
        prepared, reason, detail, meta = check_and_prepare(data, content_type, self.max_image_pixels,
                                                           exif=self.extract_exif)
        if reason is not None:
            return ImageResult(None, reason, detail, meta=meta)
        with self._lock:
            out, w, h, ow, oh, err = self.resizer(io.BytesIO(prepared))
        if err is not None or out is None:
            err = err or "no output"
            return ImageResult(None, resizer_reason(err), err, meta=meta)
        return ImageResult(out, None, None, w, h, ow, oh, meta)
