"""recap's ingest of shards you already have vs a plain reading loop over the same files, in one
run: webdataset tars (recap's `webdataset` source, read in place) against a `webdataset` loop that
reads and decodes every sample, and Parquet tables of image bytes (the `parquet` source, also read
in place) against a pyarrow scan that decodes every image. Prints samples/s and the ratios.

    .venv/bin/python bench/ingest.py [--shards 8] [--per-shard 1000] [--processes 2] [--repeat 2]

Both sides use the same number of processes (Ray workers for recap, a process pool for the plain
loops) and read every image with Pillow: the loops decode in full, recap checks (a JPEG's every
entropy-coded block, without the inverse DCT). Ray's start-up is measured apart and excluded, as the
pool's is; it is printed so nobody is misled.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import record  # noqa: E402

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


# -- the input ------------------------------------------------------------------------------------

def _image(rng: np.random.Generator, size: int) -> bytes:
    """A smooth gradient plus noise: decodes like a photo, not like a flat colour."""
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([(x * 255 // size), (y * 255 // size), ((x + y) * 127 // size)], axis=-1)
    pixels = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_inputs(work: Path, shards: int, per_shard: int, size: int) -> tuple[list[Path], list[Path], int]:
    """img2dataset's layout (jpg, json, txt per sample) and the same samples as Parquet tables."""
    rng = np.random.default_rng(0)
    pool = [_image(rng, size) for _ in range(64)]  # reused: generating is not what is measured
    (work / "wds").mkdir()
    (work / "pq").mkdir()
    tars, tables, total = [], [], 0
    for s in range(shards):
        keys, urls, caps, imgs = [], [], [], []
        tar_path = work / "wds" / f"{s:05d}.tar"
        with tarfile.open(tar_path, "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                img = pool[(s * per_shard + i) % len(pool)]
                url, cap = f"http://example.com/{key}.jpg", f"a synthetic photo number {key}"
                meta = json.dumps({"key": key, "url": url, "caption": cap, "status": "success"}).encode()
                for ext, data in (("jpg", img), ("json", meta), ("txt", cap.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                keys.append(key), urls.append(url), caps.append(cap), imgs.append(img)
        tars.append(tar_path)
        table_path = work / "pq" / f"{s:05d}.parquet"
        pq.write_table(pa.table({"key": keys, "url": urls, "caption": caps, "image": pa.array(imgs, pa.binary())}),
                       table_path, row_group_size=256)
        tables.append(table_path)
        total += per_shard
    return tars, tables, total


# -- the plain loops ------------------------------------------------------------------------------

def _wds_count(paths: list[str]) -> int:
    import webdataset as wds

    n = 0
    for sample in wds.WebDataset(paths, shardshuffle=False, empty_check=False).decode("pil"):
        n += sample["jpg"].size[0] > 0
    return n


def _parquet_count(paths: list[str], decode: bool) -> int:
    from PIL import Image

    n = 0
    for path in paths:
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(columns=["caption", "image"], batch_size=256):
            for data in batch.column("image").to_pylist():
                if decode:
                    with Image.open(io.BytesIO(data)) as img:
                        img.load()
                        n += img.convert("RGB").size[0] > 0
                else:
                    n += len(data) > 0
    return n


def _split(paths: list[Path], parts: int) -> list[list[str]]:
    return [[str(p) for p in paths[i::parts]] for i in range(parts) if paths[i::parts]]


def plain(fn, paths: list[Path], processes: int, *args) -> tuple[float, int, float]:
    """(samples/s, samples, seconds) of fn over the files split across a warm process pool."""
    with get_context("spawn").Pool(processes) as pool:
        pool.map(_noop, range(processes))  # start the workers before the clock
        t = time.time()
        n = sum(pool.starmap(fn, [(part, *args) for part in _split(paths, processes)]))
        secs = time.time() - t
    return n / secs, n, secs


def _noop(_: int) -> None:
    import PIL.Image  # noqa: F401 - imports paid before the clock, as Ray's workers pay theirs
    import webdataset  # noqa: F401


# -- recap ----------------------------------------------------------------------------------------

def recap_ingest(work: Path, name: str, inp: dict, section: tuple[str, dict]) -> tuple[float, int, float]:
    from recap.pipeline.job import build_job
    from recap.pipeline.runner import run_job

    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    job = build_job({"name": "bench", "input": inp, "output": str(out), section[0]: section[1], "stages": []}, "bench")
    t = time.time()
    run_job(job, progress=False)
    secs = time.time() - t
    kept = sum(pq.read_table(p, columns=["status"]).column("status").to_pylist().count("success")
               for p in (out / "shards").glob("*.parquet"))
    return kept / secs, kept, secs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="alternate the two this many times; best of each counts")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    from recap.pipeline.runner import init_ray

    work = Path(tempfile.mkdtemp(prefix="recap-bench-ingest-"))
    try:
        tars, tables, total = make_inputs(work, args.shards, args.per_shard, args.image_size)
        mb = sum(p.stat().st_size for p in tars) / 1e6
        print(f"{total} samples in {args.shards} tars ({mb:.0f} MB) and {args.shards} Parquet files, "
              f"{args.image_size}px JPEGs, {args.processes} processes")
        t = time.time()
        init_ray(None, args.processes)
        ray_start = time.time() - t
        runs: dict[str, list] = {k: [] for k in ("recap_wds", "wds", "recap_pq", "pq_decode", "pq_scan")}
        for rep in range(args.repeat):
            wds_input = {"kind": "webdataset", "paths": str(work / "wds/*.tar")}
            runs["recap_wds"].append(recap_ingest(work, f"wds{rep}", wds_input, ("webdataset", {})))
            runs["wds"].append(plain(_wds_count, tars, args.processes))
            pq_input = {"kind": "parquet", "paths": str(work / "pq/*.parquet")}
            pq_section = ("parquet", {"rows_per_shard": args.per_shard})
            runs["recap_pq"].append(recap_ingest(work, f"pq{rep}", pq_input, pq_section))
            runs["pq_decode"].append(plain(_parquet_count, tables, args.processes, True))
            runs["pq_scan"].append(plain(_parquet_count, tables, args.processes, False))
            print(f"run {rep}: " + ", ".join(f"{k} {v[-1][0]:.0f}/s" for k, v in runs.items()), flush=True)
        best = {k: max(v) for k, v in runs.items()}
        line = "{:<34}: {:6d} samples in {:7.2f}s = {:8.1f} samples/s"

        def show(label: str, key: str) -> str:
            rate, n, secs = best[key]
            return line.format(label, n, secs, rate)

        print(show("recap webdataset (in place)", "recap_wds")
              + f"  (best of {args.repeat}; Ray start-up {ray_start:.1f}s excluded)")
        print(show("webdataset loop (read + decode)", "wds"))
        print(f"ratio recap/webdataset: {best['recap_wds'][0] / best['wds'][0]:.2f}  (goal >= 0.8)")
        print(show("recap parquet (in place)     ", "recap_pq"))
        print(show("pyarrow scan + decode", "pq_decode"))
        print(show("pyarrow scan only (no decode)", "pq_scan"))
        record("webdataset source samples/s", best["recap_wds"][0] / best["wds"][0], goal=">= 0.8",
               value=best["recap_wds"][0], baseline=best["wds"][0], unit="samples/s",
               against="webdataset loop reading and decoding")
        record("parquet source samples/s", best["recap_pq"][0] / best["pq_decode"][0], goal=">= 0.8",
               value=best["recap_pq"][0], baseline=best["pq_decode"][0], unit="samples/s",
               against="pyarrow scan + decode")
        print(f"ratio recap/pyarrow scan + decode: {best['recap_pq'][0] / best['pq_decode'][0]:.2f}  (goal >= 0.8); "
              f"recap/scan only: {best['recap_pq'][0] / best['pq_scan'][0]:.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
