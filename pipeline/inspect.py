"""``recap inspect``: per-stage counts from the files themselves (not from the markers), drops by
reason, the invariant *inputs = kept + dropped* checked sample by sample at every stage, every
committed file checked against its marker, and what an interrupted run has left to do."""
from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from recap.pipeline.stage import Stage, UnknownStage, get_stage_class
from recap.pipeline.stage_data import StageData
from recap.pipeline.preflight import PLAN
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


def _markers(ds: Dataset, verify: bool) -> tuple[dict[tuple[str, int], dict], list[dict]]:
    """Every commit marker, by (step, shard), read once; and the files that do not match the marker
    that committed them: missing or resized (always checked: a listing, no data read), or with
    other bytes (``verify``: every file re-hashed)."""
    markers: dict[tuple[str, int], dict] = {}
    damaged = []
    for step in ds.listdir("commits"):
        for name in ds.listdir(f"commits/{step}"):
            try:
                marker = ds.read_json(f"commits/{step}/{name}")
            except (OSError, ValueError):
                damaged.append({"step": step, "shard": None, "file": f"commits/{step}/{name}", "why": "unreadable marker"})
                continue
            markers[(step, marker.get("shard"))] = marker
            for rel, why in ds.damaged_files(marker, verify):
                damaged.append({"step": step, "shard": marker.get("shard"), "file": rel, "why": why})
    return markers, damaged


def _described(ds: Dataset, cls: type[Stage] | None, shard: int) -> dict[str, dict]:
    """uid -> the source's own description of the sample (where it came from, its text)."""
    cols = [c for c in (getattr(cls, "origin_column", None), getattr(cls, "text_column", None)) if c]
    try:
        index = ds.read_table(Dataset.index_rel(shard))
    except (OSError, pa.ArrowException):
        return {}
    cols = [c for c in cols if c in index.column_names]
    return {r["uid"]: {c: r[c] for c in cols} for r in index.select(["uid", *cols]).to_pylist()}


class _Tally:
    """Counts and the invariant, stage by stage, over the shards every earlier stage committed."""

    def __init__(self, order: list[str], samples: int):
        self.stages = {n: {"in": 0, "kept": 0, "dropped": Counter(), "notes": Counter()} for n in order}
        self.examples: dict[str, dict[str, list]] = {n: {} for n in order}
        self.done = {n: 0 for n in order}
        self.samples = samples
        self.problems: list[str] = []

    def add(self, name: str, sn: str, current: list[str], kept: list[str], ledger: pa.Table, described: dict) -> None:
        self.done[name] += 1
        drops = ledger.filter(pc.equal(ledger.column("action"), "drop"))
        notes = ledger.filter(pc.equal(ledger.column("action"), "note"))
        dropped = _uids(drops)
        st = self.stages[name]
        st["in"] += len(current)
        st["kept"] += len(kept)
        st["dropped"].update(drops.column("reason").to_pylist())
        st["notes"].update(notes.column("reason").to_pylist())
        cur, k, d = set(current), set(kept), set(dropped)
        if len(current) != len(kept) + len(dropped) or k | d != cur or k & d:
            self.problems.append(f"{name}: shard {sn}: in {len(current)} != kept {len(kept)} + dropped {len(dropped)}"
                                 f" (unaccounted {len(cur - k - d)}, unknown {len((k | d) - cur)}, both {len(k & d)})")
        for row in drops.to_pylist() if self.samples else ():
            ex = self.examples[name].setdefault(row["reason"], [])
            if len(ex) < self.samples:
                ex.append({"uid": row["uid"], **described.get(row["uid"], {}), "detail": row["detail"]})

    def as_json(self) -> dict:
        return {n: {"in": s["in"], "kept": s["kept"], "dropped": dict(s["dropped"].most_common()),
                    "notes": dict(s["notes"].most_common())} for n, s in self.stages.items()}


def _kept(ds: Dataset, name: str, kind: str | None, cls: type[Stage] | None, shard: int) -> list[str]:
    if kind == "source":
        index = ds.read_table(Dataset.index_rel(shard))
        return _uids(index.filter(cls.kept(index)))
    return _uids(ds.read_table(Dataset.sidecar_rel(name, shard), columns=["uid"]))


def inspect_dataset(url: str, samples: int = 0, verify: bool = False) -> dict:
    """The report ``recap inspect`` prints; ``verify`` re-hashes every committed file."""
    ds = Dataset(url)
    if not ds.exists("manifest.json"):
        raise FileNotFoundError(f"{url}: no manifest.json — not a recap dataset (or the run never started)")
    manifest = ds.read_json("manifest.json")
    order: list[str] = manifest.get("stage_order", [])
    meta = manifest.get("stages", {})
    kinds = {k: v.get("kind") for k, v in meta.items()}
    classes = _stage_classes(order)
    n_shards = int(manifest.get("shards", 0))
    tally = _Tally(order, samples)
    markers, damaged = _markers(ds, verify)
    bad_files = {d["file"] for d in damaged}
    for d in damaged:
        where = f"shard {shard_name(d['shard'])}: " if isinstance(d.get("shard"), int) else ""
        tally.problems.append(f"{d['step']}: {where}{d['file']} is damaged ({d['why']}); `recap run` again redoes it")
    source = next((n for n in order if kinds.get(n) == "source"), None)
    if source and classes.get(source) is None:
        tally.problems.append(f"{source}: the source stage is not installed here, so its kept rows cannot be told")

    for shard in range(n_shards):
        sn = shard_name(shard)
        try:
            current = _uids(ds.read_table(Dataset.input_rel(shard), columns=["uid"]))
        except (OSError, pa.ArrowException):
            tally.problems.append(f"input shard {sn} is missing or unreadable; `recap run` again recreates it")
            continue
        described = _described(ds, classes.get(source), shard) if samples else {}
        for name in order:
            marker = markers.get((name, shard))
            if marker is None or marker.get("config_hash") != meta.get(name, {}).get("config_hash"):
                break  # not committed yet (interrupted or still running): counted as incomplete
            if set(marker.get("files", {})) & bad_files or (kinds.get(name) == "source" and classes[name] is None):
                break  # reported above
            try:
                kept = _kept(ds, name, kinds.get(name), classes[name], shard)
                ledger = ds.read_table(Dataset.ledger_rel(name, shard))
            except (OSError, pa.ArrowException) as e:  # damaged on disk: a problem to report, not a crash
                tally.problems.append(f"{name}: shard {sn}: unreadable file ({str(e)[:200]}); `recap run` again redoes it")
                break
            tally.add(name, sn, current, kept, ledger, described)
            current = kept
    incomplete = {n: {"committed": k, "shards": n_shards} for n, k in tally.done.items() if k < n_shards}
    status = manifest.get("status")
    out = {
        "dataset": url,
        "status": status,
        "shards": n_shards,
        "stages": tally.as_json(),
        "complete": not incomplete and status == "done",
        "invariant_ok": not tally.problems,
        "problems": tally.problems,
        "damaged": damaged,
    }
    if incomplete:
        out["incomplete"] = incomplete
    if verify:
        out["verified"] = True
    skipped = ds.read_json(PLAN).get("skipped", 0) if ds.exists(PLAN) else 0
    if skipped:
        out["input_rows_skipped"] = skipped
    summaries = _stage_summaries(ds, classes, n_shards)
    if summaries:
        out["summaries"] = summaries
    if samples:
        out["examples"] = tally.examples
    return out


def _stage_summaries(ds: Dataset, classes: dict[str, type[Stage] | None], n_shards: int) -> dict:
    """Each stage's own view of its effect (Stage.summarize), for stages installed here."""
    out = {}
    for name, cls in classes.items():
        if cls is None:
            continue
        try:
            summary = cls.summarize(StageData(ds, name, n_shards))
        except (OSError, KeyError, ValueError, pa.ArrowException) as e:
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


def _example_line(ex: dict) -> str:
    described = "  ".join(f"{v}"[:80] for k, v in ex.items() if k not in ("uid", "detail") and v)
    return f"          {ex['uid']}  {described}  {(ex['detail'] or '')[:90]}".rstrip()


def format_report(rep: dict) -> str:
    lines = [f"dataset {rep['dataset']}  ({rep['shards']} shards, run {rep.get('status')})"]
    for name, s in rep["stages"].items():
        pct = 100.0 * s["kept"] / s["in"] if s["in"] else 0.0
        lines.append(f"  {name:<12} in {s['in']:>8}  kept {s['kept']:>8} ({pct:5.1f}%)  dropped {sum(s['dropped'].values()):>7}")
        for reason, n in s["dropped"].items():
            lines.append(f"      - {reason:<24} {n:>7}")
            lines.extend(_example_line(ex) for ex in rep.get("examples", {}).get(name, {}).get(reason, []))
        for reason, n in s["notes"].items():
            lines.append(f"      ~ {reason:<24} {n:>7}  (note: kept)")
    if rep.get("input_rows_skipped"):
        lines.append(f"  input: {rep['input_rows_skipped']} bad rows skipped (input/_skipped.jsonl)")
    for name, summary in rep.get("summaries", {}).items():
        lines.extend(_summary_lines(name, summary))
    if rep["invariant_ok"]:
        lines.append("invariant ok: inputs = kept + dropped at every stage" + (
            " (of the committed shards)" if rep.get("incomplete") else ""))
    else:
        lines.append("INVARIANT BROKEN:" if not rep.get("damaged") else "DAMAGED:")
        lines.extend(f"  {p}" for p in rep["problems"][:50])
    if rep.get("incomplete"):
        done = ", ".join(f"{n} {c['committed']}/{c['shards']}" for n, c in rep["incomplete"].items())
        lines.append(f"INCOMPLETE: the run was interrupted or is still going (shards committed: {done}); "
                     f"`recap run` with the same job resumes it")
    return "\n".join(lines)


def exit_ok(rep: dict) -> bool:
    """What `recap inspect`'s exit code says: the dataset is complete and intact."""
    return rep["invariant_ok"] and not rep.get("incomplete") and rep.get("status") == "done"
