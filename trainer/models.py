"""Models for the bundled trainer: open_clip models by name, plus small configs of our own.

``create_model`` accepts any open_clip model name (``ViT-B-32``, ``convnext_base``,
``MobileCLIP-S1``, ``coca_ViT-B-32``, ...) and the configs shipped in ``trainer/model_configs``:

- ``recap-tiny``        CLIP: ViT 64 px / patch 8 / width 128 / 2 layers; text width 128 / 2 layers, context 77
- ``recap-tiny-siglip`` the same towers with SigLIP's init (logit scale 10, logit bias -10)
- ``recap-tiny-coca``   a tiny CoCa (attentional pooler, CLS text tower, 2-layer multimodal decoder)
- ``recap-tiny-cnn``    a timm ResNet-10-T image tower (32 px, BatchNorm) and the recap-tiny text tower
                      at context 32 (the demo's captions need at most 27 tokens; at 77 the text
                      tower cost more than the image tower): a CNN learns the demo world's shapes
                      where the tiny ViT does not (see the README's trainer section)

Our configs use open_clip's ``SimpleTokenizer`` (vocab 49408) whatever their name says (open_clip
picks an HF SigLIP tokenizer for any name containing "siglip", which would need a download).

Weights: ``pretrained`` is an open_clip pretrained tag (open_clip downloads it: a cluster's
business, never done in tests or the demo) or a checkpoint of ours / an open_clip state dict at a
local path or fsspec URL. No code path here downloads anything by itself.

Long texts (Long-CLIP): ``stretch_text_positions`` extends a text tower's positional embedding
with Long-CLIP's knowledge-preserved stretching; ``create_model(context_length=N)`` with N above
the config's context does it for you (before loading a checkpoint that was trained stretched).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn as nn

from recap.trainer.weights import read_state_dict

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
LONG_CLIP_KEEP = 20  # Long-CLIP keeps the first 20 positions (the well-trained ones) unchanged

open_clip.add_model_config(CONFIG_DIR)


def bundled_models() -> list[str]:
    """Names of the configs shipped in trainer/model_configs."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def _is_bundled(name: str) -> bool:
    return (CONFIG_DIR / f"{name}.json").is_file()


def model_config(name: str) -> dict[str, Any]:
    """The open_clip config dict of ``name`` (ours or open_clip's); KeyError if unknown."""
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise KeyError(f"unknown model {name!r}: not an open_clip model nor one of {bundled_models()}")
    return cfg


def get_tokenizer(name: str, context_length: int | None = None):
    """open_clip's tokenizer for ``name``; our bundled configs always get the SimpleTokenizer."""
    if _is_bundled(name):
        ctx = context_length or model_config(name)["text_cfg"].get("context_length", 77)
        return open_clip.SimpleTokenizer(context_length=ctx)
    return open_clip.get_tokenizer(name, context_length=context_length)


def _is_local_or_url(pretrained: str) -> bool:
    return "://" in pretrained or Path(pretrained).is_file()


def create_model(name: str, *, pretrained: str | None = None, context_length: int | None = None,
                 precision: str = "fp32", device: str | torch.device = "cpu", **overrides):
    """Build ``name`` → ``(model, preprocess_train, preprocess_val, tokenizer)``.

    ``pretrained``: an open_clip tag (loaded by open_clip), or a checkpoint path / fsspec URL (ours:
    ``{"state_dict": ...}``, or any open_clip state dict). ``context_length``: None keeps the
    config's; above it the text positions are stretched (Long-CLIP), below it the model is built
    shorter (open_clip's ``force_context_length``). ``overrides`` go to
    ``open_clip.create_model_and_transforms`` (``output_dict=True``, ``aug_cfg=...``,
    ``force_image_size=...``, or model constructor kwargs such as ``init_logit_bias``).
    """
    cfg = model_config(name)
    base_ctx = int(cfg["text_cfg"].get("context_length", 77))
    stretch_to = None
    if context_length is not None and context_length > base_ctx:
        stretch_to = int(context_length)
    elif context_length is not None and context_length < base_ctx:
        overrides.setdefault("force_context_length", int(context_length))
    own_ckpt = pretrained is not None and _is_local_or_url(pretrained)
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        name, pretrained=None if own_ckpt else pretrained, precision=precision, device=device, **overrides)
    if pretrained is None or own_ckpt:
        _init_left_empty(model)
    tokenizer = get_tokenizer(name, context_length=overrides.get("force_context_length"))
    if own_ckpt:
        state = read_state_dict(pretrained)
        ckpt_ctx = _state_text_positions(model, state)
        if ckpt_ctx is not None and ckpt_ctx > text_context_length(model):
            stretch_to = max(stretch_to or 0, ckpt_ctx)  # trained stretched: stretch first, then load
        if stretch_to:
            stretch_text_positions(model, stretch_to, tokenizer=tokenizer)
            stretch_to = None
        _load_state(model, state)
        model.to(device)
        log.info("loaded weights from %s", pretrained)
    if stretch_to:
        stretch_text_positions(model, stretch_to, tokenizer=tokenizer)
    return model, preprocess_train, preprocess_val, tokenizer


def _init_left_empty(model: nn.Module) -> None:
    """open_clip 3.3 builds CoCa's ``text_decoder.text_projection`` with ``torch.empty`` and never
    initialises it (``MultimodalTransformer.init_parameters`` is not called, and would fail on
    ``self.transformer``). From scratch that is whatever memory held: zeros, 1e24 or NaN, varying
    from run to run (mlfoundations/open_clip#554). Give it the init that method intends."""
    dec = getattr(model, "text_decoder", None)
    proj = getattr(dec, "text_projection", None)
    if isinstance(proj, nn.Parameter):
        with torch.no_grad():
            nn.init.normal_(proj, std=dec.width ** -0.5)


def _load_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a state dict into ``model`` the way open_clip's load_checkpoint does (its conversions,
    positional-embedding resizing and strictness), from memory rather than a local file."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    state = convert_state_dict(model, dict(state))
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    for key in ("logit_scale", "logit_bias"):
        own = getattr(model, key, None)
        if key in state and own is not None and own.ndim != state[key].ndim:
            state[key] = state[key].reshape(own.shape)
    if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None:
        state["logit_bias"] = torch.zeros_like(state["logit_scale"])
    resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)
    model.load_state_dict(state, strict=True)


def _state_text_positions(model: nn.Module, state: dict[str, torch.Tensor]) -> int | None:
    """The text context a state dict was trained with (None if it has no text positions)."""
    for key in ("positional_embedding", "text.positional_embedding"):
        if key in state:
            n = int(state[key].shape[0])
            tower = _text_tower(model)[0]
            extra = 1 if getattr(tower, "cls_emb", None) is not None else 0
            return n - extra
    return None


# -- sizes ----------------------------------------------------------------------------------------

def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def embed_dim(model: nn.Module) -> int:
    """Dimension of the joint embedding space (``encode_image``/``encode_text`` outputs)."""
    m = _unwrap(model)
    proj = getattr(m, "text_projection", None)
    if proj is None and getattr(m, "text", None) is not None:
        proj = getattr(m.text, "text_projection", None)
        if proj is None:
            dim = getattr(m.text, "output_dim", None)
            if dim:
                return int(dim)
    if isinstance(proj, nn.Linear):
        return int(proj.out_features)
    if isinstance(proj, torch.Tensor):
        return int(proj.shape[1])
    return image_dim(m)


def image_dim(model: nn.Module) -> int:
    """Dimension of the image embedding (``encode_image`` output); equals ``embed_dim`` for
    CLIP-style models. Falls back to one forward of a zero image when the tower does not say."""
    m = _unwrap(model)
    dim = getattr(m.visual, "output_dim", None)
    if dim:
        return int(dim)
    proj = getattr(getattr(m.visual, "head", None), "proj", None)  # open_clip's TimmModel
    if isinstance(proj, nn.Linear):
        return int(proj.out_features)
    p = next(m.parameters())
    size = image_size(m)
    was_training = m.visual.training
    m.visual.eval()  # a train-mode forward would move BatchNorm running statistics
    try:
        with torch.no_grad():
            return int(m.encode_image(torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype)).shape[-1])
    finally:
        m.visual.train(was_training)


def image_size(model: nn.Module) -> int:
    """The (square) input resolution of the image tower."""
    size = getattr(_unwrap(model).visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def text_context_length(model: nn.Module) -> int:
    """Tokens per text the text tower takes (the tokenizer's context length)."""
    tower, _ = _text_tower(_unwrap(model))
    return int(getattr(tower, "context_length"))


# -- Long-CLIP ------------------------------------------------------------------------------------

def _text_tower(model: nn.Module) -> tuple[nn.Module, bool]:
    """(module holding positional_embedding/attn_mask/context_length, is_clip_flat)."""
    if hasattr(model, "positional_embedding") and hasattr(model, "token_embedding"):
        return model, True  # open_clip.CLIP keeps the text tower's parts on itself
    text = getattr(model, "text", None)
    if text is not None and hasattr(text, "positional_embedding"):
        return text, False  # CustomTextCLIP / CoCa: open_clip TextTransformer
    raise NotImplementedError(
        f"{type(text).__name__ if text is not None else type(model).__name__} has no learned text positional "
        "embedding (e.g. an HF text tower): Long-CLIP stretching is not supported for it")


def stretch_positions(pos: torch.Tensor, new_len: int, keep: int = LONG_CLIP_KEEP) -> torch.Tensor:
    """Long-CLIP knowledge-preserved stretching of a ``[old_len, width]`` positional table: rows
    ``< keep`` are copied; row ``p >= keep`` takes old coordinate ``keep + (p - keep) / f`` with
    ``f = (new_len - keep) / (old_len - keep)``, linearly interpolated between neighbouring rows
    (extrapolated from the last two rows past the end, as Long-CLIP does for its last rows)."""
    old_len = pos.shape[0]
    if new_len < old_len:
        raise ValueError(f"cannot stretch {old_len} positions down to {new_len}")
    keep = max(0, min(keep, old_len - 2))
    if new_len == old_len:
        return pos.clone()
    src = pos.detach().float()
    factor = (new_len - keep) / (old_len - keep)
    p = torch.arange(keep, new_len, dtype=torch.float64)
    x = keep + (p - keep) / factor
    lo = x.floor().long().clamp(max=old_len - 2)
    frac = (x - lo.double()).float().unsqueeze(1)
    tail = src[lo] + frac * (src[lo + 1] - src[lo])
    return torch.cat([src[:keep], tail], 0).to(pos.dtype)


def _causal_mask(n: int, like: torch.Tensor | None) -> torch.Tensor:
    mask = torch.full((n, n), float("-inf")).triu_(1)
    return mask.to(device=like.device, dtype=like.dtype) if like is not None else mask


def stretch_text_positions(model: nn.Module, new_context_length: int, keep: int = LONG_CLIP_KEEP,
                           tokenizer: Any = None) -> nn.Module:
    """Extend the text tower to ``new_context_length`` tokens (Long-CLIP): stretch its positional
    embedding (see ``stretch_positions``), rebuild the causal mask, update ``context_length``
    (the model's, the tower's, a CoCa decoder's mask) and the ``tokenizer``'s context length if one
    is given. Works for open_clip CLIP, CustomTextCLIP and CoCa text towers, in place; returns the
    model. An HF text tower raises NotImplementedError. Shorter than now is a ValueError."""
    m = _unwrap(model)
    tower, _ = _text_tower(m)
    old_ctx = int(tower.context_length)
    if new_context_length < old_ctx:
        raise ValueError(f"context {new_context_length} is shorter than the model's {old_ctx}")
    extra = 1 if getattr(tower, "cls_emb", None) is not None else 0  # CoCa appends a CLS position
    new_pos = stretch_positions(tower.positional_embedding.data, new_context_length + extra, keep)
    param = nn.Parameter(new_pos.to(tower.positional_embedding.device), requires_grad=tower.positional_embedding.requires_grad)
    tower.positional_embedding = param
    if hasattr(tower, "num_pos"):
        tower.num_pos = new_context_length + extra
    tower.context_length = new_context_length
    if getattr(tower, "attn_mask", None) is not None:
        tower.attn_mask = _causal_mask(new_context_length + extra, tower.attn_mask)
    if tower is not m:
        m.context_length = new_context_length
    decoder = getattr(m, "text_decoder", None)
    if decoder is not None and getattr(decoder, "attn_mask", None) is not None:
        decoder.context_length = new_context_length
        decoder.attn_mask = _causal_mask(new_context_length, decoder.attn_mask)
    if tokenizer is not None and hasattr(tokenizer, "context_length"):
        tokenizer.context_length = new_context_length
    return model
