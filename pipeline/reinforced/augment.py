"""param_aug: the stored augmentations of one image, sampled deterministically and replayed exactly.

One augmentation is ``[[i, j, h, w], [[op_idx, mag_bin], ...]]``: a RandomResizedCrop box in pixels
of the stored image, then RandAugment ops from ``AugConfig.ops`` with signed magnitude bins.
torchvision is imported on first use: readers that never replay need not pay for it."""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from recap.pipeline import rng
from recap.pipeline.reinforced.config import AugConfig, ReinforcedFormatError


@lru_cache(maxsize=64)
def _space(num_bins: int, size: tuple[int, int]) -> dict[str, tuple[list[float], bool]]:
    """Op -> (magnitudes per bin, signed), exactly as torchvision's RandAugment computes them."""
    from torchvision.transforms import RandAugment

    space = RandAugment()._augmentation_space(num_bins, size)
    return {k: ([float(x) for x in m.reshape(-1).tolist()] if m.ndim > 0 else [], s) for k, (m, s) in space.items()}


def _signed(op: str) -> bool:
    return _space(31, (224, 224))[op][1]


def _crop_box(g: np.random.Generator, width: int, height: int, scale: Sequence[float],
              ratio: Sequence[float]) -> list[int]:
    """torchvision's RandomResizedCrop.get_params, drawing from a numpy Generator."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * float(g.uniform(scale[0], scale[1]))
        aspect = math.exp(float(g.uniform(log_ratio[0], log_ratio[1])))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(g.integers(0, height - h + 1))
            j = int(g.integers(0, width - w + 1))
            return [i, j, h, w]
    in_ratio = width / height  # fallback: central crop
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return [(height - h) // 2, (width - w) // 2, h, w]


def sample_param_aug(width: int, height: int, aug_cfg: AugConfig, seed: int, uid: str, n_aug: int | None = None,
                     stage: str = "reinforce") -> list:
    """``n_aug`` augmentation parameters for one image of ``width`` x ``height``: a pure function of
    (seed, stage, uid) and the config, so independent of call order, batch and worker."""
    if width < 1 or height < 1:
        raise ReinforcedFormatError(f"sample {uid}: image size {width}x{height} has no pixels")
    n = aug_cfg.n_aug if n_aug is None else n_aug
    g = rng.generator(seed, f"{stage}/paug", uid)
    out = []
    for _ in range(n):
        box = _crop_box(g, width, height, aug_cfg.scale, aug_cfg.ratio)
        ops = []
        for _ in range(aug_cfg.num_ops):
            idx = int(g.integers(len(aug_cfg.ops)))
            mag = aug_cfg.magnitude if aug_cfg.magnitude is not None else int(g.integers(aug_cfg.num_magnitude_bins))
            if _signed(aug_cfg.ops[idx]) and int(g.integers(2)):
                mag = -mag
            ops.append([idx, int(mag)])
        out.append([box, ops])
    return out


def _interp(name: str):
    from torchvision.transforms import InterpolationMode

    return {"nearest": InterpolationMode.NEAREST, "bilinear": InterpolationMode.BILINEAR,
            "bicubic": InterpolationMode.BICUBIC}[name]


def check_param(param: Any, aug_cfg: AugConfig, where: str = "param_aug") -> None:
    """Raise ReinforcedFormatError unless ``param`` is ``[[i, j, h, w], [[op_idx, mag_bin], ...]]``."""
    try:
        box, ops = param
        ok = len(box) == 4 and all(isinstance(x, int) for x in box) and box[2] > 0 and box[3] > 0
        for op in ops:
            idx, mag = op
            ok = ok and isinstance(idx, int) and isinstance(mag, int) and 0 <= idx < len(aug_cfg.ops) \
                and abs(mag) < aug_cfg.num_magnitude_bins and (mag >= 0 or _signed(aug_cfg.ops[idx]))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ReinforcedFormatError(f"{where}: expected [[i, j, h, w], [[op_idx, mag_bin], ...]] with op_idx < "
                                    f"{len(aug_cfg.ops)} and |mag_bin| < {aug_cfg.num_magnitude_bins}, got {param!r}")


def apply_param_aug(img, param: Sequence, aug_cfg: AugConfig, image_size: int | None = None):
    """Replay one stored augmentation on a PIL image; returns a PIL image of ``image_size`` (default
    ``aug_cfg.image_size``) square. Crop: torchvision ``resized_crop(i, j, h, w)`` with the config's
    interpolation (antialiased); then each op through torchvision's ``_apply_op`` with the magnitude
    torchvision's RandAugment would use for that bin at the output size (NEAREST, fill 0, as
    RandAugment's defaults). Pure: the same (image, param) gives the same pixels every time."""
    import torchvision.transforms.functional as F
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.autoaugment import _apply_op

    size = int(image_size or aug_cfg.image_size)
    (i, j, h, w), ops = param
    out = F.resized_crop(img, int(i), int(j), int(h), int(w), [size, size], interpolation=_interp(aug_cfg.interpolation),
                         antialias=True)
    space = _space(aug_cfg.num_magnitude_bins, (size, size))
    for idx, mag in ops:
        name = aug_cfg.ops[int(idx)]
        mags, _ = space[name]
        magnitude = mags[abs(int(mag))] if mags else 0.0
        if mag < 0:
            magnitude = -magnitude
        out = _apply_op(out, name, magnitude, interpolation=InterpolationMode.NEAREST, fill=None)
    return out
