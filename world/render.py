"""Drawing scenes, encoding them, and the broken bodies the faulty corners of the web serve.

Everything here is a pure function of its arguments (plus a seeded ``random.Random`` where noted),
so a file's bytes never depend on which process rendered it.
"""
from __future__ import annotations

import io
import math
import random
import struct
import zlib
from typing import Any

from PIL import Image, ImageDraw

from recap.world.scenes import COLOURS, Scene

SUPERSAMPLE = 2  # draw at 2x and box-filter down: cheap anti-aliasing


def _rotate(points: list[tuple[float, float]], cx: float, cy: float, r: float, angle: float
            ) -> list[tuple[float, float]]:
    a = math.radians(angle)
    ca, sa = math.cos(a), math.sin(a)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in points]


def _regular(n: int, start: float = -90.0) -> list[tuple[float, float]]:
    return [(math.cos(math.radians(start + 360.0 * k / n)), math.sin(math.radians(start + 360.0 * k / n)))
            for k in range(n)]


def _star() -> list[tuple[float, float]]:
    return [(rad * math.cos(math.radians(-90 + 36 * k)), rad * math.sin(math.radians(-90 + 36 * k)))
            for k, rad in zip(range(10), [1.0, 0.45] * 5)]


def _heart() -> list[tuple[float, float]]:
    pts = []
    for k in range(48):
        t = 2 * math.pi * k / 48
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x / 17.0, -y / 17.0 + 0.1))
    return pts


def _crescent() -> list[tuple[float, float]]:
    # The unit disc minus a disc of radius 0.8 centred at (0.45, 0): outer arc, then inner arc back.
    d, ri = 0.45, 0.8
    ix = (1 - ri * ri + d * d) / (2 * d)
    iy = math.sqrt(1 - ix * ix)
    t1, p1 = math.atan2(iy, ix), math.atan2(iy, ix - d)
    outer = [(math.cos(t), math.sin(t)) for t in (t1 + (2 * math.pi - 2 * t1) * k / 32 for k in range(33))]
    inner = [(d + ri * math.cos(p), ri * math.sin(p)) for p in (2 * math.pi - p1 - (2 * math.pi - 2 * p1) * k / 32
                                                                 for k in range(33))]
    return outer + inner


def _oval() -> list[tuple[float, float]]:
    return [(math.cos(2 * math.pi * k / 48), 0.6 * math.sin(2 * math.pi * k / 48)) for k in range(48)]


_UNIT: dict[str, list[tuple[float, float]]] = {
    "square": _regular(4, -45.0),
    "triangle": [(x, y + 0.15) for x, y in _regular(3)],
    "pentagon": _regular(5),
    "hexagon": _regular(6),
    "octagon": _regular(8, -22.5),
    "star": _star(),
    "heart": _heart(),
    "cross": [(-0.33, -1), (0.33, -1), (0.33, -0.33), (1, -0.33), (1, 0.33), (0.33, 0.33), (0.33, 1), (-0.33, 1),
              (-0.33, 0.33), (-1, 0.33), (-1, -0.33), (-0.33, -0.33)],
    "diamond": [(0, -1), (0.62, 0), (0, 1), (-0.62, 0)],
    "crescent": _crescent(),
    "arrow": [(-1, -0.28), (0.1, -0.28), (0.1, -0.7), (1, 0), (0.1, 0.7), (0.1, 0.28), (-1, 0.28)],
    "oval": _oval(),
}


def _draw_object(draw: ImageDraw.ImageDraw, obj: dict[str, Any], cx: float, cy: float, r: float) -> None:
    fill = COLOURS[obj["colour"]]
    shape = obj["shape"]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(2, round(0.35 * r)))
    else:
        draw.polygon(_rotate(_UNIT[shape], cx, cy, r, obj.get("angle", 0)), fill=fill)


def render_scene(scene: Scene, width: int, height: int, shift: tuple[float, float] = (0.0, 0.0)) -> Image.Image:
    """The scene on a width x height canvas; ``shift`` moves every object by a fraction of the
    canvas (near-duplicates). Sizes are relative to min(width, height), so any size works."""
    s = SUPERSAMPLE
    W, H = width * s, height * s
    img = Image.new("RGB", (W, H), COLOURS[scene["background"]])
    draw = ImageDraw.Draw(img)
    m = min(W, H)
    # Dominant object last, so it is on top and always visible.
    for obj in reversed(scene["objects"]):
        cx, cy = (obj["x"] + shift[0]) * W, (obj["y"] + shift[1]) * H
        _draw_object(draw, obj, cx, cy, obj["scale"] * m)
    return img.reduce(s)


def encode(img: Image.Image, fmt: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=6)
    else:
        img.save(buf, format="JPEG", quality=quality, subsampling=2 if quality < 90 else 0)
    return buf.getvalue()


# -- faulty bodies --------------------------------------------------------------------------------

def _scan_start(jpeg: bytes) -> int:
    """Offset of the first byte of entropy-coded data (just after the SOS segment)."""
    i = jpeg.find(b"\xff\xda")
    if i < 0:
        return len(jpeg) // 4
    return i + 2 + struct.unpack(">H", jpeg[i + 2:i + 4])[0]


def truncated(jpeg: bytes) -> bytes:
    """The JPEG cut in half, inside its scan data: a decoder runs out of data."""
    start = _scan_start(jpeg)
    return jpeg[:max(len(jpeg) // 2, start + 16)]


def corrupt(jpeg: bytes, rng: random.Random) -> bytes:
    """Either garbage spliced into the middle of the scan data (with a stray second SOF marker, so
    decoding fails instead of degrading into grey blocks), or random bytes behind a JPEG header."""
    if rng.random() < 0.5:
        start = _scan_start(jpeg)
        mid = (start + len(jpeg)) // 2
        garbage = bytes(rng.randrange(256) for _ in range(64))
        return jpeg[:mid] + b"\xff\xc0\x00\x11" + garbage + jpeg[mid:]
    header = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    return header + bytes(rng.randrange(256) for _ in range(rng.randint(2000, 6000)))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(side: int = 14000) -> bytes:
    """A valid 1-bit PNG of side x side pixels (~196 M, over twice Pillow's MAX_IMAGE_PIXELS), a
    few tens of KB on disk. Written by hand: Pillow would allocate the full image to save it."""
    row = b"\x00" + b"\x00" * ((side + 7) // 8)  # filter byte + all-black pixels
    comp = zlib.compressobj(9)
    data = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def tiny_jpeg(colour: tuple[int, int, int] = (200, 0, 0)) -> bytes:
    return encode(Image.new("RGB", (16, 16), colour), "jpeg", 85)


_HTML_TITLES = ("Page not found", "Access denied", "Just a moment...", "Please enable JavaScript", "Log in",
                "Image not available", "403 Forbidden")


def html_page(rng: random.Random) -> bytes:
    title = rng.choice(_HTML_TITLES)
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title></head>\n"
            f"<body><h1>{title}</h1><p>The requested image could not be displayed. "
            f"Reference #{rng.randrange(10**8):08d}.</p></body></html>\n").encode()


def jpeg_filler_head() -> bytes:
    """The start of an endless 'JPEG' (too_large): a real header, then zeros."""
    return b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
