"""param_aug: the stored augmentations of one image, sampled deterministically and replayed exactly.

One augmentation is in DataCompDR's compressed layout, i.e. what ml-mobileclip's ``Compose.compress``
emits for the transforms of ``AugConfig.image_augmentation()``, in its order::

    [[i, j, h, w], [[op_index, magnitude], ...]]           (aug.hflip == 0)
    [[i, j, h, w], flip, [[op_index, magnitude], ...]]     (aug.hflip > 0; flip a bool)

(i, j, h, w) is the RandomResizedCrop box (top, left, height, width) in pixels of the stored image;
op_index indexes RANDAUGMENT_OPS (DataCompDR's op_names); magnitude is the signed value
torchvision's RandAugment applies, as it computes it for the output size ``aug.image_size``
(ShearX 0.09, Rotate 9.0, Posterize 7.0 at bin 9 of 31), so replay needs no table.

Format version 1 stored ``[op_idx, mag_bin]`` instead (op_idx into ``aug.ops``, a signed bin);
``upgrade_v1`` turns such an entry into this layout. torchvision is imported on first use: readers
that never replay need not pay for it."""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from recap.pipeline import rng
from recap.pipeline.reinforced.config import RANDAUGMENT_OPS, AugConfig, ReinforcedFormatError

@lru_cache(maxsize=64)
def _space(num_bins: int, size: tuple[int, int]) -> dict[str, tuple[list[float], bool]]:
    """Op -> (magnitudes per bin, signed), exactly as torchvision's RandAugment computes them (its
    float32 values, which is what DataCompDR stored)."""
    from torchvision.transforms import RandAugment

    space = RandAugment()._augmentation_space(num_bins, size)
    return {k: ([float(x) for x in m.reshape(-1).tolist()] if m.ndim > 0 else [], s) for k, (m, s) in space.items()}


def _signed(op: str) -> bool:
    return _space(31, (224, 224))[op][1]


def _magnitude(aug: AugConfig, op: str, mag_bin: int) -> float:
    """The value of a signed magnitude bin at the config's output size; 0.0 for ops without one."""
    mags, _ = _space(aug.num_magnitude_bins, (aug.image_size, aug.image_size))[op]
    m = mags[abs(mag_bin)] if mags else 0.0
    return -m if mag_bin < 0 else m


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
                     stage: str = "augment") -> list:
    """``n_aug`` augmentations for one image of ``width`` x ``height``: a pure function of
    (seed, stage, uid) and the config, so independent of call order, batch and worker."""
    if width < 1 or height < 1:
        raise ReinforcedFormatError(f"sample {uid}: image size {width}x{height} has no pixels")
    n = aug_cfg.n_aug if n_aug is None else n_aug
    g = rng.generator(seed, f"{stage}/paug", uid)
    out = []
    for _ in range(n):
        entry: list[Any] = [_crop_box(g, width, height, aug_cfg.scale, aug_cfg.ratio)]
        if aug_cfg.hflip:  # drawn only when enabled, so configs without it keep their streams
            entry.append(bool(g.uniform() < aug_cfg.hflip))
        ops = []
        for _ in range(aug_cfg.num_ops):
            name = aug_cfg.ops[int(g.integers(len(aug_cfg.ops)))]
            mag = aug_cfg.magnitude if aug_cfg.magnitude is not None else int(g.integers(aug_cfg.num_magnitude_bins))
            m = _magnitude(aug_cfg, name, mag)
            if _signed(name) and int(g.integers(2)):
                m = -m
            ops.append([RANDAUGMENT_OPS.index(name), m])
        entry.append(ops)
        out.append(entry)
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parts(param: Any, aug_cfg: AugConfig) -> tuple[Sequence[int], bool, Sequence[Sequence[Any]]]:
    """(box, flip, ops) of one entry; ValueError unless it has the layout and values replay needs."""
    if not isinstance(param, (list, tuple)) or len(param) != (3 if aug_cfg.hflip else 2):
        raise ValueError("wrong number of parts")
    box, ops = param[0], param[-1]
    flip = param[1] if aug_cfg.hflip else False
    if not isinstance(flip, bool):
        raise ValueError("flip must be a bool")
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(_is_int(x) for x in box)
            and box[2] > 0 and box[3] > 0):
        raise ValueError("bad box")
    # ml-mobileclip's RandAugment.reapply replays exactly num_ops entries
    if not isinstance(ops, (list, tuple)) or len(ops) != aug_cfg.num_ops:
        raise ValueError("wrong number of ops")
    for op in ops:
        if not isinstance(op, (list, tuple)) or len(op) != 2:
            raise ValueError("bad op")
        idx, mag = op
        if not (_is_int(idx) and 0 <= idx < len(RANDAUGMENT_OPS)):
            raise ValueError("bad op_index")
        if not ((_is_int(mag) or isinstance(mag, float)) and math.isfinite(mag)):
            raise ValueError("bad magnitude")
        if RANDAUGMENT_OPS[idx] == "Posterize" and not 0 <= int(mag) <= 8:
            raise ValueError("Posterize keeps 0..8 bits")
    return box, flip, ops


def check_param(param: Any, aug_cfg: AugConfig, where: str = "param_aug") -> None:
    """Raise ReinforcedFormatError unless ``param`` is one entry in the layout above for this config."""
    try:
        _parts(param, aug_cfg)
    except (TypeError, ValueError) as e:
        flip = "flip, " if aug_cfg.hflip else ""
        raise ReinforcedFormatError(
            f"{where}: expected [[i, j, h, w], {flip}[[op_index, magnitude] x {aug_cfg.num_ops}]] with op_index < "
            f"{len(RANDAUGMENT_OPS)} ({e}), got {param!r}") from None


def upgrade_v1(param: Any, aug_cfg: AugConfig) -> list:
    """A format-version-1 entry ``[[i, j, h, w], [[op_idx, mag_bin], ...]]`` in this layout: op_idx
    (into ``aug.ops``) becomes the RANDAUGMENT_OPS index, the signed bin its value at the config's
    output size, the size the teachers saw. ReinforcedFormatError for an entry version 1 refused."""
    try:
        box, ops = param
        out_ops = []
        for idx, mag in ops:
            ok = _is_int(idx) and _is_int(mag) and 0 <= idx < len(aug_cfg.ops) \
                and abs(mag) < aug_cfg.num_magnitude_bins and (mag >= 0 or _signed(aug_cfg.ops[idx]))
            if not ok:
                raise ValueError
            name = aug_cfg.ops[idx]
            out_ops.append([RANDAUGMENT_OPS.index(name), _magnitude(aug_cfg, name, mag)])
        entry = [list(box), out_ops]
    except (TypeError, ValueError):
        raise ReinforcedFormatError(f"version-1 param_aug entry {param!r}: expected [[i, j, h, w], [[op_idx, "
                                    f"mag_bin], ...]] with op_idx < {len(aug_cfg.ops)}") from None
    if aug_cfg.hflip:  # version 1 had no flip; a config that asks for one has none stored
        entry.insert(1, False)
    return entry


def replay_augmentation(image, param: Sequence, aug: AugConfig, size: int | None = None):
    """Replay one stored augmentation on a PIL image (RGB); a PIL image of ``size`` (default
    ``aug.image_size``) square, with the pixels of ml-mobileclip's ``reapply`` for the same params.

    As there: torchvision's ``resized_crop(i, j, h, w)`` with the config's interpolation
    (antialiased), the flip if stored, then each op through torchvision's ``_apply_op`` with the
    stored magnitude, NEAREST, fill None (RandAugment's defaults). At another ``size`` the stored
    magnitudes apply unchanged (translations stay in pixels), as ``reapply(size=...)`` does in
    ml-mobileclip's open_clip training. Pure: the same (image, param) give the same pixels."""
    import torchvision.transforms.functional as F
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.autoaugment import _apply_op

    (i, j, h, w), flip, ops = _parts(param, aug)
    out_size = int(size or aug.image_size)
    mode = {"nearest": InterpolationMode.NEAREST, "bilinear": InterpolationMode.BILINEAR,
            "bicubic": InterpolationMode.BICUBIC}[aug.interpolation]
    out = F.resized_crop(image, i, j, h, w, [out_size, out_size], interpolation=mode, antialias=True)
    if flip:
        out = F.hflip(out)
    for idx, mag in ops:
        out = _apply_op(out, RANDAUGMENT_OPS[idx], float(mag), interpolation=InterpolationMode.NEAREST, fill=None)
    return out
