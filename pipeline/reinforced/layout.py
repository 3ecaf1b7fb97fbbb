"""Where things live in a reinforced dataset directory: one place for the names the writer writes
and the reader looks for."""
from __future__ import annotations

CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.jsonl"
SHARDS_DIR = "shards"
# open_clip looks for sizes.json beside the shards; recap's readers also look at the top level.
SIZES_FILES = ("sizes.json", f"{SHARDS_DIR}/sizes.json")


def shard_file(index: int) -> str:
    return f"{index:05d}.tar"


def join(url: str, rel: str) -> str:
    """``rel`` under the dataset directory ``url`` (a local path or any fsspec URL)."""
    return f"{url.rstrip('/')}/{rel}"
