"""Webdataset tars written deterministically, and read back by key."""
from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_tar(samples: Iterable[tuple[str, dict[str, bytes]]]) -> bytes:
    """Tar bytes with ``{key}.{ext}`` members, samples in the given order, members sorted by
    extension within a sample (webdataset groups consecutive members by key)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext in sorted(members):
                data = members[ext]
                tar.addfile(_info(f"{key}.{ext}", len(data)), io.BytesIO(data))
    return buf.getvalue()


def read_tar(data: bytes) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes}. Raises tarfile.ReadError on a truncated or corrupt tar."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, _, ext = m.name.partition(".")
            f = tar.extractfile(m)
            out.setdefault(key, {})[ext] = f.read() if f else b""
    return out


def sample_json(row: dict) -> bytes:
    return json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
