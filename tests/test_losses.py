"""trainer.losses: values against direct formulas (and open_clip at world size 1), and exact
full-batch gradients over real gloo process groups (2 and 4 spawned CPU processes).

Gradient parity: each rank's gradient divided by the world size (DDP averages), concatenated over
ranks, must equal the single-process gradient on the concatenated batch (float64, rel err <= 1e-5);
logit_scale / logit_bias / head gradients averaged over ranks must equal the single-process ones.
A naive local loss (gather without gradient) must fail the same comparison.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from recap.trainer import losses
from recap.trainer.distributed import run_spawned

D, T_LEN, VOCAB, TAGS = 12, 6, 11, 9


# -- direct formulas (single process, whole batch) -----------------------------------------------
def ref_clip(img, txt, scale, neg=None):
    cols = txt if neg is None or not len(neg) else torch.cat([txt, neg])
    labels = torch.arange(len(img))
    return (F.cross_entropy(scale * img @ cols.T, labels) + F.cross_entropy(scale * txt @ img.T, labels)) / 2


def ref_siglip(img, txt, scale, bias, neg=None):
    logits = scale * img @ txt.T + bias
    labels = 2 * torch.eye(len(img), dtype=img.dtype) - 1
    total = -F.logsigmoid(labels * logits).sum()
    if neg is not None and len(neg):
        total = total - F.logsigmoid(-(scale * img @ neg.T + bias)).sum()
    return total / len(img)


def ref_kl_rows(t_logits, s_logits):  # mean over rows of KL(softmax(t) || softmax(s))
    p = t_logits.softmax(1)
    return (p * (t_logits.log_softmax(1) - s_logits.log_softmax(1))).sum(1).mean()


def ref_distill(img, txt, scale, t_img, t_txt, t_scales, lam, neg=None, t_neg=None, after_softmax=False):
    clip = ref_clip(img, txt, scale, neg)
    cols = txt if t_neg is None else torch.cat([txt, neg])
    s_i, s_t = scale * img @ cols.T, scale * txt @ img.T
    ti = [s * a @ (b if t_neg is None else torch.cat([b, c])).T
          for s, a, b, c in zip(t_scales, t_img, t_txt, t_neg or [None] * len(t_img))]
    tt = [s * b @ a.T for s, a, b in zip(t_scales, t_img, t_txt)]
    if after_softmax:
        pi = torch.stack([x.softmax(1) for x in ti]).mean(0)
        pt = torch.stack([x.softmax(1) for x in tt]).mean(0)
        kl = ((pi * (pi.log() - s_i.log_softmax(1))).sum(1).mean() + (pt * (pt.log() - s_t.log_softmax(1))).sum(1).mean()) / 2
    else:
        kl = sum((ref_kl_rows(a, s_i) + ref_kl_rows(b, s_t)) / 2 for a, b in zip(ti, tt)) / len(ti)
    return (1 - lam) * clip + lam * kl


def unit(n, d=D, gen=None):
    return F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=-1)


# -- cases run both in one process and across spawned ranks ---------------------------------------
def make_data(spec):
    """The global batch of a case (deterministic from its seed)."""
    g = torch.Generator().manual_seed(spec.get("seed", 0))
    n, n_neg = sum(spec["sizes"]), sum(spec.get("negs", [0] * len(spec["sizes"])))
    data = {"img": unit(n, gen=g), "txt": unit(n, gen=g), "neg": unit(n_neg, gen=g)}
    dims = spec.get("teacher_dims")
    if dims:
        data["t_img"] = [unit(n, d, g) for d in dims]
        data["t_txt"] = [unit(n, d, g) for d in dims]
        data["t_neg"] = [unit(n_neg, d, g) for d in dims]
    if spec["loss"] == "coca":
        data["logits"] = torch.randn(n, T_LEN, VOCAB, generator=g, dtype=torch.float64)
        labels = torch.randint(1, VOCAB, (n, T_LEN), generator=g)
        labels[torch.rand(n, T_LEN, generator=g) < 0.3] = 0  # pads, a different count per sample
        data["labels"] = labels
    if spec["loss"] == "short_tag":
        data["targets"] = torch.randint(-1, 2, (n, TAGS), generator=g).to(torch.float64)
    return data


def _rows(x, sizes, rank):
    start = sum(sizes[:rank])
    return x[start:start + sizes[rank]]


def compute(spec, rank, world, naive=False):
    """Run one case on this rank's rows (the whole batch when world == 1): loss value and gradients."""
    data = make_data(spec)
    sizes = spec["sizes"] if world > 1 else [sum(spec["sizes"])]
    negs = spec.get("negs", [0] * len(spec["sizes"]))
    negs = negs if world > 1 else [sum(negs)]
    leaf = lambda x: x.clone().requires_grad_(True)  # noqa: E731
    img, txt = leaf(_rows(data["img"], sizes, rank)), leaf(_rows(data["txt"], sizes, rank))
    neg = leaf(_rows(data["neg"], negs, rank))
    scale = torch.tensor(spec.get("scale", 10.0), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-5.0, dtype=torch.float64, requires_grad=True)
    use_neg = sum(negs) > 0
    neg_arg = neg if use_neg and len(neg) else None  # a rank without negatives passes None
    opts = dict(spec.get("opts", {}))
    kind = spec["loss"]
    extra = {}
    if kind == "short_tag":
        torch.manual_seed(1)  # the same head on every rank and in the single process
        opts.update(embed_dim=D, num_tags=TAGS)
    loss_fn = losses.build_loss(kind, rank=rank, world_size=world, **opts).double()
    if naive:
        out = naive_local_clip(img, txt, scale, rank, world)
    elif kind == "clip":
        out = loss_fn(img, txt, scale, negative_text_features=neg_arg)
    elif kind == "siglip":
        out = loss_fn(img, txt, scale, bias, negative_text_features=neg_arg)
    elif kind == "distill":
        t_img = [_rows(t, sizes, rank) for t in data["t_img"]]
        t_txt = [_rows(t, sizes, rank) for t in data["t_txt"]]
        t_neg = [_rows(t, negs, rank) for t in data["t_neg"]] if spec.get("teacher_negs") else None
        if spec.get("concat_teachers"):  # one tensor, split by teacher_dims
            t_img, t_txt = torch.cat(t_img, 1), torch.cat(t_txt, 1)
            t_neg = torch.cat(t_neg, 1) if t_neg is not None else None
        out = loss_fn(img, txt, scale, teacher_image_features=t_img, teacher_text_features=t_txt,
                      negative_text_features=neg_arg,
                      teacher_negative_text_features=t_neg,
                      output_dict=True)
    elif kind == "coca":
        extra["logits"] = leaf(_rows(data["logits"], sizes, rank))
        out = loss_fn(image_features=img, text_features=txt, logits=extra["logits"],
                      labels=_rows(data["labels"], sizes, rank), logit_scale=scale, output_dict=True)
    elif kind == "short_tag":
        out = loss_fn(img, targets=_rows(data["targets"], sizes, rank))
    else:
        raise AssertionError(kind)
    total = sum(out.values()) if isinstance(out, dict) else out
    total.backward()
    tensors = {"img": img, "txt": txt, "neg": neg, "scale": scale, "bias": bias, **extra}
    if kind == "short_tag":
        tensors.update(head_w=loss_fn.head.weight, head_b=loss_fn.head.bias)
    result = {k: (torch.zeros_like(v) if v.grad is None else v.grad.detach()) for k, v in tensors.items()}
    result["loss"] = total.detach()
    return result


def naive_local_clip(img, txt, scale, rank, world):
    """open_clip's ``--local-loss`` WITHOUT gather-with-grad: other ranks' rows carry no gradient."""
    import torch.distributed as dist

    with torch.no_grad():
        all_img = [torch.empty_like(img) for _ in range(world)]
        all_txt = [torch.empty_like(txt) for _ in range(world)]
        dist.all_gather(all_img, img)
        dist.all_gather(all_txt, txt)
    all_img, all_txt = torch.cat(all_img), torch.cat(all_txt)
    labels = torch.arange(len(img)) + rank * len(img)
    return (F.cross_entropy(scale * img @ all_txt.T, labels) + F.cross_entropy(scale * txt @ all_img.T, labels)) / 2


class Towers(torch.nn.Module):
    """Two linear towers and a learnable scale (and bias): what DDP wraps in the trainer."""

    def __init__(self, bias: bool):
        super().__init__()
        self.img, self.txt = torch.nn.Linear(D, D), torch.nn.Linear(D, D)
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = torch.nn.Parameter(torch.tensor(-5.0)) if bias else None

    def forward(self, x, y):
        return F.normalize(self.img(x), dim=-1), F.normalize(self.txt(y), dim=-1), self.log_scale.exp(), self.bias


def compute_ddp(spec, rank, world):
    """A real DDP step: parameter gradients after backward (DDP has averaged them over ranks)."""
    g = torch.Generator().manual_seed(spec.get("seed", 0))
    sizes = spec["sizes"] if world > 1 else [sum(spec["sizes"])]
    negs = spec["negs"] if world > 1 else [sum(spec["negs"])]
    x, y, z = (torch.randn(n, D, generator=g, dtype=torch.float64) for n in (sum(sizes), sum(sizes), sum(negs)))
    torch.manual_seed(0)
    model = Towers(bias=spec["loss"] == "siglip").double()
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    xs, ys, zs = _rows(x, sizes, rank), _rows(y, sizes, rank), _rows(z, negs, rank)
    img, txt, scale, bias = net(xs, torch.cat([ys, zs]))  # negatives ride in the same text forward
    txt, neg = txt[:len(ys)], txt[len(ys):]
    loss_fn = losses.build_loss(spec["loss"], rank=rank, world_size=world)
    extra = (bias,) if spec["loss"] == "siglip" else ()
    out = loss_fn(img, txt, scale, *extra, output_dict=True, negative_text_features=neg if len(neg) else None)
    sum(out.values()).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def worker(rank, world, cases):
    """Runs in each spawned process (module-level so spawn can pickle it)."""
    return {name: (compute_ddp(spec, rank, world) if spec.get("ddp") else
                   compute(spec, rank, world, naive=spec.get("naive", False))) for name, spec in cases.items()}


CASES_2 = {
    "clip": {"loss": "clip", "sizes": [5, 5]},
    "clip_neg": {"loss": "clip", "sizes": [5, 5], "negs": [3, 0], "seed": 1},
    "siglip": {"loss": "siglip", "sizes": [5, 5], "seed": 2},
    "siglip_neg": {"loss": "siglip", "sizes": [5, 5], "negs": [2, 4], "seed": 3},
    "siglip_gather": {"loss": "siglip", "sizes": [5, 5], "negs": [1, 2], "opts": {"exchange": "gather"}, "seed": 4},
    "distill": {"loss": "distill", "sizes": [5, 5], "teacher_dims": [8, 6], "seed": 5,
                "opts": {"lambda_distill": 0.5, "teacher_logit_scale": [100.0, 50.0]}},
    "distill_neg": {"loss": "distill", "sizes": [5, 5], "negs": [2, 3], "teacher_dims": [8], "teacher_negs": True,
                    "seed": 6, "opts": {"lambda_distill": 0.7}},
    "distill_concat": {"loss": "distill", "sizes": [5, 5], "negs": [2, 0], "teacher_dims": [8, 6],
                       "concat_teachers": True, "seed": 7,
                       "opts": {"lambda_distill": 1.0, "teacher_dims": [8, 6], "average_after_softmax": True}},
    "coca": {"loss": "coca", "sizes": [5, 5], "seed": 8},
    "short_tag": {"loss": "short_tag", "sizes": [5, 5], "seed": 9},
    "naive": {"loss": "clip", "sizes": [5, 5], "naive": True},
    "ddp_clip": {"loss": "clip", "sizes": [5, 5], "negs": [2, 1], "ddp": True, "seed": 31},
    "ddp_siglip": {"loss": "siglip", "sizes": [5, 5], "negs": [0, 3], "ddp": True, "seed": 32},
}
# 4 ranks: the ring's bidirectional hops and its last one-way hop; unequal local batches
CASES_4 = {
    "clip_neg": {"loss": "clip", "sizes": [4, 2, 3, 5], "negs": [1, 0, 3, 2], "seed": 11},
    "siglip_neg": {"loss": "siglip", "sizes": [4, 2, 3, 5], "negs": [0, 2, 1, 3], "seed": 12},
    "siglip_gather": {"loss": "siglip", "sizes": [3, 3, 3, 3], "opts": {"exchange": "gather"}, "seed": 13},
    "distill_neg": {"loss": "distill", "sizes": [4, 2, 3, 5], "negs": [1, 0, 3, 2], "teacher_dims": [8, 6],
                    "teacher_negs": True, "seed": 14, "opts": {"lambda_distill": 0.5}},
    "coca": {"loss": "coca", "sizes": [4, 2, 3, 5], "seed": 15},
}


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def parity(spec, per_rank, single):
    """Worst relative error of the DDP-averaged rank results against the single process."""
    world = len(per_rank)
    errs = {}
    for key in ("img", "txt", "neg", "logits"):
        if key in single and single[key].numel() and single[key].norm() > 0:
            errs[key] = rel(torch.cat([r[key] for r in per_rank]) / world, single[key])
    for key in ("scale", "bias", "head_w", "head_b", "loss"):
        if key in single and single[key].norm() > 0:
            errs[key] = rel(sum(r[key] for r in per_rank) / world, single[key])
    return errs


@pytest.fixture(scope="module")
def ranks2():
    return run_spawned(worker, 2, CASES_2, timeout=120)


@pytest.fixture(scope="module")
def ranks4():
    return run_spawned(worker, 4, CASES_4, timeout=120)


@pytest.mark.parametrize("name", [n for n in CASES_2 if n != "naive" and not CASES_2[n].get("ddp")])
def test_grad_parity_2_ranks(ranks2, name):
    spec = CASES_2[name]
    single = compute(spec, 0, 1)
    errs = parity(spec, [r[name] for r in ranks2], single)
    assert errs and max(errs.values()) <= 1e-5, errs
    assert ("head_w" if spec["loss"] == "short_tag" else "scale") in errs  # logit_scale / head grads match
    if spec["loss"] == "siglip":
        assert "bias" in errs
    pure_kl_without_teacher_negs = spec.get("opts", {}).get("lambda_distill") == 1.0 and not spec.get("teacher_negs")
    if spec.get("negs") and not pure_kl_without_teacher_negs:
        assert "neg" in errs
    if pure_kl_without_teacher_negs:  # negatives only enter the CLIP term, which has weight 0 here
        assert single["neg"].abs().max() == 0


@pytest.mark.parametrize("name", list(CASES_4))
def test_grad_parity_4_ranks_unequal_batches(ranks4, name):
    spec = CASES_4[name]
    errs = parity(spec, [r[name] for r in ranks4], compute(spec, 0, 1))
    assert errs and max(errs.values()) <= 1e-5, errs


@pytest.mark.parametrize("name", [n for n in CASES_2 if CASES_2[n].get("ddp")])
def test_ddp_parameter_gradients_equal_single_process(ranks2, name):
    """Inside a real DistributedDataParallel step (whose gradient all-reduces share the group with
    the loss's own collectives) every parameter gets the single-process full-batch gradient."""
    single = compute_ddp(CASES_2[name], 0, 1)
    for r in ranks2:
        for k, g in single.items():
            assert rel(r[name][k], g) <= 1e-5, (k, rel(r[name][k], g))


def test_naive_local_loss_without_gather_grad_fails_parity(ranks2):
    spec = CASES_2["naive"]
    single = compute(CASES_2["clip"], 0, 1)
    errs = parity(spec, [r["naive"] for r in ranks2], single)
    assert errs["loss"] <= 1e-12  # same value...
    assert errs["img"] > 1e-2 and errs["txt"] > 1e-2  # ...wrong gradient
    # and the real loss on the same data passes
    assert max(parity(spec, [r["clip"] for r in ranks2], single).values()) <= 1e-5


# -- values at world size 1 ---------------------------------------------------------------------
def _pair(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return unit(n, gen=g), unit(n, gen=g), unit(3, gen=g)


def test_clip_value_matches_formula_and_open_clip():
    import open_clip.loss as ocl

    img, txt, neg = _pair()
    scale = torch.tensor(14.0, dtype=torch.float64)
    got = losses.ClipLoss()(img, txt, scale)
    assert torch.allclose(got, ref_clip(img, txt, scale), rtol=1e-12)
    assert torch.allclose(got, ocl.ClipLoss()(img, txt, scale), rtol=1e-12)
    assert losses.ClipLoss()(img, txt, scale, output_dict=True)["contrastive_loss"] == got
    with_neg = losses.ClipLoss()(img, txt, scale, negative_text_features=neg)
    assert torch.allclose(with_neg, ref_clip(img, txt, scale, neg), rtol=1e-12)
    assert with_neg > got  # extra columns only add to the image->text denominators
    empty = losses.ClipLoss()(img, txt, scale, negative_text_features=neg[:0])
    assert torch.allclose(empty, got, rtol=1e-12)


def test_siglip_value_matches_formula_and_open_clip():
    import open_clip.loss as ocl

    img, txt, neg = _pair(seed=1)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-5.0, dtype=torch.float64)
    got = losses.SigLipLoss()(img, txt, scale, bias)
    assert torch.allclose(got, ref_siglip(img, txt, scale, bias), rtol=1e-12)
    assert torch.allclose(got, ocl.SigLipLoss()(img, txt, scale, bias), rtol=1e-12)
    got_neg = losses.SigLipLoss()(img, txt, scale, bias, negative_text_features=neg, output_dict=True)
    assert torch.allclose(got_neg["contrastive_loss"], ref_siglip(img, txt, scale, bias, neg), rtol=1e-12)


def test_distill_lambda0_is_clip_and_self_distillation_has_zero_kl():
    img, txt, neg = _pair(seed=2)
    scale = torch.tensor(100.0, dtype=torch.float64)
    d0 = losses.DistillClipLoss(lambda_distill=0.0)(img, txt, scale, teacher_image_features=img,
                                                     teacher_text_features=txt, negative_text_features=neg)
    assert torch.allclose(d0, losses.ClipLoss()(img, txt, scale, negative_text_features=neg), rtol=1e-12)
    # lambda 0 needs no teacher at all
    assert torch.allclose(losses.DistillClipLoss(lambda_distill=0.0)(img, txt, scale), ref_clip(img, txt, scale))
    terms = losses.DistillClipLoss(lambda_distill=1.0, teacher_logit_scale=100.0)(
        img, txt, scale, teacher_image_features=img, teacher_text_features=txt, output_dict=True)
    assert abs(terms["distill_loss"].item()) < 1e-12 and terms["contrastive_loss"].item() == 0.0
    # a different teacher scale is a different distribution
    other = losses.DistillClipLoss(teacher_logit_scale=30.0)(img, txt, scale, teacher_image_features=img,
                                                               teacher_text_features=txt)
    assert other.item() > 1e-3


def test_distill_value_matches_formula():
    g = torch.Generator().manual_seed(3)
    img, txt, neg = unit(6, gen=g), unit(6, gen=g), unit(2, gen=g)
    t_img, t_txt, t_neg = [unit(6, 8, g), unit(6, 5, g)], [unit(6, 8, g), unit(6, 5, g)], [unit(2, 8, g), unit(2, 5, g)]
    scale = torch.tensor(20.0, dtype=torch.float64)
    fn = losses.DistillClipLoss(lambda_distill=0.3, teacher_logit_scale=[100.0, 70.0])
    got = fn(img, txt, scale, teacher_image_features=t_img, teacher_text_features=t_txt)
    assert torch.allclose(got, ref_distill(img, txt, scale, t_img, t_txt, [100.0, 70.0], 0.3), rtol=1e-10)
    got = fn(img, txt, scale, teacher_image_features=t_img, teacher_text_features=t_txt, negative_text_features=neg)
    want = ref_distill(img, txt, scale, t_img, t_txt, [100.0, 70.0], 0.3, neg)  # KL over batch columns only
    assert torch.allclose(got, want, rtol=1e-10)
    got = fn(img, txt, scale, teacher_image_features=t_img, teacher_text_features=t_txt, negative_text_features=neg,
             teacher_negative_text_features=t_neg)
    assert torch.allclose(got, ref_distill(img, txt, scale, t_img, t_txt, [100.0, 70.0], 0.3, neg, t_neg), rtol=1e-10)
    soft = losses.DistillClipLoss(teacher_logit_scale=[100.0, 70.0], average_after_softmax=True,
                                  teacher_dims=[8, 5])
    got = soft(img, txt, scale, teacher_image_features=torch.cat(t_img, 1), teacher_text_features=torch.cat(t_txt, 1))
    want = ref_distill(img, txt, scale, t_img, t_txt, [100.0, 70.0], 1.0, after_softmax=True)
    assert torch.allclose(got, want, rtol=1e-10)


def test_distill_rejects_bad_teachers():
    img, txt, _ = _pair()
    scale = torch.tensor(10.0, dtype=torch.float64)
    with pytest.raises(ValueError, match="needs teacher"):
        losses.DistillClipLoss()(img, txt, scale)
    with pytest.raises(ValueError, match="teacher_dims"):
        losses.DistillClipLoss(teacher_dims=[4, 4])(img, txt, scale, teacher_image_features=unit(7, 10),
                                                    teacher_text_features=unit(7, 10))
    with pytest.raises(ValueError, match="student rows"):
        losses.DistillClipLoss()(img, txt, scale, teacher_image_features=unit(6), teacher_text_features=unit(6))
    with pytest.raises(ValueError, match="lambda_distill"):
        losses.DistillClipLoss(lambda_distill=1.5)


def test_coca_value_matches_formula_and_open_clip():
    import open_clip.loss as ocl

    spec = {"loss": "coca", "sizes": [6], "seed": 21}
    data = make_data(spec)
    scale = torch.tensor(10.0, dtype=torch.float64)
    fn = losses.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=0)
    terms = fn(data["img"], data["txt"], data["logits"], data["labels"], scale, output_dict=True)
    cap = F.cross_entropy(data["logits"].permute(0, 2, 1), data["labels"], ignore_index=0)
    assert torch.allclose(terms["caption_loss"], 2.0 * cap, rtol=1e-12)
    assert torch.allclose(terms["contrastive_loss"], ref_clip(data["img"], data["txt"], scale), rtol=1e-12)
    oc = ocl.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)(
        data["img"], data["txt"], data["logits"], data["labels"], scale, output_dict=True)
    for k in terms:
        assert torch.allclose(terms[k], oc[k].to(terms[k].dtype), rtol=1e-12), k
    total = fn(data["img"], data["txt"], data["logits"], data["labels"], scale)
    assert torch.allclose(total, sum(terms.values()))
    no_clip = losses.CoCaLoss(clip_loss_weight=0.0)(data["img"], data["txt"], data["logits"], data["labels"], scale,
                                                    output_dict=True)
    assert no_clip["contrastive_loss"].item() == 0.0


def test_coca_loss_decreases():
    torch.manual_seed(0)
    feats = torch.randn(8, D)
    labels = torch.randint(1, VOCAB, (8, T_LEN))
    labels[:, -2:] = 0
    img_proj, txt_proj, dec = torch.nn.Linear(D, D), torch.nn.Linear(D, D), torch.nn.Linear(D, T_LEN * VOCAB)
    params = [*img_proj.parameters(), *txt_proj.parameters(), *dec.parameters()]
    opt = torch.optim.Adam(params, lr=0.05)
    fn, scale = losses.CoCaLoss(), torch.tensor(10.0)
    seen = []
    for _ in range(15):
        out = fn(F.normalize(img_proj(feats), dim=-1), F.normalize(txt_proj(feats + 0.1), dim=-1),
                 dec(feats).view(8, T_LEN, VOCAB), labels, scale)
        opt.zero_grad()
        out.backward()
        opt.step()
        seen.append(out.item())
    assert seen[-1] < 0.5 * seen[0], seen


def test_short_tag_value_ragged_equals_targets_and_formula():
    torch.manual_seed(0)
    fn = losses.ShortTagLoss(embed_dim=D, num_tags=TAGS, weight=0.5)
    feats = torch.randn(3, D)
    pos, neg = [[0, 2], [], [5]], [[1], [3, 4, 5], [5, 8]]  # sample 2 lists tag 5 in both: positive wins
    targets = fn.make_targets(pos, neg, 3)
    want = torch.full((3, TAGS), -1.0)
    want[0, [0, 2]], want[0, 1] = 1, 0
    want[1, [3, 4, 5]] = 0
    want[2, 5], want[2, 8] = 1, 0
    assert torch.equal(targets, want)
    got = fn(feats, positive_ids=pos, negative_ids=neg)
    assert torch.allclose(got, fn(feats, targets=targets))
    logits, mask = fn.head(feats), want >= 0
    direct = F.binary_cross_entropy_with_logits(logits[mask], want[mask])
    assert torch.allclose(got, 0.5 * direct)
    assert set(fn(feats, positive_ids=pos, negative_ids=neg, output_dict=True)) == {"short_tag_loss"}
    assert fn(feats, targets=torch.full((3, TAGS), -1.0)).item() == 0.0  # nothing labelled
    with pytest.raises(ValueError, match="out of range"):
        fn(feats, positive_ids=[[TAGS], [], []])
    with pytest.raises(ValueError, match="tag lists"):
        fn(feats, positive_ids=[[0]])


def test_short_tag_loss_decreases():
    torch.manual_seed(0)
    fn = losses.ShortTagLoss(embed_dim=D, num_tags=TAGS)
    feats = torch.randn(16, D)
    targets = torch.randint(-1, 2, (16, TAGS)).float()
    opt = torch.optim.Adam(fn.parameters(), lr=0.1)
    seen = []
    for _ in range(20):
        loss = fn(feats, targets=targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen.append(loss.item())
    assert seen[-1] < 0.7 * seen[0], seen


def test_clip_and_siglip_losses_decrease():
    torch.manual_seed(0)
    x = torch.randn(16, D)
    for fn, bias in ((losses.ClipLoss(), None), (losses.SigLipLoss(), torch.nn.Parameter(torch.tensor(-5.0)))):
        a, b = torch.nn.Linear(D, D), torch.nn.Linear(D, D)
        log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
        params = [*a.parameters(), *b.parameters(), log_scale] + ([bias] if bias is not None else [])
        opt = torch.optim.Adam(params, lr=0.05)
        seen = []
        for _ in range(15):
            args = [F.normalize(a(x), dim=-1), F.normalize(b(x + 0.1 * torch.randn(16, D)), dim=-1), log_scale.exp()]
            loss = fn(*args, bias) if bias is not None else fn(*args)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen.append(loss.item())
        assert seen[-1] < 0.5 * seen[0], (type(fn).__name__, seen)


def test_build_loss_and_argument_checks():
    assert isinstance(losses.build_loss("clip"), losses.ClipLoss)
    assert isinstance(losses.build_loss("siglip", rank=0, world_size=1), losses.SigLipLoss)
    d = losses.build_loss("distill", lambda_distill=0.5, teacher_logit_scale=50.0)
    assert isinstance(d, losses.DistillClipLoss) and d.lambda_distill == 0.5
    assert losses.build_loss("coca", caption_loss_weight=1.0).caption_loss_weight == 1.0
    assert isinstance(losses.build_loss("short_tag", embed_dim=4, num_tags=3), losses.ShortTagLoss)
    with pytest.raises(ValueError, match="unknown loss"):
        losses.build_loss("triplet")
    with pytest.raises(ValueError, match="rank"):
        losses.ClipLoss(rank=2, world_size=2)
    img, txt, _ = _pair()
    with pytest.raises(RuntimeError, match="not initialised"):
        losses.ClipLoss(rank=1, world_size=2)(img, txt, torch.tensor(10.0))
    with pytest.raises(ValueError, match="pair row by row"):
        losses.ClipLoss()(img, txt[:5], torch.tensor(10.0))
    with pytest.raises(ValueError, match="exchange"):
        losses.SigLipLoss(exchange="allreduce")


def test_half_precision_inputs_give_finite_close_values():
    """bf16 features (autocast-style) give finite losses near the float64 ones; the distill KL is
    taken in fp32 whatever the student's dtype."""
    g = torch.Generator().manual_seed(41)
    img, txt, neg = unit(16, gen=g), unit(16, gen=g), unit(4, gen=g)
    t_img, t_txt = unit(16, 8, g), unit(16, 8, g)
    s64 = torch.tensor(30.0, dtype=torch.float64)
    calls = {
        "clip": lambda fn, a, b, n, s: fn(a, b, s, negative_text_features=n),
        "siglip": lambda fn, a, b, n, s: fn(a, b, s, torch.tensor(-5.0, dtype=s.dtype), negative_text_features=n),
        "distill": lambda fn, a, b, n, s: fn(a, b, s, teacher_image_features=t_img.float(),
                                            teacher_text_features=t_txt.float(), negative_text_features=n),
    }
    for name, call in calls.items():
        fn = losses.build_loss(name, **({"lambda_distill": 0.5} if name == "distill" else {}))
        want = call(fn, img, txt, neg, s64)
        a, b, n = (x.to(torch.bfloat16).requires_grad_(True) for x in (img, txt, neg))
        got = call(fn, a, b, n, s64.float())
        got.backward()
        assert torch.isfinite(got) and all(torch.isfinite(x.grad).all() for x in (a, b, n)), name
        assert abs(got.item() - want.item()) <= 0.05 * abs(want.item()) + 1e-2, (name, got.item(), want.item())
