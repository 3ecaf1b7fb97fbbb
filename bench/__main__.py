"""Every benchmark in bench/, one after another, and one table of their ratios.

    python -m bench [--quick] [--only NAME ...] [--json PATH] [--timeout SECONDS]

Each benchmark is its own script (run one by hand for its whole report); here each runs in a
child process, says its headline figures through ``bench/report.py``, and this prints them in one
table: ours, the baseline measured in the same run, their ratio and the goal. ``--quick`` runs
each on small inputs (about 10 minutes in all on 2 CPU cores; ratios are noisier); the default
sizes are the scripts' own. The results, with the machine's facts (cores, memory, load, versions,
commit), go to a JSON file for comparisons over time (bench/results/suite-<time>.json unless
``--json``). A benchmark that fails or times out is reported as such; the others still run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.report import ENV, meets  # noqa: E402

# (name, script and arguments of the quick run, arguments of the full run)
SUITE: list[tuple[str, list[str], list[str]]] = [
    ("matching", ["metaclip_match.py", "--entries", "6000", "--texts", "20000", "--repeat", "2", "--stage",
                  "--shards", "4"], ["metaclip_match.py", "--stage"]),
    ("download", ["download.py", "--samples", "1000", "--repeat", "1"], ["download.py"]),
    ("ingest", ["ingest.py", "--shards", "2", "--per-shard", "500", "--repeat", "1"], ["ingest.py"]),
    ("clip scoring", ["clip_score.py", "--only", "clip", "--only", "phash", "--images", "512", "--repeat", "1",
                      "--hashes", "20000"], ["clip_score.py"]),
    ("dedup quality", ["dedup_quality.py", "--samples", "600", "--heldout", "120", "--seeds", "5", "--resize", "no"],
     ["dedup_quality.py"]),
    ("kNN", ["knn.py", "--n", "20000", "--queries", "200"], ["knn.py", "--n", "1000000"]),
    ("reinforce", ["knn.py", "--reinforce", "--samples", "64"], ["knn.py", "--reinforce"]),
    ("LLM client", ["llm_client.py", "--requests", "64", "--images", "16"], ["llm_client.py"]),
    ("rerun", ["resume.py", "--samples", "300", "--checks", "1", "--no-rerun"], ["resume.py"]),
    ("streaming", ["streaming.py", "--samples", "600", "--repeat", "1"], ["streaming.py"]),
    ("trainer", ["train.py", "--steps", "20", "--warmup", "5", "--repeat", "1"], ["train.py"]),
    ("CLIP filter quality", ["clip_filter_quality.py", "--samples", "600", "--heldout", "400", "--steps", "20",
                             "--no-control"], ["clip_filter_quality.py"]),
    ("learning", ["learning.py", "--models", "recap-tiny-cnn", "--steps", "40", "--train-samples", "800",
                  "--eval-samples", "140"], ["learning.py"]),
    ("caption content", ["caption_content.py", "--steps", "40", "--train-samples", "1000", "--eval-samples", "140"],
     ["caption_content.py"]),
]


def machine() -> dict:
    """What the figures were measured on."""
    facts: dict = {"cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                   "load_average": os.getloadavg()[0], "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        cpu = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")]
        facts["cpu"] = cpu[0].split(":", 1)[1].strip() if cpu else platform.processor()
        mem = [ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")]
        facts["memory_gb"] = round(int(mem[0].split()[1]) / 2**20, 1) if mem else None
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("recap-curate", "torch", "ray", "pyarrow", "faiss-cpu", "open_clip_torch", "img2dataset", "numpy"):
        try:
            facts[pkg] = version(pkg)
        except PackageNotFoundError:
            facts[pkg] = None
    try:
        facts["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                         timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        facts["commit"] = None
    try:
        import torch

        facts["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - a fact, not a requirement
        facts["gpu"] = None
    return facts


def run_one(name: str, argv: list[str], timeout: float, log_dir: Path) -> dict:
    with tempfile.NamedTemporaryFile("w+", suffix=".jsonl", delete=False) as f:
        rec = f.name
    log = log_dir / f"{name.replace(' ', '_')}.log"
    started = time.monotonic()
    status = "ok"
    with open(log, "w") as out:
        try:
            p = subprocess.run([sys.executable, str(ROOT / "bench" / argv[0]), *argv[1:]], cwd=ROOT, stdout=out,
                               stderr=subprocess.STDOUT, timeout=timeout, env={**os.environ, ENV: rec})
            if p.returncode != 0:
                status = f"failed (exit {p.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout:.0f}s"
    rows = [json.loads(ln) for ln in Path(rec).read_text().splitlines() if ln.strip()]
    os.unlink(rec)
    if status == "ok" and not rows:
        status = "said nothing"
    tail = "" if status == "ok" else log.read_text()[-1500:]
    return {"bench": name, "command": " ".join(["bench/" + argv[0], *argv[1:]]), "status": status,
            "seconds": round(time.monotonic() - started, 1), "results": rows, "log": str(log), "log_tail": tail}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def table(runs: list[dict]) -> str:
    lines = [f"{'benchmark':<20} {'metric':<58} {'ours':>9} {'baseline':>9} {'ratio':>7} {'goal':>7}  met",
             "-" * 122]
    for r in runs:
        if not r["results"]:
            lines.append(f"{r['bench']:<20} {r['status']}")
            continue
        for x in r["results"]:
            ok = meets(x["ratio"], x["goal"])
            lines.append(f"{r['bench']:<20} {x['metric'][:58]:<58} {_fmt(x['value']):>9} {_fmt(x['baseline']):>9} "
                         f"{_fmt(x['ratio']):>7} {x['goal'] or '-':>7}  {'-' if ok is None else 'yes' if ok else 'NO'}")
        if r["status"] != "ok":
            lines.append(f"{'':<20} ({r['status']})")
    return "\n".join(lines)


def main() -> int:
    names = [n for n, _, _ in SUITE]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small inputs: about 10 minutes on 2 CPU cores")
    ap.add_argument("--only", action="append", choices=names, help="run only these (repeatable)")
    ap.add_argument("--json", type=Path, help="where to save the results (default bench/results/suite-<time>.json)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per benchmark (default 300 quick, 7200 full)")
    args = ap.parse_args()
    timeout = args.timeout or (300 if args.quick else 7200)
    out = args.json or ROOT / "bench" / "results" / f"suite-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="recap-bench-logs-"))
    facts = machine()
    print(f"{facts['cores']} cores ({facts.get('cpu')}), {facts.get('memory_gb')} GB, load {facts['load_average']:.1f}; "
          f"{'quick' if args.quick else 'full'} sizes; logs in {log_dir}", flush=True)
    runs = []
    for name, quick, full in SUITE:
        if args.only and name not in args.only:
            continue
        r = run_one(name, quick if args.quick else full, timeout, log_dir)
        runs.append(r)
        print(f"  {name}: {r['status']} in {r['seconds']:.0f}s", flush=True)
    facts["load_average_after"] = os.getloadavg()[0]
    print()
    print(table(runs))
    out.write_text(json.dumps({"machine": facts, "quick": args.quick, "runs": runs}, indent=1) + "\n")
    print(f"\nsaved {out}")
    return 0 if all(r["status"] == "ok" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
