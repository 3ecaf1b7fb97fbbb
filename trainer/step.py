"""One optimizer step's forward and backward: the loss of a batch, and gradient accumulation that
keeps the contrastive batch whole.

Accumulating a contrastive loss micro-batch by micro-batch would shrink its batch: each micro-batch
would only see its own negatives. So ``backward_step`` with several micro-batches does what
open_clip's ``--accum-freq`` does (GradCache): one pass without gradient caches every
micro-batch's features, then each micro-batch is forwarded again with gradient and the loss of the
*whole* batch (its live features, the others' cached ones) is back-propagated. Summed over the
micro-batches, that is the gradient of the full batch's loss. Parameters that enter that loss
directly rather than through a micro-batch's features (the logit scale and bias, the short-tag
head) receive the same gradient once per micro-batch, so theirs is divided by the count. CoCa's
captioning loss is a mean over one micro-batch's caption tokens, so it is weighted by that
micro-batch's share of the batch's non-pad tokens (counted over all ranks). Each micro-batch's
second forward restores the RNG state of its first, so dropout draws the same masks; BatchNorm
statistics are updated by both passes (as in open_clip).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

import torch
import torch.distributed as dist

from recap.trainer.config import TrainConfig

# features with one row per sample (or per negative): concatenated over micro-batches
_ROW_OUTPUTS = ("image_features", "text_features", "negative_text_features")
_ROW_TEACHER = ("teacher_image", "teacher_text", "teacher_neg_text")
# loss terms that are a mean over one micro-batch's own caption tokens (not over the batch's pairs)
_PER_SAMPLE_TERMS = ("caption_loss",)
# model parameters used by the loss itself (not through features)
_LOSS_PARAMS = ("logit_scale", "logit_bias")


def forward_outputs(model, batch: dict, cfg: TrainConfig) -> dict[str, Any]:
    """The model's outputs for a batch. Negative texts ride along in the same text forward (one DDP
    forward per micro-batch) and come back split off as ``negative_text_features``."""
    images, texts = batch["image"], batch["text"]
    n_txt = texts.shape[0]
    negs = batch.get("neg_text") if cfg.loss.hard_negatives else None
    if negs is not None and negs.shape[0]:
        texts = torch.cat([texts, negs])
    out = dict(model(images, texts))
    if negs is not None and negs.shape[0] and cfg.loss.kind != "coca":
        txt = out["text_features"]
        out["text_features"], out["negative_text_features"] = txt[:n_txt], txt[n_txt:]
    return out


def loss_terms(loss_fn, out: dict, batch: dict, cfg: TrainConfig, tag_loss=None) -> dict[str, torch.Tensor]:
    """The loss terms of ``out`` (from ``forward_outputs``); ``batch`` supplies teachers and tags."""
    kind = cfg.loss.kind
    if kind == "coca":
        terms = loss_fn(image_features=out["image_features"], text_features=out["text_features"],
                        logits=out["logits"], labels=out["labels"], logit_scale=out["logit_scale"], output_dict=True)
    else:
        kwargs: dict[str, Any] = {}
        if "negative_text_features" in out:
            kwargs["negative_text_features"] = out["negative_text_features"]
        img, txt, scale = out["image_features"], out["text_features"], out["logit_scale"]
        if kind == "siglip":
            terms = loss_fn(img, txt, scale, out["logit_bias"], output_dict=True, **kwargs)
        elif kind == "distill":
            t_neg = batch.get("teacher_neg_text")
            if "negative_text_features" in kwargs and t_neg is not None \
                    and t_neg.shape[0] == kwargs["negative_text_features"].shape[0]:
                # the teacher scores the same negatives (neg_text_emb), so they enter the KL too;
                # long negatives have no teacher rows, and then only the CLIP term sees negatives
                kwargs["teacher_negative_text_features"] = t_neg
            terms = loss_fn(img, txt, scale, teacher_image_features=batch["teacher_image"],
                            teacher_text_features=batch["teacher_text"], output_dict=True, **kwargs)
        else:
            terms = loss_fn(img, txt, scale, output_dict=True, **kwargs)
    if not isinstance(terms, dict):
        terms = {"loss": terms}
    if tag_loss is not None:
        terms.update(tag_loss(out["image_features"], positive_ids=batch["tag_pos"], negative_ids=batch["tag_neg"],
                              output_dict=True))
    return terms


def compute_loss(model, loss_fn, batch: dict, cfg: TrainConfig, tag_loss=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward one batch: (total, terms)."""
    terms = loss_terms(loss_fn, forward_outputs(model, batch, cfg), batch, cfg, tag_loss)
    return sum(terms.values()), terms


def _merge_outputs(outs: list[dict], live: int) -> dict:
    merged = dict(outs[live])  # logit scale/bias and CoCa's logits/labels: the live pass's
    for k in _ROW_OUTPUTS:
        if k in merged:
            merged[k] = torch.cat([o[k] if i == live else o[k].detach() for i, o in enumerate(outs)])
    return merged


def _merge_batches(batches: list[dict]) -> dict:
    merged: dict[str, Any] = {}
    for k in _ROW_TEACHER:
        if k in batches[0]:
            merged[k] = torch.cat([b[k] for b in batches])
    for k in ("tag_pos", "tag_neg"):
        if k in batches[0]:
            merged[k] = [x for b in batches for x in b[k]]
    return merged


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _token_shares(cached: list[dict], loss_fn, device: torch.device) -> list[float]:
    """Each micro-batch's share of the batch's non-pad caption tokens (CoCa's caption CE is a mean
    over them), counted on every rank."""
    pad = getattr(loss_fn, "pad_id", 0)
    counts = torch.stack([(o["labels"] != pad).sum().float() for o in cached]).to(device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts)
    return (counts / counts.sum().clamp(min=1)).tolist()


def _loss_params(model, heads: dict) -> list[torch.nn.Parameter]:
    m = getattr(model, "module", model)
    params = [p for n, p in m.named_parameters() if n.split(".")[-1] in _LOSS_PARAMS]
    return params + [p for h in heads.values() for p in h.parameters()]


def backward_step(model, loss_fn, micro: list[dict], cfg: TrainConfig, *, tag_loss=None, heads: dict | None = None,
                  device: torch.device = torch.device("cpu"), autocast: Callable[[], Any] = nullcontext,
                  backward: Callable[[torch.Tensor], None] = lambda t: t.backward(),
                  no_sync: Callable[[], Any] | None = None) -> tuple[dict[str, float], dict | None]:
    """Forward and backward the micro-batches of one optimizer step (already on ``device``);
    gradients are left in ``.grad``. Returns (terms for the log, None), or, when the loss is not
    finite, (its terms, the batch: with several micro-batches, all their uids) at once.
    ``no_sync``: DDP's, for all but the last backward."""
    heads = heads or {}
    last = len(micro) - 1

    def sync(i: int):
        return nullcontext() if (no_sync is None or i == last) else no_sync()

    if len(micro) == 1:
        with sync(0), autocast():
            total, terms = compute_loss(model, loss_fn, micro[0], cfg, tag_loss)
        if not torch.isfinite(total).item():
            return {k: float(v.detach()) for k, v in terms.items()}, micro[0]
        backward(total)
        return {k: float(v.detach()) for k, v in terms.items()}, None

    states, cached = [], []
    with torch.no_grad():
        for b in micro:
            states.append(_rng_state(device))
            with autocast():
                cached.append(forward_outputs(model, b, cfg))
    whole = _merge_batches(micro)
    shares: list[float] | None = None  # counted once, and only when a per-sample term needs it
    logged: dict[str, float] = {}
    for i, b in enumerate(micro):
        _set_rng_state(states[i], device)
        with sync(i), autocast():
            outs = list(cached)
            outs[i] = forward_outputs(model, b, cfg)
            terms = loss_terms(loss_fn, _merge_outputs(outs, i), whole, cfg, tag_loss)
            if shares is None and any(k in _PER_SAMPLE_TERMS for k in terms):
                shares = _token_shares(cached, loss_fn, device)  # every rank has the same terms: one collective
            share = shares[i] if shares is not None else 1.0
            total = sum(v * share if k in _PER_SAMPLE_TERMS else v for k, v in terms.items())
        if not torch.isfinite(total).item():  # the whole batch's loss: any micro-batch may be the cause
            return {k: float(v.detach()) for k, v in terms.items()}, {"uid": [u for m in micro for u in m.get("uid", [])]}
        backward(total)
        for k, v in terms.items():
            if k in _PER_SAMPLE_TERMS:
                logged[k] = logged.get(k, 0.0) + float(v.detach()) * share
            else:
                logged[k] = float(v.detach())  # the whole batch's loss: the same value in every pass
    with torch.no_grad():
        for p in _loss_params(model, heads):
            if p.grad is not None:
                p.grad /= len(micro)
    return logged, None
