"""The resume check of a finished dataset: re-hashing every committed file (``verify=True``, what
every rerun did before) vs reading the markers and checking each file's size (the default now), in
one run. Prints seconds and bytes read for both, and the ratios.

    .venv/bin/python bench/resume.py [--work DIR] [--samples 2000] [--small-shard 10] [--checks 3]
                                     [--repeats 1] [--no-rerun]

Two datasets are built with the real pipeline (``recap run`` of the bundled demo job on a demo world
served on 127.0.0.1, nothing else is contacted): the demo itself (250 samples per shard) and the
same world cut into shards of ``--small-shard`` samples (200 shards by default), where the per-marker
cost shows. ``--work DIR`` keeps them and reuses a dataset whose manifest says done; by default they
live in a temporary directory.

The decision is measured in this process as the runner makes it: ``Dataset.committed(step, shard,
config_hash, verify)`` for every marker under ``commits/``, on a Dataset whose filesystem counts what
``open``/``cat`` return, split into marker JSON and data files. Warm (page cache, best of
``--checks``) and cold (every file of the dataset dropped from the page cache with
``posix_fadvise(DONTNEED)`` first; directory entries and inodes stay cached, which only helps the
size check). The script fails if the default check reads a byte of a data file.

Then ``recap run`` is rerun on each finished dataset, with and without ``--verify``, as a user would
(wall clock, ``--quiet``); Ray's start-up is timed apart, since it dominates. Last, a cost model
for 10k shards of 1 GB, from the measured per-marker costs; it says which numbers are measured and
which are assumed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import record  # noqa: E402

from recap.jobs import DEMO_JOB
from recap.pipeline.storage import Dataset
from recap.world.server import free_port, port_free

# assumptions of the cost model (not measured here)
NODE_READ_BPS = 1e9          # what one node reads from its disk or an object store, bytes/s
S3_EGRESS_USD_PER_GB = 0.09  # S3 internet egress (list price, first tier); in-region reads are free
S3_USD_PER_1K_GET = 0.0004   # S3 Standard GET/HEAD
S3_REQUEST_S = 0.02          # one small GET or HEAD, first byte, from inside the region


# -- counting reads -------------------------------------------------------------------------------

class _CountingFile:
    def __init__(self, f, into: Counter, kind: str) -> None:
        self._f, self._into, self._kind = f, into, kind

    def _add(self, n: int) -> None:
        self._into[self._kind] += n

    def read(self, *a):
        data = self._f.read(*a)
        self._add(len(data))
        return data

    def read1(self, *a):
        data = self._f.read1(*a)
        self._add(len(data))
        return data

    def readinto(self, b):
        n = self._f.readinto(b)
        self._add(n or 0)
        return n

    def readline(self, *a):
        data = self._f.readline(*a)
        self._add(len(data))
        return data

    def readlines(self, *a):
        lines = self._f.readlines(*a)
        self._add(sum(map(len, lines)))
        return lines

    def __iter__(self):
        for line in self._f:
            self._add(len(line))
            yield line

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


class CountingFS:
    """An fsspec filesystem that counts the bytes its callers read (through ``open``, ``cat``,
    ``cat_file``), marker JSON (``commits/``) apart from data files, and every other call by name.
    Counting at the filesystem, not with /proc/self/io, leaves out what the interpreter itself reads;
    rchar is still printed beside it, as a cross-check."""

    def __init__(self, fs, root: str) -> None:
        self._fs, self._root = fs, root.rstrip("/") + "/"
        self.read = Counter()
        self.calls = Counter()

    def _kind(self, path) -> str:
        p = str(path)
        rel = p[len(self._root):] if p.startswith(self._root) else p
        return "marker" if rel.startswith("commits/") else "data"

    def open(self, path, mode="rb", *a, **kw):
        self.calls["open"] += 1
        f = self._fs.open(path, mode, *a, **kw)
        return _CountingFile(f, self.read, self._kind(path)) if "r" in mode else f

    def cat_file(self, path, *a, **kw):
        self.calls["cat_file"] += 1
        data = self._fs.cat_file(path, *a, **kw)
        self.read[self._kind(path)] += len(data)
        return data

    def cat(self, path, *a, **kw):
        self.calls["cat"] += 1
        out = self._fs.cat(path, *a, **kw)
        for p, data in (out.items() if isinstance(out, dict) else [(path, out)]):
            if isinstance(data, bytes):
                self.read[self._kind(p)] += len(data)
        return out

    def __getattr__(self, name):
        attr = getattr(self._fs, name)
        if not callable(attr):
            return attr

        def counted(*a, **kw):
            self.calls[name] += 1
            return attr(*a, **kw)
        return counted


def proc_io() -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())}
    except OSError:  # not Linux: the cross-check is left out
        return {}


# -- the datasets ---------------------------------------------------------------------------------

def ensure_world(world: Path, samples: int) -> int:
    """The world's port (its URLs, and so the job's config hash, carry it)."""
    from recap.world.generate import generate_world

    meta = world / "world.json"
    if meta.exists():
        info = json.loads(meta.read_text())
        if info.get("samples") == samples and port_free(info["port"]):
            return info["port"]
        if info.get("samples") == samples:
            sys.exit(f"port {info['port']} of {world} is in use; free it or pass another --work")
    port = free_port()
    t = time.perf_counter()
    generate_world(world, samples=samples, heldout=0, seed=0, port=port)
    print(f"world: {samples} samples in {world} ({time.perf_counter() - t:.1f}s)", flush=True)
    return port


def run_cmd(out: Path, overrides: list[str], *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "recap", "run", str(DEMO_JOB)]
    for o in overrides:
        cmd += ["--set", o]
    return cmd + ["--output", str(out), "--quiet", *extra]


def quiet_run(cmd: list[str]) -> None:
    """Ray's start-up warnings would bury the results: its output is shown only if the run fails."""
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-4000:]}")


def is_done(out: Path) -> bool:
    try:
        return json.loads((out / "manifest.json").read_text()).get("status") == "done"
    except (OSError, ValueError):
        return False


def ensure_dataset(name: str, out: Path, overrides: list[str]) -> None:
    if is_done(out):
        print(f"{name}: reusing {out} (manifest says done)", flush=True)
        return
    t = time.perf_counter()
    quiet_run(run_cmd(out, overrides))
    print(f"{name}: built {out} in {time.perf_counter() - t:.1f}s", flush=True)
    if not is_done(out):
        sys.exit(f"{name}: {out}/manifest.json does not say done")


# -- the resume decision ----------------------------------------------------------------------------

def committed_pairs(root: Path) -> list[dict]:
    """Every marker under commits/, read once outside the measurements: (step, shard, hash, files)."""
    out = []
    for step in sorted(p for p in (root / "commits").iterdir() if p.is_dir()):
        for f in sorted(step.glob("*.json")):
            marker = json.loads(f.read_bytes())
            out.append({"step": step.name, "shard": int(f.stem), "hash": marker["config_hash"],
                        "files": marker.get("files", {}), "marker_bytes": f.stat().st_size})
    return out


def check_hashes_match_manifest(root: Path, pairs: list[dict]) -> None:
    """The markers' hashes must be the runner's for this job, or a rerun would redo, not skip."""
    stages = json.loads((root / "manifest.json").read_text()).get("stages", {})
    want = {name: s.get("config_hash") for name, s in stages.items()}
    for p in pairs:
        stage = p["step"].split(".")[0]
        if stage in want and want[stage] is not None and want[stage] != p["hash"]:
            sys.exit(f"{root}: commits/{p['step']}/{p['shard']:05d}.json has hash {p['hash']}, "
                     f"the manifest says {want[stage]}")


def evict(root: Path) -> None:
    """Drop every file of the dataset from the page cache (clean pages only, so sync first)."""
    for dirpath, _, names in os.walk(root):
        for n in names:
            fd = os.open(os.path.join(dirpath, n), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def check(root: Path, pairs: list[dict], verify: bool, cold: bool = False) -> dict:
    """One pass of the runner's decision over every marker; returns time, bytes read, calls."""
    ds = Dataset(str(root))
    fs = CountingFS(ds.fs, ds.root)
    ds.fs = fs
    if cold:
        evict(root)
    io0 = proc_io()
    t = time.perf_counter()
    skipped = sum(ds.committed(p["step"], p["shard"], p["hash"], verify=verify) is not None for p in pairs)
    seconds = time.perf_counter() - t
    io1 = proc_io()
    if skipped != len(pairs):
        sys.exit(f"{root}: only {skipped} of {len(pairs)} markers pass (verify={verify}): the dataset is damaged")
    return {"seconds": seconds, "marker": fs.read["marker"], "data": fs.read["data"], "calls": dict(fs.calls),
            "rchar": io1.get("rchar", 0) - io0.get("rchar", 0),
            "disk": io1.get("read_bytes", 0) - io0.get("read_bytes", 0)}


def parts(root: Path, pairs: list[dict], repeats: int) -> dict:
    """The default check taken apart: reading + parsing the markers, and one size per file."""
    ds = Dataset(str(root))
    paths = [ds.path(rel) for p in pairs for rel in p["files"]]
    best_read = best_stat = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for p in pairs:
            ds.read_json(Dataset.commit_rel(p["step"], p["shard"]))
        best_read = min(best_read, time.perf_counter() - t)
        t = time.perf_counter()
        for path in paths:
            ds.fs.size(path)
        best_stat = min(best_stat, time.perf_counter() - t)
    return {"read_s": best_read / len(pairs), "stat_s": best_stat / max(len(paths), 1)}


def mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def ratio(a: float, b: float) -> str:
    return f"{a / b:,.0f}x" if b > 0 else "inf (after reads 0)"


def measure(name: str, root: Path, checks: int) -> dict:
    pairs = committed_pairs(root)
    check_hashes_match_manifest(root, pairs)
    steps = Counter(p["step"] for p in pairs)
    n_files = sum(len(p["files"]) for p in pairs)
    total = sum(m["size"] for p in pairs for m in p["files"].values())
    marker_total = sum(p["marker_bytes"] for p in pairs)
    shards = max(steps.values())
    print(f"\n== {name}: {root}")
    print(f"   {len(pairs)} markers ({shards} shards x {sum(1 for s in steps if steps[s] == shards)} steps"
          f" + {sum(1 for s in steps if steps[s] != shards)} reduce), {n_files} files listed, "
          f"{mb(total)} committed, {mb(marker_total)} of marker JSON")

    warm = {True: [], False: []}
    for _ in range(checks):  # alternated, so neither side gets a warmer cache
        for verify in (True, False):
            warm[verify].append(check(root, pairs, verify))
    best = {v: min(runs, key=lambda r: r["seconds"]) for v, runs in warm.items()}
    cold = {v: check(root, pairs, v, cold=True) for v in (True, False)}
    for v in (True, False):
        for r in warm[v] + [cold[v]]:
            if (r["marker"], r["data"]) != (best[v]["marker"], best[v]["data"]):
                sys.exit(f"{name}: bytes read differ between passes (verify={v})")
    if best[False]["data"] or cold[False]["data"] or best[False]["marker"] != marker_total:
        sys.exit(f"{name}: the default check read {best[False]['data']} bytes of data files and "
                 f"{best[False]['marker']} of markers; it must read the {marker_total} bytes of markers only")
    if best[True]["data"] != total:
        print(f"   note: verify read {best[True]['data']} data bytes, the markers list {total}")

    print(f"   {'':26s} {'warm (best of %d)' % checks:>20s} {'cold':>10s} {'bytes read: markers':>20s} "
          f"{'data files':>12s} {'rchar':>12s} {'cold: disk':>11s}  calls")
    for v, label in ((True, "before: verify=True"), (False, "after:  markers + sizes")):
        b, c = best[v], cold[v]
        calls = ", ".join(f"{k} {n}" for k, n in sorted(b["calls"].items()))
        print(f"   {label:26s} {b['seconds'] * 1e3:17.1f} ms {c['seconds'] * 1e3:7.1f} ms {mb(b['marker']):>20s} "
              f"{mb(b['data']):>12s} {mb(b['rchar']):>12s} {mb(c['disk']):>11s}  {calls}")
    print("   (bytes read counted at the filesystem; rchar: /proc/self/io around the warm pass; cold disk: "
          "its read_bytes, whole pages, so at least 4 kB a file)")
    rb = best[True]["marker"] + best[True]["data"]
    ra = best[False]["marker"] + best[False]["data"]
    print(f"   ratio before/after: time {best[True]['seconds'] / best[False]['seconds']:.1f}x warm, "
          f"{cold[True]['seconds'] / cold[False]['seconds']:.1f}x cold; bytes read {ratio(rb, ra)} "
          f"(data-file bytes: {mb(best[True]['data'])} vs 0)")
    record(f"rerun check time ({name})", best[True]["seconds"] / best[False]["seconds"], goal=">= 1.0",
           value=best[False]["seconds"], baseline=best[True]["seconds"], unit="s",
           against="re-hashing every committed file (--verify)", bytes_read=ra, bytes_read_verify=rb)
    return {"name": name, "pairs": pairs, "steps": steps, "shards": shards, "n_files": n_files, "total": total,
            "marker_total": marker_total, "best": best, "cold": cold, "parts": parts(root, pairs, checks)}


# -- end to end -------------------------------------------------------------------------------------

def commits_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in (root / "commits").rglob("*.json")}


def ray_startup(repeats: int) -> float:
    """Interpreter + imports + a local Ray's start and shutdown, no job: the floor of every rerun."""
    code = ("from recap.pipeline.runner import init_ray; import ray; init_ray(None, None); ray.shutdown()")
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def reruns(name: str, root: Path, overrides: list[str], repeats: int, srv) -> dict:
    before = commits_snapshot(root)
    requests = sum(srv.counts.values())
    times = {True: [], False: []}
    for _ in range(repeats):
        for verify in (True, False):
            cmd = run_cmd(root, overrides, *(["--verify"] if verify else []))
            t = time.perf_counter()
            quiet_run(cmd)
            times[verify].append(time.perf_counter() - t)
    if commits_snapshot(root) != before:
        sys.exit(f"{name}: a rerun recommitted something; the dataset was not complete")
    if sum(srv.counts.values()) != requests:
        sys.exit(f"{name}: a rerun downloaded again")
    return {v: statistics.median(ts) for v, ts in times.items()}


# -- the 10k-shard model ----------------------------------------------------------------------------

def sha256_rate(repeats: int) -> float:
    """hashlib.sha256 over a 64 MiB buffer, bytes/s on one core: what re-hashing a large shard costs
    once its bytes are in memory (the small files of the datasets above are open-bound instead)."""
    import hashlib

    buf = os.urandom(64 << 20)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        hashlib.sha256(buf).digest()
        best = min(best, time.perf_counter() - t)
    return len(buf) / best


def cost_model(m: dict, hash_bps: float, n_shards: int = 10_000, shard_bytes: float = 1e9) -> None:
    shard_steps = [s for s, n in m["steps"].items() if n == m["shards"]]
    markers = n_shards * len(shard_steps) + (len(m["pairs"]) - m["shards"] * len(shard_steps))
    files_per_marker = m["n_files"] / len(m["pairs"])
    files = markers * files_per_marker
    marker_bytes = markers * m["marker_total"] / len(m["pairs"])
    data = n_shards * shard_bytes
    p = m["parts"]
    after_s = markers * p["read_s"] + files * p["stat_s"]
    before_s = data / NODE_READ_BPS + marker_bytes / NODE_READ_BPS
    requests_after = markers + files  # a GET per marker, a HEAD per listed file (fs.size, cache invalidated)
    workers = 64

    print(f"\n== cost model: {n_shards:,} shards of {shard_bytes / 1e9:.0f} GB committed each "
          f"({data / 1e12:.0f} TB), this job's steps")
    print(f"   measured ({m['name']}): {len(shard_steps)} markers per shard, {files_per_marker:.2f} files per marker, "
          f"{m['marker_total'] / len(m['pairs']):.0f} B per marker (independent of the shard's size), "
          f"{p['read_s'] * 1e6:.0f} us to read + parse a marker, {p['stat_s'] * 1e6:.1f} us per size (local disk, "
          f"warm); sha256 {hash_bps / 1e6:.0f} MB/s on one core")
    print(f"   assumed: {NODE_READ_BPS / 1e9:.0f} GB/s read per node (local disk or S3), S3 {S3_REQUEST_S * 1e3:.0f} ms "
          f"per small request, ${S3_EGRESS_USD_PER_GB}/GB internet egress, ${S3_USD_PER_1K_GET} per 1k GET/HEAD, "
          f"{workers} concurrent workers")
    print(f"   extrapolated: {markers:,} markers listing {files:,.0f} files")
    print(f"   before: reads {(data + marker_bytes) / 1e12:.2f} TB; {before_s / 3600:.1f} h of one node's reads at "
          f"{NODE_READ_BPS / 1e9:.0f} GB/s, and {data / hash_bps / 3600:.1f} core-hours of sha256; on S3 from outside "
          f"the region ${data / 1e9 * S3_EGRESS_USD_PER_GB:,.0f} of egress per rerun")
    print(f"   after:  reads {marker_bytes / 1e6:.0f} MB (markers only, no data byte); {after_s:.1f} s on one local disk "
          f"at the measured costs; on S3 {requests_after:,.0f} small requests ({requests_after / 1000 * S3_USD_PER_1K_GET:.2f} "
          f"USD, no egress), {requests_after * S3_REQUEST_S / 60 / workers:.1f} min over {workers} workers")
    print(f"   ratio before/after: bytes {(data + marker_bytes) / marker_bytes:,.0f}x; time on one local node "
          f"{before_s / after_s:,.0f}x ({before_s / 3600:.1f} h vs {after_s:.1f} s)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", help="keep the worlds and datasets here and reuse them (default: a temporary directory)")
    ap.add_argument("--samples", type=int, default=2000, help="samples in the world both datasets are cut from")
    ap.add_argument("--small-shard", type=int, default=10, help="samples per shard of the second dataset")
    ap.add_argument("--checks", type=int, default=3, help="in-process passes of each check (best counts)")
    ap.add_argument("--repeats", type=int, default=1, help="end-to-end reruns of each kind (median counts)")
    ap.add_argument("--no-rerun", action="store_true", help="skip the end-to-end reruns")
    args = ap.parse_args()

    from recap.world.server import serve

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="recap-bench-resume-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        world = work / "world"
        port = ensure_world(world, args.samples)
        base = [f"input.path={world / 'urls.parquet'}", f"download.allow_hosts=[127.0.0.1:{port}]"]
        datasets = [
            ("demo", work / "demo", base),
            (f"{args.samples // args.small_shard} shards", work / f"shards{args.small_shard}",
             [*base, f"download.samples_per_shard={args.small_shard}"]),
        ]
        with serve(world, port=port) as srv:
            for name, out, overrides in datasets:
                ensure_dataset(name, out, overrides)
            results = [measure(name, out, args.checks) for name, out, _ in datasets]
            if not args.no_rerun:
                floor = ray_startup(args.repeats)
                print(f"\n== end to end: `recap run ... --quiet` on the finished dataset, wall clock, "
                      f"median of {args.repeats}")
                print(f"   python + imports + Ray start/stop alone (no job): {floor:.1f}s. That, and Ray Data starting "
                      f"a stream per segment of steps, dominate every rerun: the check itself is the in-process "
                      f"time above")
                for (name, out, overrides), m in zip(datasets, results):
                    t = reruns(name, out, overrides, args.repeats, srv)
                    print(f"   {name:12s} --verify {t[True]:6.1f}s   default {t[False]:6.1f}s   (less the floor: "
                          f"{t[True] - floor:.1f}s vs {t[False] - floor:.1f}s; the check in process: "
                          f"{m['best'][True]['seconds']:.2f}s vs {m['best'][False]['seconds']:.2f}s; "
                          f"nothing recommitted, no download)")
        cost_model(results[-1], sha256_rate(args.checks))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
