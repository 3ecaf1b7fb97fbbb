"""Dataset directory I/O on any fsspec filesystem, with completion markers.

Local files are written to a temporary name and renamed into place. Object stores have no atomic
rename, so completeness is never inferred from a file existing: a (stage, shard) is done only when
its commit marker, written last, exists and lists the files it made with their sizes and digests.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import threading
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from recap.pipeline.atomic import is_local, write_atomic
from recap.pipeline.errors import OutputError

TMP_DIR = ".tmp"


def shard_name(shard: int) -> str:
    return f"{shard:05d}"


@dataclass
class Dataset:
    """A dataset directory: ``shards/``, ``stages/``, ``ledger/``, ``commits/``, ``manifest.json``."""

    url: str

    def __post_init__(self) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/")
        self.local = is_local(self.fs)

    def __getstate__(self) -> dict:
        return {"url": self.url}

    def __setstate__(self, state: dict) -> None:
        self.url = state["url"]
        self.__post_init__()

    # -- before a run writes anything ---------------------------------------------------------
    def check_usable(self, timeout: float = 15.0) -> None:
        """Raise OutputError, naming the URL, when the dataset cannot be written: a parent that is
        a file or not writable, or an object store that does not answer within ``timeout``."""
        if self.local:
            self._check_local_parents()
        else:
            self._check_store(timeout)

    def _check_local_parents(self) -> None:
        path = os.path.abspath(self.root)
        while True:
            if os.path.exists(path):
                if not os.path.isdir(path):
                    raise OutputError(f"{self.url}: cannot be a dataset directory: {path} is a file")
                if not os.access(path, os.W_OK | os.X_OK):
                    raise OutputError(f"{self.url}: cannot write there: {path} is not writable")
                return
            parent = os.path.dirname(path)
            if parent == path:
                return
            path = parent

    def _check_store(self, timeout: float) -> None:
        bucket = self.root.split("/", 1)[0]
        outcome: dict = {}

        def probe() -> None:
            # info, not exists: exists says False for a bucket the credentials may not see
            try:
                self.fs.info(bucket)
                outcome["exists"] = True
            except FileNotFoundError:
                outcome["exists"] = False
            except PermissionError as e:
                outcome["denied"] = e
            except Exception as e:  # noqa: BLE001 - every failure to reach the store is reported
                outcome["error"] = e

        worker = threading.Thread(target=probe, daemon=True)  # botocore retries for minutes
        worker.start()
        worker.join(timeout)
        endpoint = _endpoint(self.fs)
        where = f" at {endpoint}" if endpoint else ""
        if worker.is_alive():
            raise OutputError(f"{self.url}: the object store{where} did not answer within {timeout:.0f}s")
        if "denied" in outcome:
            raise OutputError(f"{self.url}: the object store{where} refused access to the bucket {bucket!r} "
                              f"(check the credentials in the environment): {str(outcome['denied'])[:200]}")
        if "error" in outcome:
            err = outcome["error"]
            raise OutputError(f"{self.url}: cannot reach the object store{where}: {type(err).__name__}: {str(err)[:200]}")
        if not outcome.get("exists"):
            raise OutputError(f"{self.url}: the bucket {bucket!r} does not exist{where}")

    # -- paths ----------------------------------------------------------------------------------
    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    @staticmethod
    def input_rel(shard: int) -> str:
        return f"input/{shard_name(shard)}.parquet"

    @staticmethod
    def tar_rel(shard: int) -> str:
        return f"shards/{shard_name(shard)}.tar"

    @staticmethod
    def index_rel(shard: int) -> str:
        return f"shards/{shard_name(shard)}.parquet"

    @staticmethod
    def source_rel(shard: int) -> str:
        """For a source read in place: which tar or files the shard references, and their sizes when read."""
        return f"shards/{shard_name(shard)}.source.json"

    @staticmethod
    def stats_rel(shard: int) -> str:
        return f"shards/{shard_name(shard)}_stats.json"

    @staticmethod
    def sidecar_rel(stage: str, shard: int) -> str:
        return f"stages/{stage}/{shard_name(shard)}.parquet"

    @staticmethod
    def ledger_rel(stage: str, shard: int) -> str:
        return f"ledger/{stage}/{shard_name(shard)}.parquet"

    @staticmethod
    def commit_rel(step: str, shard: int) -> str:
        return f"commits/{step}/{shard_name(shard)}.json"

    # -- reading --------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open(self.path(rel), "rb") as f:
            return f.read()

    def read_json(self, rel: str):
        return json.loads(self.read_bytes(rel))

    def read_table(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        with self.fs.open(self.path(rel), "rb") as f:
            return pq.read_table(f, columns=columns)

    def read_schema(self, rel: str) -> pa.Schema:
        with self.fs.open(self.path(rel), "rb") as f:
            return pq.read_schema(f)

    def listdir(self, rel: str) -> list[str]:
        if not self.local:
            self.fs.invalidate_cache()  # s3fs caches listings; other workers write meanwhile
        try:
            return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(self.path(rel), detail=False))
        except FileNotFoundError:
            return []

    # -- writing --------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        write_atomic(self.path(rel), data, fs=self.fs, tmp_dir=self.path(TMP_DIR) if self.local else None)

    def write_json(self, rel: str, obj) -> None:
        self.write_bytes(rel, json_bytes(obj))

    def write_table(self, rel: str, table: pa.Table) -> None:
        self.write_bytes(rel, table_bytes(table))

    def remove(self, rel: str) -> None:
        try:
            self.fs.rm(self.path(rel), recursive=True)
        except FileNotFoundError:
            pass

    def clear_tmp(self) -> None:
        """Remove what an interrupted run left half-written (it never counts as output)."""
        if self.local:
            self.remove(TMP_DIR)

    # -- commit markers -------------------------------------------------------------------------
    def commit(self, step: str, shard: int, config_hash: str, files: dict[str, bytes], counts: dict) -> dict:
        """Write ``files`` then the marker that declares them complete. Returns the marker."""
        listed = {}
        for rel, data in sorted(files.items()):
            self.write_bytes(rel, data)
            listed[rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        marker = {"step": step, "shard": shard, "config_hash": config_hash, "files": listed, "counts": counts}
        self.write_json(self.commit_rel(step, shard), marker)
        return marker

    def committed(self, step: str, shard: int, config_hash: str, verify: bool = False) -> dict | None:
        """The marker if (step, shard) is complete with this config hash and its files are intact.

        Intact means what a listing reports without reading a byte of data: each file exists with
        the recorded size (a truncated tar is caught). Markers hold no store-specific metadata
        (ETags, mtimes), so a dataset is byte-identical on local disk and on an object store, and
        survives a copy between them. ``verify`` also re-hashes every file (``recap inspect
        --verify`` does it for all)."""
        rel = self.commit_rel(step, shard)
        if not self.local:
            self.fs.invalidate_cache()
        try:
            marker = self.read_json(rel)
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        if marker.get("config_hash") != config_hash:
            return None
        return marker if not self.damaged_files(marker, verify) else None

    def damaged_files(self, marker: dict, verify: bool) -> list[tuple[str, str]]:
        """(file, why) for each file a marker lists that is missing, of another size, or
        (``verify``) of another sha256."""
        bad = []
        for frel, meta in marker.get("files", {}).items():
            try:
                size = self.fs.size(self.path(frel))
            except (FileNotFoundError, OSError):
                bad.append((frel, "missing"))
                continue
            if size != meta["size"]:
                bad.append((frel, f"{size} bytes, its commit marker says {meta['size']}"))
            elif verify and hashlib.sha256(self.read_bytes(frel)).hexdigest() != meta["sha256"]:
                bad.append((frel, "its bytes changed since it was committed (sha256)"))
        return bad


def _endpoint(fs) -> str | None:
    kwargs = getattr(fs, "client_kwargs", None) or {}
    return getattr(fs, "endpoint_url", None) or kwargs.get("endpoint_url")


def finite_json(obj):
    """``obj`` with non-finite floats as the strings "inf", "-inf", "nan": strict JSON for files
    other tools read (the manifest), and pydantic reads those strings back as the floats."""
    if isinstance(obj, float) and obj != obj:
        return "nan"
    if isinstance(obj, float) and obj in (float("inf"), float("-inf")):
        return "inf" if obj > 0 else "-inf"
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    return obj


def json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def table_bytes(table: pa.Table) -> bytes:
    """Parquet bytes that depend only on the table (no creation timestamps, fixed writer)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", write_statistics=True, store_schema=True)
    return buf.getvalue()
