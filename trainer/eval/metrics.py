"""Metrics on embeddings: zero-shot classification, retrieval and the compositional test.

All are in [0, 1], with ties broken at random *in expectation*, so a model that cannot tell
things apart scores chance, not 1.0:

- zero-shot top-1/top-5 against class embeddings (``embed.class_embeddings``)
- retrieval image→text and text→image R@1/5/10: the positives of an image are the texts equal to
  its caption (identical captions of two images are both right)
- compositional: per sample with a ``neg_caption``, right iff sim(image, caption) >
  sim(image, neg_caption); overall and per ``neg_type``

Chance levels are reported beside each.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

RECALL_KS = (1, 5, 10)


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
