"""Loading MetaCLIP metadata: a flat JSON list of strings, index = entry id (upstream's format)."""
from __future__ import annotations

import json

import fsspec


class MetadataError(ValueError):
    pass


def load_entries(path: str) -> list[str]:
    """Read ``metadata.json`` (local path or fsspec URL); errors name the file and the first bad item."""
    try:
        with fsspec.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise MetadataError(f"{path}: no such metadata file") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise MetadataError(f"{path}: not UTF-8 ({e})") from None
    except json.JSONDecodeError as e:
        raise MetadataError(f"{path}: not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(data, list):
        raise MetadataError(f"{path}: expected a JSON list of strings (MetaCLIP's metadata.json), got a {type(data).__name__}")
    for i, item in enumerate(data):
        if not isinstance(item, str):
            raise MetadataError(f"{path}: item {i} is not a string (got {json.dumps(item)[:80]})")
    return data
