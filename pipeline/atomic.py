"""The one way recap writes a file that others may read while it is written: a reader sees the old
file or the whole new one, never a part.

Locally: a temporary name (beside the target, or in ``tmp_dir`` on the same filesystem), fsync,
rename. Object stores have no rename, but a single PUT only ever shows a complete object; what
they cannot give is "these N files together", which is what commit markers (``storage.py``) add.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import IO

import fsspec
from fsspec import AbstractFileSystem


def is_local(fs: AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def write_atomic(target: str, data: bytes | Callable[[IO[bytes]], None], *, fs: AbstractFileSystem | None = None,
                 tmp_dir: str | None = None) -> None:
    """Write ``data`` (bytes, or a function that writes to a binary file object, such as
    ``torch.save``) to ``target``: a local path or fsspec URL, or a path on ``fs``."""
    if fs is None:
        fs, target = fsspec.core.url_to_fs(target)
    parent = _parent(target)
    if not is_local(fs):
        if callable(data):
            with fs.open(target, "wb") as f:  # one PUT on close: complete or absent
                data(f)
        else:
            fs.pipe_file(target, data)
        return
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp_parent = tmp_dir or parent or "."
    os.makedirs(tmp_parent, exist_ok=True)
    tmp = os.path.join(tmp_parent, f".{os.path.basename(target)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
