"""Stored image bytes as the pixels a model or a hash sees: a full decode that fails on truncated
data, an 8-bit RGB view of whatever mode the file has, and a bound on extreme aspect ratios."""
from __future__ import annotations

import io

import numpy as np

# Longer sides beyond this many shorter sides are centre-cropped before a model's transform. The
# usual eval transform (shortest side to the model's size, then a centre crop) keeps only the
# central square anyway, which the crop leaves untouched, and a 1x40000 banner would otherwise be
# resized to hundreds of megapixels first.
MAX_ASPECT = 8


def decode(data: bytes | None):
    """(image, None) fully decoded, or (None, why). The reason text never holds addresses or
    timings, so ledgers are the same bytes on every run."""
    from PIL import Image, UnidentifiedImageError

    from recap.pipeline.imaging import WEB_FORMATS

    if not data:
        return None, "no image bytes"
    try:
        img = Image.open(io.BytesIO(data), formats=WEB_FORMATS)
        img.load()  # the full decode: truncated data fails here, not inside the transform
        return img, None
    except UnidentifiedImageError:
        return None, "no decoder accepts the data"
    except Exception as e:  # noqa: BLE001 - a bad image is data, not a bug
        return None, f"{type(e).__name__}: {e}"[:300]


def bounded_aspect(img):
    """Centre-crop the long side to at most MAX_ASPECT short sides."""
    w, h = img.size
    if max(w, h) <= MAX_ASPECT * min(w, h):
        return img
    if w > h:
        left = (w - MAX_ASPECT * h) // 2
        return img.crop((left, 0, left + MAX_ASPECT * h, h))
    top = (h - MAX_ASPECT * w) // 2
    return img.crop((0, top, w, top + MAX_ASPECT * w))


def to_rgb(img):
    """An 8-bit RGB image of what the file shows. PIL's own convert("RGB"), which the transform
    would apply, clips 16-bit values (nearly every pixel white) and drops alpha to whatever colour
    transparent pixels hide; both are fixed here."""
    from PIL import Image

    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)  # "I" taken as 16-bit data too
        img = Image.fromarray((a >> 8).astype(np.uint8), "L")
    elif mode == "F":
        a = np.asarray(img, dtype=np.float32)
        if not np.isfinite(a).all():
            raise ValueError("a float image with NaN or infinite pixels")
        img = img.convert("L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")
