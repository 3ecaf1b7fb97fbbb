"""Presenting ``evaluate``'s result: flat ``task/metric`` numbers for logs, and a table for people."""
from __future__ import annotations

from typing import Any


def _zeroshot_results(result: dict[str, Any]) -> list[tuple[str | None, dict[str, Any] | None]]:
    """(label set name, its zero-shot result): the main labels (name None) first, then each further set."""
    return [(None, result.get("zeroshot")), *result.get("zeroshot_label_sets", {}).items()]


def flatten(result: dict[str, Any]) -> dict[str, float]:
    """The headline numbers as flat ``task/metric`` keys (for metrics.csv / tensorboard)."""
    flat: dict[str, float] = {}
    for name, zs in _zeroshot_results(result):
        if zs is not None and "top1" in zs:
            prefix = f"zeroshot/{name}" if name else "zeroshot"
            flat.update({f"{prefix}/top1": zs["top1"], f"{prefix}/top5": zs["top5"]})
    rt = result.get("retrieval", {})
    for d in ("image_to_text", "text_to_image"):
        for k, v in rt.get(d, {}).items():
            flat[f"retrieval/{d}/{k}"] = v
    cp = result.get("compositional", {})
    if "accuracy" in cp:
        flat["compositional/accuracy"] = cp["accuracy"]
        for t, v in cp["by_type"].items():
            flat[f"compositional/{t}"] = v["accuracy"]
    return flat


def format_table(result: dict[str, Any]) -> str:
    """A human-readable table of ``evaluate``'s result."""
    lines = [f"data: {result.get('data')}   samples: {result.get('n')}"]
    if result.get("skipped"):
        lines.append("skipped: " + ", ".join(f"{k}={v}" for k, v in result["skipped"].items()))
    rows: list[tuple[str, str, str]] = []
    for name, zs in _zeroshot_results(result):
        if zs is None:
            continue
        which = f", {name}" if name else ""
        if "top1" in zs:
            rows += [(f"zero-shot top-1{which} ({zs['n_classes']} classes)", f"{zs['top1']:.4f}", f"{zs['chance_top1']:.4f}"),
                     (f"zero-shot top-5{which}", f"{zs['top5']:.4f}", f"{zs['chance_top5']:.4f}")]
        else:
            rows.append((f"zero-shot{which}", f"skipped: {zs['skipped']}", ""))
    rt = result.get("retrieval")
    if rt is not None:
        if "image_to_text" in rt:
            for d, label in (("image_to_text", "image→text"), ("text_to_image", "text→image")):
                for k, v in rt[d].items():
                    rows.append((f"retrieval {label} {k}", f"{v:.4f}", f"{rt['chance'][k]:.4f}"))
        else:
            rows.append(("retrieval", f"skipped: {rt['skipped']}", ""))
    cp = result.get("compositional")
    if cp is not None:
        if "accuracy" in cp:
            rows.append((f"compositional (n={cp['n']})", f"{cp['accuracy']:.4f}", "0.5000"))
            for t, v in cp["by_type"].items():
                rows.append((f"  {t} (n={v['n']})", f"{v['accuracy']:.4f}", "0.5000"))
        else:
            rows.append(("compositional", f"skipped: {cp['skipped']}", ""))
    lp = result.get("linear_probe")
    if lp is not None:
        if "top1" in lp:
            which = f", {lp['label_set']}" if lp.get("label_set") else ""
            rows.append((f"linear probe top-1{which} ({lp['n_classes']} classes, {lp['n_train']} train)",
                         f"{lp['top1']:.4f}", f"{lp['chance_top1']:.4f}"))
        else:
            rows.append(("linear probe", f"skipped: {lp['skipped']}", ""))
    if rows:
        w = max(len(r[0]) for r in rows)
        lines.append(f"{'metric'.ljust(w)}  {'value':>8}  {'chance':>8}")
        lines += [f"{a.ljust(w)}  {b:>8}  {c:>8}" for a, b, c in rows]
    return "\n".join(lines)

