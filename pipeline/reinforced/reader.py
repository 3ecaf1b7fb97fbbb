"""Reading a reinforced dataset, or plain img2dataset shards: its config and sizes, its shard URLs,
and the samples of one shard. Tolerant: bad data is counted in ``stats``, never raised."""
from __future__ import annotations

import json
import logging
import tarfile
import zipfile
from collections import Counter
from collections.abc import Iterator, Sequence

import fsspec

from recap.pipeline.reinforced.codec import decode_sample
from recap.pipeline.reinforced.config import VERSION, ReinforcedConfig, ReinforcedFormatError
from recap.pipeline.reinforced.layout import CONFIG_FILE, SHARDS_DIR, SIZES_FILES, join

log = logging.getLogger(__name__)
# configs already reported as old: a trainer opens its dataset again every epoch
_told_old: set[str] = set()


def _read(url: str) -> bytes:
    with fsspec.open(url, "rb") as f:
        return f.read()


def read_config(url: str) -> ReinforcedConfig:
    """The dataset's config.json (``url`` is the dataset directory, or config.json itself)."""
    path = url if url.rstrip("/").endswith(".json") else join(url, CONFIG_FILE)
    try:
        raw = json.loads(_read(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no config.json (not a reinforced dataset?)") from None
    except ValueError as e:
        raise ReinforcedFormatError(f"{path}: not valid JSON ({e})") from None
    try:
        config = ReinforcedConfig.model_validate(raw)
    except Exception as e:  # pydantic ValidationError: name the file
        raise ReinforcedFormatError(f"{path}: {e}") from None
    if config.version < VERSION and path not in _told_old:
        _told_old.add(path)
        log.warning("%s: format version %d (param_aug magnitude bins); its entries are converted to version %d "
                    "(DataCompDR's magnitude values) as they are read", path, config.version, VERSION)
    return config


def find_config(url: str) -> tuple[ReinforcedConfig | None, str | None]:
    """Config of a dataset given by its directory, its shards/ directory, or one of its shard URLs
    (looked up in the directory and its parent). (None, None) for plain shards."""
    base = url.rstrip("/")
    if base.endswith(".tar") or "{" in base:
        base = base.rsplit("/", 1)[0]
    for cand in (base, base.rsplit("/", 1)[0] if "/" in base else None):
        if not cand:
            continue
        fs, path = fsspec.core.url_to_fs(join(cand, CONFIG_FILE))
        if fs.exists(path):
            return read_config(cand), cand
    return None, None


def read_sizes(url: str) -> dict[str, int]:
    """sizes.json of a dataset directory (or of a shards/ directory); {} when absent."""
    for rel in SIZES_FILES:
        try:
            return {k: int(v) for k, v in json.loads(_read(join(url, rel))).items()}
        except (FileNotFoundError, ValueError):
            continue
    return {}


def _expand(url: str) -> list[str]:
    import braceexpand

    return list(braceexpand.braceexpand(url))


def list_shards(url: str | Sequence[str]) -> list[str]:
    """Shard URLs, sorted by name within a directory: a reinforced dataset's ``shards/*.tar``, a
    directory of tars (plain img2dataset output, or its ``shards/``), a tar URL, a brace pattern
    (``.../{00000..00009}.tar``), ``::``-separated URLs, or a list of any of these. Never raises
    for an empty result: callers decide (the trainer raises, naming the path)."""
    if not isinstance(url, str):
        return [s for u in url for s in list_shards(u)]
    if "::" in url and not url.startswith("simplecache::"):
        return [s for u in url.split("::") if u for s in list_shards(u)]
    out: list[str] = []
    for u in _expand(url):
        fs, path = fsspec.core.url_to_fs(u)
        if path.endswith(".tar"):
            out.append(fs.unstrip_protocol(path) if "://" in u else path)
            continue
        for sub in (f"{SHARDS_DIR}/", ""):
            found = sorted(fs.glob(f"{path.rstrip('/')}/{sub}*.tar"))
            if found:
                out.extend(fs.unstrip_protocol(p) if "://" in u else p for p in found)
                break
    return out


def _split_name(name: str) -> tuple[str, str]:
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower() if dot else ""


def iter_raw(url: str, stats: Counter | None = None, expected_n: int | None = None,
             count_shard_errors: bool = True) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` groups of one tar (webdataset grouping: consecutive members with the
    same key). A missing shard, or a truncated/corrupt tar, ends the shard with a counted
    ``missing_shard`` / ``truncated_shard``, and the group being read is dropped. A tar cut at a
    block boundary is caught too: a complete tar ends with a zero block, which the reader checks
    (tarfile's own iteration stops there silently). Fewer groups than ``expected_n`` (sizes.json)
    in an otherwise sound tar counts ``short_shard``. Never raises for bad data."""
    stats = stats if stats is not None else Counter()
    n = 0
    group: dict[str, bytes] = {}
    key = None
    try:
        with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = _split_name(member.name)
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} cut short")
                if key is not None and k != key:
                    n += 1
                    yield key, group
                    group = {}
                key = k
                group[ext] = data
            tar.fileobj.seek(tar.offset)
            end = tar.fileobj.read(tarfile.BLOCKSIZE)
            if len(end) != tarfile.BLOCKSIZE or end.count(0) != tarfile.BLOCKSIZE:
                raise tarfile.ReadError("no end-of-archive block: cut short")
    except FileNotFoundError:
        if count_shard_errors:
            stats["missing_shard"] += 1
        return
    except (tarfile.TarError, OSError, EOFError, zipfile.BadZipFile, ValueError):
        if count_shard_errors:
            stats["truncated_shard"] += 1
        return
    if key is not None and group:
        n += 1
        yield key, group
    if expected_n is not None and n < expected_n and count_shard_errors:
        stats["short_shard"] += 1


def iter_shard(url: str, stats: Counter | None = None, required: Sequence[str] = ("jpg", "txt", "json"),
               config: ReinforcedConfig | None = None, expected_n: int | None = None) -> Iterator[dict]:
    """Decoded samples of one shard, in tar order. Tolerant: samples that lack a required member or
    do not decode are skipped and counted in ``stats`` (reason -> n); a truncated tar ends the shard
    with a counted error. Never raises for bad data. Pass the dataset's ``config`` to get param_aug
    in the current layout whatever the version it was written in."""
    stats = stats if stats is not None else Counter()
    for key, members in iter_raw(url, stats, expected_n):
        s = decode_sample(key, members, stats, required, config)
        if s is not None:
            yield s
