"""Training losses with open_clip's calling convention, exact across ranks.

Every loss is built with ``rank`` and ``world_size`` (plus options, all with defaults) and called on
THIS rank's embeddings: ``loss(image_features, text_features, logit_scale, ...)``. It returns the
loss tensor, or with ``output_dict=True`` a dict of weighted terms whose sum is the loss (the dict
keys follow open_clip: ``contrastive_loss``, ``distill_loss``, ``caption_loss``).

Gradients are exact. Embeddings are exchanged with gradient (``trainer.distributed``), each rank
scores its own rows against the whole global batch, and the rank's loss is its share of the global
sum scaled by ``world_size / N`` (N = global batch). So when DDP averages gradients over ranks,
every parameter, feature and ``logit_scale``/``logit_bias`` gets the gradient of the single-process
loss on the concatenated batch, and the mean of the ranks' loss values is that loss. With equal
local batches ``world_size / N`` is ``1 / local batch``: the usual per-rank mean (open_clip's
``--local-loss --gather-with-grad``, SigLIP's division by the local image count). Local batches may
differ in size (a short last batch, a varying number of hard negatives): row counts are exchanged
first, one tiny all_gather per call. ``world_size=1`` needs no process group.

Losses:
- ``ClipLoss``: InfoNCE, image->text and text->image, averaged; optional hard negatives
  (``negative_text_features``, NegCLIP) are extra columns of the image->text logits only.
- ``SigLipLoss``: sigmoid loss with bias; texts travel around a bidirectional ring (point-to-point,
  with gradient) so each rank scores its images against every text; hard negatives are extra
  negative-only texts. ``exchange="gather"`` uses one all_gather instead of the ring.
- ``DistillClipLoss``: MobileCLIP's reinforced-training loss
  ``(1 - lambda_distill) * L_clip + lambda_distill * L_distill``, where L_distill is
  KL(teacher || student) over the image->text and text->image rows, averaged over the two directions
  and over teachers. ``lambda_distill`` defaults to 1.0: MobileCLIP trains its S-variants on
  DataCompDR with pure distillation (``--distill-loss-weights 0.0 1.0`` in ml-mobileclip; its B
  variant used 0.25/0.75).
- ``CoCaLoss``: captioning cross-entropy (pad ignored) + ``ClipLoss``, open_clip's CoCa convention.
- ``ShortTagLoss``: HQ-CLIP's short-tag loss, a multi-label BCE head over a tag vocabulary, scored on
  positive and explicit negative tags only.

``build_loss(name, rank, world_size, **options)`` maps "clip", "siglip", "distill", "coca",
"short_tag" to these classes.
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from recap.trainer.distributed import exchange_with_grad, gather_counts, gather_parts_with_grad, require_group

__all__ = ["ClipLoss", "SigLipLoss", "DistillClipLoss", "CoCaLoss", "ShortTagLoss", "build_loss", "LOSSES"]


def _empty_like_rows(x: torch.Tensor) -> torch.Tensor:
    return x.new_zeros((0,) + tuple(x.shape[1:]))


def _check_pairs(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    if image_features.dim() != 2 or text_features.dim() != 2:
        raise ValueError(f"features must be [batch, dim]; got image {tuple(image_features.shape)}, "
                         f"text {tuple(text_features.shape)}")
    if image_features.shape != text_features.shape:
        raise ValueError(f"image and text features must pair row by row: {tuple(image_features.shape)} vs "
                         f"{tuple(text_features.shape)}")


def _check_negatives(neg: torch.Tensor | None, text_features: torch.Tensor) -> None:
    if neg is not None and (neg.dim() != 2 or neg.shape[1] != text_features.shape[1]):
        raise ValueError(f"negative_text_features must be [n_neg, {text_features.shape[1]}]; got {tuple(neg.shape)}")


class _Distributed(nn.Module):
    """rank / world_size / group bookkeeping shared by the losses."""

    def __init__(self, rank: int = 0, world_size: int = 1, group=None):
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        self.rank, self.world_size, self.group = int(rank), int(world_size), group
        self._checked = False

    def _counts(self, counts: Sequence[int], device: torch.device) -> list[list[int]]:
        if self.world_size > 1 and not self._checked:
            require_group(self.world_size, self.group)
            self._checked = True
        return gather_counts(counts, self.world_size, device, self.group)

    def _scale(self, n_global: int) -> float:
        """Factor turning this rank's sum over its rows into its share of the global mean."""
        return self.world_size / n_global if n_global else 0.0


class ClipLoss(_Distributed):
    """CLIP InfoNCE with the exact full-batch gradient across ranks.

    ``forward(image_features, text_features, logit_scale, logit_bias=None, output_dict=False,
    negative_text_features=None)``: features are this rank's [n, D] rows (image i pairs with text i);
    ``negative_text_features`` [n_neg, D] (any n_neg, 0 allowed, may differ per rank) are gathered
    like the texts and appended as image->text columns. ``logit_bias`` is accepted for open_clip
    compatibility (a constant shift does not change a softmax).
    """

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False,
                negative_text_features=None):
        loss = self.contrastive(image_features, text_features, logit_scale, logit_bias, negative_text_features)[0]
        return {"contrastive_loss": loss} if output_dict else loss

    # the pieces DistillClipLoss and CoCaLoss reuse
    def gather(self, image_features, text_features, negative_text_features=None, extra_counts: Sequence[int] = ()):
        """All ranks' images, texts, negatives (with gradient) + this rank's label offset + global N
        + the full count table (extra_counts ride along in the same size exchange)."""
        _check_pairs(image_features, text_features)
        _check_negatives(negative_text_features, text_features)
        neg = negative_text_features if negative_text_features is not None else _empty_like_rows(text_features)
        if self.world_size == 1:
            n = image_features.shape[0]
            return image_features, text_features, neg, 0, n, [[n, n, neg.shape[0], *extra_counts]]
        counts = self._counts([image_features.shape[0], text_features.shape[0], neg.shape[0], *extra_counts],
                              image_features.device)
        all_img, all_txt, all_neg = gather_parts_with_grad([image_features, text_features, neg.to(text_features.dtype)],
                                                           counts, self.rank, self.group)
        offset = sum(c[0] for c in counts[:self.rank])
        return all_img, all_txt, all_neg, offset, sum(c[0] for c in counts), counts

    def contrastive(self, image_features, text_features, logit_scale, logit_bias=None, negative_text_features=None,
                    extra_counts: Sequence[int] = (), compute_loss: bool = True):
        """(loss, logits_per_image [n, N + N_neg], logits_per_text [n, N], N, counts)."""
        all_img, all_txt, all_neg, offset, n_global, counts = self.gather(
            image_features, text_features, negative_text_features, extra_counts)
        columns = torch.cat([all_txt, all_neg]) if all_neg.shape[0] else all_txt
        logits_per_image = logit_scale * image_features @ columns.T
        logits_per_text = logit_scale * text_features @ all_img.T
        if logit_bias is not None:
            logits_per_image = logits_per_image + logit_bias
            logits_per_text = logits_per_text + logit_bias
        if not compute_loss:
            return None, logits_per_image, logits_per_text, n_global, counts
        labels = torch.arange(offset, offset + image_features.shape[0], device=image_features.device)
        total = (F.cross_entropy(logits_per_image, labels, reduction="sum")
                 + F.cross_entropy(logits_per_text, labels, reduction="sum")) / 2
        return total * self._scale(n_global), logits_per_image, logits_per_text, n_global, counts


class SigLipLoss(_Distributed):
    """SigLIP's sigmoid loss: -sum log sigmoid(label * (scale * img @ txt.T + bias)) / N_images, label
    +1 on matching pairs and -1 elsewhere (each rank divides its share by N / world_size, i.e. by its
    local image count when local batches are equal).

    ``exchange``: "ring" (default) passes texts around a bidirectional ring with point-to-point
    sends, like open_clip's ``neighbour_exchange_bidir_with_grad``: no rank ever holds the whole
    batch; "gather" all_gathers them in one collective (fewer, larger messages).
    ``negative_text_features`` [n_neg, D] are extra negative-only texts for every rank's images.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, exchange: str = "ring", group=None):
        super().__init__(rank, world_size, group)
        if exchange not in ("ring", "gather"):
            raise ValueError(f"exchange must be 'ring' or 'gather', got {exchange!r}")
        self.exchange = exchange

    @staticmethod
    def _sum(image_features, texts, logit_scale, logit_bias, positives: bool) -> torch.Tensor:
        logits = logit_scale * image_features @ texts.T
        if logit_bias is not None:
            logits = logits + logit_bias
        if positives:  # texts are this rank's own: the diagonal pairs
            labels = 2 * torch.eye(*logits.shape, device=logits.device, dtype=logits.dtype) - 1
            return -F.logsigmoid(labels * logits).sum()
        return -F.logsigmoid(-logits).sum()

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False,
                negative_text_features=None):
        _check_pairs(image_features, text_features)
        _check_negatives(negative_text_features, text_features)
        neg = negative_text_features if negative_text_features is not None else _empty_like_rows(text_features)
        total = self._sum(image_features, text_features, logit_scale, logit_bias, True)
        if neg.shape[0]:
            total = total + self._sum(image_features, neg, logit_scale, logit_bias, False)
        if self.world_size == 1:
            n_global = image_features.shape[0]
        else:
            counts = self._counts([image_features.shape[0], text_features.shape[0] + neg.shape[0]],
                                  image_features.device)
            n_global = sum(c[0] for c in counts)
            block = torch.cat([text_features, neg.to(text_features.dtype)]) if neg.shape[0] else text_features
            for other in self._other_texts(block, [c[1] for c in counts]):
                if other.shape[0]:
                    total = total + self._sum(image_features, other, logit_scale, logit_bias, False)
        loss = total * self._scale(n_global)
        return {"contrastive_loss": loss} if output_dict else loss

    def _other_texts(self, block: torch.Tensor, rows: list[int]):
        """Yield every other rank's text block (with gradient back to its owner)."""
        r, w = self.rank, self.world_size
        if self.exchange == "gather":
            everything = gather_parts_with_grad([block], [[n] for n in rows], r, self.group)[0]
            start = 0
            for s, n in enumerate(rows):
                if s != r:
                    yield everything[start:start + n]
                start += n
            return
        left, right = (r - 1) % w, (r + 1) % w
        to_left = to_right = block
        n_bidir, remainder = divmod(w - 1, 2)
        for k in range(1, n_bidir + 1):
            # at hop k the right neighbour forwards rank r+k's texts, the left one rank r-k's
            from_right, from_left = exchange_with_grad([(to_left, left), (to_right, right)],
                                                       [(right, rows[(r + k) % w]), (left, rows[(r - k) % w])],
                                                       self.group)
            yield from_right
            yield from_left
            to_left, to_right = from_right, from_left
        if remainder:  # even world size: the opposite rank's texts arrive once, from the left
            (from_left,) = exchange_with_grad([(to_right, right)], [(left, rows[(r - n_bidir - 1) % w])], self.group)
            yield from_left


class DistillClipLoss(ClipLoss):
    """MobileCLIP's distillation loss: ``(1 - lambda_distill) * L_clip + lambda_distill * L_distill``.

    L_distill = mean over teachers of [KL(p_t || p_s) over image->text rows + over text->image rows] / 2,
    summed over rows and divided by the global batch (a per-row mean), where p_s = softmax of the
    student's logits (``logit_scale`` x the student's gathered features) and p_t = softmax of
    ``teacher_logit_scale`` x teacher_img @ teacher_txt.T over the same global batch.

    ``forward(image_features, text_features, logit_scale, teacher_image_features=None,
    teacher_text_features=None, output_dict=False, negative_text_features=None,
    teacher_negative_text_features=None, logit_bias=None)``. Teacher features are [n, D_t] tensors
    of this rank's samples, or lists of them (one per teacher); with ``teacher_dims`` a single
    tensor is split along its last dimension into those widths (the reinforced shards store the
    teachers' normalised embeddings side by side). ``teacher_logit_scale`` is one number or one per
    teacher. ``average_after_softmax=True`` averages the teachers' probabilities and takes one KL
    (ml-mobileclip's ``--distill-average-after-softmax``); the default averages the KL terms.
    Hard negatives: student negatives extend the image->text columns of the CLIP term; they enter
    the KL term only together with ``teacher_negative_text_features`` (same rows), otherwise the KL
    is taken over the batch columns alone.
    One call scores one (image, text) pair set; call again for a second set (e.g. synthetic captions).
    """

    def __init__(self, rank: int = 0, world_size: int = 1, lambda_distill: float = 1.0,
                 teacher_logit_scale: float | Sequence[float] = 100.0, teacher_dims: Sequence[int] | None = None,
                 average_after_softmax: bool = False, group=None):
        super().__init__(rank, world_size, group)
        if not 0.0 <= lambda_distill <= 1.0:
            raise ValueError(f"lambda_distill must be in [0, 1], got {lambda_distill}")
        self.lambda_distill = float(lambda_distill)
        self.teacher_logit_scale = teacher_logit_scale
        self.teacher_dims = list(teacher_dims) if teacher_dims else None
        self.average_after_softmax = average_after_softmax

    def _teachers(self, feats, what: str) -> list[torch.Tensor]:
        if feats is None:
            return []
        if isinstance(feats, torch.Tensor):
            if self.teacher_dims:
                if sum(self.teacher_dims) != feats.shape[-1]:
                    raise ValueError(f"{what}: teacher_dims {self.teacher_dims} sum to {sum(self.teacher_dims)}, "
                                     f"features are {feats.shape[-1]}-d")
                return list(torch.split(feats, self.teacher_dims, dim=-1))
            return [feats]
        return list(feats)

    def _scales(self, k: int) -> list[float]:
        s = self.teacher_logit_scale
        scales = [float(s)] * k if isinstance(s, (int, float)) or (torch.is_tensor(s) and s.dim() == 0) else list(s)
        if len(scales) != k:
            raise ValueError(f"{len(scales)} teacher_logit_scale values for {k} teachers")
        return scales

    def forward(self, image_features, text_features, logit_scale, teacher_image_features=None,
                teacher_text_features=None, output_dict=False, negative_text_features=None,
                teacher_negative_text_features=None, logit_bias=None):
        lam = self.lambda_distill
        t_img = self._teachers(teacher_image_features, "teacher_image_features")
        t_txt = self._teachers(teacher_text_features, "teacher_text_features")
        t_neg = self._teachers(teacher_negative_text_features, "teacher_negative_text_features")
        if lam > 0 and not (t_img and t_txt):
            raise ValueError("DistillClipLoss with lambda_distill > 0 needs teacher_image_features and "
                             "teacher_text_features")
        if len(t_img) != len(t_txt) or (t_neg and len(t_neg) != len(t_img)):
            raise ValueError(f"teacher counts differ: {len(t_img)} image, {len(t_txt)} text, {len(t_neg)} negative")
        n = image_features.shape[0]
        for a, b in zip(t_img, t_txt):
            if a.shape[0] != n or b.shape[0] != n or a.shape[1] != b.shape[1]:
                raise ValueError(f"teacher features {tuple(a.shape)}/{tuple(b.shape)} do not fit {n} student rows")
        n_tneg = t_neg[0].shape[0] if t_neg else 0

        clip, lpi, lpt, n_global, counts = self.contrastive(
            image_features, text_features, logit_scale, logit_bias, negative_text_features,
            extra_counts=[n_tneg], compute_loss=lam < 1)
        terms = {"contrastive_loss": (1 - lam) * clip if clip is not None else lpi.new_zeros(())}
        if lam > 0:
            terms["distill_loss"] = lam * self._distill(lpi, lpt, t_img, t_txt, t_neg, n_global, counts)
        else:
            terms["distill_loss"] = lpi.new_zeros(())
        return terms if output_dict else terms["contrastive_loss"] + terms["distill_loss"]

    def _distill(self, lpi, lpt, t_img, t_txt, t_neg, n_global, counts):
        n_batch_cols = lpt.shape[1]  # = N
        tneg_total = sum(c[3] for c in counts)
        sneg_total = sum(c[2] for c in counts)
        if tneg_total and any(c[2] != c[3] for c in counts):  # global: every rank raises alike
            raise ValueError("teacher_negative_text_features must have one row per student negative on every rank "
                             f"(student/teacher negatives per rank: {[(c[2], c[3]) for c in counts]})")
        use_neg = tneg_total > 0 and sneg_total > 0
        if not use_neg:
            lpi = lpi[:, :n_batch_cols]
        # gather every teacher's rows in one collective (no gradient: teachers are fixed)
        dims = [t.shape[1] for t in t_img]
        local_parts = [torch.cat(t_img, 1), torch.cat(t_txt, 1)]
        local_parts.append(torch.cat(t_neg, 1) if t_neg else local_parts[1].new_zeros((0, sum(dims))))
        # the KL in at least fp32: teacher logits at scale 100 need more than bf16's 8 mantissa bits
        dtype = torch.promote_types(lpi.dtype, torch.float32)
        lpi, lpt = lpi.to(dtype), lpt.to(dtype)
        local_parts = [p.to(dtype) for p in local_parts]
        if self.world_size == 1:
            all_img, all_txt, all_neg = local_parts
        else:
            all_img, all_txt, all_neg = gather_parts_with_grad(local_parts, [[c[0], c[1], c[3]] for c in counts],
                                                               self.rank, self.group, with_grad=False)
        scales = self._scales(len(dims))
        log_ps_i, log_ps_t = F.log_softmax(lpi, dim=1), F.log_softmax(lpt, dim=1)
        teach_i, teach_t = [], []
        ends = list(itertools.accumulate(dims))
        for k, (lo, hi) in enumerate(zip([0, *ends[:-1]], ends)):
            img_k, txt_k = local_parts[0][:, lo:hi], local_parts[1][:, lo:hi]
            cols = all_txt[:, lo:hi]
            if use_neg:
                cols = torch.cat([cols, all_neg[:, lo:hi]])
            teach_i.append(F.log_softmax(scales[k] * img_k @ cols.T, dim=1))
            teach_t.append(F.log_softmax(scales[k] * txt_k @ all_img[:, lo:hi].T, dim=1))

        def kl(log_pt, log_ps):  # sum over rows of KL(p_t || p_s)
            return F.kl_div(log_ps, log_pt, reduction="sum", log_target=True)

        if self.average_after_softmax and len(dims) > 1:
            logk = math.log(len(dims))
            ti = torch.logsumexp(torch.stack(teach_i), 0) - logk
            tt = torch.logsumexp(torch.stack(teach_t), 0) - logk
            total = (kl(ti, log_ps_i) + kl(tt, log_ps_t)) / 2
        else:
            total = sum((kl(ti, log_ps_i) + kl(tt, log_ps_t)) / 2 for ti, tt in zip(teach_i, teach_t)) / len(dims)
        return total * self._scale(n_global)


class CoCaLoss(ClipLoss):
    """open_clip's CoCa loss: ``clip_loss_weight * ClipLoss + caption_loss_weight * CE(logits, labels)``.

    ``forward(image_features, text_features, logits, labels, logit_scale, output_dict=False)``:
    ``logits`` [B, T, V] from the text decoder, ``labels`` [B, T] token ids (``pad_id`` ignored).
    The caption CE is the mean over the global batch's non-pad tokens (token counts are summed
    across ranks), so it too is exact under DDP. Returns the sum, or with ``output_dict=True``
    ``{"contrastive_loss", "caption_loss"}`` (already weighted). open_clip returns a
    (contrastive, caption) tuple instead of the sum.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, caption_loss_weight: float = 2.0,
                 clip_loss_weight: float = 1.0, pad_id: int = 0, group=None):
        super().__init__(rank, world_size, group)
        self.caption_loss_weight, self.clip_loss_weight, self.pad_id = caption_loss_weight, clip_loss_weight, pad_id

    def forward(self, image_features, text_features, logits, labels, logit_scale, output_dict=False,
                negative_text_features=None):
        if logits.dim() != 3 or labels.shape != logits.shape[:2]:
            raise ValueError(f"need logits [B, T, V] and labels [B, T]; got {tuple(logits.shape)}, {tuple(labels.shape)}")
        if self.clip_loss_weight:
            clip = self.clip_loss_weight * self.contrastive(image_features, text_features, logit_scale,
                                                            negative_text_features=negative_text_features)[0]
        else:
            clip = logits.new_zeros(())
        tokens = (labels != self.pad_id).sum()
        n_tokens = int(tokens) if self.world_size == 1 else sum(
            c[0] for c in self._counts([int(tokens)], logits.device))
        flat = logits.reshape(-1, logits.shape[-1])
        if flat.dtype in (torch.float16, torch.bfloat16):  # the softmax over the vocabulary in fp32
            flat = flat.float()
        ce = F.cross_entropy(flat, labels.reshape(-1),
                             ignore_index=self.pad_id, reduction="sum")
        caption = self.caption_loss_weight * ce * self._scale(n_tokens)
        terms = {"contrastive_loss": clip, "caption_loss": caption}
        return terms if output_dict else clip + caption


class ShortTagLoss(_Distributed):
    """HQ-CLIP's short-tag loss: a Linear(embed_dim, num_tags) head on the image embeddings, binary
    cross-entropy on each sample's positive tags (target 1) and explicit negative tags (target 0);
    all other tags are ignored. The loss is the mean over the labelled (sample, tag) entries of the
    global batch (counts summed across ranks), times ``weight``.

    The head's parameters live in this module: put them in the optimiser, and in the DDP-wrapped
    module (or all-reduce their gradients) when training on several ranks.

    ``forward(image_features, positive_ids=None, negative_ids=None, targets=None, output_dict=False)``:
    either ragged ``positive_ids`` / ``negative_ids`` (one list or 1-d tensor of tag ids per sample;
    an id in both counts as positive) or ``targets`` [B, num_tags] with 1 / 0 / -1 (ignore).
    """

    def __init__(self, embed_dim: int, num_tags: int, rank: int = 0, world_size: int = 1, weight: float = 1.0,
                 group=None, input_scale: float = 1.0):
        super().__init__(rank, world_size, group)
        self.head = nn.Linear(embed_dim, num_tags)
        # CLIP features are L2-normalised (components ~ 1/sqrt(D)): sqrt(D) gives the head unit-scale
        # inputs, so it learns at the optimiser's lr instead of sqrt(D) times slower
        self.num_tags, self.weight, self.input_scale = num_tags, weight, float(input_scale)

    def make_targets(self, positive_ids, negative_ids, batch: int, device=None) -> torch.Tensor:
        """[B, num_tags] targets from ragged id lists: 1 positive, 0 negative, -1 ignored."""
        t = torch.full((batch, self.num_tags), -1.0, device=device)
        for ids_per_sample, value in ((negative_ids, 0.0), (positive_ids, 1.0)):  # positives win
            if ids_per_sample is None:
                continue
            if len(ids_per_sample) != batch:
                raise ValueError(f"{len(ids_per_sample)} tag lists for {batch} samples")
            for i, ids in enumerate(ids_per_sample):
                ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
                if ids.numel() and (ids.min() < 0 or ids.max() >= self.num_tags):
                    raise ValueError(f"tag id out of range [0, {self.num_tags}) in sample {i}: {ids.tolist()}")
                t[i, ids.to(t.device)] = value
        return t

    def forward(self, image_features, positive_ids=None, negative_ids=None, targets=None, output_dict=False):
        if targets is None:
            targets = self.make_targets(positive_ids, negative_ids, image_features.shape[0], image_features.device)
        elif targets.shape != (image_features.shape[0], self.num_tags):
            raise ValueError(f"targets must be [{image_features.shape[0]}, {self.num_tags}], got {tuple(targets.shape)}")
        logits = self.head(image_features * self.input_scale if self.input_scale != 1.0 else image_features)
        mask = targets >= 0
        n_local = int(mask.sum())
        n_global = n_local if self.world_size == 1 else sum(c[0] for c in self._counts([n_local], logits.device))
        bce = F.binary_cross_entropy_with_logits(logits, targets.clamp(min=0).to(logits.dtype), reduction="none")
        loss = self.weight * (bce * mask).sum() * self._scale(n_global)
        return {"short_tag_loss": loss} if output_dict else loss


LOSSES = {"clip": ClipLoss, "siglip": SigLipLoss, "distill": DistillClipLoss, "coca": CoCaLoss,
          "short_tag": ShortTagLoss}


def build_loss(name: str, rank: int = 0, world_size: int = 1, **options) -> nn.Module:
    """The loss called ``name`` (see ``LOSSES``) for this rank; ``options`` go to its constructor."""
    try:
        cls = LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}") from None
    return cls(rank=rank, world_size=world_size, **options)
