"""Writing a reinforced dataset: validated shards, then the index files that make it a dataset."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence

from recap.pipeline.atomic import write_atomic
from recap.pipeline.reinforced.codec import encode_shard
from recap.pipeline.reinforced.config import VERSION, ReinforcedConfig, ReinforcedFormatError
from recap.pipeline.reinforced.layout import CONFIG_FILE, MANIFEST_FILE, SHARDS_DIR, SIZES_FILES, join, shard_file


def _current(config: ReinforcedConfig) -> None:
    # older versions are read (and converted), never written: their shards would mix layouts
    if config.version != VERSION:
        raise ReinforcedFormatError(f"config version {config.version}: only version {VERSION} is written")


def index_files(config: ReinforcedConfig, entries: Sequence[dict]) -> dict[str, bytes]:
    """config.json, sizes.json (top level and shards/, where open_clip looks) and manifest.jsonl
    from shard entries ``{"name", "n", ...}`` (sorted by name), as ``{relative path: bytes}`` in
    the order they should be written (config.json last)."""
    _current(config)
    entries = sorted(entries, key=lambda e: e["name"])
    sizes = json.dumps({e["name"]: int(e["n"]) for e in entries}, indent=1, sort_keys=True).encode()
    out = {rel: sizes for rel in SIZES_FILES}
    out[MANIFEST_FILE] = "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries).encode()
    # config.json last: find_config takes its presence to mean "a reinforced dataset is here"
    out[CONFIG_FILE] = json.dumps(config.model_dump(mode="json"), indent=1, sort_keys=True).encode()
    return out


def write_index(out: str, config: ReinforcedConfig, entries: Sequence[dict]) -> None:
    """Write the index files of ``index_files`` into the dataset directory ``out``."""
    for rel, data in index_files(config, entries).items():
        write_atomic(join(out, rel), data)


class ReinforcedWriter:
    """Writes a reinforced dataset: ``write_shard`` per shard, then ``close`` for the index files.

    Shards may be written by several writers (e.g. Ray workers) if one of them, or the caller, then
    calls ``write_index`` with all entries."""

    def __init__(self, out: str, config: ReinforcedConfig | dict):
        self.out = str(out).rstrip("/")
        self.config = config if isinstance(config, ReinforcedConfig) else ReinforcedConfig.model_validate(config)
        _current(self.config)
        self.entries: dict[str, dict] = {}
        self.closed = False

    def write_shard(self, index: int, samples: Iterable[dict]) -> dict:
        """Validate and write ``shards/{index:05d}.tar``; returns its manifest entry."""
        if self.closed:
            raise RuntimeError("ReinforcedWriter is closed")
        data, n = encode_shard(samples, self.config)
        name = shard_file(index)
        rel = f"{SHARDS_DIR}/{name}"
        write_atomic(join(self.out, rel), data)
        entry = {"name": name, "path": rel, "n": n, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        self.entries[name] = entry
        return entry

    def close(self) -> None:
        if not self.closed:
            write_index(self.out, self.config, list(self.entries.values()))
            self.closed = True

    def __enter__(self) -> ReinforcedWriter:
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
