"""The dataset's config.json as pydantic models: teachers (concatenation order, dims), the
augmentation config that param_aug indexes, the embedding dtype and the generators used."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FORMAT = "recap-reinforced"
VERSION = 1

# torchvision's RandAugment op list, in its _augmentation_space order (the default op table).
RANDAUGMENT_OPS = ["Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
                   "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize"]


class ReinforcedFormatError(ValueError):
    """A sample or dataset that does not fit the format; the message names the uid/field/path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TeacherConfig(_Strict):
    name: str = Field(..., description="open_clip model name (or a label for another encoder)")
    pretrained: str | None = Field(None, description="pretrained tag or checkpoint path")
    dim: int = Field(..., ge=1, description="embedding width of this teacher's slice")


class AugConfig(_Strict):
    image_size: int = Field(224, ge=1, description="output side the teacher embeddings were computed at")
    scale: tuple[float, float] = Field((0.08, 1.0), description="RandomResizedCrop area range")
    ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="RandomResizedCrop aspect range")
    interpolation: Literal["nearest", "bilinear", "bicubic"] = "bilinear"
    n_aug: int = Field(10, ge=1, description="stored augmentations per image")
    num_ops: int = Field(2, ge=0, description="RandAugment ops per augmentation")
    num_magnitude_bins: int = Field(31, ge=2)
    magnitude: int | None = Field(9, ge=0, description="fixed magnitude bin (torchvision's RandAugment); "
                                                        "None: a bin drawn uniformly per op")
    ops: list[str] = Field(default_factory=lambda: list(RANDAUGMENT_OPS),
                           description="op table that op_idx indexes (torchvision RandAugment names)")

    @field_validator("ops")
    @classmethod
    def _known_ops(cls, v: list[str]) -> list[str]:
        bad = [o for o in v if o not in RANDAUGMENT_OPS]
        if bad:
            raise ValueError(f"unknown RandAugment ops {bad}; known: {RANDAUGMENT_OPS}")
        if not v:
            raise ValueError("ops must not be empty")
        return v

    @model_validator(mode="after")
    def _ranges(self) -> AugConfig:
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        if self.magnitude is not None and self.magnitude >= self.num_magnitude_bins:
            raise ValueError(f"magnitude {self.magnitude} must be < num_magnitude_bins {self.num_magnitude_bins}")
        return self


class ReinforcedConfig(_Strict):
    format: Literal["recap-reinforced"] = FORMAT
    version: int = VERSION
    teachers: list[TeacherConfig] = Field(default_factory=list, description="in concatenation order")
    aug: AugConfig = Field(default_factory=AugConfig)
    emb_dtype: Literal["float16", "float32"] = "float16"
    generators: dict[str, Any] = Field(default_factory=dict,
                                       description="captioner/LLM names, generation params, prompt hashes")

    @property
    def dim(self) -> int:
        """D: the width of every embedding row (sum of teacher dims); 0 without teachers."""
        return sum(t.dim for t in self.teachers)

    def slices(self) -> list[tuple[str, slice]]:
        out, at = [], 0
        for t in self.teachers:
            out.append((t.name, slice(at, at + t.dim)))
            at += t.dim
        return out


# Augmentation of plain (non-reinforced) shards: open_clip's training RandomResizedCrop, no RandAugment.
PLAIN_AUG = AugConfig(scale=(0.9, 1.0), interpolation="bicubic", n_aug=1, num_ops=0)
