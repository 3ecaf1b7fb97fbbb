"""Small reinforced datasets for tests and benchmarks: the reinforce stage's writer, minus the models."""
from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Sequence

import fsspec
import numpy as np

from recap.pipeline import rng
from recap.pipeline.reinforced.augment import sample_param_aug
from recap.pipeline.reinforced.codec import IMAGE_EXTS
from recap.pipeline.reinforced.config import AugConfig, ReinforcedConfig, TeacherConfig
from recap.pipeline.reinforced.layout import shard_file
from recap.pipeline.reinforced.writer import ReinforcedWriter


def _unit_rows(rows: np.ndarray, config: ReinforcedConfig) -> np.ndarray:
    out = rows.astype(np.float64).copy()
    for _, sl in config.slices():
        out[:, sl] /= np.maximum(np.linalg.norm(out[:, sl], axis=1, keepdims=True), 1e-12)
    return out.astype(np.float32)


def _index_rows(n: int, config: ReinforcedConfig) -> np.ndarray:
    """Row k = the unit vector e_k in every teacher slice (so a row's argmax names its index)."""
    out = np.zeros((n, config.dim), np.float32)
    for _, sl in config.slices():
        width = sl.stop - sl.start
        if n > width:
            raise ValueError(f"encode_index needs every teacher dim >= {n} rows, got {width}")
        out[np.arange(n), sl.start + np.arange(n)] = 1.0
    return out


def _fixture_image(g: np.random.Generator, min_size: int, max_size: int) -> bytes:
    from PIL import Image, ImageDraw

    w, h = (int(x) for x in g.integers(min_size, max_size + 1, size=2))
    img = Image.new("RGB", (w, h), tuple(int(c) for c in g.integers(0, 256, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = int(g.integers(0, w // 2)), int(g.integers(0, h // 2))
        x1, y1 = int(g.integers(x0 + 4, w + 1)), int(g.integers(y0 + 4, h + 1))
        d.rectangle([x0, y0, x1, y1], fill=tuple(int(c) for c in g.integers(0, 256, 3)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_fixture(out: str, n_samples: int, n_shards: int = 1, dims: Sequence[int] = (16,), seed: int = 0,
                 images_from: str | None = None, *, n_aug: int = 3, n_syn: int = 2, n_neg: int = 2,
                 image_size: int = 32, balance_prob: float | Callable[[int], float] | None = None,
                 encode_index: bool = False, min_size: int = 40, max_size: int = 96,
                 aug: dict | None = None) -> dict:
    """A small reinforced dataset (the reinforce stage's writer, minus the models): images drawn at
    random (or the files of ``images_from``, cycled in name order), ``n_syn`` synthetic captions and
    ``n_neg`` negatives per sample, random L2-normalised teacher embeddings (or, with
    ``encode_index``, row k = e_k in every teacher slice, so tests can check row <-> index).
    Returns ``{"config", "uids" (in write order), "shards": {name: [uids]}, "samples": {uid: dict}}``."""
    from PIL import Image

    from recap.pipeline.uid import make_uid

    config = ReinforcedConfig(
        teachers=[TeacherConfig(name=f"teacher{k}", pretrained=None, dim=int(d)) for k, d in enumerate(dims)],
        aug=AugConfig(**{"image_size": image_size, "n_aug": n_aug, **(aug or {})}),
        emb_dtype="float32",
        generators={"captioner": {"name": "fixture"}, "rewriter": {"name": "fixture"}})
    files: list[bytes] = []
    if images_from:
        fs, root = fsspec.core.url_to_fs(images_from)
        for p in sorted(fs.find(root)):
            if p.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
                files.append(fs.cat_file(p))
        if not files:
            raise FileNotFoundError(f"no images under {images_from}")
    g = rng.generator(seed, "fixture", "images")
    sources = ["caption", "rewrite", "short", "long"]
    samples: list[dict] = []
    for i in range(n_samples):
        url = f"https://fixture.invalid/{seed}/{i}.jpg"
        caption = f"fixture image {i} of seed {seed}"
        uid = make_uid(url, caption)
        jpg = files[i % len(files)] if files else _fixture_image(g, min_size, max_size)
        with Image.open(io.BytesIO(jpg)) as im:
            width, height = im.size
        syn_text = [f"synthetic {sources[k % len(sources)]} {k} of image {i}" for k in range(n_syn)]
        neg_short = [f"negative {k} of image {i}" for k in range(n_neg)]
        bp = balance_prob(i) if callable(balance_prob) else balance_prob
        meta = {"uid": uid, "sha256": hashlib.sha256(jpg).hexdigest(), "width": width, "height": height,
                "scores": {"clip_score": round(float(g.uniform(0.1, 0.4)), 6)}, "matched_entries": []}
        if bp is not None:
            meta["balance_prob"] = float(bp)
        s = {"uid": uid, "jpg": jpg, "txt": caption, "url": url, "json": meta,
             "param_aug": sample_param_aug(width, height, config.aug, seed, uid, n_aug),
             "syn": {"syn_text": syn_text, "syn_source": [sources[k % len(sources)] for k in range(n_syn)]},
             "neg": {"neg_text_short": neg_short, "neg_text_long": [t + ", described at length" for t in neg_short],
                     "neg_of": [k % (1 + n_syn) for k in range(n_neg)], "neg_type": ["swap"] * n_neg,
                     "hard_neg_uids": [], "hard_neg_sims": []}}
        if config.teachers:
            eg = rng.generator(seed, "fixture/emb", uid)
            for f, rows in (("image_emb", n_aug), ("text_emb", 1 + n_syn), ("neg_text_emb", n_neg)):
                s[f] = _index_rows(rows, config) if encode_index else \
                    _unit_rows(eg.standard_normal((rows, config.dim)), config)
        samples.append(s)
    shards: dict[str, list[str]] = {}
    with ReinforcedWriter(out, config) as w:
        for k in range(n_shards):
            part = samples[k * n_samples // n_shards:(k + 1) * n_samples // n_shards]
            w.write_shard(k, part)
            shards[shard_file(k)] = [s["uid"] for s in part]
    return {"config": config, "uids": [s["uid"] for s in samples], "shards": shards,
            "samples": {s["uid"]: s for s in samples}}
