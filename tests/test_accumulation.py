"""Gradient accumulation keeps the contrastive batch whole (open_clip's --accum-freq, GradCache):
the gradient from micro-batches through ``backward_step`` equals the gradient of the whole batch's
loss, for every loss kind, and a run with accum 2 x batch 8 trains like batch 16."""
import pytest
import torch
import yaml

from recap.trainer.config import TrainConfig, load_train_config
from recap.trainer.losses import ShortTagLoss, build_loss
from recap.trainer.models import create_model
from recap.trainer.step import backward_step, compute_loss
from recap.trainer.train import train

WORDS = ["red", "blue", "star", "circle", "large", "small", "two", "on", "a", "white", "background", "green"]


def _cfg(kind: str, **loss) -> TrainConfig:
    name = {"siglip": "recap-tiny-siglip", "coca": "recap-tiny-coca"}.get(kind, "recap-tiny")
    return TrainConfig.model_validate({"output": "unused", "steps": 1, "data": {"path": "unused"},
                                       "model": {"name": name}, "loss": {"kind": kind, **loss}})


def _micro(tok, n: int, g: torch.Generator, negatives: bool, teacher_dim: int = 16, tags: int = 0) -> dict:
    def caption() -> str:  # varied lengths: CoCa's per-token mean must be weighted right
        return " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (int(torch.randint(2, 9, (1,), generator=g)),),
                                                             generator=g))

    b = {"image": torch.randn(n, 3, 64, 64, generator=g), "text": tok([caption() for _ in range(n)]),
         "uid": [f"u{int(torch.randint(10**6, (1,), generator=g))}" for _ in range(n)]}
    unit = lambda m: torch.nn.functional.normalize(torch.randn(m, teacher_dim, generator=g), dim=-1)  # noqa: E731
    b["teacher_image"], b["teacher_text"] = unit(n), unit(n)
    if negatives:  # ragged: every other sample has one negative
        k = (n + 1) // 2
        b["neg_text"] = tok([caption() for _ in range(k)])
        b["teacher_neg_text"] = unit(k)
    if tags:
        b["tag_pos"] = [torch.randint(tags, (2,), generator=g).tolist() for _ in range(n)]
        b["tag_neg"] = [torch.randint(tags, (1,), generator=g).tolist() for _ in range(n)]
    return b


def _whole(micro: list[dict]) -> dict:
    out = {}
    for k, v in micro[0].items():
        out[k] = torch.cat([m[k] for m in micro]) if torch.is_tensor(v) else [x for m in micro for x in m[k]]
    return out


def _grads(*modules) -> dict[str, torch.Tensor]:
    return {f"{i}.{n}": p.grad.clone() for i, m in enumerate(modules) for n, p in m.named_parameters()
            if p.grad is not None}


@pytest.mark.parametrize("kind,loss", [("clip", {"hard_negatives": True}), ("siglip", {"hard_negatives": True}),
                                       ("distill", {"hard_negatives": True, "lambda_distill": 0.5}),
                                       ("coca", {}), ("clip", {"short_tags": {"weight": 1.0}})])
def test_micro_batches_give_the_whole_batch_gradient(kind, loss):
    torch.manual_seed(0)
    cfg = _cfg(kind, **loss)
    model, _, _, tok = create_model(cfg.model.name, output_dict=True)
    opts = {"lambda_distill": 0.5} if kind == "distill" else {}
    loss_fn = build_loss(kind, **opts)
    tag_loss = ShortTagLoss(128, 6, input_scale=128 ** 0.5) if cfg.loss.short_tags else None
    heads = {"short_tags": tag_loss} if tag_loss else {}
    g = torch.Generator().manual_seed(1)
    micro = [_micro(tok, n, g, cfg.loss.hard_negatives, tags=6 if tag_loss else 0) for n in (5, 7, 4)]  # unequal

    total, terms = compute_loss(model, loss_fn, _whole(micro), cfg, tag_loss)
    total.backward()
    want = _grads(model, *heads.values())
    model.zero_grad(set_to_none=True)
    for h in heads.values():
        h.zero_grad(set_to_none=True)

    logged, bad = backward_step(model, loss_fn, micro, cfg, tag_loss=tag_loss, heads=heads)
    got = _grads(model, *heads.values())
    assert bad is None and got.keys() == want.keys() and len(want) > 10
    for k in want:  # relative to the tensor's scale (float sums in another order)
        err = float((got[k] - want[k]).abs().max() / want[k].abs().max().clamp(min=1e-12))
        assert err < 1e-5 and float(want[k].abs().max()) < 1e3, (k, err, float(want[k].abs().max()))
    assert logged.keys() == terms.keys()
    for k in terms:
        assert logged[k] == pytest.approx(float(terms[k].detach()), rel=1e-5), k

    # the naive way (each micro-batch's own loss, averaged) is a different gradient: the test can fail
    model.zero_grad(set_to_none=True)
    for m in micro:
        (compute_loss(model, loss_fn, m, cfg, tag_loss)[0] / len(micro)).backward()
    naive = _grads(model)
    assert not all(torch.allclose(naive[k], want[k], rtol=1e-3, atol=1e-6) for k in naive)


def test_non_finite_micro_batch_is_reported():
    cfg = _cfg("clip")
    model, _, _, tok = create_model(cfg.model.name, output_dict=True)
    g = torch.Generator().manual_seed(2)
    micro = [_micro(tok, 4, g, False), _micro(tok, 4, g, False)]
    micro[1]["image"][0, 0, 0, 0] = float("nan")
    logged, bad = backward_step(model, build_loss("clip"), micro, cfg)
    assert bad["uid"] == micro[0]["uid"] + micro[1]["uid"]  # the whole batch's loss: every uid is a suspect
    assert logged and all(v != v for v in logged.values())  # NaN terms, for the record


def test_accum_two_by_eight_trains_like_sixteen(tmp_path):
    from recap.world.generate import generate_world

    generate_world(tmp_path / "w", samples=20, heldout=64, seed=5, port=8765)

    def run(name: str, batch: int, accum: int) -> dict:
        raw = {"name": name, "seed": 0, "output": str(tmp_path / name), "steps": 2, "log_every": 1, "threads": 1,
               "tensorboard": False, "data": {"path": str(tmp_path / "w/heldout/shards"), "batch_size": batch},
               "model": {"name": "recap-tiny"}, "optim": {"lr": 1e-3, "warmup": 1, "accum": accum},
               "loss": {"kind": "clip"}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(raw))
        summary = train(load_train_config(tmp_path / f"{name}.yaml"))
        assert summary["step"] == 2
        ckpt = torch.load(tmp_path / name / "checkpoints/step_2.pt", map_location="cpu", weights_only=False)
        return ckpt["state_dict"], summary

    (whole, s16), (acc, s8x2) = run("b16", 16, 1), run("b8x2", 8, 2)
    assert s16["loss"] == pytest.approx(s8x2["loss"], rel=1e-4)
    for k in whole:
        torch.testing.assert_close(acc[k], whole[k], rtol=1e-4, atol=2e-6, msg=lambda m: f"{k}: {m}")
