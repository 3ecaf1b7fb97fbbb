"""Evaluation of image–text models on a labelled set: zero-shot classification, retrieval and a
compositional (SugarCrepe/ARO-style) test; ``recap eval``.

Labelled set ("simple folder/webdataset format"; the demo world's ``heldout/`` is one):

    DIR/shards/*.tar     webdataset samples: {key}.jpg (or png/jpeg/webp), {key}.txt caption,
                         {key}.cls integer label, {key}.json with optional neg_caption, neg_type
    DIR/classnames.txt   one class name per line (line i = label i)
    DIR/templates.txt    prompt templates with "{}" (default: "a photo of a {}.")
    DIR/label_sets/NAME/classnames.txt
                         optional further label sets (the dominant colour, say): a sample's label
                         for NAME is ``labels.NAME`` in its {key}.json, the prompts are
                         label_sets/NAME/templates.txt (default: DIR's templates)

Or torchvision's ImageFolder layout, for sets that come as class folders (no captions, so
zero-shot and the linear probe only; retrieval and the compositional test report ``skipped``):

    DIR/CLASS/**/*.jpg   (or png/jpeg/webp) label = CLASS's index among DIR's class folders in name
                         order; prompts use DIR/classnames.txt (one line per class folder, in that
                         order) or else the folder names, "_" read as " "

DIR may be a local path or any fsspec URL. A sample without an image or a caption, with an
image that does not decode, or a shard that is cut short is skipped and counted in
``result["skipped"]`` (by reason), never a crash. A sample with a bad or missing label stays in
retrieval and the compositional test, and only leaves zero-shot.

Metrics (all in [0, 1]; ties are broken at random *in expectation*, so a model that cannot tell
things apart scores chance, not 1.0):

- zero-shot top-1/top-5: class embedding = normalised mean of the normalised template embeddings;
  the same for every further label set (``result["zeroshot_label_sets"][NAME]``), over the samples
  that carry a label for it
- retrieval image→text and text→image R@1/5/10: the positives of an image are the texts equal to
  its caption (identical captions of two images are both right)
- compositional: per sample with a ``neg_caption``, right iff sim(image, caption) >
  sim(image, neg_caption); overall and per ``neg_type``
Chance levels are reported beside each.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from collections import Counter
from typing import Any, Callable, Iterator, Sequence

import fsspec
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

TASKS = ("zeroshot", "retrieval", "compositional")
RECALL_KS = (1, 5, 10)
DEFAULT_TEMPLATES = ("a photo of a {}.",)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


# -- reading the labelled set ---------------------------------------------------------------------

def _read_lines(fs, path: str) -> list[str] | None:
    if not fs.exists(path):
        return None
    with fs.open(path, "r", encoding="utf-8") as f:
        return [line.rstrip("\n").rstrip("\r") for line in f if line.strip()]


def iter_samples(data_dir: str, skipped: Counter) -> Iterator[dict[str, Any]]:
    """Raw samples ``{key, image (bytes), caption (str|None), label (int|None), meta (dict)}``: of
    every shard under ``data_dir/shards`` in name order, or else of the class folders (caption None);
    problems counted in ``skipped``."""
    fs, root, shards, folders = _layout(data_dir)
    for shard in shards:
        yield from _iter_shard(fs, shard, skipped)
    for label, (name, files) in enumerate(folders):
        for path in files:
            if _ext(path) not in IMAGE_EXTS:
                skipped["not_an_image_file"] += 1
                continue
            try:
                image = fs.cat_file(path)
            except OSError:
                skipped["unreadable_file"] += 1
                continue
            yield {"key": path[len(root) + 1:].rsplit(".", 1)[0], "image": image, "caption": None, "label": label,
                   "meta": {}}


def list_shards(data_dir: str) -> tuple[Any, list[str]]:
    """(filesystem, sorted paths) of ``data_dir/shards/*.tar``, or (filesystem, []) for a set in
    class folders; FileNotFoundError when it is neither."""
    fs, _, shards, _ = _layout(data_dir)
    return fs, shards


def _layout(data_dir: str) -> tuple[Any, str, list[str], list[tuple[str, list[str]]]]:
    """(filesystem, root, sorted shard paths, class folders): the shards when there are any, else
    the class folders (``_class_folders``); FileNotFoundError when it is neither."""
    fs, root = fsspec.core.url_to_fs(data_dir)
    root = root.rstrip("/")
    shards = sorted(fs.glob(f"{root}/shards/*.tar"))
    folders = [] if shards else _class_folders(fs, root)
    if not shards and not folders:
        raise FileNotFoundError(f"no shards/*.tar and no class folders of images under {data_dir}")
    return fs, root, shards, folders


def _ext(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[-1].lower() if "." in base else ""


def _class_folders(fs, root: str) -> list[tuple[str, list[str]]]:
    """ImageFolder layout: (class folder name, its files, sorted) for each subfolder of ``root``
    that holds at least one image, in name order (``shards`` and ``label_sets`` are not classes)."""
    try:
        entries = fs.ls(root, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for e in sorted(entries, key=lambda e: e["name"]):
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        if e["type"] != "directory" or name in ("shards", "label_sets") or name.startswith("."):
            continue
        files = sorted(fs.find(e["name"]))
        if any(_ext(f) in IMAGE_EXTS for f in files):
            out.append((name, files))
    return out


def _folder_classnames(fs, root: str, folders: list[tuple[str, list[str]]], data_dir: str) -> list[str]:
    """Class names of a set in class folders: classnames.txt (checked against the folders) or the
    folder names."""
    listed = _read_lines(fs, f"{root}/classnames.txt")
    if listed is None:
        return [name.replace("_", " ") for name, _ in folders]
    if len(listed) != len(folders):
        raise ValueError(f"{data_dir}: classnames.txt has {len(listed)} lines for {len(folders)} class folders "
                         f"(one line per folder, in name order)")
    return listed


def _iter_shard(fs, shard: str, skipped: Counter) -> Iterator[dict[str, Any]]:
    # the reinforced reader's tar grouping: a shard cut short (even at a block boundary) ends with
    # `truncated_shard` counted, the sample being read dropped, and what came before kept
    from recap.pipeline.reinforced import iter_raw

    before = skipped["truncated_shard"]
    for key, group in iter_raw(fs.unstrip_protocol(shard), skipped):
        yield from _finish(key, group, skipped)
    if skipped["truncated_shard"] > before:
        log.warning("shard %s is damaged: the samples after the damage are lost", shard)


def _finish(key: str, group: dict[str, bytes], skipped: Counter) -> Iterator[dict[str, Any]]:
    image = next((group[e] for e in IMAGE_EXTS if e in group), None)
    if image is None:
        skipped["missing_image"] += 1
        return
    if "txt" not in group:
        skipped["missing_caption"] += 1
        return
    try:
        caption = group["txt"].decode("utf-8").strip()
    except UnicodeDecodeError:
        skipped["bad_caption"] += 1
        return
    if not caption:
        skipped["missing_caption"] += 1
        return
    label = None
    if "cls" in group:
        try:
            label = int(group["cls"].decode().strip())
        except (UnicodeDecodeError, ValueError):
            skipped["bad_label"] += 1
    meta: dict[str, Any] = {}
    if "json" in group:
        try:
            meta = json.loads(group["json"])
            if not isinstance(meta, dict):
                raise ValueError("not an object")
        except ValueError:
            skipped["bad_json"] += 1
            meta = {}
    yield {"key": key, "image": image, "caption": caption, "label": label, "meta": meta}


def _decode(image: bytes, preprocess: Callable) -> torch.Tensor | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image)) as img:
            img.load()
            return preprocess(img.convert("RGB"))
    except Exception:  # noqa: BLE001 - any decoder failure is a bad image, counted by the caller
        return None


# -- embeddings -----------------------------------------------------------------------------------

@torch.no_grad()
def _encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int, device) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[i:i + batch_size])).to(device)
        out.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


@torch.no_grad()
def _encode_images(model, batch: list[torch.Tensor], device) -> torch.Tensor:
    x = torch.stack(batch).to(device)
    p = next(iter(model.parameters()), None)
    if p is not None and p.is_floating_point():
        x = x.to(p.dtype)
    return F.normalize(model.encode_image(x).float(), dim=-1).cpu()


def encode_split(model, preprocess: Callable, data_dir: str, batch_size: int, device,
                 skipped: Counter) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """L2-normalised image embeddings [N, D] of every decodable sample under ``data_dir`` and the
    samples (``iter_samples`` dicts without the image bytes, in the same order); bad images counted
    in ``skipped``."""
    rows: list[dict[str, Any]] = []
    chunks: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []
    for s in iter_samples(data_dir, skipped):
        x = _decode(s["image"], preprocess)
        if x is None:
            skipped["bad_image"] += 1
            continue
        pending.append(x)
        rows.append({k: v for k, v in s.items() if k != "image"})
        if len(pending) == batch_size:
            chunks.append(_encode_images(model, pending, device))
            pending = []
    if pending:
        chunks.append(_encode_images(model, pending, device))
    return (torch.cat(chunks) if chunks else torch.zeros(0, 0)), rows


# -- metrics --------------------------------------------------------------------------------------

def _hit_prob(scores: torch.Tensor, positive: torch.Tensor, ks: Sequence[int]) -> dict[int, torch.Tensor]:
    """Per row, P(a positive is among the top k) with ties broken uniformly at random (taking the
    best positive; positives tied with it are not competitors). ``positive``: bool, same shape."""
    neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype)
    best = torch.where(positive, scores, neg_inf).max(dim=1, keepdim=True).values
    negatives = ~positive
    greater = ((scores > best) & negatives).sum(1).double()
    ties = ((scores == best) & negatives).sum(1).double()
    return {k: ((k - greater) / (ties + 1)).clamp(0, 1) for k in ks}


def _mean(x: torch.Tensor) -> float:
    return float(x.double().mean()) if x.numel() else float("nan")


def zeroshot_metrics(image_emb: torch.Tensor, labels: torch.Tensor, class_emb: torch.Tensor) -> dict[str, Any]:
    n_classes = class_emb.shape[0]
    scores = image_emb @ class_emb.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(labels)), labels] = True
    hits = _hit_prob(scores, positive, (1, 5))
    per_class = {}
    for c in range(n_classes):
        sel = labels == c
        if sel.any():
            per_class[c] = _mean(hits[1][sel])
    return {"top1": _mean(hits[1]), "top5": _mean(hits[5]), "n": int(len(labels)), "n_classes": n_classes,
            "chance_top1": 1.0 / n_classes, "chance_top5": min(5, n_classes) / n_classes,
            "per_class_top1": per_class}


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, captions: Sequence[str],
                      ks: Sequence[int] = RECALL_KS, chunk: int = 1024) -> dict[str, Any]:
    """Image i's caption is text i; identical caption strings are positives of each other."""
    n = len(captions)
    ids: dict[str, int] = {}
    group = torch.tensor([ids.setdefault(c, len(ids)) for c in captions])
    i2t = {k: [] for k in ks}
    t2i = {k: [] for k in ks}
    for s in range(0, n, chunk):
        rows = slice(s, min(n, s + chunk))
        positive = group[rows, None] == group[None, :]
        for k, v in _hit_prob(image_emb[rows] @ text_emb.T, positive, ks).items():
            i2t[k].append(v)
        for k, v in _hit_prob(text_emb[rows] @ image_emb.T, positive, ks).items():
            t2i[k].append(v)
    return {"image_to_text": {f"R@{k}": _mean(torch.cat(i2t[k])) for k in ks},
            "text_to_image": {f"R@{k}": _mean(torch.cat(t2i[k])) for k in ks},
            "n": n, "chance": {f"R@{k}": min(k, n) / n if n else float("nan") for k in ks}}


def compositional_metrics(image_emb: torch.Tensor, pos_emb: torch.Tensor, neg_emb: torch.Tensor,
                          neg_types: Sequence[str]) -> dict[str, Any]:
    pos = (image_emb * pos_emb).sum(-1)
    neg = (image_emb * neg_emb).sum(-1)
    right = (pos > neg).double() + 0.5 * (pos == neg).double()  # a tie is a coin flip
    by_type: dict[str, dict[str, Any]] = {}
    for t in sorted(set(neg_types)):
        sel = torch.tensor([x == t for x in neg_types])
        by_type[t] = {"accuracy": _mean(right[sel]), "n": int(sel.sum())}
    return {"accuracy": _mean(right), "n": int(len(neg_types)), "chance": 0.5, "by_type": by_type}


def linear_probe(model, preprocess: Callable, train_dir: str, eval_dir: str, *, batch_size: int = 128,
                 device: str | torch.device = "cpu", steps: int = 500, lr: float = 1e-2, seed: int = 0,
                 label_set: str | None = None, precision: str = "fp32") -> dict[str, Any]:
    """CLIP's linear probe: a logistic regression on the frozen, L2-normalised image embeddings of
    ``train_dir``'s labelled samples, scored on ``eval_dir``'s. Says whether the image tower
    encodes the labels at all, whatever the text tower has learnt. Full-batch Adam, seeded.
    ``label_set``: probe a further label set (``labels.NAME`` in the samples' json) instead of
    the main labels. ``precision``: the image encoder under autocast, as in ``evaluate``."""
    model = getattr(model, "module", model)
    encoders = _AutocastEncoders(model, device, precision)
    was_training = model.training
    model.eval()
    try:
        (xt, yt), (xe, ye) = (_labelled(encoders, preprocess, d, batch_size, device, label_set)
                              for d in (train_dir, eval_dir))
    finally:
        model.train(was_training)
    what = f"label set {label_set!r}" if label_set else "labels"
    if not len(yt) or not len(ye):
        return {"skipped": f"no samples with {what} in " + (train_dir if not len(yt) else eval_dir),
                "label_set": label_set}
    n_classes = int(max(yt.max(), ye.max())) + 1
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(xt.shape[1], n_classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.01)
        head.bias.zero_()
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    # The embeddings are unit vectors: a fixed gain lets the logits reach confident values quickly.
    for _ in range(steps):
        loss = F.cross_entropy(head(xt * 10), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        top1 = float((head(xe * 10).argmax(1) == ye).double().mean())
    counts = torch.bincount(ye, minlength=n_classes).double()
    return {"top1": top1, "chance_top1": float(counts.max() / counts.sum()), "n_train": len(yt), "n": len(ye),
            "n_classes": n_classes, "label_set": label_set}


def _labelled(model, preprocess, data_dir: str, batch_size: int, device,
              label_set: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    emb, rows = encode_split(model, preprocess, data_dir, batch_size, device, Counter())
    labels = _set_labels(rows, label_set, Counter()) if label_set else [r["label"] for r in rows]
    keep = [i for i, lab in enumerate(labels) if isinstance(lab, int) and lab >= 0]
    return emb[keep] if keep else emb[:0], torch.tensor([labels[i] for i in keep], dtype=torch.long)


PRECISIONS = ("fp32", "bf16", "fp16")


class _AutocastEncoders:
    """``model``'s two encoders under autocast. Only they: the similarities and metrics are taken
    from their features in fp32, so a bf16 eval differs from fp32 by the features alone."""

    def __init__(self, model, device: str | torch.device, precision: str):
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: choose from {', '.join(PRECISIONS)}")
        self.model, self.device_type = model, torch.device(device).type
        self.dtype, self.enabled = (torch.bfloat16 if precision == "bf16" else torch.float16), precision != "fp32"

    def parameters(self):
        return self.model.parameters()

    def encode_image(self, x):
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled):
            return self.model.encode_image(x)

    def encode_text(self, tokens):
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled):
            return self.model.encode_text(tokens)


# -- evaluate -------------------------------------------------------------------------------------

def evaluate(model, preprocess: Callable, tokenizer: Callable, data_dir: str, *, batch_size: int = 64,
             device: str | torch.device = "cpu", tasks: Sequence[str] = TASKS, precision: str = "fp32") -> dict[str, Any]:
    """Evaluate ``model`` (anything with ``encode_image``/``encode_text``; DDP-wrapped is fine) on
    the labelled set at ``data_dir``. ``preprocess``: PIL image → tensor (open_clip's
    preprocess_val); ``tokenizer``: list[str] → token tensor. Returns::

        {"n": samples used, "skipped": {reason: count}, "data": data_dir,
         "zeroshot":      {"top1", "top5", "chance_top1", "chance_top5", "n", "n_classes", "per_class_top1"},
         "zeroshot_label_sets": {NAME: the same, per label_sets/NAME/ folder}   (only when there are any)
         "retrieval":     {"image_to_text": {"R@1","R@5","R@10"}, "text_to_image": {...}, "chance": {...}, "n"},
         "compositional": {"accuracy", "chance", "n", "by_type": {neg_type: {"accuracy", "n"}}}}

    A task that cannot run (no classnames.txt, no labels, no neg captions) is reported as
    ``{"skipped": reason}``. The model's train/eval mode is restored afterwards. ``precision``:
    bf16 / fp16 run the encoders under autocast (as open_clip's zero-shot eval does on GPUs)."""
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; choose from {list(TASKS)}")
    model = getattr(model, "module", model)
    fs, root, _, folders = _layout(data_dir)
    classnames = _folder_classnames(fs, root, folders, data_dir) if folders else \
        _read_lines(fs, f"{root}/classnames.txt")
    templates = _read_lines(fs, f"{root}/templates.txt") or list(DEFAULT_TEMPLATES)
    skipped: Counter = Counter()

    encoders = _AutocastEncoders(model, device, precision)
    was_training = model.training
    model.eval()
    try:
        return _evaluate(encoders, preprocess, tokenizer, data_dir, batch_size, device, tasks, fs, root,
                         classnames, templates, skipped)
    finally:
        model.train(was_training)


def _evaluate(model, preprocess, tokenizer, data_dir: str, batch_size: int, device, tasks: Sequence[str], fs,
              root: str, classnames: list[str] | None, templates: list[str], skipped: Counter) -> dict[str, Any]:
    image_emb, rows = encode_split(model, preprocess, data_dir, batch_size, device, skipped)
    captions = [s["caption"] for s in rows]
    labels = [s["label"] for s in rows]
    negs = [n if isinstance(n := s["meta"].get("neg_caption"), str) and n.strip() else None for s in rows]
    neg_types = [str(s["meta"].get("neg_type") or "unknown") for s in rows]
    result: dict[str, Any] = {"data": data_dir, "n": len(captions), "skipped": dict(sorted(skipped.items()))}
    if not captions:
        for t in tasks:
            result[t] = {"skipped": "no usable samples"}
        return result
    has_text = all(c is not None for c in captions)  # class folders have no captions
    need_text = has_text and ("retrieval" in tasks or "compositional" in tasks)
    text_emb = _encode_texts(model, tokenizer, captions, batch_size, device) if need_text else None

    if "zeroshot" in tasks:
        result["zeroshot"] = _zeroshot(model, tokenizer, image_emb, labels, classnames, templates,
                                       batch_size, device, skipped)
        sets = _label_sets(fs, root, templates)
        if sets:
            result["zeroshot_label_sets"] = {
                name: _zeroshot(model, tokenizer, image_emb, _set_labels(rows, name, skipped), names, tmpl,
                                batch_size, device, skipped, f"[{name}]")
                for name, (names, tmpl) in sets.items()}
        result["skipped"] = dict(sorted(skipped.items()))
    if "retrieval" in tasks:
        result["retrieval"] = retrieval_metrics(image_emb, text_emb, captions) if has_text else \
            {"skipped": "no captions (class folders)"}
    if "compositional" in tasks:
        idx = [i for i, n in enumerate(negs) if n is not None]
        if not has_text:
            result["compositional"] = {"skipped": "no captions (class folders)"}
        elif not idx:
            result["compositional"] = {"skipped": "no sample has a neg_caption"}
        else:
            neg_emb = _encode_texts(model, tokenizer, [negs[i] for i in idx], batch_size, device)
            sel = torch.tensor(idx)
            result["compositional"] = compositional_metrics(image_emb[sel], text_emb[sel], neg_emb,
                                                            [neg_types[i] for i in idx])
    return result


def _label_sets(fs, root: str, templates: list[str]) -> dict[str, tuple[list[str] | None, list[str]]]:
    """NAME → (classnames, templates) of every ``label_sets/NAME/`` folder, in name order."""
    out: dict[str, tuple[list[str] | None, list[str]]] = {}
    if not fs.isdir(f"{root}/label_sets"):
        return out
    for d in sorted(fs.ls(f"{root}/label_sets", detail=False)):
        if fs.isdir(d):
            d = d.rstrip("/")
            name = d.rsplit("/", 1)[-1]
            out[name] = (_read_lines(fs, f"{d}/classnames.txt"), _read_lines(fs, f"{d}/templates.txt") or templates)
    return out


def _set_labels(rows: list[dict[str, Any]], name: str, skipped: Counter) -> list[int | None]:
    """Each sample's label for label set ``name`` (``labels.NAME`` in its json), None if it has
    none; a value that is not an integer is counted as ``bad_label[NAME]``."""
    out: list[int | None] = []
    for r in rows:
        labels = r["meta"].get("labels")
        lab = labels.get(name) if isinstance(labels, dict) else None
        if lab is not None and (isinstance(lab, bool) or not isinstance(lab, int)):
            skipped[f"bad_label[{name}]"] += 1
            lab = None
        out.append(lab)
    return out


def _zeroshot(model, tokenizer, image_emb, labels, classnames, templates, batch_size, device, skipped,
              which: str = ""):
    if not classnames:
        return {"skipped": "no classnames.txt"}
    n_classes = len(classnames)
    keep = [i for i, lab in enumerate(labels) if lab is not None and 0 <= lab < n_classes]
    out_of_range = sum(1 for lab in labels if lab is not None and not 0 <= lab < n_classes)
    if out_of_range:
        skipped[f"label_out_of_range{which}"] += out_of_range
    if not keep:
        return {"skipped": "no sample has a valid label"}
    class_emb = class_embeddings(model, tokenizer, classnames, templates, batch_size, device)
    res = zeroshot_metrics(image_emb[torch.tensor(keep)], torch.tensor([labels[i] for i in keep]), class_emb)
    res["per_class_top1"] = {classnames[c]: v for c, v in res["per_class_top1"].items()}
    return res


def class_embeddings(model, tokenizer, classnames: Sequence[str], templates: Sequence[str], batch_size: int = 64,
                     device: str | torch.device = "cpu") -> torch.Tensor:
    """``[n_classes, D]``: per class, the normalised mean of its normalised template embeddings."""
    texts = [t.replace("{}", c) if "{}" in t else f"{t} {c}" for c in classnames for t in templates]
    emb = _encode_texts(model, tokenizer, texts, batch_size, device)
    emb = emb.reshape(len(classnames), len(templates), -1).mean(1)
    return F.normalize(emb, dim=-1)


def _zeroshot_results(result: dict[str, Any]) -> list[tuple[str | None, dict[str, Any] | None]]:
    """(label set name, its zero-shot result): the main labels (name None) first, then each further set."""
    return [(None, result.get("zeroshot")), *result.get("zeroshot_label_sets", {}).items()]


def flatten(result: dict[str, Any]) -> dict[str, float]:
    """The headline numbers as flat ``task/metric`` keys (for metrics.csv / tensorboard)."""
    flat: dict[str, float] = {}
    for name, zs in _zeroshot_results(result):
        if zs is not None and "top1" in zs:
            prefix = f"zeroshot/{name}" if name else "zeroshot"
            flat.update({f"{prefix}/top1": zs["top1"], f"{prefix}/top5": zs["top5"]})
    rt = result.get("retrieval", {})
    for d in ("image_to_text", "text_to_image"):
        for k, v in rt.get(d, {}).items():
            flat[f"retrieval/{d}/{k}"] = v
    cp = result.get("compositional", {})
    if "accuracy" in cp:
        flat["compositional/accuracy"] = cp["accuracy"]
        for t, v in cp["by_type"].items():
            flat[f"compositional/{t}"] = v["accuracy"]
    return flat


def format_table(result: dict[str, Any]) -> str:
    """A human-readable table of ``evaluate``'s result."""
    lines = [f"data: {result.get('data')}   samples: {result.get('n')}"]
    if result.get("skipped"):
        lines.append("skipped: " + ", ".join(f"{k}={v}" for k, v in result["skipped"].items()))
    rows: list[tuple[str, str, str]] = []
    for name, zs in _zeroshot_results(result):
        if zs is None:
            continue
        which = f", {name}" if name else ""
        if "top1" in zs:
            rows += [(f"zero-shot top-1{which} ({zs['n_classes']} classes)", f"{zs['top1']:.4f}", f"{zs['chance_top1']:.4f}"),
                     (f"zero-shot top-5{which}", f"{zs['top5']:.4f}", f"{zs['chance_top5']:.4f}")]
        else:
            rows.append((f"zero-shot{which}", f"skipped: {zs['skipped']}", ""))
    rt = result.get("retrieval")
    if rt is not None:
        if "image_to_text" in rt:
            for d, label in (("image_to_text", "image→text"), ("text_to_image", "text→image")):
                for k, v in rt[d].items():
                    rows.append((f"retrieval {label} {k}", f"{v:.4f}", f"{rt['chance'][k]:.4f}"))
        else:
            rows.append(("retrieval", f"skipped: {rt['skipped']}", ""))
    cp = result.get("compositional")
    if cp is not None:
        if "accuracy" in cp:
            rows.append((f"compositional (n={cp['n']})", f"{cp['accuracy']:.4f}", "0.5000"))
            for t, v in cp["by_type"].items():
                rows.append((f"  {t} (n={v['n']})", f"{v['accuracy']:.4f}", "0.5000"))
        else:
            rows.append(("compositional", f"skipped: {cp['skipped']}", ""))
    lp = result.get("linear_probe")
    if lp is not None:
        if "top1" in lp:
            which = f", {lp['label_set']}" if lp.get("label_set") else ""
            rows.append((f"linear probe top-1{which} ({lp['n_classes']} classes, {lp['n_train']} train)",
                         f"{lp['top1']:.4f}", f"{lp['chance_top1']:.4f}"))
        else:
            rows.append(("linear probe", f"skipped: {lp['skipped']}", ""))
    if rows:
        w = max(len(r[0]) for r in rows)
        lines.append(f"{'metric'.ljust(w)}  {'value':>8}  {'chance':>8}")
        lines += [f"{a.ljust(w)}  {b:>8}  {c:>8}" for a, b, c in rows]
    return "\n".join(lines)


# -- recap eval -----------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recap eval",
        description="Zero-shot, retrieval and compositional evaluation of a checkpoint (or an open_clip model) "
                    "on a labelled set (shards/*.tar + classnames.txt + templates.txt, and further label sets in "
                    "label_sets/NAME/).",
        epilog="Arguments after `--` go to clip_benchmark's `eval` (with --clip-benchmark), e.g. "
               "`-- --dataset cifar10 --dataset_root DIR`.")
    p.add_argument("target", metavar="CHECKPOINT_OR_MODEL",
                   help="a checkpoint (path or URL), a run directory (its latest checkpoint), or a model name")
    p.add_argument("--model", help="model name (default: the name stored in the checkpoint)")
    p.add_argument("--pretrained", help="an open_clip pretrained tag (when the target is a model name)")
    p.add_argument("--data", help="labelled set directory (local or fsspec URL)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--linear-probe", metavar="TRAIN_DIR",
                   help="also fit a linear probe on this labelled set's frozen image embeddings, scored on --data")
    p.add_argument("--probe-labels", metavar="NAME",
                   help="with --linear-probe: probe the further label set NAME (label_sets/NAME/), not the main labels")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="run the encoders under autocast (bf16 / fp16), as open_clip's eval on GPUs")
    p.add_argument("--context-length", type=int, default=None, help="text context (above the model's: Long-CLIP stretch)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", help="also write the JSON result to this file (local or URL)")
    p.add_argument("--clip-benchmark", action="store_true",
                   help="also run clip_benchmark (pip install clip_benchmark) on the checkpoint")
    return p


def _resolve_target(target: str, model_name: str | None, pretrained: str | None) -> tuple[str, str | None, int | None]:
    """→ (model name, pretrained (tag or checkpoint path), stored context length)."""
    from recap.trainer.checkpoint import latest_checkpoint, read_checkpoint

    fs, path = fsspec.core.url_to_fs(target)
    ckpt = None
    if fs.exists(path):
        ckpt = latest_checkpoint(target) if fs.isdir(path) else target
        if ckpt is None:
            raise FileNotFoundError(f"no checkpoints/step_N.pt under {target}")
    if ckpt is None and ("://" in target or target.endswith((".pt", ".pth", ".bin", ".safetensors"))):
        raise FileNotFoundError(f"no checkpoint at {target}")
    if ckpt is None:  # a model name
        if model_name and model_name != target:
            raise ValueError(f"{target!r} is neither a checkpoint nor a directory, and --model says {model_name!r}")
        return target, pretrained, None
    if pretrained:
        raise ValueError("--pretrained goes with a model name, not with a checkpoint")
    meta = read_checkpoint(ckpt)
    name = model_name or meta.get("name")
    if not name:
        raise ValueError(f"{ckpt} does not record its model name: pass --model")
    return name, ckpt, meta.get("context_length")


def eval_cli(argv: list[str]) -> int:
    """``recap eval CHECKPOINT_OR_MODEL --data DIR [--model NAME] [--pretrained TAG] [--json]
    [--out FILE] [--clip-benchmark [-- CLIP_BENCHMARK_ARGS]]``. Exit 0 ok, 1 failed, 2 usage."""
    argv = list(argv)
    cb_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, cb_args = argv[:i], argv[i + 1:]
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return EXIT_OK if e.code == 0 else EXIT_USAGE
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    if set(tasks) - set(TASKS):
        print(f"recap eval: unknown tasks {sorted(set(tasks) - set(TASKS))}; choose from {','.join(TASKS)}", file=sys.stderr)
        return EXIT_USAGE
    if args.linear_probe and not args.data:
        print("recap eval: --linear-probe TRAIN_DIR needs --data DIR to score on", file=sys.stderr)
        return EXIT_USAGE
    if args.probe_labels and not args.linear_probe:
        print("recap eval: --probe-labels NAME goes with --linear-probe TRAIN_DIR", file=sys.stderr)
        return EXIT_USAGE
    if not args.data and not args.clip_benchmark:
        print("recap eval: --data DIR is required (or --clip-benchmark)", file=sys.stderr)
        return EXIT_USAGE
    if args.clip_benchmark and not _has_clip_benchmark():
        print("recap eval: --clip-benchmark needs the clip_benchmark package: pip install clip_benchmark",
              file=sys.stderr)
        return EXIT_FAILED
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        from recap.trainer.models import create_model

        name, pretrained, ctx = _resolve_target(args.target, args.model, args.pretrained)
        context_length = args.context_length or ctx
        model, _, preprocess, tokenizer = create_model(name, pretrained=pretrained, context_length=context_length,
                                                       device=device)
        result: dict[str, Any] = {"model": name, "pretrained": pretrained}
        if args.data:
            result.update(evaluate(model, preprocess, tokenizer, args.data, batch_size=args.batch_size,
                                   device=device, tasks=tasks, precision=args.precision))
            if args.linear_probe:
                result["linear_probe"] = linear_probe(model, preprocess, args.linear_probe, args.data,
                                                      batch_size=args.batch_size, device=device,
                                                      label_set=args.probe_labels, precision=args.precision)
        if args.clip_benchmark:
            result["clip_benchmark"] = run_clip_benchmark(name, pretrained, cb_args, context_length=context_length)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        print(f"recap eval: {e}", file=sys.stderr)
        return EXIT_FAILED
    text = json.dumps(result, indent=1, default=str)
    if args.out:
        with fsspec.open(args.out, "w") as f:
            f.write(text + "\n")
    if args.json:
        print(text)
    else:
        print(f"model: {name}   weights: {pretrained or 'random init'}")
        if args.data:
            print(format_table(result))
        if args.clip_benchmark:
            print(f"clip_benchmark: {json.dumps(result['clip_benchmark'], default=str)}")
    return EXIT_OK


# -- clip_benchmark -------------------------------------------------------------------------------

def _has_clip_benchmark() -> bool:
    try:
        import clip_benchmark  # noqa: F401
    except ImportError:
        return False
    return True


def run_clip_benchmark(name: str, pretrained: str | None, extra_args: Sequence[str] = (),
                       context_length: int | None = None) -> list[dict[str, Any]]:
    """Run clip_benchmark's ``eval`` in this process on our model: a ``recap`` model type is
    registered with it whose loader is ``trainer.models.create_model`` (our configs, our
    tokenizer, stretched contexts, checkpoint paths/URLs). ``extra_args`` are its own CLI
    arguments (``--dataset``, ``--dataset_root``, ``--task``, ``--output``, ...). Returns the JSON
    dumps it wrote (one per dataset/language)."""
    if not _has_clip_benchmark():
        raise RuntimeError("clip_benchmark is not installed: pip install clip_benchmark")
    import glob
    import os
    import tempfile

    import clip_benchmark.cli as cb_cli
    import clip_benchmark.models as cb_models

    from recap.trainer.models import create_model

    def load_recap(model_name: str, pretrained: str | None, cache_dir: str | None = None, device="cpu", **_):
        model, _, preprocess, tokenizer = create_model(
            model_name, pretrained=pretrained if pretrained not in ("", "none", "None") else None,
            context_length=context_length, device=device)
        return model, preprocess, tokenizer

    model_type = "open_clip"
    if hasattr(cb_models, "TYPE2FUNC") and hasattr(cb_models, "MODEL_TYPES"):
        cb_models.TYPE2FUNC["recap"] = load_recap
        if "recap" not in cb_models.MODEL_TYPES:
            cb_models.MODEL_TYPES.append("recap")  # the same list object its CLI offers as choices
        model_type = "recap"
    extra = list(extra_args)
    with tempfile.TemporaryDirectory() as tmp:
        if "--output" not in extra:
            extra += ["--output", os.path.join(tmp, "{dataset}_{language}_{task}.json")]
        argv = ["clip_benchmark", "eval", "--model", name, "--pretrained", pretrained or "none",
                "--model_type", model_type, *extra]
        saved = sys.argv
        try:
            sys.argv = argv
            base = cb_cli.get_parser_args()
        finally:
            sys.argv = saved
        cb_cli.main_eval(base)
        results = []
        pattern = base.output if "{" not in base.output else os.path.join(tmp, "*.json")
        for path in sorted(glob.glob(pattern)):
            with open(path) as f:
                results.append(json.load(f))
    return results
