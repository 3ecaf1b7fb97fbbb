"""``recap inspect``: per-stage counts from the files themselves (not from the markers), drops by
reason, and the invariant *inputs = kept + dropped* checked sample by sample at every stage."""
from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from recap.pipeline.stage import Stage, UnknownStage, get_stage_class
from recap.pipeline.stage_data import StageData
from recap.pipeline.storage import Dataset, shard_name


def _uids(table) -> list[str]:
    return table.column("uid").to_pylist()


def _stage_classes(order: list[str]) -> dict[str, type[Stage] | None]:
    out = {}
    for name in order:
        try:
            out[name] = get_stage_class(name)
        except (UnknownStage, ImportError, TypeError):
            out[name] = None  # a stage not installed here: counted, but its own views are missing
    return out


def inspect_dataset(url: str, samples: int = 0, verify: bool = False) -> dict:
    """Counts and the invariant from the dataset's files; ``verify`` also re-hashes every committed
    file against its commit marker."""
    ds = Dataset(url)
    if not ds.exists("manifest.json"):
        raise FileNotFoundError(f"{url}: no manifest.json — not a recap dataset (or the run never started)")
    manifest = ds.read_json("manifest.json")
    order: list[str] = manifest.get("stage_order", [])
    kinds = {k: v.get("kind") for k, v in manifest.get("stages", {}).items()}
    classes = _stage_classes(order)
    n_shards = int(manifest.get("shards", 0))
    stages = {name: {"in": 0, "kept": 0, "dropped": Counter(), "notes": Counter()} for name in order}
    examples: dict[str, dict[str, list]] = {name: {} for name in order}
    problems: list[str] = []
    for name, cls in classes.items():
        if cls is None and kinds.get(name) == "source":
            problems.append(f"{name}: the source stage is not installed here, so its kept rows cannot be told")

    for shard in range(n_shards):
        sn = shard_name(shard)
        try:
            current = _uids(ds.read_table(Dataset.input_rel(shard), columns=["uid"]))
        except FileNotFoundError:
            problems.append(f"input shard {sn} is missing")
            continue
        for name in order:
            try:
                if kinds.get(name) == "source":
                    if classes[name] is None:
                        break
                    index = ds.read_table(Dataset.index_rel(shard))
                    kept = _uids(index.filter(classes[name].kept(index)))
                else:
                    kept = _uids(ds.read_table(Dataset.sidecar_rel(name, shard), columns=["uid"]))
                ledger = ds.read_table(Dataset.ledger_rel(name, shard))
            except FileNotFoundError:
                problems.append(f"{name}: shard {sn} has not been committed (incomplete run)")
                break
            except (OSError, pa.ArrowException) as e:  # damaged on disk: a problem to report, not a crash
                problems.append(f"{name}: shard {sn}: unreadable file: {str(e)[:200]}")
                break
            drops = ledger.filter(pc.equal(ledger.column("action"), "drop"))
            notes = ledger.filter(pc.equal(ledger.column("action"), "note"))
            dropped = _uids(drops)
            st = stages[name]
            st["in"] += len(current)
            st["kept"] += len(kept)
            st["dropped"].update(drops.column("reason").to_pylist())
            st["notes"].update(notes.column("reason").to_pylist())
            cur, k, d = set(current), set(kept), set(dropped)
            if len(current) != len(kept) + len(dropped) or k | d != cur or k & d:
                problems.append(f"{name}: shard {sn}: in {len(current)} != kept {len(kept)} + dropped {len(dropped)}"
                                f" (unaccounted {len(cur - k - d)}, unknown {len((k | d) - cur)}, both {len(k & d)})")
            if samples:
                for row in drops.to_pylist():
                    ex = examples[name].setdefault(row["reason"], [])
                    if len(ex) < samples:
                        ex.append({"uid": row["uid"], "detail": row["detail"]})
            current = kept
    out = {
        "dataset": url,
        "status": manifest.get("status"),
        "shards": n_shards,
        "stages": {name: {"in": s["in"], "kept": s["kept"], "dropped": dict(s["dropped"].most_common()),
                          "notes": dict(s["notes"].most_common())} for name, s in stages.items()},
        "invariant_ok": not problems,
        "problems": problems,
    }
    if verify:
        problems.extend(_verify(ds))
        out["invariant_ok"] = not problems
        out["verified"] = True
    summaries = _stage_summaries(ds, classes, n_shards)
    if summaries:
        out["summaries"] = summaries
    if samples:
        out["examples"] = examples
    return out


def _verify(ds: Dataset) -> list[str]:
    """Every committed file re-hashed against its marker (reads the whole dataset)."""
    problems = []
    for step in ds.listdir("commits"):
        for name in ds.listdir(f"commits/{step}"):
            try:
                marker = ds.read_json(f"commits/{step}/{name}")
            except (OSError, ValueError):
                problems.append(f"{step}: commit marker {name} is unreadable")
                continue
            for rel in ds.damaged_files(marker, verify=True):
                problems.append(f"{step}: {rel} does not match its commit marker (missing, resized or changed)")
    return problems


def _stage_summaries(ds: Dataset, classes: dict[str, type[Stage] | None], n_shards: int) -> dict:
    """Each stage's own view of its effect (Stage.summarize), for stages installed here."""
    out = {}
    for name, cls in classes.items():
        if cls is None:
            continue
        try:
            summary = cls.summarize(StageData(ds, name, n_shards))
        except (FileNotFoundError, KeyError, ValueError) as e:
            summary = {"error": f"{type(e).__name__}: {e}"}
        if summary:
            out[name] = summary
    return out


def _summary_lines(name: str, summary: dict) -> list[str]:
    if "error" in summary:
        return [f"  {name}: summary unavailable: {summary['error']}"[:400]]
    try:
        cls = get_stage_class(name)
    except (UnknownStage, ImportError, TypeError):
        return [f"  {name}: " + json.dumps(summary, sort_keys=True)[:400]]
    return cls.summary_lines(summary)


def format_report(rep: dict) -> str:
    lines = [f"dataset {rep['dataset']}  ({rep['shards']} shards, run {rep.get('status')})"]
    for name, s in rep["stages"].items():
        pct = 100.0 * s["kept"] / s["in"] if s["in"] else 0.0
        lines.append(f"  {name:<12} in {s['in']:>8}  kept {s['kept']:>8} ({pct:5.1f}%)  dropped {sum(s['dropped'].values()):>7}")
        for reason, n in s["dropped"].items():
            lines.append(f"      - {reason:<24} {n:>7}")
            for ex in rep.get("examples", {}).get(name, {}).get(reason, []):
                lines.append(f"          {ex['uid']}  {(ex['detail'] or '')[:90]}")
        for reason, n in s["notes"].items():
            lines.append(f"      ~ {reason:<24} {n:>7}  (note: kept)")
    for name, summary in rep.get("summaries", {}).items():
        lines.extend(_summary_lines(name, summary))
    if rep["invariant_ok"]:
        lines.append("invariant ok: inputs = kept + dropped at every stage")
    else:
        lines.append("INVARIANT BROKEN:")
        lines.extend(f"  {p}" for p in rep["problems"][:50])
    return "\n".join(lines)
