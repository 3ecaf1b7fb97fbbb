"""The dataset's config.json as pydantic models: teachers (concatenation order, dims), the
augmentation config that param_aug follows, the embedding dtype/format and the generators used."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator, model_validator

FORMAT = "recap-reinforced"
# 2: param_aug in DataCompDR's compressed layout (magnitude values); 1: signed magnitude bins
# indexing AugConfig.ops, which the reader still converts.
VERSION = 2

# torchvision's RandAugment op list, in its _augmentation_space order: also DataCompDR's op_names,
# which paug.json's op_index indexes.
RANDAUGMENT_OPS = ["Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
                   "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize"]
# open_clip.constants.OPENAI_DATASET_MEAN / _STD: DataCompDR's teachers saw images normalised so
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# torchvision's RandomResizedCrop / RandAugment defaults: left out of image_augmentation when equal,
# so a DataCompDR-like config writes DataCompDR's own dict
_RRC_DEFAULTS = {"scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3)}
_RA_DEFAULTS = {"num_ops": 2, "magnitude": 9, "num_magnitude_bins": 31}


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
    hflip: float = Field(0.0, ge=0, le=1, description="horizontal flip probability (0: no flip in param_aug)")
    n_aug: int = Field(10, ge=1, description="stored augmentations per image")
    num_ops: int = Field(2, ge=0, description="RandAugment ops per augmentation")
    num_magnitude_bins: int = Field(31, ge=2)
    magnitude: int | None = Field(9, ge=0, description="fixed magnitude bin (torchvision's RandAugment); "
                                                        "None: a bin drawn uniformly per op")
    ops: list[str] = Field(default_factory=lambda: list(RANDAUGMENT_OPS),
                           description="RandAugment ops to draw from (torchvision names); paug.json's "
                                       "op_index indexes RANDAUGMENT_OPS whatever this subset")
    mean: tuple[float, float, float] = Field(OPENAI_MEAN, description="normalisation of the teachers' input")
    std: tuple[float, float, float] = Field(OPENAI_STD, description="normalisation of the teachers' input")

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

    def image_augmentation(self) -> dict[str, dict[str, Any]]:
        """This config in ml-mobileclip's ``reinforce.image_augmentation`` vocabulary (DataCompDR's
        config.json): its ``compose_from_config`` builds the transforms whose ``compress`` layout
        param_aug follows and whose ``reapply`` replays it as ``replay_augmentation`` does."""
        rrc: dict[str, Any] = {"interpolation": self.interpolation, "size": self.image_size}
        rrc.update({k: list(getattr(self, k)) for k, d in _RRC_DEFAULTS.items() if tuple(getattr(self, k)) != d})
        out: dict[str, dict[str, Any]] = {"random_resized_crop": rrc}
        if self.hflip:
            out["random_horizontal_flip"] = {"p": self.hflip}
        # RandAugment always runs (p 1): with no ops it stores an empty list, so the layout never varies.
        # num_ops must be recorded: reapply replays exactly num_ops entries.
        ra: dict[str, Any] = {"enable": True, "p": 1.0}
        ra.update({k: getattr(self, k) for k, d in _RA_DEFAULTS.items()
                   if getattr(self, k) is not None and getattr(self, k) != d})
        out["rand_augment"] = ra
        out["to_rgb"] = {"enable": True}
        out["to_tensor"] = {"enable": True}
        out["normalize"] = {"mean": list(self.mean), "std": list(self.std)}
        return out


class ReinforcedConfig(_Strict):
    format: Literal["recap-reinforced"] = FORMAT
    version: int = Field(VERSION, description="format version (the reader converts older ones)")
    teachers: list[TeacherConfig] = Field(default_factory=list, description="in concatenation order")
    aug: AugConfig = Field(default_factory=AugConfig)
    emb_dtype: Literal["float16", "float32", "bfloat16"] = "float16"
    emb_format: Literal["npz", "pth.gz"] = Field("npz", description="member holding the embeddings: npz, or "
                                                                     "DataCompDR's gzipped torch pickle")
    generators: dict[str, Any] = Field(default_factory=dict,
                                       description="captioner/LLM names, generation params, prompt hashes")

    @field_validator("version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if not 1 <= v <= VERSION:
            raise ValueError(f"format version {v} is not one this reader knows (1..{VERSION}); a newer recap "
                             f"wrote it?")
        return v

    @model_validator(mode="before")
    @classmethod
    def _derived_reinforce(cls, data: Any) -> Any:
        """``reinforce`` is written from ``aug`` for DataCompDR readers; on the way in it must still agree
        with ``aug``, which is what replay follows."""
        if not isinstance(data, dict) or "reinforce" not in data:
            return data
        data = dict(data)
        given = data.pop("reinforce")
        if not isinstance(data.get("version", VERSION), int) or data.get("version", VERSION) > VERSION:
            return data  # a newer layout: the version's own error is the one to report
        try:
            want = AugConfig.model_validate(data.get("aug") or {}).image_augmentation()
        except ValueError:
            return data  # aug's own error is the one to report
        if given != {"image_augmentation": want}:
            raise ValueError(f"reinforce {given!r} disagrees with aug (it is derived from aug: edit aug); "
                             f"aug gives {{'image_augmentation': {want!r}}}")
        return data

    @model_validator(mode="after")
    def _emb_dtype_fits(self) -> ReinforcedConfig:
        if self.emb_dtype == "bfloat16" and self.emb_format != "pth.gz":
            raise ValueError("emb_dtype bfloat16 needs emb_format 'pth.gz' (npz has no bfloat16)")
        return self

    @computed_field(description="ml-mobileclip's reinforce.image_augmentation, derived from aug")
    @property
    def reinforce(self) -> dict[str, Any]:
        return {"image_augmentation": self.aug.image_augmentation()}

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
