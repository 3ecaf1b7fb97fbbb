"""recap's download vs img2dataset.download on the same URL list, from the same local server, with
the same resize settings and process count, in one run. Prints images/s for both and the ratio.

    .venv/bin/python bench/download.py [--samples 4000] [--processes 2] [--threads 32] [--faults]

By default only the world's fault-free URLs are used (a throughput comparison); --faults keeps the
broken ones too (timeouts then dominate both). Ray's start-up is measured apart and excluded, as
img2dataset's interpreter start is; it is printed so nobody is misled.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import record  # noqa: E402

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def _count_i2d(folder: Path) -> int:
    import json
    n = 0
    for stats in folder.glob("*_stats.json"):
        n += json.loads(stats.read_text())["successes"]
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=8000)
    ap.add_argument("--repeat", type=int, default=2, help="alternate the two this many times; best of each counts")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--samples-per-shard", type=int, default=500)
    ap.add_argument("--faults", action="store_true")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    from img2dataset import download as i2d_download

    from recap.pipeline.job import build_job
    from recap.pipeline.runner import init_ray, run_job
    from recap.world.generate import generate_world
    from recap.world.server import serve

    work = Path(tempfile.mkdtemp(prefix="recap-bench-dl-"))
    try:
        port = free_port()
        generate_world(work / "w", samples=args.samples, heldout=0, seed=1, port=port)
        urls = pq.read_table(work / "w/urls.parquet")
        truth = pq.read_table(work / "w/truth.parquet")
        if not args.faults:
            urls = urls.filter(pc.equal(truth.column("fault"), "none"))
        urls = urls.select(["url", "caption"])
        pq.write_table(urls, work / "urls.parquet")
        n = urls.num_rows
        resize = dict(image_size=args.image_size, resize_mode="border")
        print(f"{n} URLs, {args.processes} processes x {args.threads} threads, image_size {args.image_size}")

        with serve(work / "w", port=port):
            t = time.time()
            init_ray(None, args.processes)
            ray_start = time.time() - t
            recap_runs, i2d_runs = [], []
            for rep in range(args.repeat):
                job = build_job({
                    "name": "bench", "seed": 0, "input": {"path": str(work / "urls.parquet")},
                    "output": str(work / f"recap{rep}"),
                    "download": {**resize, "samples_per_shard": args.samples_per_shard, "threads": args.threads,
                                 "timeout": 3, "retries": 0, "allow_hosts": [f"127.0.0.1:{port}"]}, "stages": []}, "bench")
                t = time.time()
                run_job(job, progress=False)
                secs = time.time() - t
                ok = sum(pq.read_table(p, columns=["status"]).column("status").to_pylist().count("success")
                         for p in (work / f"recap{rep}/shards").glob("*.parquet"))
                recap_runs.append((ok / secs, ok, secs))

                t = time.time()
                i2d_download(url_list=str(work / "urls.parquet"), input_format="parquet", url_col="url",
                             caption_col="caption", output_folder=str(work / f"i2d{rep}"), output_format="webdataset",
                             processes_count=args.processes, thread_count=args.threads,
                             number_sample_per_shard=args.samples_per_shard, timeout=3, retries=0,
                             distributor="multiprocessing", enable_wandb=False, **resize)
                secs = time.time() - t
                ok = _count_i2d(work / f"i2d{rep}")
                i2d_runs.append((ok / secs, ok, secs))
                print(f"run {rep}: recap {recap_runs[-1][0]:.1f} images/s, img2dataset {i2d_runs[-1][0]:.1f} images/s", flush=True)
        r, recap_ok, recap_s = max(recap_runs)
        i, i2d_ok, i2d_s = max(i2d_runs)
        print(f"recap      : {recap_ok:6d} images in {recap_s:7.2f}s = {r:8.1f} images/s  (best of {args.repeat}; Ray start-up {ray_start:.1f}s excluded)")
        print(f"img2dataset: {i2d_ok:6d} images in {i2d_s:7.2f}s = {i:8.1f} images/s  (best of {args.repeat})")
        print(f"ratio recap/img2dataset: {r / i:.2f}  (goal >= 1.0)")
        record("download images/s", r / i, goal=">= 1.0", value=r, baseline=i, unit="images/s",
               against="img2dataset, same settings and processes", samples=args.samples)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
