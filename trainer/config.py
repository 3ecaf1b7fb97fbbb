"""``recap train`` configuration: one YAML file, validated before anything runs, the same
conventions as job files (unknown keys are errors; `--set a.b=c` overrides; errors name the field)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    path: str = Field(..., description="reinforced dataset directory (or plain img2dataset shards): local path or fsspec URL")
    text_choice: Literal["gt", "uniform"] = Field("gt", description="GT caption, or uniform over GT + syn_text")
    syn_weights: dict[str, float] | None = Field(None, description="per-source weights for uniform choice (`gt`, `caption`, `rewrite`, ...)")
    online_balance: bool = Field(False, description="MetaCLIP online balancing: a sample enters an epoch with its balance_prob")
    resampled: bool = False
    batch_size: int = Field(32, ge=1, description="per rank")
    workers: int = Field(0, ge=0, description="DataLoader workers per rank")
    image_hard_negatives: int = Field(0, ge=0, description="pull up to this many of each sample's neg.hard_neg_uids "
                                                           "(kNN image neighbours) into its batch, from the shuffle buffer")
    shuffle_buffer: int = Field(1000, ge=1, description="samples per DataLoader worker in the shuffle buffer")


class ModelConfig(_Strict):
    name: str = Field("recap-tiny", description="any open_clip model name, or one of trainer/model_configs")
    pretrained: str | None = Field(None, description="open_clip pretrained tag or a checkpoint path to start from")
    context_length: int | None = Field(None, ge=8, description="text context; above the model's, positions are stretched (Long-CLIP)")
    grad_checkpointing: bool = False


class ShortTagConfig(_Strict):
    weight: float = Field(1.0, gt=0, description="added to the loss: weight x BCE over labelled (sample, tag) pairs")
    vocab: str | None = Field(None, description="JSON list of tags; none: the most frequent short_positive tags of the data")
    max_tags: int = Field(1000, ge=1, description="vocabulary size when made from the data")
    min_count: int = Field(1, ge=1, description="samples a tag needs to enter a vocabulary made from the data")


class LossConfig(_Strict):
    kind: Literal["clip", "siglip", "distill", "coca"] = "clip"
    lambda_distill: float = Field(1.0, ge=0, le=1, description="distill: weight of the KL term (MobileCLIP's λ)")
    teacher_logit_scale: float = Field(100.0, gt=0)
    teacher_dims: list[int] | None = Field(None, description="distill: the teachers' embedding dims expected in the shards")
    hard_negatives: bool = Field(False, description="append neg_text_short embeddings as extra text columns (NegCLIP)")
    negatives_per_sample: int = Field(1, ge=1, description="with hard_negatives: how many of a sample's stored "
                                      "neg_text_short enter each step (a seeded draw by epoch and uid; NegCLIP uses 1)")
    long_negatives: bool = Field(False, description="with hard_negatives: also the long negative (neg_text_long, or "
                                                    "HQ-CLIP's long_negative) as one more column")
    short_tags: ShortTagConfig | None = Field(None, description="HQ-CLIP's short-tag loss: a multi-label head on the "
                                                                 "image embedding over syn.json's short_positive / short_negative")
    caption_loss_weight: float = 2.0
    clip_loss_weight: float = 1.0


class OptimConfig(_Strict):
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup: int = Field(10, ge=0, description="warmup steps (linear)")
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float | None = Field(1.0, gt=0)
    accum: int = Field(1, ge=1, description="gradient accumulation: micro-batches per optimizer step")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="autocast precision (GPU or CPU); fp16 adds a gradient scaler")
    fused: bool = Field(True, description="fused AdamW (one kernel over all parameters; CPU and CUDA): "
                                          "5x faster steps than the per-tensor loop for small models")


class WandbConfig(_Strict):
    project: str
    entity: str | None = None
    mode: Literal["online", "offline", "disabled"] = "online"
    tags: list[str] = Field(default_factory=list)


class TrainConfig(_Strict):
    name: str = "train"
    seed: int = 0
    output: str = Field(..., description="run directory: checkpoints/step_N.pt, metrics.csv, tensorboard/")
    steps: int = Field(..., ge=1, description="optimizer steps in all")
    save_every: int = Field(0, ge=0, description="checkpoint every N steps (0 = only at the end)")
    log_every: int = Field(10, ge=1)
    threads: int | None = Field(None, ge=1, description="torch intra-op threads per process")
    deterministic: bool = Field(False, description="deterministic kernels (torch.use_deterministic_algorithms, "
                                                   "cuDNN deterministic, a fixed cuBLAS workspace): on GPUs, what "
                                                   "makes a resumed run equal an uninterrupted one bit for bit; slower")
    data: DataConfig
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    eval_data: str | None = Field(None, description="labelled set (recap eval's format) scored on rank 0 at the end "
                                                    "and every eval_every steps: eval.jsonl, TensorBoard, W&B")
    eval_every: int = Field(0, ge=0, description="steps between evaluations on eval_data (0: at the end only)")
    tensorboard: bool = True
    wandb: WandbConfig | None = Field(None, description="also log to Weights & Biases (pip install wandb); "
                                                        "a resumed run continues the same W&B run")

    @model_validator(mode="after")
    def _coca_needs_coca(self) -> TrainConfig:
        if (self.loss.kind == "coca") != ("coca" in self.model.name.lower()):
            raise ValueError(f"loss.kind {self.loss.kind!r} does not fit model {self.model.name!r} "
                             "(CoCa models train with the coca loss, and only they)")
        return self


class TrainConfigError(ValueError):
    pass


def _set(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def load_train_config(path: str | Path, overrides: list[str] = (), output: str | None = None) -> TrainConfig:
    """Parse, apply `--set` overrides (YAML values) and validate; errors name file, field and value."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise TrainConfigError(f"{path}: {e}") from e
    if not isinstance(raw, dict):
        raise TrainConfigError(f"{path}: a train file is a mapping of fields (got {type(raw).__name__})")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise TrainConfigError(f"--set {item!r}: expected KEY=VALUE")
        _set(raw, key.strip(), yaml.safe_load(value))
    if output:
        raw["output"] = output
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            where = ".".join(str(x) for x in err["loc"]) or "(top level)"
            got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
            lines.append(f"{path}: {where}: {err['msg']}{got}")
        raise TrainConfigError("\n".join(lines)) from None
