"""recap's `clip` stage on Ray vs a plain loop of the same open_clip model's forward, in one run:
N images in webdataset tars, already ingested (the `webdataset` source, read in place), scored by
a job whose only new step is `clip`, against `model.encode_image` + `model.encode_text`, normalise,
cosine on the same images already decoded and transformed and the captions already tokenized,
with the same batch size. Prints img/s both ways and the ratio (stage / plain loop).

    .venv/bin/python bench/clip_score.py [--images 4096] [--per-shard 512] [--batch-size 256]
                                         [--model recap-tiny] [--image-size 256] [--repeat 2]
                                         [--only clip|phash|semantic ...]

A third figure splits the gap: the stage's own `process()` called in a plain process on the same
batches (decode, RGB, the model's transform, tokenizing with the truncation count, verdicts), no
engine. So stage.process / forward is the stage's per-image work, engine / stage.process what Ray,
reading the shard and committing cost. Below them: when the actors came up and the shards were
committed, a steady-state rate (median shard, no start-up), and CPU seconds per image on each side
(Ray's own count for the actors), which other load on a shared machine changes least.

Threads: Ray gives each clip actor one CPU and sets OMP_NUM_THREADS to it, so the actor's torch
runs that many threads; the plain loops run as many processes as the engine ran actors, each with
the same thread count (printed). Ray's start-up is measured apart and excluded, and so is the
ingest of the tars; the engine's own fixed costs inside the run (starting actors, importing torch,
building the model) are not, and are shown apart. The model is random-init (`pretrained: null`):
weights are never downloaded, and a forward costs the same whatever they are.

`--only phash` times dedup's multi-index Hamming search against the all-pairs scan on 100k hashes
(same pairs checked); `--only semantic` times SemDeDup against N.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from multiprocessing import get_context
from multiprocessing.connection import Connection
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import record  # noqa: E402

import numpy as np

BENCHES = ("clip", "phash", "semantic")


# -- the input ------------------------------------------------------------------------------------

from ingest import _image  # noqa: E402 - bench/ is the script's folder: the same generated photo


def make_tars(out: Path, images: int, per_shard: int, size: int) -> list[Path]:
    """img2dataset's layout: jpg, json and txt members per sample."""
    rng = np.random.default_rng(0)
    pool = [_image(rng, size) for _ in range(64)]  # reused: generating is not what is measured
    out.mkdir()
    tars = []
    for s, start in enumerate(range(0, images, per_shard)):
        path = out / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(start, min(start + per_shard, images)):
                key = f"{i:09d}"
                cap = f"a synthetic photo, number {i}, of a gradient with some noise"
                meta = json.dumps({"key": key, "url": f"http://example.com/{key}.jpg", "caption": cap,
                                   "status": "success"}).encode()
                for ext, data in (("jpg", pool[i % len(pool)]), ("json", meta), ("txt", cap.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        tars.append(path)
    return tars


def read_samples(tar_path: str) -> list[tuple[str, bytes, str]]:
    """(url, jpg bytes, caption) of every sample, in tar order."""
    by_key: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            by_key.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return [(json.loads(v["json"])["url"], v["jpg"], v["txt"].decode()) for v in by_key.values()]


# -- the plain loops (one process per engine actor) -----------------------------------------------

def _worker(conn: Connection, tars: list[str], model_name: str, threads: int, batch_size: int) -> None:
    """Builds the model and the inputs of its share of tars, says ready, then runs what it is told
    to, timing only the loop itself."""
    import open_clip
    import pyarrow as pa
    import torch
    from PIL import Image

    import recap.trainer.models  # noqa: F401 - registers recap-tiny with open_clip
    from recap.pipeline.stage import StageContext
    from recap.pipeline.uid import make_uid
    from recap.stages.clip import ClipConfig, ClipStage

    torch.set_num_threads(threads)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    stage = ClipStage(ClipConfig(model=model_name, pretrained=None, batch_size=batch_size),
                      StageContext("bench", 0, "clip", tempfile.gettempdir()))
    stage.setup()

    # batches cut per tar, as the engine cuts each shard
    tensors: list[tuple[torch.Tensor, torch.Tensor]] = []
    tables: list[pa.Table] = []
    for path in tars:
        samples = read_samples(path)
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            pics = [preprocess(Image.open(io.BytesIO(data)).convert("RGB")) for _, data, _ in chunk]
            tensors.append((torch.stack(pics), tokenizer([cap for _, _, cap in chunk])))
            tables.append(pa.table({"uid": [make_uid(u, c) for u, _, c in chunk],
                                    "jpg": pa.array([d for _, d, _ in chunk], pa.binary()),
                                    "caption": [c for _, _, c in chunk]}))

    def forward() -> int:
        n = 0
        with torch.inference_mode():
            for images, tokens in tensors:
                i, t = model.encode_image(images), model.encode_text(tokens)
                i, t = i / i.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
                n += int((i * t).sum(-1).isfinite().sum())
        return n

    def process() -> int:
        n = 0
        for table in tables:
            out = stage.process(table)
            n += out.column("_drop").null_count  # the kept rows, as the stage run counts them
        return n

    # warm, as an actor is by its first batches: the tokenizer's BPE cache, torch's first calls
    with torch.inference_mode():
        model.encode_image(tensors[0][0][:8]), model.encode_text(tensors[0][1][:8])
    stage.process(tables[0].slice(0, 8))
    conn.send(("ready", torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")))
    runs = {"forward": forward, "process": process}
    while (cmd := conn.recv()) is not None:
        t, cpu = time.perf_counter(), time.process_time()
        n = runs[cmd]()
        conn.send((n, time.perf_counter() - t, time.process_time() - cpu))
    stage.teardown()


class PlainPool:
    """``processes`` warm workers, each with ``threads`` torch threads and its share of the tars."""

    def __init__(self, tars: list[Path], processes: int, threads: int, model: str, batch_size: int):
        ctx = get_context("spawn")
        self.conns, self.procs = [], []
        # what Ray sets for a worker, so numpy's and torch's pools start the same size as the actors'
        saved = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = str(threads)
        try:
            for k in range(processes):
                share = [str(p) for p in tars[k::processes]]
                if not share:
                    continue
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(child, share, model, threads, batch_size), daemon=True)
                proc.start()
                self.conns.append(parent)
                self.procs.append(proc)
        finally:
            if saved is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = saved
        self.threads = [c.recv()[1:] for c in self.conns]

    def run(self, what: str) -> dict:
        """img/s, images, seconds (from telling every worker to start until the last one is done)
        and the workers' CPU seconds."""
        t = time.perf_counter()
        for c in self.conns:
            c.send(what)
        results = [c.recv() for c in self.conns]
        secs = time.perf_counter() - t
        n = sum(r[0] for r in results)
        return {"rate": n / secs, "n": n, "secs": secs, "cpu": sum(r[2] for r in results)}

    def close(self) -> None:
        for c in self.conns:
            c.send(None)
        for p in self.procs:
            p.join(30)


# -- recap ----------------------------------------------------------------------------------------

def _job(work: Path, out: Path, stages: list[dict]) -> dict:
    return {"name": "bench", "input": {"kind": "webdataset", "paths": str(work / "wds/*.tar")},
            "output": str(out), "webdataset": {}, "stages": stages}


def ingest(work: Path) -> tuple[Path, float]:
    """The tars ingested once; each stage run gets a copy, so its source step is already committed."""
    from recap.pipeline.job import build_job
    from recap.pipeline.runner import run_job

    base = work / "ingested"
    t = time.perf_counter()
    run_job(build_job(_job(work, base, []), "bench"), progress=False)
    return base, time.perf_counter() - t


def _clip_actors(since: float) -> list[dict]:
    """The clip actors Ray started after ``since`` (epoch seconds), from Ray's own actor table.
    The public state API needs the dashboard, which recap does not start."""
    try:
        from ray._private import state
        actors = state.actors().values()
    except Exception:  # noqa: BLE001 - an internal API: without it the actor count is the setting
        return []
    return [a for a in actors if "clip" in (a.get("ActorClassName") or "") and (a.get("StartTime") or 0) / 1e3 >= since]


def _ray_totals(stats: str) -> tuple[float, float] | None:
    """(remote wall, remote cpu) seconds summed over the clip operator's tasks, from the stats text
    Ray Data writes (the runner keeps it in logs/ray/); None if its format is not the expected one."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
    totals: dict[str, float] = {}
    in_clip = False
    for line in stats.splitlines():
        if line.startswith("Operator"):
            in_clip = "clip" in line
        m = re.match(r"\* Remote (wall|cpu) time: .*?([\d.]+)(us|ms|s) total", line.strip()) if in_clip else None
        if m:
            totals[m.group(1)] = float(m.group(2)) * units[m.group(3)]
    return (totals["wall"], totals["cpu"]) if len(totals) == 2 else None


def recap_clip(work: Path, base: Path, rep: int, cfg: dict, keep: bool) -> dict:
    """One job run with the clip stage on a copy of the ingested dataset; wall clock and where it went."""
    from recap.pipeline.job import build_job
    from recap.pipeline.runner import run_job

    out = work / f"run{rep}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(base, out)
    job = build_job(_job(work, out, [{"clip": cfg}]), "bench")
    started = time.time()
    t, cpu = time.perf_counter(), time.process_time()
    run_job(job, progress=False)
    secs, driver_cpu = time.perf_counter() - t, time.process_time() - cpu
    kept = sum(json.loads(p.read_text())["counts"]["kept"] for p in (out / "commits/clip").glob("*.json"))
    timing_files = sorted((out / "logs/timings/clip").glob("*.json"))
    done_at = [p.stat().st_mtime - started for p in timing_files]
    stats = [p.read_text() for p in (out / "logs/ray").glob("*clip*.txt")]
    actors = _clip_actors(started)
    r = {"rate": kept / secs, "n": kept, "secs": secs, "actors": len(actors),
         "shard_s": [json.loads(p.read_text())["seconds"] for p in timing_files],
         "up": sorted(a["StartTime"] / 1e3 - started for a in actors),
         "first_done": min(done_at, default=0.0), "last_done": max(done_at, default=0.0),
         "ray": _ray_totals(stats[0]) if stats else None, "driver_cpu": driver_cpu}
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return r


def shard_read_cost(base: Path, shards: int) -> float:
    """Seconds per image of the engine's read of a clip batch (index, sidecars, the whole tar,
    the members picked out), in this process: part of what the actors do besides process()."""
    from recap.pipeline.stage import get_stage_class
    from recap.pipeline.steps import load_input
    from recap.pipeline.storage import Dataset

    ds, source = Dataset(str(base)), get_stage_class("webdataset_tars")
    t, n = time.perf_counter(), 0
    for shard in range(shards):
        n += load_input(ds, shard, source, [], ("jpg", "caption")).num_rows
    return (time.perf_counter() - t) / max(n, 1)


def actor_threads() -> tuple[int, str | None]:
    """What torch and OMP_NUM_THREADS are inside a Ray worker given the clip stage's one CPU."""
    import ray

    from recap.stages.clip import ClipStage

    @ray.remote(num_cpus=ClipStage.default_resources.cpus)
    def probe() -> tuple[int, str | None]:
        import torch
        return torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")

    return ray.get(probe.remote())


def bench_clip(args: argparse.Namespace) -> None:
    import ray

    from recap.pipeline.runner import init_ray

    images = args.images or (4096 if args.model.startswith("recap-tiny") else 256)
    work = Path(tempfile.mkdtemp(prefix="recap-bench-clip-"))
    if args.keep:
        print(f"clip: keeping {work}")
    pool: PlainPool | None = None
    try:
        load = os.getloadavg()
        tars = make_tars(work / "wds", images, args.per_shard, args.image_size)
        mb = sum(p.stat().st_size for p in tars) / 1e6
        print(f"clip: {images} images in {len(tars)} tars ({mb:.0f} MB), {args.image_size}px JPEGs; model "
              f"{args.model} (random init, fp32), batch {args.batch_size}")
        t = time.perf_counter()
        init_ray(None, args.cpus)
        ray_start = time.perf_counter() - t
        cpus = int(ray.cluster_resources().get("CPU", 1))
        threads, omp = actor_threads()
        base, ingest_s = ingest(work)
        read_s = shard_read_cost(base, len(tars))
        cfg = {"model": args.model, "pretrained": None, "batch_size": args.batch_size}
        if args.actors:
            cfg["concurrency"] = args.actors
        print(f"Ray: {cpus} CPUs, start-up {ray_start:.1f}s (excluded); a 1-CPU Ray worker runs torch with "
              f"{threads} thread(s) (OMP_NUM_THREADS={omp}, set by Ray); ingest of the tars {ingest_s:.1f}s "
              f"(excluded, each run starts from a copy of it)", flush=True)

        runs: dict[str, list] = {"stage": [], "process": [], "forward": []}
        for rep in range(args.repeat):
            runs["stage"].append(recap_clip(work, base, rep, cfg, args.keep))
            if pool is None:  # as many processes as the engine ran actors (or would, when Ray hides them)
                processes = max(r["actors"] for r in runs["stage"]) or args.actors or cpus
                pool = PlainPool(tars, processes, threads, args.model, args.batch_size)
                print(f"plain loops: {len(pool.conns)} processes x torch threads "
                      f"{', '.join(str(t[0]) for t in pool.threads)} (OMP_NUM_THREADS {pool.threads[0][1]})",
                      flush=True)
            for what in ("process", "forward"):
                runs[what].append(pool.run(what))
            print(f"run {rep}: " + ", ".join(f"{k} {v[-1]['rate']:.0f} img/s" for k, v in runs.items())
                  + f"  (load average {os.getloadavg()[0]:.1f})", flush=True)

        best = {k: max(v, key=lambda r: r["rate"]) for k, v in runs.items()}
        line = "{:<44}: {:6d} images in {:7.2f}s = {:8.1f} img/s"

        def show(label: str, key: str) -> str:
            r = best[key]
            return line.format(label, r["n"], r["secs"], r["rate"])

        s, fw = best["stage"], best["forward"]["rate"]
        workers = len(pool.conns)
        print(show(f"recap clip stage, job on Ray ({s['actors'] or '?'} actors)", "stage")
              + f"  (best of {args.repeat}; Ray start-up {ray_start:.1f}s excluded)")
        print(show(f"stage.process(), no engine ({workers} processes)", "process"))
        print(show(f"plain forward loop ({workers} processes)", "forward"))
        print(f"ratio stage/plain forward: {s['rate'] / fw:.2f}  (goal >= 0.8)")
        record(f"clip stage images/s ({args.model})", s["rate"] / fw, goal=">= 0.8", value=s["rate"], baseline=fw,
               unit="images/s", against="plain encode_image + encode_text on pre-decoded inputs",
               process_ratio=round(best["process"]["rate"] / fw, 4))
        print(f"  stage.process/forward {best['process']['rate'] / fw:.2f}: decode, RGB, transform, tokenizing "
              f"(twice: the truncation count), verdicts")
        print(f"  stage/stage.process {s['rate'] / best['process']['rate']:.2f}: Ray, starting actors, "
              f"reading shards, committing")
        shards = s["shard_s"]
        up = ", ".join(f"+{u:.1f}s" for u in s["up"]) or "?"
        print(f"  the best stage run: actors up at {up}; first shard committed at +{s['first_done']:.1f}s, last "
              f"at +{s['last_done']:.1f}s, the job returned at +{s['secs']:.1f}s")
        print(f"  its {len(shards)} shards: {statistics.median(shards):.2f}s median, {max(shards):.2f}s max (an "
              f"actor's first shard imports torch and builds the model), {sum(shards):.1f}s in all"
              + (f"; Ray counts {s['ray'][1]:.1f}s of CPU in {s['ray'][0]:.1f}s of its tasks' wall time"
                 if s["ray"] else "")
              + f"; reading a batch's images from its shard costs {read_s * 1e3:.2f} ms/img")
        actors = max(s["actors"] or workers, 1)
        later = sorted(shards)[:-actors]  # each actor's first shard carries its start-up: the slowest
        if later:
            steady = len(later) * s["n"] / len(shards) / (sum(later) / actors)
            print(f"  steady state ({len(later)} shards after each actor's first, all actors busy): "
                  f"{steady:.0f} img/s = {steady / fw:.2f} of the plain forward loop")
        else:
            print("  steady state: every shard was some actor's first; give more shards (--per-shard)")
        ms = {k: best[k]["cpu"] / best[k]["n"] * 1e3 for k in ("process", "forward")}
        if s["ray"]:
            actor_ms = s["ray"][1] / s["n"] * 1e3
            print(f"  CPU per image (what other load on the machine changes least): stage's actors "
                  f"{actor_ms:.2f} ms (Ray's count, start-up included) + driver {s['driver_cpu'] / s['n'] * 1e3:.2f} ms, "
                  f"stage.process {ms['process']:.2f} ms, forward {ms['forward']:.2f} ms; forward/stage "
                  f"{ms['forward'] / (actor_ms + s['driver_cpu'] / s['n'] * 1e3):.2f}")
        print(f"  load average {load[0]:.1f} before, {os.getloadavg()[0]:.1f} after: on a shared machine "
              f"all figures drop with it, the ratios less")
    finally:
        if pool is not None:
            pool.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


# -- near-duplicate search (dedup's helpers) ---------------------------------------------------------

def _planted_hashes(n: int, seed: int = 0) -> np.ndarray:
    """n random 64-bit hashes, 1 % of them copies of others with up to 6 bits flipped."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 1 << 63, size=n, dtype=np.int64).view(np.uint64) << np.uint64(1)
    h |= rng.integers(0, 2, n).astype(np.uint64)
    k = n // 100
    flips = np.zeros(k, np.uint64)
    for i in range(k):
        for b in rng.choice(64, rng.integers(0, 7), replace=False):
            flips[i] |= np.uint64(1) << np.uint64(int(b))
    h[n - k:] = h[rng.integers(0, n - k, k)] ^ flips
    return h


def bench_phash(args: argparse.Namespace) -> None:
    """Multi-index Hamming search vs the all-pairs scan (numpy popcount over every pair, blocked)
    on the same 100k hashes: the same pairs, and the ratio of times."""
    from recap.stages.dedup import DedupConfig
    from recap.stages.near_duplicates import all_pairs, hamming_pairs

    n, distance = args.hashes, DedupConfig().phash_distance
    h = _planted_hashes(n)
    t0 = time.perf_counter()
    i, j, _ = hamming_pairs(h, distance)
    t_mih = time.perf_counter() - t0
    t0 = time.perf_counter()
    a, b = all_pairs(h, distance)
    t_all = time.perf_counter() - t0
    same = set(zip(i.tolist(), j.tolist())) == set(zip(a.tolist(), b.tolist()))
    print(f"phash: {n} hashes, distance {distance}: multi-index {t_mih:.3f} s, all pairs {t_all:.2f} s, "
          f"{t_all / t_mih:.0f}x faster; {len(i)} pairs, same as all pairs: {same}")
    record("phash pair search speed-up", t_all / t_mih, goal=">= 10", value=t_mih, baseline=t_all, unit="s",
           against="all-pairs popcount scan", hashes=n, distance=distance, same_pairs=same)


def bench_semantic(args: argparse.Namespace) -> None:
    """SemDeDup (faiss spherical k-means + in-cluster rule) time against N, 512-d embeddings."""
    from recap.stages.semdedup import semdedup

    rng = np.random.default_rng(0)
    for n in (10_000, 40_000, 160_000):
        emb = rng.normal(size=(n, 512)).astype(np.float32)
        emb[n // 2:] = emb[:n - n // 2] + 0.02 * rng.normal(size=(n - n // 2, 512)).astype(np.float32)
        uids = [f"{i:09d}" for i in range(n)]
        t0 = time.perf_counter()
        res = semdedup(emb, uids, eps=0.01, clusters=int(np.sqrt(n)), keep="farthest", seed=0)
        print(f"semantic: N={n}: {time.perf_counter() - t0:.2f} s ({int(np.sqrt(n))} clusters), "
              f"{int(res.removed.sum())} removed of {n // 2} planted copies")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", choices=BENCHES, help="run only these (repeatable; default all)")
    ap.add_argument("--images", type=int, default=None, help="default 4096 for recap-tiny, 256 for other models")
    ap.add_argument("--per-shard", type=int, default=512, help="images per tar, and so per shard")
    ap.add_argument("--batch-size", type=int, default=256, help="the stage's batch_size and the plain loop's")
    ap.add_argument("--model", default="recap-tiny", help="open_clip name or bundled config; random init always")
    ap.add_argument("--image-size", type=int, default=256, help="side of the generated JPEGs")
    ap.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    ap.add_argument("--actors", type=int, default=None, help="clip concurrency (default: the engine's choice)")
    ap.add_argument("--repeat", type=int, default=2, help="alternate the sides this many times; best of each counts")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--hashes", type=int, default=100_000, help="hashes for the phash search benchmark")
    args = ap.parse_args()

    import recap.trainer.models  # noqa: F401 - registers recap-tiny, so the name checks below know it
    from recap.models.encoders import known_models

    if args.model not in known_models():
        sys.exit(f"--model {args.model}: not an open_clip model nor a bundled config")
    for name in args.only or BENCHES:
        {"clip": bench_clip, "phash": bench_phash, "semantic": bench_semantic}[name](args)


if __name__ == "__main__":
    main()
