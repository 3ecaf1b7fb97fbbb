"""CLIP's linear probe: how well a logistic regression on frozen image embeddings reads a
labelled set's labels, whatever the text tower has learnt."""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import torch
import torch.nn.functional as F

from recap.trainer.eval.embed import AutocastEncoders, encode_split
from recap.trainer.eval.sets import labels_in_set


def linear_probe(model, preprocess: Callable, train_dir: str, eval_dir: str, *, batch_size: int = 128,
                 device: str | torch.device = "cpu", steps: int = 500, lr: float = 1e-2, seed: int = 0,
                 label_set: str | None = None, precision: str = "fp32") -> dict[str, Any]:
    """CLIP's linear probe: a logistic regression on the frozen, L2-normalised image embeddings of
    ``train_dir``'s labelled samples, scored on ``eval_dir``'s. Says whether the image tower
    encodes the labels at all, whatever the text tower has learnt. Full-batch Adam, seeded.
    ``label_set``: probe a further label set (``labels.NAME`` in the samples' json) instead of
    the main labels. ``precision``: the image encoder under autocast, as in ``evaluate``."""
    model = getattr(model, "module", model)
    encoders = AutocastEncoders(model, device, precision)
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
    labels = labels_in_set(rows, label_set, Counter()) if label_set else [r["label"] for r in rows]
    keep = [i for i, lab in enumerate(labels) if isinstance(lab, int) and lab >= 0]
    return emb[keep] if keep else emb[:0], torch.tensor([labels[i] for i in keep], dtype=torch.long)
