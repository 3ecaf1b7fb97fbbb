"""``manifest.json``: the resolved job, versions, per-stage config hashes, counts and timings."""
from __future__ import annotations

import platform
from collections import Counter
from importlib.metadata import PackageNotFoundError, version

from recap.pipeline.storage import Dataset, finite_json

_PACKAGES = ("recap-curate", "ray", "pyarrow", "img2dataset", "webdataset", "torch", "open_clip_torch", "pydantic")


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for p in _PACKAGES:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            pass
    return out


def merge_counts(markers: list[dict]) -> dict:
    total = {"shards": len(markers), "in": 0, "kept": 0, "dropped": Counter(), "notes": Counter()}
    for m in markers:
        c = m.get("counts", {})
        total["in"] += c.get("in", 0)
        total["kept"] += c.get("kept", 0)
        total["dropped"].update(c.get("dropped", {}))
        total["notes"].update(c.get("notes", {}))
    total["dropped"] = dict(sorted(total["dropped"].items()))
    total["notes"] = dict(sorted(total["notes"].items()))
    return total


def step_markers(ds: Dataset, step: str) -> list[dict]:
    out = []
    for name in ds.listdir(f"commits/{step}"):
        if name.endswith(".json"):
            try:
                out.append(ds.read_json(f"commits/{step}/{name}"))
            except (OSError, ValueError):
                pass
    return out


def _timings(ds: Dataset, step: str) -> tuple[float, dict[str, list[int]]]:
    """A step's worker seconds, and which Ray node ran each of its shards ({node id: [shard]})."""
    total, nodes = 0.0, {}
    for name in sorted(ds.listdir(f"logs/timings/{step}")):
        try:
            record = ds.read_json(f"logs/timings/{step}/{name}")
            total += float(record.get("seconds", 0))
        except (OSError, ValueError):
            continue
        if record.get("node") and name.split(".")[0].isdigit():
            nodes.setdefault(record["node"], []).append(int(name.split(".")[0]))
    return round(total, 3), dict(sorted(nodes.items()))


def write_manifest(ds: Dataset, job, steps, n_shards: int, status: str, seconds: float, error: str | None = None) -> dict:
    stages: dict[str, dict] = {}
    nodes: dict[str, dict] = {}
    for spec in steps:
        worker_seconds, nodes[spec.step] = _timings(ds, spec.step)
        if spec.phase == "partial":
            continue
        markers = [m for m in step_markers(ds, spec.step) if m.get("config_hash") == spec.config_hash]
        stages[spec.name] = {
            "kind": spec.stage_cls.kind,
            "config_hash": spec.config_hash,
            "counts": merge_counts(markers),
            "worker_seconds": worker_seconds,
        }
    manifest = {
        "recap_manifest": 1,
        "status": status,
        "job": job.resolved(),
        "job_file": job.source_file,
        "stage_order": [e.name for e in job.stages],
        "shards": n_shards,
        "stages": stages,
        "seconds": round(seconds, 3),
        "nodes": {step: ran for step, ran in nodes.items() if ran},  # {step: {Ray node id: [shard]}}
        "versions": _versions(),
    }
    if error:
        manifest["error"] = error
    ds.write_json("manifest.json", finite_json(manifest))
    return stages
