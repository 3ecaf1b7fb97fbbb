"""SemDeDup (Abbas et al., 2023) on image embeddings: spherical k-means, then inside each cluster
the items are ordered by their distance to the centroid and an item leaves when its cosine to any
item before it exceeds ``1 - eps``. ``keep: farthest`` orders far-from-centroid first (the paper's
default, "keep hard"), ``closest`` the reverse; equal distances are ordered by uid, so the result
depends only on the data and the seed."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_BLOCK = 2048  # rows of a cluster's similarity matrix held at once


@dataclass
class SemanticResult:
    cluster: np.ndarray      # per item: its cluster
    removed: np.ndarray      # per item: True when it leaves
    nearest: np.ndarray      # per removed item: index of the earlier item it is closest to (else -1)
    similarity: np.ndarray   # per removed item: that cosine (else NaN)
    kept_as: np.ndarray      # per removed item: the kept item its chain of nearest items ends at


def normalise(emb: np.ndarray) -> np.ndarray:
    e = np.asarray(emb, dtype=np.float32)
    norm = np.linalg.norm(e, axis=1, keepdims=True)
    return e / np.where(norm > 0, norm, 1.0)


def spherical_kmeans(emb: np.ndarray, clusters: int, seed: int, niter: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """(centroids, assignment) with faiss's k-means (spherical: centroids renormalised each step)."""
    import faiss

    k = max(1, min(clusters, len(emb)))
    km = faiss.Kmeans(emb.shape[1], k, niter=niter, seed=seed, spherical=True, verbose=False,
                      min_points_per_centroid=1)
    km.train(emb)
    _, assign = km.index.search(emb, 1)
    return km.centroids, assign[:, 0].astype(np.int64)


def semdedup(emb: np.ndarray, uids: list[str] | np.ndarray, *, eps: float, clusters: int, keep: str,
             seed: int) -> SemanticResult:
    """SemDeDup over ``emb`` (rows in any fixed order; the result does not depend on it beyond
    what k-means's own initialisation draws from the seed)."""
    n = len(emb)
    removed = np.zeros(n, bool)
    nearest = np.full(n, -1, np.int64)
    similarity = np.full(n, np.nan, np.float32)
    if n == 0:
        return SemanticResult(np.zeros(0, np.int64), removed, nearest, similarity, nearest.copy())
    e = normalise(emb)
    centroids, assign = spherical_kmeans(e, clusters, seed)
    uid_rank = np.argsort(np.argsort(np.asarray(uids, dtype=object), kind="stable"), kind="stable")
    for c in np.unique(assign):
        members = np.nonzero(assign == c)[0]
        if len(members) < 2:
            continue
        dist = 1.0 - e[members] @ normalise(centroids[c:c + 1])[0]
        # farthest first: sort by -dist; np.lexsort's last key is the primary one
        primary = -dist if keep == "farthest" else dist
        ordered = members[np.lexsort((uid_rank[members], primary))]
        sub = e[ordered]
        for start in range(1, len(ordered), _BLOCK):
            stop = min(start + _BLOCK, len(ordered))
            sims = sub[start:stop] @ sub[:stop].T
            # only items earlier in the order count: column index < row's position
            sims[np.arange(stop - start)[:, None] + start <= np.arange(stop)[None, :]] = -np.inf
            best = sims.argmax(axis=1)
            top = sims[np.arange(stop - start), best]
            gone = top > 1.0 - eps
            rows = ordered[start:stop][gone]
            removed[rows] = True
            nearest[rows] = ordered[best[gone]]
            similarity[rows] = top[gone]
    kept_as = nearest.copy()
    while True:  # follow nearest-earlier links until a kept item; they always point back in order
        step = removed[np.maximum(kept_as, 0)] & (kept_as >= 0)
        if not step.any():
            break
        kept_as[step] = nearest[kept_as[step]]
    return SemanticResult(assign, removed, nearest, similarity, kept_as)
