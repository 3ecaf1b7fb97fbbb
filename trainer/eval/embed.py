"""Embedding an evaluation set: L2-normalised image and text features, class prompt embeddings,
and the encoders under autocast for bf16 / fp16 evaluation."""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from recap.trainer.eval.sets import decode_image, iter_samples

PRECISIONS = ("fp32", "bf16", "fp16")


class AutocastEncoders:
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


@torch.no_grad()
def encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int, device) -> torch.Tensor:
    """``[len(texts), D]`` L2-normalised text embeddings, on the CPU."""
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
        x = decode_image(s["image"], preprocess)
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


def class_embeddings(model, tokenizer, classnames: Sequence[str], templates: Sequence[str], batch_size: int = 64,
                     device: str | torch.device = "cpu") -> torch.Tensor:
    """``[n_classes, D]``: per class, the normalised mean of its normalised template embeddings."""
    texts = [t.replace("{}", c) if "{}" in t else f"{t} {c}" for c in classnames for t in templates]
    emb = encode_texts(model, tokenizer, texts, batch_size, device)
    emb = emb.reshape(len(classnames), len(templates), -1).mean(1)
    return F.normalize(emb, dim=-1)
