"""faiss approximate search vs exact flat search, and the reinforce stage's throughput vs the
teacher's plain forward pass.

    .venv/bin/python bench/knn.py --n 100000 --d 512            # kNN: recall@10 and speed ratio
    .venv/bin/python bench/knn.py --reinforce --samples 256      # reinforce vs teacher forward

kNN: N synthetic unit vectors in d dimensions drawn around N/100 centres (embeddings cluster; on
uniform random vectors in 512-d no approximate index beats a scan), Q held-out queries from the
same mixture. Exact search is IndexFlatIP; each approximate kind (ivf, ivfpq, hnsw) is built with
the negatives stage's own code (stages/knn.py, seeded training sample) and scored by recall@10
against it and by its search-time speed-up; build times are printed apart. Goal: recall >= 0.95
at >= 10x speed.

Reinforce: the stage's partial over a shard of S synthetic JPEGs (decode, sample and replay
n_aug augmentations, every teacher on crops and texts, npz, tar) vs the same teacher's forward
pass alone over the same crops and texts (already replayed and preprocessed), samples/s each,
and the ratio (goal >= 0.7). The machine is shared: run both halves in one go and compare ratios.
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import record  # noqa: E402


def _mixture(n: int, d: int, seed: int, centres: np.ndarray, spread: float) -> np.ndarray:
    g = np.random.default_rng(seed)
    x = centres[g.integers(0, len(centres), n)] + spread * g.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def bench_knn(n: int, d: int, queries: int, k: int, kinds: list[str], spread: float, seed: int) -> list[dict]:
    import faiss

    from recap.stages.knn import IndexConfig, build_index, search

    g = np.random.default_rng(seed)
    c = g.standard_normal((max(1, n // 100), d)).astype(np.float32)
    centres = c / np.linalg.norm(c, axis=1, keepdims=True)
    x = _mixture(n, d, seed + 1, centres, spread)
    q = _mixture(queries, d, seed + 2, centres, spread)
    print(f"N={n} d={d} queries={queries} k={k} faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads")
    t = time.perf_counter()
    flat = build_index(x, IndexConfig(kind="flat"))
    t_build = time.perf_counter() - t
    t = time.perf_counter()
    _, truth = flat.search(q, k)
    t_flat = time.perf_counter() - t
    print(f"  flat    build {t_build:7.2f}s  search {t_flat:7.3f}s  recall@{k} 1.000  speed-up 1.0x (baseline)")
    rows = [{"kind": "flat", "build_s": t_build, "search_s": t_flat, "recall": 1.0, "speedup": 1.0}]
    nlist = max(1, int(4 * np.sqrt(n)))
    cfgs = {"ivf": IndexConfig(kind="ivf", nlist=min(nlist, n // 39), nprobe=16),
            "ivfpq": IndexConfig(kind="ivfpq", nlist=min(nlist, n // 39), nprobe=16, pq_m=min(64, d // 8), rerank=10),
            "hnsw": IndexConfig(kind="hnsw", hnsw_m=32, ef_search=128)}
    for kind in kinds:
        cfg = cfgs[kind]
        t = time.perf_counter()
        index = build_index(x, cfg, seed=seed)
        t_build = time.perf_counter() - t
        t = time.perf_counter()
        if kind == "ivfpq":  # the stage's search: PQ candidates, re-scored exactly
            ids, _ = search(index, x, q, k, rerank=cfg.rerank)
        else:
            _, ids = index.search(q, k)
        t_s = time.perf_counter() - t
        recall = float(np.mean([len(set(a[a >= 0]) & set(b)) / k for a, b in zip(ids, truth)]))
        print(f"  {kind:7s} build {t_build:7.2f}s  search {t_s:7.3f}s  recall@{k} {recall:.3f}  "
              f"speed-up {t_flat / t_s:5.1f}x  ({cfg.model_dump(exclude_defaults=True)})")
        rows.append({"kind": kind, "build_s": t_build, "search_s": t_s, "recall": recall, "speedup": t_flat / t_s})
        record(f"kNN {kind} search speed-up (recall@{k} {recall:.3f}, goal >= 0.95)", t_flat / t_s, goal=">= 10", value=t_s, baseline=t_flat, unit="s",
               against="exact flat search, same queries", recall_at_k=round(recall, 4), n=n, d=d)
    return rows


def _jpegs(n: int, seed: int) -> list[bytes]:
    from PIL import Image

    g = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = (int(v) for v in g.integers(96, 160, 2))
        arr = (g.random((h // 8, w // 8, 3)) * 255).astype(np.uint8)
        img = Image.fromarray(arr).resize((w, h))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def bench_reinforce(samples: int, n_aug: int, model: str, image_size: int, seed: int) -> dict:
    import pyarrow as pa
    import torch
    from PIL import Image

    from recap.pipeline.reinforced import replay_augmentation, sample_param_aug
    from recap.pipeline.stage import StageContext
    from recap.pipeline.uid import make_uid
    from recap.stages.reinforce import ReinforceConfig, ReinforceStage

    torch.set_num_threads(2)
    jpgs = _jpegs(samples, seed)
    caps = [f"a picture of noise number {i}" for i in range(samples)]
    uids = [make_uid(f"https://bench.invalid/{i}", c) for i, c in enumerate(caps)]
    batch = pa.table({"uid": uids, "jpg": pa.array(jpgs, pa.binary()), "caption": caps})
    cfg = ReinforceConfig(teachers=[{"model": model, "pretrained": None}], aug={"image_size": image_size, "n_aug": n_aug})
    stage = ReinforceStage(cfg, StageContext("bench", seed, "reinforce", "/tmp", samples))
    stage._load()
    stage.partial(batch.slice(0, 4))  # warm-up
    t = time.perf_counter()
    summary, _, files = stage.partial(batch)
    t_stage = time.perf_counter() - t
    # the teacher alone on the same inputs, replayed and preprocessed beforehand
    enc = stage._teachers[0]
    crops = []
    for u, data in zip(uids, jpgs):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        crops += [enc.preprocess(replay_augmentation(img, p, cfg.aug))
                  for p in sample_param_aug(img.width, img.height, cfg.aug, seed, u)]
    t = time.perf_counter()
    for s in range(0, samples, cfg.encode_batch):
        enc.encode_preprocessed(crops[s * n_aug:(s + cfg.encode_batch) * n_aug])
        enc.encode_texts(caps[s:s + cfg.encode_batch])
    t_fwd = time.perf_counter() - t
    r = {"samples": samples, "stage_sps": samples / t_stage, "forward_sps": samples / t_fwd,
         "ratio": t_fwd / t_stage, "tar_bytes": len(next(iter(files.values())))}
    print(f"reinforce: {samples} samples x {n_aug} augmentations, {model} at {image_size}px: stage "
          f"{r['stage_sps']:.1f} samples/s, teacher forward alone {r['forward_sps']:.1f} samples/s, ratio {r['ratio']:.2f}")
    record("reinforce samples/s", r["ratio"], goal=">= 0.7", value=r["stage_sps"], baseline=r["forward_sps"],
           unit="samples/s", against="the teacher's plain forward over the same crops and texts", model=model)
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--kinds", default="ivf,ivfpq,hnsw")
    p.add_argument("--spread", type=float, default=1.0, help="noise norm around each centre (1.0: 45 degrees)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reinforce", action="store_true", help="the reinforce throughput half instead")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--n-aug", type=int, default=4)
    p.add_argument("--model", default="recap-tiny")
    p.add_argument("--image-size", type=int, default=64)
    a = p.parse_args()
    if a.reinforce:
        bench_reinforce(a.samples, a.n_aug, a.model, a.image_size, a.seed)
    else:
        bench_knn(a.n, a.d, a.queries, a.k, [k for k in a.kinds.split(",") if k], a.spread, a.seed)


if __name__ == "__main__":
    main()
