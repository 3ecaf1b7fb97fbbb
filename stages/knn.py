"""Nearest neighbours by inner product with faiss, for the negatives stage and bench/knn.py. Not a stage.

Index kinds (``IndexConfig.kind``):

- ``flat``: ``IndexFlatIP``, exact; the default, and right up to a few million vectors.
- ``ivf``: ``IndexIVFFlat`` over ``nlist`` k-means cells, ``nprobe`` cells searched per query.
- ``ivfpq``: ``IndexIVFPQ``: as ivf, each vector compressed to ``pq_m`` bytes (8-bit codes);
  the candidates are re-scored exactly afterwards, so only recall is approximate, never a similarity.
- ``hnsw``: ``IndexHNSWFlat`` (graph, ``hnsw_m`` links per node, ``ef_search`` at query time).

Trained kinds learn from a sample of ``train_size`` vectors drawn with the job seed; faiss wants
about 39 training vectors per k-means centroid (its own warning threshold), and product
quantisation 256 per sub-quantiser (8-bit codes), so a sample smaller than that is an error that
names the config field. Training and HNSW insertion run on one thread: faiss' multi-threaded
k-means and graph build can order float sums differently run to run, and the index must not
depend on the machine. Searching is per query and may use every thread.

Results are deterministic: candidates come back re-scored in float64 against the stored vectors
and ordered by (similarity descending, id ascending).
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

MIN_PER_CENTROID = 39  # faiss' k-means warns below this many training points per centroid
PQ_CODES = 256  # 8-bit product-quantiser codes: one centroid per code


class IndexConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["flat", "ivf", "ivfpq", "hnsw"] = Field("flat", description="flat (exact), ivf, ivfpq or hnsw")
    nlist: int | None = Field(None, ge=1, description="ivf/ivfpq cells; default 4*sqrt(N), at most N/39")
    nprobe: int = Field(16, ge=1, description="ivf/ivfpq cells searched per query")
    pq_m: int = Field(16, ge=1, description="ivfpq bytes per vector (must divide the dimension)")
    hnsw_m: int = Field(32, ge=2, description="hnsw links per node")
    ef_construction: int = Field(80, ge=1, description="hnsw build beam")
    ef_search: int = Field(64, ge=1, description="hnsw query beam")
    rerank: int = Field(10, ge=1, description="ivfpq: candidates fetched per wanted neighbour, re-scored exactly")
    train_size: int | None = Field(None, ge=1, description="vectors in the seeded training sample; default "
                                                           "max(39*nlist, 256 for ivfpq) capped at N")
    gpu: bool = Field(True, description="use faiss-gpu when the worker has a GPU and faiss was built with it")


class IndexTooSmall(ValueError):
    """A trained index kind whose training sample cannot be big enough; the message names the field."""


def _nlist(cfg: IndexConfig, n: int) -> int:
    # the default stays trainable: 4*sqrt(N) cells, fewer when N has not 39 vectors for each
    return cfg.nlist or max(1, min(int(4 * math.sqrt(max(n, 1))), n // MIN_PER_CENTROID))


def training_needs(cfg: IndexConfig, n: int) -> tuple[int, str]:
    """(training vectors this kind needs for N vectors, the field that sets it); (0, '') if none."""
    if cfg.kind in ("flat", "hnsw"):
        return 0, ""
    need, field = _nlist(cfg, n) * MIN_PER_CENTROID, "nlist"
    if cfg.kind == "ivfpq" and PQ_CODES > need:
        need, field = PQ_CODES, "pq_m"
    return need, field


def check_trainable(cfg: IndexConfig, n: int, where: str) -> None:
    """IndexTooSmall, naming ``where``'s fields, unless ``n`` vectors can train this index."""
    need, field = training_needs(cfg, n)
    if not need:
        return
    have = min(n, cfg.train_size) if cfg.train_size else n
    if have < need:
        limit = "the dataset" if not cfg.train_size or cfg.train_size >= n else f"{where}.train_size"
        raise IndexTooSmall(
            f"{where}.kind {cfg.kind!r}: training needs at least {need} vectors ({where}.{field}: "
            f"{_nlist(cfg, n)} cells x {MIN_PER_CENTROID}" + (" or 256 PQ codes" if cfg.kind == "ivfpq" else "")
            + f"), but {limit} gives {have}; lower {where}.nlist, raise {where}.train_size, or use kind: flat")


def _gpu_count() -> int:
    import faiss

    try:
        return int(faiss.get_num_gpus())
    except AttributeError:  # faiss-cpu
        return 0


def build_index(x: np.ndarray, cfg: IndexConfig, seed: int = 0, where: str = "index", use_gpu: bool = False):
    """An index over ``x`` (float32, unit rows), trained on a seeded sample when the kind needs it."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    check_trainable(cfg, n, where)
    if cfg.kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif cfg.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.ef_construction
        index.hnsw.efSearch = cfg.ef_search
    else:
        nlist = _nlist(cfg, n)
        quantizer = faiss.IndexFlatIP(d)
        if cfg.kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            if d % cfg.pq_m:
                raise IndexTooSmall(f"{where}.pq_m {cfg.pq_m} must divide the vectors' dimension {d}")
            index = faiss.IndexIVFPQ(quantizer, d, nlist, cfg.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        need, _ = training_needs(cfg, n)
        # default sample: 64 per cell (faiss' comfortable range is 30-256), and 39 per PQ code
        default = max(need, 64 * nlist, 39 * PQ_CODES if cfg.kind == "ivfpq" else 0)
        size = min(n, max(cfg.train_size or default, need))
        g = np.random.default_rng(seed)
        sample = x[np.sort(g.choice(n, size=size, replace=False))] if size < n else x
        index.cp.seed = seed
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            index.train(sample)
        finally:
            faiss.omp_set_num_threads(threads)
        index.nprobe = min(cfg.nprobe, nlist)
    if use_gpu and cfg.gpu and cfg.kind != "hnsw" and _gpu_count() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    if cfg.kind == "hnsw":
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            index.add(x)
        finally:
            faiss.omp_set_num_threads(threads)
    else:
        index.add(x)
    return index


def _is_pq(index) -> bool:
    import faiss

    try:
        return isinstance(faiss.downcast_index(index), faiss.IndexIVFPQ)
    except Exception:  # noqa: BLE001 - a GPU index or another wrapper: no re-ranking
        return False


def search(index, base: np.ndarray, queries: np.ndarray, k: int, exclude_self: np.ndarray | None = None,
           rerank: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(ids [q, k], sims [q, k]) of each query's k nearest rows of ``base``, re-scored exactly and
    ordered by (similarity desc, id asc); -1 / NaN where fewer exist. ``exclude_self[i]`` is a row
    id query i must not get back (itself). An IVF-PQ index is asked for ``rerank`` times as many."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    extra = 1 if exclude_self is not None else 0
    # compressed codes rank only roughly: fetch more, then the exact re-score below orders them
    factor = rerank if _is_pq(index) else 1
    want = min((k + extra) * factor, base.shape[0])
    ids = np.full((len(q), k), -1, np.int64)
    sims = np.full((len(q), k), np.nan, np.float32)
    if not len(q) or want <= 0:
        return ids, sims
    _, cand = index.search(q, want)
    b64 = base.astype(np.float64, copy=False)
    for r in range(len(q)):
        c = cand[r][cand[r] >= 0]
        if exclude_self is not None:
            c = c[c != exclude_self[r]]
        c = np.unique(c)
        s = b64[c] @ q[r].astype(np.float64)
        order = np.lexsort((c, -s))[:k]
        ids[r, :len(order)] = c[order]
        sims[r, :len(order)] = s[order]
    return ids, sims
