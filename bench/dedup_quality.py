"""Does dedup find the demo world's planted duplicates, and only them? Generates worlds, serves
each on 127.0.0.1, runs the demo job's download then ``dedup`` (exact + phash, with the held-out
split as the evaluation set) on a local Ray, and scores the verdicts against truth.parquet:
recall over the planted copies (byte-identical, repeated URL, re-rendered near copies), false
drops among the samples that are neither, and the pool's copies of held-out images caught. Each
world runs with the thumbnail check (the default) and with the hash alone at the same distance.

    .venv/bin/python bench/dedup_quality.py [--samples 3000] [--heldout 600] [--seeds 5 11]
                                            [--resize no border] [--distance BITS]

What it measured on 2 CPU cores (3,000 URLs, 600 held out, phash_distance 4, phash_rmse 0.06;
about 1 min per run):

    seed  resize  check   exact   url     near    recall  false drops  held-out copies (wrong)
    (filled in from a run; see the README's dedup section)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.report import record  # noqa: E402
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from recap.world.generate import generate_world  # noqa: E402
from recap.world.server import free_port, serve  # noqa: E402
from tests.test_dedup import dedup_figures, run_dedup  # noqa: E402


def _share(fig: dict, kind: str) -> str:
    return f"{fig['found'][kind]}/{fig['need'][kind]}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--heldout", type=int, default=600)
    ap.add_argument("--seeds", type=int, nargs="+", default=[5, 11])
    ap.add_argument("--resize", nargs="+", default=["no", "border"], help="download.resize_mode values")
    ap.add_argument("--distance", type=int, default=None, help="phash_distance (default: the stage's)")
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()
    print("seed  resize  check   exact    url      near     recall  false drops     held-out copies (wrong)")
    with tempfile.TemporaryDirectory(prefix="recap-dedup-bench-") as tmp:
        for seed in args.seeds:
            port = free_port()
            world = Path(tmp) / f"world{seed}"
            generate_world(world, samples=args.samples, heldout=args.heldout, seed=seed, port=port)
            with serve(world, port=port):
                for resize in args.resize:
                    for check in (0.06, None):
                        cfg = {"methods": ["exact", "phash"], "phash_rmse": check,
                               "eval_set": str(world / "heldout")}
                        if args.distance is not None:
                            cfg["phash_distance"] = args.distance
                        out = Path(tmp) / f"out{seed}{resize}{check}"
                        fig = dedup_figures(world, out, run_dedup(world, port, out, cfg, cpus=args.cpus,
                                                                  resize_mode=resize, shard=500))
                        false = len(fig["false"])
                        print(f"{seed:<5} {resize:<7} {'thumb' if check else 'hash':<7} "
                              f"{_share(fig, 'exact'):<8} {_share(fig, 'url'):<8} {_share(fig, 'near'):<8} "
                              f"{fig['recall']:.3f}   {false:>3} ({false / max(1, fig['innocent']):.2%})   "
                              f"{len(fig['caught'])}/{fig['contaminated']} ({len(fig['wrongly_contaminated'])})",
                              flush=True)
                        if check:
                            record(f"dedup recall (seed {seed}, resize {resize})", fig["recall"], goal=">= 0.95",
                                   against="truth.parquet's planted copies",
                                   false_drop_rate=round(false / max(1, fig["innocent"]), 5),
                                   heldout_caught=f"{len(fig['caught'])}/{fig['contaminated']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
