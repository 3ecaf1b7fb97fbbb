"""Reading a labelled evaluation set: its samples, class names, prompt templates and label sets.

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
``skipped`` (by reason), never a crash. A sample with a bad or missing label keeps its place
with label None.
"""
from __future__ import annotations

import io
import json
import logging
from collections import Counter
from typing import Any, Callable, Iterator

import fsspec
import torch

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ("a photo of a {}.",)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def read_lines(fs, path: str) -> list[str] | None:
    """The non-blank lines of a text file, or None when there is no such file."""
    if not fs.exists(path):
        return None
    with fs.open(path, "r", encoding="utf-8") as f:
        return [line.rstrip("\n").rstrip("\r") for line in f if line.strip()]


def iter_samples(data_dir: str, skipped: Counter) -> Iterator[dict[str, Any]]:
    """Raw samples ``{key, image (bytes), caption (str|None), label (int|None), meta (dict)}``: of
    every shard under ``data_dir/shards`` in name order, or else of the class folders (caption None);
    problems counted in ``skipped``."""
    fs, root, shards, folders = layout(data_dir)
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
    fs, _, shards, _ = layout(data_dir)
    return fs, shards


def layout(data_dir: str) -> tuple[Any, str, list[str], list[tuple[str, list[str]]]]:
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


def folder_classnames(fs, root: str, folders: list[tuple[str, list[str]]], data_dir: str) -> list[str]:
    """Class names of a set in class folders: classnames.txt (checked against the folders) or the
    folder names."""
    listed = read_lines(fs, f"{root}/classnames.txt")
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


def decode_image(image: bytes, preprocess: Callable) -> torch.Tensor | None:
    """``preprocess`` of the decoded RGB image, or None when the bytes do not decode."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image)) as img:
            img.load()
            return preprocess(img.convert("RGB"))
    except Exception:  # noqa: BLE001 - any decoder failure is a bad image, counted by the caller
        return None


def label_sets(fs, root: str, templates: list[str]) -> dict[str, tuple[list[str] | None, list[str]]]:
    """NAME → (classnames, templates) of every ``label_sets/NAME/`` folder, in name order."""
    out: dict[str, tuple[list[str] | None, list[str]]] = {}
    if not fs.isdir(f"{root}/label_sets"):
        return out
    for d in sorted(fs.ls(f"{root}/label_sets", detail=False)):
        if fs.isdir(d):
            d = d.rstrip("/")
            name = d.rsplit("/", 1)[-1]
            out[name] = (read_lines(fs, f"{d}/classnames.txt"), read_lines(fs, f"{d}/templates.txt") or templates)
    return out


def labels_in_set(rows: list[dict[str, Any]], name: str, skipped: Counter) -> list[int | None]:
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
