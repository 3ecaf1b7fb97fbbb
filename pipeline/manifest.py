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


def _seconds(ds: Dataset, step: str) -> float:
    total = 0.0
    for name in ds.listdir(f"logs/timings/{step}"):
        try:
            total += float(ds.read_json(f"logs/timings/{step}/{name}").get("seconds", 0))
        except (OSError, ValueError):
            pass
    return round(total, 3)


def write_manifest(ds: Dataset, job, steps, n_shards: int, status: str, seconds: float, error: str | None = None) -> dict:
    stages: dict[str, dict] = {}
    for spec in steps:
        if spec.phase == "partial":
            continue
        markers = [m for m in step_markers(ds, spec.step) if m.get("config_hash") == spec.config_hash]
        stages[spec.name] = {
            "kind": spec.stage_cls.kind,
            "config_hash": spec.config_hash,
            "counts": merge_counts(markers),
            "worker_seconds": _seconds(ds, spec.step),
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
        "versions": _versions(),
    }
    if error:
        manifest["error"] = error
    ds.write_json("manifest.json", finite_json(manifest))
    return stages
