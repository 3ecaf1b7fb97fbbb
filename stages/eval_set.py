"""The images of an evaluation set, for decontamination: a folder of image files (searched
recursively), webdataset tars in it, or one tar. Names say where each image came from
(``shards/00000.tar:0007.jpg``) so a ledger line points at the evaluation image."""
from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and (_is_image(p.name) or p.name.endswith(".tar")))


def _label(root: Path, p: Path) -> str:
    return p.name if root.is_file() else str(p.relative_to(root))


def count_images(path: str) -> int:
    """How many images the set holds (tar headers only); raises ValueError when it cannot be read."""
    root = Path(path)
    if not root.exists():
        raise ValueError(f"{path} does not exist")
    n = 0
    for p in _files(root):
        if p.name.endswith(".tar"):
            try:
                with tarfile.open(p) as tf:
                    n += sum(1 for m in tf if m.isfile() and _is_image(m.name))
            except (tarfile.TarError, OSError) as e:
                raise ValueError(f"{p}: not a readable tar ({e})") from None
        else:
            n += 1
    return n


def iter_images(path: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every image, in a fixed order."""
    root = Path(path)
    for p in _files(root):
        if p.name.endswith(".tar"):
            with tarfile.open(p) as tf:
                for m in tf:
                    if m.isfile() and _is_image(m.name):
                        f = tf.extractfile(m)
                        yield f"{_label(root, p)}:{m.name}", f.read() if f else b""
        else:
            yield _label(root, p), p.read_bytes()
