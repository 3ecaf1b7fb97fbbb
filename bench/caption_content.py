"""What slows the learning of shape: the tower, or what else the caption says? On demand, not a test.

One world's clean split trains the same image tower (``recap-tiny-cnn``) for the same number of
steps with the same contrastive loss (``trainer.losses.ClipLoss``, learnt logit scale, AdamW,
cosine schedule), changing only the text side:

- ``label``:   a learnt embedding per shape class (contrastive, but the text is the label);
- ``shape``:   the caption "a {shape}" through the model's text tower;
- ``concept``: "a {colour} {shape}" (the dominant object only);
- ``caption``: the world's full caption (sizes, colours, shapes, background, other objects);
- ``caption+concept``: per sample and step, the full caption or "a {colour} {shape}" with equal
  odds (MobileCLIP's uniform sampling over the GT and one object-focused synthetic caption);
- ``shape-negatives``: the full caption, plus --negatives copies of it with the dominant object's
  shape word swapped for another shape (a text-only NegCLIP swap), as extra text columns: the loss
  can only fall by telling the shapes apart;
- ``supervised``: cross-entropy on the shape labels through a linear head (the reference).

Zero-shot over the 14 shapes is scored on another world's clean split ("a photo of a {}."; for
``label`` and ``supervised`` the class embedding / head row). Images are decoded once at the
model's resolution (centre crop, random flip while training), so the runs differ only in the
text side.

    .venv/bin/python bench/caption_content.py [--steps 300] [--variants label,shape,concept,caption,shape-negatives,supervised]
                                        [--negatives 4]

Measured on the 2-core CPU machine (300 steps, batch 48, lr 1e-3; train 8400 samples of world
seed 1, eval 700 of seed 2; chance 0.071; about ±0.02 between seeds), zero-shot:
label 0.34, shape 0.19, concept 0.12, caption 0.09; supervised 0.29 (label and supervised take
23 s, the text-tower runs 46 s). The tower learns shape
about as fast from a contrastive label as from cross-entropy. Each word the caption adds that the
image shows more plainly (a colour first) slows it: the batch is told apart without shape, the loss
falls (0.46 for full captions against 3.27 for shape-only ones), and shape gets little gradient.
Larger batches put more same-colour captions in each batch: full captions at batch 192 reach
0.15-0.18 after 300 steps (two seeds), at 384 0.16 (about 2 and 3.5 minutes here); batch 48 for
the same number of samples (960 steps, bench/learning.py) reaches 0.13. Sampling the full caption
or "a {colour} {shape}" with equal odds does not help (0.091 against 0.094 in the same run).
Hard negatives that ask for shape do not either: with all 13 shape swaps of each caption as extra
columns the loss stays at 1.53 after 300 steps (the model cannot yet tell the shapes apart) and
zero-shot is 0.107 (178 s); with 4 swaps 0.117 (80 s). Throwaway runs of the same harness: a
fixed logit scale of 5, 10, 20 or 50 gives 0.09-0.10, SigLIP's loss 0.074; and the shape a
caption-trained model picks is one of those in the image only at the random rate (0.104 against
0.098).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.report import record  # noqa: E402

VARIANTS = ("label", "shape", "concept", "caption", "caption+concept", "shape-negatives", "supervised")
TEXT_SIDES = ("shape", "concept", "caption", "caption+concept", "shape-negatives")


def load_split(heldout: Path, preprocess) -> dict:
    """Images (preprocessed once), captions, labels and dominant objects of a clean split."""
    from recap.trainer.eval.sets import decode_image as _decode, iter_samples

    scenes = {r["key"]: r["scene"] for r in pq.read_table(heldout / "index.parquet").to_pylist()}
    images, captions, labels, dominant = [], [], [], []
    for s in iter_samples(str(heldout), Counter()):
        x = _decode(s["image"], preprocess)
        if x is None:
            continue
        scene = scenes[s["key"]]
        scene = json.loads(scene) if isinstance(scene, str) else scene
        images.append(x)
        captions.append(s["caption"])
        labels.append(s["label"])
        dominant.append(scene["objects"][0])
    return {"images": torch.stack(images), "captions": captions, "labels": torch.tensor(labels),
            "dominant": dominant}


def shape_swaps(split: dict, k: int) -> list[list[str]]:
    """Per caption, ``k`` copies with the dominant object's shape word (its first mention, singular or
    plural) replaced by other shapes, chosen per caption with a seeded shuffle."""
    from recap.world.captions import _en_plural
    from recap.world.scenes import SHAPES

    out = []
    for cap, dom in zip(split["captions"], split["dominant"]):
        others = [s for s in SHAPES if s != dom["shape"]]
        random.Random(cap).shuffle(others)
        m = re.search(rf"\b({re.escape(_en_plural(dom['shape']))}|{re.escape(dom['shape'])})\b", cap)
        if m is None:  # a caption that does not name the shape: no negative can be made from it
            out.append([cap] * k)
            continue
        plural = m.group(1) != dom["shape"]
        out.append([cap[:m.start()] + (_en_plural(o) if plural else o) + cap[m.end():] for o in others[:k]])
    return out


def texts_for(variant: str, split: dict) -> list[str]:
    if variant == "shape":
        return [f"a {o['shape']}" for o in split["dominant"]]
    if variant == "concept":
        return [f"a {o['colour']} {o['shape']}" for o in split["dominant"]]
    return split["captions"]


def run(variant: str, train: dict, held: dict, a: argparse.Namespace) -> dict:
    from recap.trainer.losses import ClipLoss
    from recap.trainer.models import create_model
    from recap.world.scenes import SHAPES

    torch.manual_seed(a.seed)
    model, _, _, tok = create_model(a.model)
    with torch.no_grad():
        dim = model.eval().encode_image(train["images"][:2]).shape[-1]
    model.train()
    head = nn.Embedding(len(SHAPES), dim) if variant == "label" else (
        nn.Linear(dim, len(SHAPES)) if variant == "supervised" else None)
    params = list(model.visual.parameters())
    if variant in TEXT_SIDES:
        params += [p for n, p in model.named_parameters() if not n.startswith("visual") and n != "logit_scale"]
    if head is not None:
        params += list(head.parameters())
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    opt = torch.optim.AdamW([{"params": params}, {"params": [logit_scale], "weight_decay": 0.0}],
                            lr=a.lr, weight_decay=0.2)
    loss_fn = ClipLoss()
    text_variants = ["caption"] if variant == "shape-negatives" else variant.split("+")
    negatives = torch.stack([tok(r) for r in shape_swaps(train, a.negatives)]) if variant == "shape-negatives" else None
    tokens = torch.stack([tok(texts_for(v, train)) for v in text_variants]) if variant in TEXT_SIDES else None
    rng = torch.Generator().manual_seed(a.seed)
    warmup = max(1, a.steps // 20)
    n = len(train["labels"])
    t0 = time.perf_counter()
    for step in range(a.steps):
        lr = a.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / a.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, n, (a.batch_size,), generator=rng)
        x = train["images"][idx]
        x = torch.where(torch.rand(len(idx), 1, 1, 1, generator=rng) < 0.5, x.flip(-1), x)
        img = F.normalize(model.encode_image(x), dim=-1)
        if variant == "supervised":
            loss = F.cross_entropy(head(img * 10), train["labels"][idx])
        else:
            if variant == "label":
                txt = head(train["labels"][idx])
            else:
                pick = torch.randint(0, len(tokens), (len(idx),), generator=rng)
                txt = model.encode_text(tokens[pick, idx])
            neg = None if negatives is None else F.normalize(model.encode_text(negatives[idx].flatten(0, 1)), dim=-1)
            loss = loss_fn(img, F.normalize(txt, dim=-1), logit_scale.exp().clamp(max=100), negative_text_features=neg)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    train_s = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        emb = F.normalize(torch.cat([model.encode_image(held["images"][i:i + 256])
                                     for i in range(0, len(held["labels"]), 256)]), dim=-1)
        if variant == "supervised":
            scores = head(emb * 10)
        elif variant == "label":
            scores = emb @ F.normalize(head.weight, dim=-1).T
        else:
            scores = emb @ F.normalize(model.encode_text(tok([f"a photo of a {s}." for s in SHAPES])), dim=-1).T
    acc = float((scores.argmax(1) == held["labels"]).float().mean())
    return {"variant": variant, "steps": a.steps, "train_s": round(train_s, 1), "zeroshot": round(acc, 3),
            "chance": round(1 / len(SHAPES), 3), "last_loss": round(float(loss), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--model", default="recap-tiny-cnn")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--negatives", type=int, default=4, help="shape-negatives: swapped captions per sample (1-13)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-samples", type=int, default=8400)
    ap.add_argument("--eval-samples", type=int, default=700)
    ap.add_argument("--keep", type=Path, help="work in this directory and keep it (default: a temp dir)")
    a = ap.parse_args()
    bad = set(a.variants.split(",")) - set(VARIANTS)
    if bad:
        ap.error(f"unknown variants {sorted(bad)}; choose from {','.join(VARIANTS)}")
    if not 1 <= a.negatives <= 13:
        ap.error("--negatives must be 1-13 (there are 14 shapes)")
    torch.set_num_threads(a.threads)
    random.seed(a.seed)

    from recap.trainer.models import create_model
    from recap.world.generate import generate_world

    with tempfile.TemporaryDirectory() as tmp:
        work = a.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name, n, seed in (("train", a.train_samples, 1), ("eval", a.eval_samples, 2)):
            if not (work / name / "heldout").exists():
                generate_world(work / name, samples=20, heldout=n, seed=seed)
        _, _, pre, _ = create_model(a.model)
        train, held = load_split(work / "train" / "heldout", pre), load_split(work / "eval" / "heldout", pre)
        rows = []
        for v in a.variants.split(","):
            rows.append(run(v, train, held, a))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'text side':<16}{'steps':>6}{'train s':>9}{'zero-shot':>11}{'chance':>8}{'last loss':>11}")
    for r in rows:
        print(f"{r['variant']:<16}{r['steps']:>6}{r['train_s']:>9}{r['zeroshot']:>11}{r['chance']:>8}{r['last_loss']:>11}")
        record(f"zero-shot after training on {r['variant']} captions", r["zeroshot"] / r["chance"], value=r["zeroshot"],
               baseline=r["chance"], against="chance", steps=r["steps"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
