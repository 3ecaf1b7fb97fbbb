"""Perceptual hashes and the pairs of them within a Hamming distance, found without comparing all
pairs: multi-index hashing. Split the 64 bits into ``distance + 1`` disjoint chunks; two hashes at
most ``distance`` bits apart agree exactly on at least one chunk (pigeonhole), so only hashes that
share a chunk value are compared, and every such pair is found. A colour thumbnail kept beside each
hash confirms a match (``thumbnail_rmse``)."""
from __future__ import annotations

import numpy as np

PHASH_BITS = 64


# A 32x32 luma spread below this many grey levels carries no shape: such images (blank ones, or a
# shape on a background of the same luminance, yellow on beige) all hash alike, so they are left
# out of perceptual matching instead of being grouped together.
FLAT_STD = 2.0


# Side of the colour thumbnail that confirms a hash match. Luminance hashes of plain shapes on
# plain backgrounds collide often (a red disc and a blue octagon of the same size and place hash
# alike); comparing the colours pixel by pixel at this size tells them apart, while a re-encoded,
# resized or slightly trimmed copy stays within a few grey levels.
THUMB = 32


def perceptual_bytes(data: bytes | None, letterbox: bool = False
                     ) -> tuple[int | None, bytes | None, str | None]:
    """(64-bit DCT perceptual hash, 32x32 RGB thumbnail bytes, None), or (None, None, why the
    image has none).

    The hash is imagehash's ``phash`` (8x8 low frequencies of a 32x32 DCT, each bit "above the
    median") of the image as the file shows it: 16-bit, alpha and palette images are made 8-bit
    RGB first, as the clip stage sees them, so a PNG and its JPEG copy hash alike. The thumbnail
    is the same RGB image area-averaged to 32x32 (aspect ignored, as for the hash). With
    ``letterbox``, the image is first padded to a square with white, centred, as the downloader's
    ``resize_mode: border`` stores it."""
    import imagehash
    from PIL import Image

    from recap.pipeline.pixels import decode, to_rgb

    img, why = decode(data)
    if img is None:
        return None, None, why
    try:
        rgb = to_rgb(img)
        if letterbox and rgb.width != rgb.height:
            side = max(rgb.size)
            square = Image.new("RGB", (side, side), (255, 255, 255))
            square.paste(rgb, ((side - rgb.width) // 2, (side - rgb.height) // 2))
            rgb = square
        # imagehash's own first step, done here so the flatness check sees the same pixels
        small = rgb.convert("L").resize((32, 32), Image.Resampling.LANCZOS)
        if float(np.asarray(small, dtype=np.float32).std()) < FLAT_STD:
            return None, None, "flat image (no luminance structure to hash)"
        bits = imagehash.phash(small).hash.reshape(-1)
        thumb = rgb.resize((THUMB, THUMB), Image.Resampling.BOX).tobytes()
    except Exception as e:  # noqa: BLE001 - a bad image is data, not a bug
        return None, None, f"{type(e).__name__}: {e}"[:300]
    return int.from_bytes(np.packbits(bits).tobytes(), "big"), thumb, None


def phash_bytes(data: bytes | None) -> tuple[int | None, str | None]:
    """(perceptual hash, None) or (None, why): ``perceptual_bytes`` without the thumbnail."""
    h, _, why = perceptual_bytes(data)
    return h, why


def thumbnail_rmse(a: list[bytes], b: list[bytes]) -> np.ndarray:
    """Root-mean-square difference of paired thumbnails, on a 0-1 scale per colour channel."""
    if not a:
        return np.zeros(0, np.float32)
    x = np.frombuffer(b"".join(a), np.uint8).reshape(len(a), -1).astype(np.float32)
    y = np.frombuffer(b"".join(b), np.uint8).reshape(len(b), -1).astype(np.float32)
    return np.sqrt(((x - y) ** 2).mean(axis=1)) / 255.0


def phash_image(path_or_file) -> int:
    """The same hash of an image file (an evaluation set's images); raises when it does not decode."""
    data = path_or_file.read() if hasattr(path_or_file, "read") else open(path_or_file, "rb").read()
    h, why = phash_bytes(data)
    if h is None:
        raise ValueError(why)
    return h


def as_u64(values) -> np.ndarray:
    """Hashes stored as signed int64 (Arrow has no unsigned sort we need) back to uint64 bits."""
    return np.asarray(values, dtype=np.int64).view(np.uint64)


def to_i64(h: int) -> int:
    return h - (1 << 64) if h >= 1 << 63 else h


def _chunks(distance: int) -> list[tuple[int, int]]:
    """(shift, width) of ``distance + 1`` disjoint chunks covering the 64 bits."""
    n = distance + 1
    widths = [PHASH_BITS // n + (1 if i < PHASH_BITS % n else 0) for i in range(n)]
    out, shift = [], 0
    for w in widths:
        out.append((shift, w))
        shift += w
    return out


def hamming_pairs(hashes: np.ndarray, distance: int, queries: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair within ``distance`` bits, as (i, j, bits) arrays sorted by (i, j).

    Without ``queries``: pairs i < j of ``hashes``. With ``queries``: i indexes ``queries``, j
    ``hashes`` (the pool against an evaluation set). Work is one sort per chunk plus one pass per
    step inside the longest run of equal chunk values, so uniform hashes cost O(N log N)."""
    if not 0 <= distance < PHASH_BITS:
        raise ValueError(f"distance must be in [0, {PHASH_BITS})")
    base = np.asarray(hashes, dtype=np.uint64)
    cross = queries is not None
    h = np.concatenate([np.asarray(queries, dtype=np.uint64), base]) if cross else base
    n_q = len(h) - len(base)
    found_i, found_j = [], []
    for shift, width in _chunks(distance):
        if len(h) < 2:
            break
        key = (h >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        order = np.argsort(key, kind="stable")
        ks = key[order]
        step = 1
        while step < len(h):
            same = ks[step:] == ks[:-step]
            if not same.any():
                break  # equal keys are contiguous: no run is longer than this step
            a, b = order[:-step][same], order[step:][same]
            lo, hi = np.minimum(a, b), np.maximum(a, b)
            if cross:  # only query-to-pool pairs
                keep = (lo < n_q) & (hi >= n_q)
                lo, hi = lo[keep], hi[keep]
            close = np.bitwise_count(h[lo] ^ h[hi]) <= distance
            found_i.append(lo[close])
            found_j.append(hi[close])
            step += 1
    if not found_i:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty.astype(np.uint8)
    i, j = np.concatenate(found_i), np.concatenate(found_j)
    pairs = np.unique(np.stack([i, j], axis=1), axis=0)  # a pair shares several chunks at most once
    i, j = pairs[:, 0], pairs[:, 1]
    bits = np.bitwise_count(h[i] ^ h[j]).astype(np.uint8)
    return (i, j - n_q, bits) if cross else (i, j, bits)


def all_pairs(hashes: np.ndarray, distance: int, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """The brute-force answer (every pair compared), for checks and the benchmark's baseline."""
    h = np.asarray(hashes, dtype=np.uint64)
    out_i, out_j = [], []
    for start in range(0, len(h), block):
        d = np.bitwise_count(h[start:start + block, None] ^ h[None, :])
        i, j = np.nonzero(d <= distance)
        i = i + start
        upper = i < j
        out_i.append(i[upper])
        out_j.append(j[upper])
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(out_i), np.concatenate(out_j)


def components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected-component label of each of ``n`` nodes linked by the pairs (i, j)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n))
    return connected_components(graph, directed=False)[1]
