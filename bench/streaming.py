"""Does streaming overlap the stages? The demo job's curation stages (download, basic, dedup,
balance) over one demo world on a local Ray: the whole job from scratch, end to end, against each
stage run alone on a dataset where everything before it is already committed. Goal: end to end at
most 1.2x the slowest stage alone (with perfect overlap a pipeline costs its slowest stage; run one
after another it costs their sum, also printed).

A stage "alone" is the wall time of a run that has only that stage left to do, less the time of the
same run once everything is committed (Ray Data's start per segment, reading the markers): what
the stage itself adds. Ray's own start-up is outside every timing.

    .venv/bin/python bench/streaming.py [--samples 2000] [--cpus 2] [--repeat 2]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.report import record  # noqa: E402

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--per-shard", type=int, default=100)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="best of this many for every timing")
    args = ap.parse_args()

    import yaml

    from recap.pipeline.job import load_job
    from recap.pipeline.runner import init_ray, run_job
    from recap.world.generate import generate_world
    from recap.world.server import free_port, serve

    demo = yaml.safe_load((ROOT / "jobs/demo.yaml").read_text())
    names = [next(iter(s)) if isinstance(s, dict) else s for s in demo["stages"]]
    stages = demo["stages"][:names.index("balance") + 1]
    stages[-1]["balance"]["metadata"] = str(ROOT / "jobs" / demo["stages"][names.index("balance")]["balance"]["metadata"])
    work = Path(tempfile.mkdtemp(prefix="recap-bench-streaming-"))
    try:
        port = free_port()
        generate_world(work / "world", samples=args.samples, heldout=0, seed=3, port=port)
        init_ray(None, args.cpus)

        def run(out: Path, upto: int) -> float:
            job = load_job(ROOT / "jobs/demo.yaml", [
                f"input.path={work / 'world' / 'urls.parquet'}", f"download.allow_hosts=[127.0.0.1:{port}]",
                f"download.samples_per_shard={args.per_shard}", f"stages={json.dumps(stages[:upto])}"],
                output=str(out))
            t = time.perf_counter()
            run_job(job, cpus=args.cpus, progress=False)
            return time.perf_counter() - t

        with serve(work / "world", port=port):
            whole, alone = [], {n: [] for n in ["download", *(next(iter(s)) for s in stages)]}
            for rep in range(args.repeat):
                whole.append(run(work / f"whole{rep}", len(stages)))
                out = work / f"steps{rep}"
                for k, name in enumerate(alone):
                    t = run(out, k)
                    alone[name].append(t - run(out, k))  # less the same run with nothing left to do
                print(f"run {rep + 1}: end to end {whole[-1]:.1f}s; alone "
                      + ", ".join(f"{n} {v[-1]:.1f}s" for n, v in alone.items()), flush=True)
        best = {n: min(v) for n, v in alone.items()}
        slowest = max(best, key=best.get)
        e2e = min(whole)
        print(f"\nend to end {e2e:.1f}s; each stage alone: "
              + ", ".join(f"{n} {s:.1f}s" for n, s in best.items())
              + f" (sum {sum(best.values()):.1f}s)")
        print(f"ratio end to end / slowest stage alone ({slowest}): {e2e / best[slowest]:.2f}  (goal <= 1.2); "
              f"/ sum of the stages: {e2e / sum(best.values()):.2f}")
        record("streaming: end to end vs slowest stage alone", e2e / best[slowest], goal="<= 1.2", value=e2e,
               baseline=best[slowest], unit="s", against=f"{slowest} alone", sum_of_stages=round(sum(best.values()), 2),
               samples=args.samples)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
