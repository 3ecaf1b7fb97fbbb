"""Generating the demo web: URL list, ground truth, served files, routes and a held-out split.

Layout written under ``out`` (see DESIGN.md, "The demo world"):

    world.json       parameters and counts (written last: its presence means "complete")
    urls.parquet     url, caption, source_page, license — what a user feeds img2dataset
    truth.parquet    one row per url row, same order: scene, concept, caption kind, language,
                     duplicate group, fault, the ledger reason the downloader must give, and
                     ``heldout_of``: the held-out image a pool image near-copies (else -1)
    routes.json      path -> how the server answers (file, status, delay, headers, redirect, ...)
    files/           the bytes served
    heldout/         clean evaluation split: shards/00000.tar, index.parquet, classnames.txt (the
                     dominant shape), templates.txt, label_sets/{colour,concept}/ (further label sets)

Determinism: every per-sample draw comes from a ``random.Random`` seeded by (seed, what, index),
global structure (which rows are faulty, duplicated, the web's order) from one plan stream, and
rendering is a pure function of the planned job; so the bytes never depend on ``workers``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from recap.world import captions as cap
from recap.world import render
from recap.world.scenes import COLOURS, SHAPES, Scene, concept_of, image_size, sample_scene, scene_json

DEFAULT_PORT = 8765
# 2: pool images that are near-duplicates of held-out images (heldout_of); 3: near copies keep the
# source's aspect ratio and move at most 1 %
VERSION = 3
HOST = "127.0.0.1"
TRAP_HOST = "127.0.0.2"  # the address the downloader's SSRF guard must never reach
TOO_LARGE_BYTES = 64 << 20
HANG_SECONDS = 60.0
FAULT_RATE = 0.10

# fault -> (relative weight, ledger reason the downloader must give; None = the download succeeds)
FAULTS: dict[str, tuple[float, str | None]] = {
    "http_404": (3.0, "http_404"),
    "http_500": (1.0, "http_500"),
    "slow": (1.5, None),
    "hang": (0.3, "timeout"),
    "truncated": (1.0, "decode_error"),
    "corrupt": (1.0, "decode_error"),
    "html_as_image": (1.0, "not_an_image"),
    "bomb": (0.4, "decompression_bomb"),
    "too_large": (0.4, "too_large"),
    "redirect": (1.5, None),
    "redirect_chain": (0.6, None),
    "redirect_loop": (0.5, "redirect_loop"),
    "redirect_blocked": (0.5, "blocked_address"),
    "blocked_url": (0.5, "blocked_address"),
    "opted_out": (1.0, "opted_out"),
    "bad_scheme": (0.5, "unsupported_scheme"),
    "invalid_url": (0.5, "invalid_url"),
    "empty_body": (0.5, "empty_response"),
}
# Faults whose route serves (part of) a rendered image.
_IMAGE_FAULTS = {"slow", "truncated", "corrupt", "opted_out", "redirect", "redirect_chain"}

CAPTION_MIX: dict[str, float] = {"exact": 0.47, "partial": 0.15, "wrong": 0.10, "junk": 0.14, "foreign": 0.14}
DUP_RATES: dict[str, float] = {"exact": 0.02, "near": 0.02, "url": 0.01}
# Pool rows whose image is a re-render of a held-out image: what decontamination must find.
CONTAMINATION_RATE = 0.005
PNG_RATE = 0.1
LICENSES = ("CC-BY-4.0", "CC0-1.0", "CC-BY-SA-4.0", "all-rights-reserved", "unknown")
TEMPLATES = ("a photo of a {}.", "a drawing of a {}.", "an illustration of a {}.", "a {} shape.",
             "a picture of the {}.", "clip art of a {}.")
# Further zero-shot label sets of the held-out split (trainer.eval's label_sets/NAME/): the dominant
# object's colour, and its concept (colour + shape, the unit the web's Zipf law and MetaCLIP's
# metadata are over). The main label set is the dominant shape.
COLOUR_TEMPLATES = ("a photo of a {} shape.", "a drawing of a {} shape.", "an illustration of a {} object.",
                    "clip art of a {} shape.")
CONCEPT_CLASSES = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
HELDOUT_SHARD_SIZE = 10000
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # on the render workers' PYTHONPATH


def _rng(seed: int, *parts: object) -> random.Random:
    # String seeds go through SHA-512: stable across processes and Python runs (no hash salting).
    return random.Random(":".join(["recap-world", str(seed), *map(str, parts)]))


def _key(seed: int, *parts: object) -> str:
    return hashlib.sha256(":".join([str(seed), *map(str, parts)]).encode()).hexdigest()[:16]


def _allocate(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Largest-remainder split of ``total`` by ``weights`` (ties in dict order): deterministic."""
    s = sum(weights.values())
    exact = {k: total * w / s for k, w in weights.items()}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(weights, key=lambda k: -(exact[k] - counts[k]))[:total - sum(counts.values())]:
        counts[k] += 1
    return counts


# -- planning -------------------------------------------------------------------------------------

def _image_path(rng: random.Random, key: str, fmt: str, scene: Scene) -> str:
    ext = "png" if fmt == "png" else rng.choice(("jpg", "jpg", "jpeg"))
    d = scene["objects"][0]
    pattern = rng.randrange(6)
    if pattern == 0:
        return f"/img/{key}.{ext}"
    if pattern == 1:
        return f"/photos/{rng.randrange(2012, 2025)}/{rng.randrange(1, 13):02d}/{key}.{ext}"
    if pattern == 2:
        return f"/cdn/{key[:2]}/{key[2:4]}/{key}.{ext}"
    if pattern == 3:
        return f"/media/{d['colour']}-{d['shape']}-{key}.{ext}"
    if pattern == 4:
        return f"/i/{key}"
    return f"/assets/images/{rng.choice(('product', 'thumb', 'banner', 'gallery'))}_{key}.{ext}"


def _caption(kind: str, scene: Scene, rng: random.Random, scenes: list[Scene]) -> tuple[str, str]:
    """(caption, lang) of one caption kind."""
    if kind == "exact":
        return cap.random_exact(scene, rng), "en"
    if kind == "partial":
        return cap.partial_en(scene, rng), "en"
    if kind == "wrong":
        other = scene
        for _ in range(50):  # the caption of an image of another concept
            other = scenes[rng.randrange(len(scenes))]
            if concept_of(other) != concept_of(scene):
                break
        return cap.random_exact(other, rng), "en"
    if kind == "junk":
        return cap.junk(scene, rng)
    if kind == "foreign":
        text, lang = cap.random_foreign(scene, rng)
        return text, lang
    if kind == "empty":
        return "", "und"
    if kind == "huge":
        return cap.huge(scene, rng), "en"
    raise ValueError(kind)


def _draw_kind(rng: random.Random) -> str:
    return rng.choices(list(CAPTION_MIX), weights=list(CAPTION_MIX.values()))[0]


class _Plan:
    """Rows of the web, the routes that serve them and the render jobs that make their files."""

    def __init__(self, seed: int, port: int) -> None:
        self.seed, self.port = seed, port
        self.base = f"http://{HOST}:{port}"
        self.routes: dict[str, dict[str, Any]] = {}
        self.jobs: list[dict[str, Any]] = []
        self.small_files: dict[str, bytes] = {}  # written by the main process (html pages, the bomb)

    def route(self, path: str, **spec: Any) -> None:
        assert path not in self.routes, path
        self.routes[path] = spec

    def image_job(self, key: str, scene: Scene, w: int, h: int, fmt: str, quality: int, *,
                  shift: tuple[float, float] = (0.0, 0.0), post: str | None = None) -> str:
        ext = "png" if fmt == "png" else "jpg"
        rel = f"files/{key[:2]}/{key}.{ext}"
        self.jobs.append({"id": len(self.jobs), "rel": rel, "scene": scene, "w": w, "h": h, "fmt": fmt,
                          "quality": quality, "shift": shift, "post": post, "post_seed": f"{self.seed}:{key}"})
        return rel


def _content_type(fmt: str) -> str:
    return "image/png" if fmt == "png" else "image/jpeg"


def _fault_route(plan: _Plan, row: dict[str, Any], rng: random.Random) -> None:
    """Sets row['url'] and adds the routes (and render jobs) for one row's fault."""
    fault, key, path = row["fault"], row["key"], row["path"]
    url = plan.base + path
    if fault == "none" or fault in ("slow", "opted_out"):
        rel = plan.image_job(key, row["scene"], row["width"], row["height"], row["fmt"], row["quality"],
                             shift=row.get("shift", (0.0, 0.0)))
        row["job"] = len(plan.jobs) - 1
        spec: dict[str, Any] = {"file": rel, "content_type": _content_type(row["fmt"])}
        if fault == "slow":
            spec["delay"] = round(rng.uniform(0.3, 1.0), 2)
        if fault == "opted_out":
            spec["headers"] = {"X-Robots-Tag": rng.choice(("noai", "noai, noimageai", "noimageai"))}
        plan.route(path, **spec)
    elif fault in ("http_404", "http_500"):
        status = int(fault[-3:])
        body = "<html><body><h1>404 Not Found</h1></body></html>" if status == 404 else "Internal Server Error"
        plan.route(path, status=status, body=body, content_type="text/html" if status == 404 else "text/plain")
    elif fault == "hang":
        plan.route(path, hang=HANG_SECONDS)
    elif fault in ("truncated", "corrupt"):
        rel = plan.image_job(key, row["scene"], row["width"], row["height"], "jpeg", row["quality"], post=fault)
        plan.route(path, file=rel, content_type="image/jpeg")
    elif fault == "html_as_image":
        rel = f"files/{key[:2]}/{key}.html"
        plan.small_files[rel] = render.html_page(rng)
        plan.route(path, file=rel, content_type="image/jpeg")
    elif fault == "bomb":
        plan.small_files.setdefault("files/bomb.png", b"")  # one shared file, made once
        plan.route(path, file="files/bomb.png", content_type="image/png")
    elif fault == "too_large":
        plan.route(path, generate="jpeg_filler", length=TOO_LARGE_BYTES, content_type="image/jpeg")
    elif fault in ("redirect", "redirect_chain"):
        rel = plan.image_job(key, row["scene"], row["width"], row["height"], row["fmt"], row["quality"])
        row["job"] = len(plan.jobs) - 1
        final = f"/img/{key}-full.{'png' if row['fmt'] == 'png' else 'jpg'}"
        plan.route(final, file=rel, content_type=_content_type(row["fmt"]))
        if fault == "redirect":
            plan.route(path, status=302, location=final)
        else:
            hops = [path, f"/r/{key}/1", f"/r/{key}/2", final]
            for status, src, dst in zip((301, 302, 307), hops, hops[1:]):
                plan.route(src, status=status, location=dst)
    elif fault == "redirect_loop":
        other = f"/loop/{key}/b"
        plan.route(path, status=302, location=other)
        plan.route(other, status=301, location=path)
    elif fault == "redirect_blocked":
        # {port} is filled in by the server with the port it really listens on.
        plan.route(path, status=302, location=f"http://{TRAP_HOST}:{{port}}/internal/{key}.jpg")
    elif fault == "blocked_url":
        url = f"http://{TRAP_HOST}:{plan.port}/latest/meta-data/{key}.jpg"
    elif fault == "bad_scheme":
        url = rng.choice(("file:///etc/passwd", f"ftp://{HOST}/{key}.jpg", f"gopher://{HOST}:{plan.port}/{key}"))
    elif fault == "invalid_url":
        url = rng.choice(("http://", "not a url", f"http://[::1/{key}.jpg", f"http:///{key}.jpg"))
    elif fault == "empty_body":
        plan.route(path, body="", content_type="image/jpeg")
    else:
        raise ValueError(fault)
    row["url"] = url


def _counts(samples: int) -> tuple[dict[str, int], dict[str, int], int, int]:
    """(fault counts, duplicate counts, empty captions, huge captions) for a web of ``samples`` rows."""
    faults = _allocate(round(FAULT_RATE * samples), {k: w for k, (w, _) in FAULTS.items()})
    if samples >= 200:  # every fault at least once: tests and acceptance rely on it
        faults = {k: max(1, v) for k, v in faults.items()}
    floor = 1 if samples >= 100 else 0
    dups = {k: max(floor, round(r * samples)) for k, r in DUP_RATES.items()}
    n_empty = max(1, samples // 250) if samples >= 10 else 0
    n_huge = max(1, samples // 20000) if samples >= 10 else 0
    return faults, dups, n_empty, n_huge


def _near_copy(src: dict[str, Any], r: random.Random, min_size: int, max_size: int) -> dict[str, Any]:
    """Size, shift and quality of a re-render of ``src``: rescaled, moved by at most 1 % (a
    slight trim) and recompressed. A larger move would make a near copy no closer to its source
    than two distinct scenes of the same plain shape can be, and no perceptual method could then
    tell a copy from a look-alike."""
    # Rescaled as a whole: the factor is kept inside what the size limits allow for both sides, so
    # the copy has the source's aspect ratio (a clamped side would stretch the scene instead).
    w, h = src["width"], src["height"]
    lo, hi = max(0.85, min_size / min(w, h)), min(1.15, max_size / max(w, h))
    scale = r.uniform(lo, hi) if lo <= hi else 1.0
    return {"width": min(max(round(w * scale), min_size), max_size),
            "height": min(max(round(h * scale), min_size), max_size),
            "shift": (round(r.uniform(-0.01, 0.01), 4), round(r.uniform(-0.01, 0.01), 4)),
            "quality": min(95, max(60, src["quality"] + r.choice((-12, -8, 8, 12)))), "fmt": "jpeg"}


def _plan_web(seed: int, samples: int, port: int, min_size: int, max_size: int,
              held: list[dict[str, Any]]) -> tuple[_Plan, list[dict[str, Any]]]:
    plan = _Plan(seed, port)
    fault_counts, dup_counts, n_empty, n_huge = _counts(samples)
    n_contaminated = min(len(held), max(1 if samples >= 100 else 0, round(CONTAMINATION_RATE * samples)))
    n_copies = sum(dup_counts.values())
    n_base = samples - n_copies
    if n_base < sum(fault_counts.values()) + n_copies + n_empty + n_huge + n_contaminated:
        raise ValueError(f"samples={samples} is too small for its faults and duplicates")

    base: list[dict[str, Any]] = []
    for i in range(n_base):
        r = _rng(seed, "sample", i)
        w, h = image_size(r, min_size, max_size)
        scene = sample_scene(r, w, h)
        key = _key(seed, "sample", i)
        fmt = "png" if r.random() < PNG_RATE else "jpeg"
        base.append({"idx": i, "key": key, "scene": scene, "width": w, "height": h, "fmt": fmt,
                     "quality": r.randint(70, 95),
                     "path": _image_path(r, key, fmt, scene), "caption_kind": _draw_kind(r),
                     "source_page": f"{plan.base}/pages/{r.randrange(max(1, samples // 8)):05d}.html",
                     "license": r.choice(LICENSES), "fault": "none", "dup_kind": "none", "src": None})

    # Global structure from one plan stream: faults, duplicate sources, special captions.
    pr = _rng(seed, "plan")
    order = list(range(n_base))
    pr.shuffle(order)
    it = iter(order)
    for fault, n in fault_counts.items():
        for _ in range(n):
            row = base[next(it)]
            row["fault"] = fault
            if fault in ("truncated", "corrupt"):
                row["fmt"] = "jpeg"
    copies: list[dict[str, Any]] = []
    for kind, n in dup_counts.items():
        for _ in range(n):
            src = next(it)
            copies.append({"dup_kind": kind, "src": src})
            base[src]["dup_kind"] = kind
    for kind, n in (("empty", n_empty), ("huge", n_huge)):
        for _ in range(n):
            base[next(it)]["caption_kind"] = kind
    # Contamination: clean rows whose image becomes a near-copy of a held-out image (their
    # captions, drawn below, describe it).
    for k, h in enumerate(sorted(pr.sample(range(len(held)), n_contaminated))):
        row, r = base[next(it)], _rng(seed, "contamination", k)
        row.update(scene=held[h]["scene"], heldout_of=h, **_near_copy(held[h], r, min_size, max_size))
        row["path"] = _image_path(r, row["key"], "jpeg", row["scene"])

    scenes = [b["scene"] for b in base]
    for i, row in enumerate(base):
        row["caption"], row["lang"] = _caption(row["caption_kind"], row["scene"], _rng(seed, "caption", i), scenes)
        _fault_route(plan, row, _rng(seed, "fault", i))

    for k, c in enumerate(copies):
        src = base[c["src"]]
        r = _rng(seed, "copy", k)
        row = {**src, "fault": "none", "src": c["src"], "dup_kind": c["dup_kind"],
               "source_page": f"{plan.base}/pages/{r.randrange(max(1, samples // 8)):05d}.html"}
        if c["dup_kind"] == "url":
            # The same URL listed again: half the time with the same caption, else with another one.
            if r.random() < 0.5:
                caption, lang, kind = src["caption"], src["lang"], src["caption_kind"]
            else:
                kind = r.choice(("exact", "partial", "junk"))
                caption, lang = _caption(kind, src["scene"], r, scenes)
                if caption == src["caption"]:
                    caption, lang, kind = cap.partial_en(src["scene"], r) + " (detail)", "en", "partial"
            row.update(caption=caption, lang=lang, caption_kind=kind)
        else:
            key = _key(seed, "copy", k)
            kind = _draw_kind(r)
            caption, lang = _caption(kind, src["scene"], r, scenes)
            row.update(key=key, caption=caption, lang=lang, caption_kind=kind)
            if c["dup_kind"] == "exact":
                # Same bytes at another URL: the route serves the source's file.
                row["path"] = _image_path(r, key, src["fmt"], src["scene"])
                plan.route(row["path"], **plan.routes[src["path"]])
            else:
                # Near-duplicate: the same scene re-rendered rescaled, barely moved and recompressed.
                near = _near_copy(src, r, min_size, max_size)
                row.update(near, path=_image_path(r, key, "jpeg", src["scene"]))
                rel = plan.image_job(key, src["scene"], near["width"], near["height"], "jpeg", near["quality"],
                                     shift=near["shift"])
                row["job"] = len(plan.jobs) - 1
                plan.route(row["path"], file=rel, content_type="image/jpeg")
            row["url"] = plan.base + row["path"]
        copies[k] = row

    rows = base + copies
    pr.shuffle(rows)
    return plan, rows


def _plan_heldout(seed: int, n: int, min_size: int, max_size: int) -> list[dict[str, Any]]:
    """Clean evaluation samples: classes balanced over shapes (so tail classes are measured too),
    dominant colour uniform, a few small distractors at most, exact English captions."""
    labels = [i % len(SHAPES) for i in range(n)]
    _rng(seed, "heldout-plan").shuffle(labels)
    items = []
    for i, label in enumerate(labels):
        r = _rng(seed, "heldout", i)
        w, h = image_size(r, min_size, max_size)
        colour = r.choice(list(COLOURS))
        scene = sample_scene(r, w, h, dominant=(colour, SHAPES[label]),
                             n_objects=r.choices((1, 2, 3), weights=(0.5, 0.3, 0.2))[0], secondary_sizes=("small",))
        template, size_variant, style = r.randrange(len(cap.EXACT_TEMPLATES)), r.randrange(2), r.randrange(4)
        caption = cap.exact_en(scene, template, size_variant, style)
        for _ in range(20):
            neg_scene, neg_type = cap.hard_negative(scene, r)
            neg = cap.exact_en(neg_scene, template, size_variant, style)
            if neg != caption:
                break
        else:  # pragma: no cover - every scene has a colour or shape to replace
            raise RuntimeError("no hard negative")
        items.append({"key": f"{i:06d}", "scene": scene, "width": w, "height": h, "quality": 90, "label": label,
                      "classname": SHAPES[label], "caption": caption, "neg_caption": neg, "neg_type": neg_type})
    return items


# -- rendering (in worker processes) --------------------------------------------------------------

def _render_job(job: dict[str, Any], out: str | None) -> tuple[int, str, bytes | None]:
    img = render.render_scene(job["scene"], job["w"], job["h"], tuple(job["shift"]))
    data = render.encode(img, job["fmt"], job["quality"])
    if job["post"] == "truncated":
        data = render.truncated(data)
    elif job["post"] == "corrupt":
        data = render.corrupt(data, random.Random(f"recap-world:corrupt:{job['post_seed']}"))
    digest = hashlib.sha256(data).hexdigest()
    if out is None or job["rel"] is None:
        return job["id"], digest, data
    path = os.path.join(out, job["rel"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return job["id"], digest, None


def _worker_main() -> None:
    """Entry point of a render worker process: pickled (jobs, out) on stdin, results on stdout."""
    import pickle
    import sys

    jobs, out = pickle.loads(sys.stdin.buffer.read())
    sys.stdout.buffer.write(pickle.dumps([_render_job(j, out) for j in jobs], protocol=pickle.HIGHEST_PROTOCOL))
    sys.stdout.buffer.flush()


def _run_jobs(jobs: list[dict[str, Any]], out: Path, workers: int) -> dict[int, tuple[str, bytes | None]]:
    if workers <= 1 or len(jobs) < 256:
        return {i: (d, b) for i, d, b in (_render_job(j, str(out)) for j in jobs)}
    # Plain subprocesses rather than multiprocessing: fork is unsafe once threads run (a server,
    # Ray), and spawn re-imports the caller's __main__, which breaks unguarded scripts.
    import pickle

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
    # -P: a directory named "world" in the cwd (a generated world!) must not shadow the package.
    cmd = [sys.executable, "-P", "-c", "from world.generate import _worker_main; _worker_main()"]

    def run(part: list[dict[str, Any]]) -> list[tuple[int, str, bytes | None]]:
        proc = subprocess.run(cmd, input=pickle.dumps((part, str(out))), capture_output=True, env=env, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"render worker failed:\n{proc.stderr.decode(errors='replace')[-3000:]}")
        return pickle.loads(proc.stdout)

    results: dict[int, tuple[str, bytes | None]] = {}
    # Interleaved slices: neighbouring jobs cost about the same, so the workers finish together.
    with ThreadPoolExecutor(workers) as pool:
        for part in pool.map(run, [jobs[i::workers] for i in range(workers)]):
            results.update((i, (d, b)) for i, d, b in part)
    return results


# -- writing --------------------------------------------------------------------------------------

def _write_parquet(path: Path, columns: dict[str, list], schema: pa.Schema) -> None:
    table = pa.table(columns, schema=schema)
    pq.write_table(table, path, compression="zstd", row_group_size=max(1, table.num_rows))


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _write_heldout(out: Path, items: list[dict[str, Any]], images: list[bytes]) -> None:
    d = out / "heldout"
    (d / "shards").mkdir(parents=True, exist_ok=True)
    (d / "classnames.txt").write_text("".join(f"{s}\n" for s in SHAPES))
    (d / "templates.txt").write_text("".join(f"{t}\n" for t in TEMPLATES))
    for name, classes, templates in (("colour", tuple(COLOURS), COLOUR_TEMPLATES), ("concept", CONCEPT_CLASSES, None)):
        (d / "label_sets" / name).mkdir(parents=True, exist_ok=True)
        (d / "label_sets" / name / "classnames.txt").write_text("".join(f"{c}\n" for c in classes))
        if templates:
            (d / "label_sets" / name / "templates.txt").write_text("".join(f"{t}\n" for t in templates))
    for s in range(max(1, -(-len(items) // HELDOUT_SHARD_SIZE))):
        part = range(s * HELDOUT_SHARD_SIZE, min(len(items), (s + 1) * HELDOUT_SHARD_SIZE))
        with tarfile.open(d / "shards" / f"{s:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in part:
                it = items[i]
                dom = it["scene"]["objects"][0]
                labels = {"colour": list(COLOURS).index(dom["colour"]),
                          "concept": CONCEPT_CLASSES.index(f"{dom['colour']} {dom['shape']}")}
                meta = {"scene": it["scene"], "label": it["label"], "classname": it["classname"], "labels": labels,
                        "neg_caption": it["neg_caption"], "neg_type": it["neg_type"]}
                # Members sorted by name within a sample: byte-identical tars.
                _tar_add(tar, f"{it['key']}.cls", str(it["label"]).encode())
                _tar_add(tar, f"{it['key']}.jpg", images[i])
                _tar_add(tar, f"{it['key']}.json", json.dumps(meta, sort_keys=True).encode())
                _tar_add(tar, f"{it['key']}.txt", it["caption"].encode())
    _write_parquet(d / "index.parquet", {
        "key": [it["key"] for it in items], "caption": [it["caption"] for it in items],
        "label": [it["label"] for it in items], "classname": [it["classname"] for it in items],
        "neg_caption": [it["neg_caption"] for it in items], "neg_type": [it["neg_type"] for it in items],
        "scene": [scene_json(it["scene"]) for it in items],
    }, pa.schema([("key", pa.string()), ("caption", pa.string()), ("label", pa.int32()), ("classname", pa.string()),
                  ("neg_caption", pa.string()), ("neg_type", pa.string()), ("scene", pa.string())]))


_OUTPUTS = ("world.json", "urls.parquet", "truth.parquet", "routes.json", "files", "heldout")


def _prepare_out(out: Path) -> None:
    """A fresh directory, or an earlier world in it (replaced). Anything else is refused rather
    than deleted."""
    if out.exists() and any(out.iterdir()):
        foreign = [p.name for p in out.iterdir() if p.name not in _OUTPUTS]
        if foreign or not ((out / "world.json").exists() or (out / "routes.json").exists()):
            raise FileExistsError(f"{out} is not empty and does not hold a demo world; refusing to overwrite it")
        (out / "world.json").unlink(missing_ok=True)  # first: an interrupted rewrite is never "complete"
        for name in _OUTPUTS:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def generate_world(out: str | Path, samples: int, heldout: int, seed: int, port: int = DEFAULT_PORT,
                   min_size: int = 128, max_size: int = 256, workers: int | None = None) -> dict[str, Any]:
    """Write a demo web of ``samples`` URL rows and a held-out split of ``heldout`` samples to
    ``out``; returns the counts also stored in world.json. Same arguments, same bytes, whatever
    ``workers`` is."""
    if samples < 1 or heldout < 0:
        raise ValueError("samples must be >= 1 and heldout >= 0")
    if not 16 <= min_size <= max_size:
        raise ValueError(f"need 16 <= min_size <= max_size, got {min_size}, {max_size}")
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    started = time.monotonic()
    out = Path(out)
    _prepare_out(out)
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))

    held = _plan_heldout(seed, heldout, min_size, max_size)
    plan, rows = _plan_web(seed, samples, port, min_size, max_size, held)
    held_jobs = [{"id": len(plan.jobs) + i, "rel": None, "scene": it["scene"], "w": it["width"], "h": it["height"],
                  "fmt": "jpeg", "quality": it["quality"], "shift": (0.0, 0.0), "post": None, "post_seed": ""}
                 for i, it in enumerate(held)]
    results = _run_jobs(plan.jobs + held_jobs, out, workers)

    if "files/bomb.png" in plan.small_files:
        plan.small_files["files/bomb.png"] = render.bomb_png()
    for rel, data in sorted(plan.small_files.items()):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    (out / "routes.json").write_text(json.dumps({"version": VERSION, "port": port, "routes": plan.routes},
                                                sort_keys=True, separators=(",", ":")))

    n = len(rows)
    expected = [FAULTS[r["fault"]][1] if r["fault"] != "none" else None for r in rows]
    _write_parquet(out / "urls.parquet", {
        "url": [r["url"] for r in rows], "caption": [r["caption"] for r in rows],
        "source_page": [r["source_page"] for r in rows], "license": [r["license"] for r in rows],
    }, pa.schema([("url", pa.string()), ("caption", pa.string()), ("source_page", pa.string()),
                  ("license", pa.string())]))

    # Duplicate groups numbered by first appearance in the web's order.
    group_of: dict[int, int] = {}
    for r in rows:
        if r["dup_kind"] != "none":
            r["_g"] = group_of.setdefault(r["src"] if r["src"] is not None else r["idx"], len(group_of))
    _write_parquet(out / "truth.parquet", {
        "row": list(range(n)), "url": [r["url"] for r in rows], "caption": [r["caption"] for r in rows],
        "scene": [scene_json(r["scene"]) for r in rows], "concept": [concept_of(r["scene"]) for r in rows],
        "caption_kind": [r["caption_kind"] for r in rows], "lang": [r["lang"] for r in rows],
        "dup_group": [r.get("_g", -1) for r in rows], "dup_kind": [r["dup_kind"] for r in rows],
        "fault": [r["fault"] for r in rows], "expected_reason": expected,
        "key": [r["key"] for r in rows], "width": [r["width"] for r in rows], "height": [r["height"] for r in rows],
        "image_sha256": [results[r["job"]][0] if e is None else None for r, e in zip(rows, expected)],
        "heldout_of": [r.get("heldout_of", -1) for r in rows],
    }, pa.schema([("row", pa.int64()), ("url", pa.string()), ("caption", pa.string()), ("scene", pa.string()),
                  ("concept", pa.string()), ("caption_kind", pa.string()), ("lang", pa.string()),
                  ("dup_group", pa.int64()), ("dup_kind", pa.string()), ("fault", pa.string()),
                  ("expected_reason", pa.string()), ("key", pa.string()), ("width", pa.int32()),
                  ("height", pa.int32()), ("image_sha256", pa.string()), ("heldout_of", pa.int64())]))

    base_jobs = len(plan.jobs)
    if held:
        _write_heldout(out, held, [results[base_jobs + i][1] for i in range(len(held))])

    summary: dict[str, Any] = {
        "version": VERSION, "seed": seed, "samples": n, "heldout": len(held), "host": HOST, "port": port,
        "trap_host": TRAP_HOST, "min_size": min_size, "max_size": max_size,
        "caption_kinds": dict(sorted(Counter(r["caption_kind"] for r in rows).items())),
        "faults": dict(sorted(Counter(r["fault"] for r in rows).items())),
        "dup_kinds": dict(sorted(Counter(r["dup_kind"] for r in rows).items())),
        "contaminated": sum(1 for r in rows if "heldout_of" in r),
        "langs": dict(sorted(Counter(r["lang"] for r in rows).items())),
        "expected_reasons": dict(sorted(Counter(e or "ok" for e in expected).items())),
        "routes": len(plan.routes), "classes": len(SHAPES),
    }
    (out / "world.json").write_text(json.dumps(summary, sort_keys=True, indent=2) + "\n")
    return {**summary, "seconds": round(time.monotonic() - started, 2)}
