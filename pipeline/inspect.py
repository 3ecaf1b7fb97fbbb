"""``recap inspect``: per-stage counts from the files themselves (not from the markers), drops by
reason, and the invariant *inputs = kept + dropped* checked sample by sample at every stage."""
from __future__ import annotations

import json
from collections import Counter

import pyarrow.compute as pc

from recap.pipeline.storage import Dataset, shard_name


def _uids(table) -> list[str]:
    return table.column("uid").to_pylist()


def inspect_dataset(url: str, samples: int = 0) -> dict:
    ds = Dataset(url)
    if not ds.exists("manifest.json"):
        raise FileNotFoundError(f"{url}: no manifest.json — not a recap dataset (or the run never started)")
    manifest = ds.read_json("manifest.json")
    order: list[str] = manifest.get("stage_order", [])
    kinds = {k: v.get("kind") for k, v in manifest.get("stages", {}).items()}
    n_shards = int(manifest.get("shards", 0))
    stages = {name: {"in": 0, "kept": 0, "dropped": Counter(), "notes": Counter()} for name in order}
    examples: dict[str, dict[str, list]] = {name: {} for name in order}
    problems: list[str] = []

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
                    index = ds.read_table(Dataset.index_rel(shard), columns=["uid", "status"])
                    kept = _uids(index.filter(pc.equal(index.column("status"), "success")))
                else:
                    kept = _uids(ds.read_table(Dataset.sidecar_rel(name, shard), columns=["uid"]))
                ledger = ds.read_table(Dataset.ledger_rel(name, shard))
            except FileNotFoundError:
                problems.append(f"{name}: shard {sn} has not been committed (incomplete run)")
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
    summaries = _stage_summaries(ds, order, n_shards)
    if summaries:
        out["summaries"] = summaries
    if samples:
        out["examples"] = examples
    return out


def _stage_summaries(ds: Dataset, order: list[str], n_shards: int) -> dict:
    """Each stage's own view of its effect (Stage.summarize), for stages installed here."""
    from recap.pipeline.stage import UnknownStage, get_stage_class

    out = {}
    for name in order:
        try:
            summary = get_stage_class(name).summarize(ds, n_shards)
        except (UnknownStage, FileNotFoundError, KeyError, ValueError) as e:
            summary = {"error": f"{type(e).__name__}: {e}"}
        if summary:
            out[name] = summary
    return out


def _format_summary(name: str, summary: dict) -> list[str]:
    if "before" in summary and "after" in summary:  # an entry-distribution summary (balance)
        b, a = summary["before"], summary["after"]
        lines = [f"  {name}: entry counts before -> after (t = {summary['t']:g})"]
        for key in ("matches", "entries_matched", "max_count", "head_share", "tail_share", "flatness",
                    "samples_matched", "samples_in_tail"):
            if key in b and key in a:
                lines.append(f"      {key:<16} {b[key]!s:>10} -> {a[key]!s:<10}")
        buckets = sorted(set(b["count_histogram"]) | set(a["count_histogram"]), key=lambda k: int(k.split("-")[0].rstrip("+")))
        lines.append("      entries by count: " + "  ".join(
            f"{k}: {b['count_histogram'].get(k, 0)}->{a['count_histogram'].get(k, 0)}" for k in buckets))
        lines.append("      top entries: " + ", ".join(f"{e['entry']!r} {e['before']}->{e['after']}" for e in summary["top_entries"]))
        return lines
    return [f"  {name}: " + json.dumps(summary, sort_keys=True)[:400]]


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
        lines.extend(_format_summary(name, summary))
    if rep["invariant_ok"]:
        lines.append("invariant ok: inputs = kept + dropped at every stage")
    else:
        lines.append("INVARIANT BROKEN:")
        lines.extend(f"  {p}" for p in rep["problems"][:50])
    return "\n".join(lines)
