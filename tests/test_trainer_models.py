"""trainer.models (bundled configs, Long-CLIP stretching) and trainer.checkpoint (open_clip-loadable,
atomic, fsspec, exact resume state). Tiny models only; nothing is downloaded."""
from __future__ import annotations

import os
import random

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from recap.trainer.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from recap.trainer.models import (bundled_models, create_model, embed_dim, image_dim, image_size, stretch_positions,
                            stretch_text_positions, text_context_length)

torch.set_num_threads(1)


def _pos(model):
    return (model.positional_embedding if hasattr(model, "positional_embedding") else model.text.positional_embedding)


def _same_params(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class Wrapped(torch.nn.Module):
    """Stands in for DistributedDataParallel: the model is at ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module


# -- models ---------------------------------------------------------------------------------------

def test_bundled_configs_registered_and_forward():
    names = {"recap-tiny", "recap-tiny-siglip", "recap-tiny-coca", "recap-tiny-cnn"}
    assert names <= set(bundled_models()) and names <= set(open_clip.list_models())
    for name in sorted(names):
        model, pre_train, pre_val, tok = create_model(name, output_dict=True)
        assert isinstance(tok, open_clip.SimpleTokenizer)  # not the HF SigLIP tokenizer ("siglip" in the name)
        size = 32 if name == "recap-tiny-cnn" else 64  # the CNN: 32 px, context 32 (fast enough to learn shape)
        assert image_size(model) == size and embed_dim(model) == 128 and image_dim(model) == 128
        assert pre_val(Image.new("RGB", (90, 50))).shape == (3, size, size)
        images = torch.randn(4, 3, size, size)
        assert tok.context_length == text_context_length(model)
        with torch.no_grad():
            out = model(images, tok(["a red circle on a white background"] * 4))
        assert out["image_features"].shape == (4, 128) and out["text_features"].shape == (4, 128)
        if name == "recap-tiny-coca":
            assert out["logits"].shape == (4, tok.context_length - 1, 49408)
    siglip, *_ = create_model("recap-tiny-siglip")
    assert float(siglip.logit_bias.detach()) == -10.0 and abs(float(siglip.logit_scale.detach().exp()) - 10.0) < 1e-4


def test_image_dim_without_output_dim_leaves_batchnorm_alone():
    model, *_ = create_model("recap-tiny-cnn")  # a timm tower: no visual.output_dim
    assert not hasattr(model.visual, "output_dim") and image_dim(model) == 128
    model.visual.head.proj = torch.nn.Identity()  # no projection either: image_dim has to run the tower
    model.train()
    bn = [m for m in model.visual.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in bn]
    assert image_dim(model) == 512
    assert model.visual.training and all(torch.equal(a, m.running_mean) for a, m in zip(before, bn))


@pytest.mark.parametrize("name", ["ViT-B-32", "convnext_base", "MobileCLIP-S1", "coca_ViT-B-32", "RN50"])
def test_open_clip_architectures_build_and_backprop(name):
    """open_clip's own configs (random init: no download) go through the same path as ours."""
    model, _, pre_val, tok = create_model(name, output_dict=True)
    assert isinstance(tok, open_clip.SimpleTokenizer)
    s = image_size(model)
    from PIL import Image

    x = pre_val(Image.new("RGB", (2 * s, s), (200, 30, 30))).unsqueeze(0).repeat(2, 1, 1, 1)
    assert x.shape == (2, 3, s, s)
    out = model(x, tok(["a red star on a white background", "two blue squares"]))
    d = embed_dim(model)
    assert out["image_features"].shape == (2, d) and out["text_features"].shape == (2, d)
    (out["image_features"] @ out["text_features"].T).sum().backward()
    assert all(p.grad is not None for p in model.visual.parameters() if p.requires_grad)


def test_coca_from_scratch_is_initialised_and_deterministic():
    """open_clip leaves CoCa's text_decoder.text_projection as torch.empty: create_model fills it."""
    states = []
    for fill in (0.0, float("nan"), 1e24):
        junk = torch.full((4096, 4096), fill)  # what the allocator may hand back next
        del junk
        torch.manual_seed(0)
        model, *_ = create_model("recap-tiny-coca")
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    proj = states[0]["text_decoder.text_projection"]
    assert torch.isfinite(proj).all() and 0.5 < float(proj.std()) * 128 ** 0.5 < 2.0
    for other in states[1:]:
        assert all(torch.equal(states[0][k], other[k]) for k in other)


def test_tiny_model_is_fast_on_cpu():
    import time

    model, _, _, tok = create_model("recap-tiny")
    images, texts = torch.randn(16, 3, 64, 64), tok(["a blue star"] * 16)
    with torch.no_grad():
        model(images, texts)
        t0 = time.perf_counter()
        model(images, texts)
        dt = time.perf_counter() - t0
    assert dt < 1.0, f"16 image-text pairs took {dt:.3f}s on one thread"


def test_unknown_model_and_unknown_tag():
    with pytest.raises(KeyError, match="unknown model"):
        create_model("no-such-model")
    with pytest.raises(RuntimeError, match="not a known tag"):  # open_clip's check, before any download
        create_model("recap-tiny", pretrained="no_such_tag")


def test_stretch_positions_matches_long_clip():
    old = torch.randn(77, 8)
    new = stretch_positions(old, 248, keep=20)
    assert new.shape == (248, 8)
    assert torch.equal(new[:20], old[:20])
    # Long-CLIP's 4x stretch of positions 20..76: new[20+4i+j] = old[20+i] + j/4 (old[21+i] - old[20+i])
    for i in range(56):
        for j in range(4):
            want = old[20 + i] + j / 4 * (old[21 + i] - old[20 + i])
            assert torch.allclose(new[20 + 4 * i + j], want, atol=1e-6)
    assert torch.allclose(new[244], old[76], atol=1e-6)  # then a linear extrapolation past the last row
    assert torch.allclose(new[247], old[76] + 0.75 * (old[76] - old[75]), atol=1e-5)
    assert torch.equal(stretch_positions(old, 77), old)
    with pytest.raises(ValueError):
        stretch_positions(old, 50)


def test_stretch_clip_text_tower_encodes_long_text():
    model, _, _, tok = create_model("recap-tiny")
    before = _pos(model).detach().clone()
    stretch_text_positions(model, 248, tokenizer=tok)
    after = _pos(model)
    assert after.shape == (248, 128) and torch.equal(after[:20].detach(), before[:20])
    assert model.context_length == 248 and tok.context_length == 248 and model.attn_mask.shape == (248, 248)
    assert isinstance(after, torch.nn.Parameter) and after.requires_grad
    assert any(p is after for p in model.parameters())
    long_a = "a red circle and a blue square " * 30
    long_b = long_a + " and finally a green star"
    tokens = tok([long_a, long_b])
    assert tokens.shape == (2, 248) and int((tokens[0] != 0).sum()) > 77
    with torch.no_grad():
        feats = model.encode_text(tokens)
    assert feats.shape == (2, 128) and torch.isfinite(feats).all()
    with pytest.raises(ValueError):
        stretch_text_positions(model, 100)


def test_stretch_coca_text_tower():
    model, _, _, tok = create_model("recap-tiny-coca")
    before = _pos(model).detach().clone()  # CoCa's text tower has one extra (CLS) position
    stretch_text_positions(model, 248, tokenizer=tok)
    assert _pos(model).shape == (249, 128) and torch.equal(_pos(model)[:20].detach(), before[:20])
    assert model.context_length == model.text.context_length == 248
    assert model.text_decoder.attn_mask.shape == (248, 248)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64), tok(["a red circle " * 60, "a star"]))
    assert out["text_features"].shape == (2, 128) and out["logits"].shape == (2, 247, 49408)


def test_create_model_context_length_and_reload_stretched(tmp_path):
    model, _, _, tok = create_model("recap-tiny", context_length=248)
    assert text_context_length(model) == 248 and tok.context_length == 248
    path = str(tmp_path / "checkpoints" / "step_1.pt")
    save_checkpoint(path, model=model, step=1, epoch=0, data_position={}, config=None, name="recap-tiny")
    # the checkpoint says how long its text positions are: it is stretched before loading
    again, _, _, tok2 = create_model("recap-tiny", pretrained=path)
    assert tok2.context_length == 248 and _same_params(model, again)
    short, _, _, tok3 = create_model("recap-tiny", context_length=32)
    assert text_context_length(short) == 32 and tok3.context_length == 32


# -- checkpoints ----------------------------------------------------------------------------------

def _train_steps(model, tok, opt, n=2, scaler=None):
    images, texts = torch.randn(4, 3, 64, 64), tok(["a red circle", "a blue square", "a star", "a ring"])
    for _ in range(n):
        img, txt, scale = model(images, texts)
        logits = scale * img @ txt.T
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(4))
        opt.zero_grad()
        (scaler.scale(loss) if scaler else loss).backward()
        (scaler.step(opt), scaler.update()) if scaler else opt.step()


def test_round_trip_restores_params_optimizer_and_rng(tmp_path):
    torch.manual_seed(0)
    model, _, _, tok = create_model("recap-tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    _train_steps(model, tok, opt, scaler=scaler)
    path = str(tmp_path / "run" / "checkpoints" / "step_2.pt")
    save_checkpoint(path, model=Wrapped(model), optimizer=opt, scaler=scaler, step=2, epoch=1,
                    data_position={"epoch": 1, "batches": 7}, config={"lr": 1e-3, "betas": (0.9, 0.98)},
                    name="recap-tiny")
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = {i: {k: v.clone() for k, v in s.items()} for i, s in opt.state_dict()["state"].items()}
    saved_scaler = scaler.state_dict()
    expected = (torch.rand(3), random.random(), np.random.rand(2))

    _train_steps(model, tok, opt, n=1, scaler=scaler)  # move everything on
    for _ in range(5):
        torch.rand(3), random.random(), np.random.rand(2)

    fresh_opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh_scaler = torch.amp.GradScaler("cpu")
    state = load_checkpoint(path, Wrapped(model), fresh_opt, fresh_scaler)
    assert state["step"] == 2 and state["epoch"] == 1 and state["data_position"] == {"epoch": 1, "batches": 7}
    assert state["config"] == {"lr": 1e-3, "betas": [0.9, 0.98]} and state["name"] == "recap-tiny"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    got_opt = fresh_opt.state_dict()["state"]
    assert got_opt.keys() == saved_opt.keys()
    for i, s in saved_opt.items():
        for k, v in s.items():  # Adam's step, exp_avg, exp_avg_sq
            assert torch.equal(got_opt[i][k], v), (i, k)
    assert fresh_scaler.state_dict() == saved_scaler
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1]
    assert np.array_equal(np.random.rand(2), expected[2])


def test_open_clip_loads_our_checkpoint(tmp_path):
    model, *_ = create_model("recap-tiny-siglip")
    path = str(tmp_path / "step_3.pt")
    save_checkpoint(path, model=Wrapped(model), step=3, epoch=0, data_position={}, config=None,
                    name="recap-tiny-siglip")
    raw = torch.load(path, weights_only=True)  # open_clip's safe loading accepts the whole file
    assert not any(k.startswith("module.") for k in raw["state_dict"])
    loaded, _, _ = open_clip.create_model_and_transforms("recap-tiny-siglip", pretrained=path)
    assert _same_params(model, loaded)
    ours, *_ = create_model("recap-tiny-siglip", pretrained=path)
    assert _same_params(model, ours)


def test_local_layout_latest_and_atomicity(tmp_path):
    model, *_ = create_model("recap-tiny")
    run = tmp_path / "run"
    assert latest_checkpoint(str(run)) is None
    for step in (9, 10, 2):
        save_checkpoint(str(run / "checkpoints" / f"step_{step}.pt"), model=model, step=step, epoch=0,
                        data_position={}, config=None, name="recap-tiny")
    (run / "checkpoints" / "step_11.pt.tmp-123-abcd").write_bytes(b"half a file")  # a crashed save
    names = sorted(os.listdir(run / "checkpoints"))
    assert names == ["latest", "step_10.pt", "step_11.pt.tmp-123-abcd", "step_2.pt", "step_9.pt"]
    assert [s for s, _ in list_checkpoints(str(run))] == [2, 9, 10]
    assert latest_checkpoint(str(run)) == str(run / "checkpoints" / "step_10.pt")  # numeric, not lexical
    assert latest_checkpoint(str(run / "checkpoints")) == str(run / "checkpoints" / "step_10.pt")


def test_memory_url_checkpoints_and_pointer():
    import fsspec

    model, *_ = create_model("recap-tiny")
    opt = torch.optim.Adam(model.parameters())
    base = "memory://f6-test-run"
    for step in (5, 20):
        save_checkpoint(f"{base}/checkpoints/step_{step}.pt", model=model, optimizer=opt, step=step, epoch=0,
                        data_position={"batches": step}, config={"k": "v"}, name="recap-tiny")
    fs = fsspec.filesystem("memory")
    with fs.open("/f6-test-run/checkpoints/latest") as f:
        assert f.read().decode().strip() == "step_20.pt"
    assert latest_checkpoint(base) == f"{base}/checkpoints/step_20.pt"
    # the pointer is written last on object stores: it wins over a listed file it does not name
    fs.pipe("/f6-test-run/checkpoints/step_30.pt", b"an upload that never committed")
    assert latest_checkpoint(base) == f"{base}/checkpoints/step_20.pt"
    other, *_ = create_model("recap-tiny")
    state = load_checkpoint(latest_checkpoint(base), other, torch.optim.Adam(other.parameters()))
    assert state["data_position"] == {"batches": 20} and _same_params(model, other)
    ours, *_ = create_model("recap-tiny", pretrained=f"{base}/checkpoints/step_5.pt")
    assert _same_params(model, ours)
    fs.rm("/f6-test-run", recursive=True)


def test_s3_checkpoint(s3_endpoint):
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.mkdir("f6-ckpt")
    model, *_ = create_model("recap-tiny")
    url = "s3://f6-ckpt/run/checkpoints/step_4.pt"
    save_checkpoint(url, model=model, step=4, epoch=0, data_position={}, config=None, name="recap-tiny")
    fs.invalidate_cache()
    assert latest_checkpoint("s3://f6-ckpt/run") == url
    other, *_ = create_model("recap-tiny")
    assert load_checkpoint(url, other)["step"] == 4 and _same_params(model, other)
