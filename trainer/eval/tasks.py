"""``evaluate``: the zero-shot, retrieval and compositional tasks of one model on one labelled set.

Zero-shot runs for the main labels and for every further label set
(``result["zeroshot_label_sets"][NAME]``), over the samples that carry a label for it. A sample
with a bad or missing label stays in retrieval and the compositional test, and only leaves
zero-shot. What was skipped, by reason, is in ``result["skipped"]``.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Sequence

import torch

from recap.trainer.eval.embed import AutocastEncoders, class_embeddings, encode_split, encode_texts
from recap.trainer.eval.metrics import compositional_metrics, retrieval_metrics, zeroshot_metrics
from recap.trainer.eval.sets import DEFAULT_TEMPLATES, folder_classnames, label_sets, labels_in_set, layout, read_lines

TASKS = ("zeroshot", "retrieval", "compositional")


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
    fs, root, _, folders = layout(data_dir)
    classnames = folder_classnames(fs, root, folders, data_dir) if folders else \
        read_lines(fs, f"{root}/classnames.txt")
    templates = read_lines(fs, f"{root}/templates.txt") or list(DEFAULT_TEMPLATES)
    skipped: Counter = Counter()

    encoders = AutocastEncoders(model, device, precision)
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
    text_emb = encode_texts(model, tokenizer, captions, batch_size, device) if need_text else None

    if "zeroshot" in tasks:
        result["zeroshot"] = _zeroshot(model, tokenizer, image_emb, labels, classnames, templates,
                                       batch_size, device, skipped)
        sets = label_sets(fs, root, templates)
        if sets:
            result["zeroshot_label_sets"] = {
                name: _zeroshot(model, tokenizer, image_emb, labels_in_set(rows, name, skipped), names, tmpl,
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
            neg_emb = encode_texts(model, tokenizer, [negs[i] for i in idx], batch_size, device)
            sel = torch.tensor(idx)
            result["compositional"] = compositional_metrics(image_emb[sel], text_emb[sel], neg_emb,
                                                            [neg_types[i] for i in idx])
    return result


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
