"""CLIP scoring: embed each sample's image and caption with one image–text model and write their
cosine, ``clip_score`` (DataComp's CLIP score), and with ``store_embeddings`` both embeddings
(float16) for the stages after it.

Images come as bytes (``jpg``, whatever the format) and are decoded here, made RGB (alpha matted
on white as the download stage's resizer does, 16-bit scaled to 8, palette and CMYK converted),
then go through the model's own eval transform. EXIF orientation is the source's business (the
download stage applies it before storing the image). Captions longer than the tokenizer's context
are truncated, as the model always does, and noted (``caption_truncated_tokens``).

Drops: ``decode_error`` (no decoder takes the bytes, or they are truncated), ``transform_error``
(the image decodes but cannot become the model's input), ``nonfinite_embedding`` (NaN or inf in
either embedding: a score from it would poison any quantile downstream).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from pydantic import ConfigDict, Field, ValidationInfo, field_validator

from recap.models.encoders import EncoderError, EncoderSpec, Precision
from recap.pipeline.pixels import bounded_aspect, decode, to_rgb
from recap.pipeline.stage import IMAGE_COLUMN, LocalPath, MapStage, StageConfig
from recap.pipeline.stage_data import StageData
from recap.pipeline.verdicts import verdicts

_SCORE_BINS = 2000  # clip_score histogram over [-1, 1] for `recap inspect`: quantiles to 0.001


class ClipConfig(StageConfig):
    # `model_config` is pydantic's own attribute name, so the field has another name and the alias
    # the job file uses; dumps (manifest, config hash) use the alias too.
    model_config = ConfigDict(serialize_by_alias=True)

    config_file: LocalPath | None = Field(None, alias="model_config",
                                          description="an open_clip model-config JSON for a custom model; "
                                                      "`model` is then only a label")
    model: str = Field(..., description="open_clip model name (ViT-B-32), bundled config (recap-tiny) "
                                        "or hf-hub:ORG/NAME")
    pretrained: str | None = Field(..., description="open_clip pretrained tag, checkpoint path or URL, "
                                                    "or null (random init)")
    precision: Precision = Field("fp32", description="fp32, or bf16 / fp16 autocast")
    store_embeddings: bool = Field(True, description="write image_emb and text_emb (float16)")

    @field_validator("config_file")
    @classmethod
    def _config_reads(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from recap.models.encoders import read_model_config

        if "://" not in v:
            v = str(Path(v).resolve())  # workers in another directory (a cluster) read the same file
        try:
            read_model_config(v)
        except EncoderError as e:
            raise ValueError(str(e)) from None
        return v

    @field_validator("model")
    @classmethod
    def _model_known(cls, v: str, info: ValidationInfo) -> str:
        if "config_file" not in info.data:
            return v  # the model config's own error says what is wrong
        from recap.models.encoders import check_model

        try:
            check_model(v, info.data["config_file"])
        except EncoderError as e:
            raise ValueError(str(e)) from None
        return v

    @field_validator("pretrained")
    @classmethod
    def _pretrained_loads(cls, v: str | None, info: ValidationInfo) -> str | None:
        if "config_file" not in info.data or "model" not in info.data:
            return v
        from recap.models.encoders import check_pretrained

        try:
            return check_pretrained(info.data["model"], v, info.data["config_file"])
        except EncoderError as e:
            raise ValueError(str(e)) from None

    def spec(self) -> EncoderSpec:
        return EncoderSpec(self.model, self.pretrained, self.config_file)


def _shape(item) -> tuple:
    return tuple(_shape(x) for x in item) if isinstance(item, tuple) else tuple(item.shape)


# -- the stage ------------------------------------------------------------------------------------

class ClipStage(MapStage):
    name = "clip"
    Config = ClipConfig
    default_batch_size = 256

    def reads(self) -> tuple[str, ...]:
        return (IMAGE_COLUMN, "caption")

    def writes(self) -> tuple[str, ...]:
        return ("clip_score", "image_emb", "text_emb") if self.config.store_embeddings else ("clip_score",)

    def setup(self) -> None:
        from PIL import Image

        from recap.models.encoders import load_encoder

        cfg: ClipConfig = self.config
        try:
            self.encoder = load_encoder(cfg.spec(), precision=cfg.precision)
        except EncoderError as e:
            raise EncoderError(e.field, f"{self.ctx.stage}.{e.field}: {e}") from e
        # what a well-formed input looks like: anything else would break the batch's stack
        self._input_shape = _shape(self.encoder.preprocess(Image.new("RGB", (48, 40), (127, 127, 127))))

    def teardown(self) -> None:
        encoder = getattr(self, "encoder", None)
        if encoder is not None:
            encoder.close()
            self.encoder = None

    def _prepare(self, data: bytes | None) -> tuple[object | None, str | None, str | None]:
        """(model input, drop reason, detail) for one image."""
        img, why = decode(data)
        if img is None:
            return None, "decode_error", why
        try:
            item = self.encoder.preprocess(to_rgb(bounded_aspect(img)))
        except Exception as e:  # noqa: BLE001 - one bad image never costs the batch
            what = f"{img.format} {img.mode} {img.width}x{img.height}"
            return None, "transform_error", f"{what}: {type(e).__name__}: {e}"[:300]
        if _shape(item) != self._input_shape:
            return None, "transform_error", f"the transform gave shape {_shape(item)}, not {self._input_shape}"
        return item, None, None

    def process(self, batch: pa.Table) -> pa.Table:
        n, dim = batch.num_rows, self.encoder.dim
        captions = [c or "" for c in batch.column("caption").to_pylist()]
        drops: list[str | None] = [None] * n
        details: list[str | None] = [None] * n
        notes: list[str | None] = [None] * n
        items = {}
        for i, data in enumerate(batch.column(IMAGE_COLUMN).to_pylist()):
            item, drops[i], details[i] = self._prepare(data)
            if item is not None:
                items[i] = item
        rows = np.array(sorted(items), dtype=np.int64)
        img = np.full((n, dim), np.nan, np.float32)
        txt = np.full((n, dim), np.nan, np.float32)
        if len(rows):
            img[rows] = self.encoder.encode_preprocessed([items[i] for i in rows])
            txt[rows], truncated = self.encoder.encode_texts([captions[i] for i in rows])
            for i in rows[truncated]:
                notes[i] = "caption_truncated_tokens"
                details[i] = f"more than {self.encoder.context_length} tokens"
        score = np.einsum("ij,ij->i", img, txt).astype(np.float32)
        bad_img, bad_txt = ~np.isfinite(img).all(1), ~np.isfinite(txt).all(1)
        for i in rows[(bad_img | bad_txt)[rows]] if len(rows) else ():
            drops[i], notes[i] = "nonfinite_embedding", None
            details[i] = " and ".join(w for w, bad in (("image", bad_img[i]), ("text", bad_txt[i])) if bad)
        kept = np.array([d is None for d in drops], dtype=bool)
        columns = {"clip_score": pa.array(score, pa.float32(), mask=~kept)}
        if self.config.store_embeddings:
            columns["image_emb"] = _fixed_list(img, kept)
            columns["text_emb"] = _fixed_list(txt, kept)
        return verdicts(batch.column("uid"), columns, drop=drops, detail=details, note=notes)

    # -- recap inspect --------------------------------------------------------------------------
    @classmethod
    def summarize(cls, data: StageData) -> dict | None:
        hist = np.zeros(_SCORE_BINS, np.int64)
        total = 0.0
        for shard in range(data.n_shards):
            table = data.kept(shard, ["clip_score"])
            if table is None or not table.num_rows:
                continue
            s = table.column("clip_score").to_numpy(zero_copy_only=False).astype(np.float64)
            total += float(s.sum())
            hist += np.bincount(_score_bins(s), minlength=_SCORE_BINS)
        n = int(hist.sum())
        if not n:
            return None
        cum = np.cumsum(hist)
        qs = {f"p{int(q * 100):02d}": round(float(_bin_centre(int(np.searchsorted(cum, q * n)))), 3)
              for q in (0.05, 0.25, 0.5, 0.75, 0.95)}
        return {"scored": n, "mean": round(total / n, 4), "quantiles": qs}

    @classmethod
    def summary_lines(cls, summary: dict) -> list[str]:
        q = summary["quantiles"]
        return [f"  {cls.name}: clip_score of {summary['scored']} kept samples: mean {summary['mean']:.4f}, "
                + ", ".join(f"{k} {v:.3f}" for k, v in q.items())]


def _fixed_list(rows: np.ndarray, kept: np.ndarray) -> pa.FixedSizeListArray:
    values = np.where(kept[:, None], rows, 0).astype(np.float16)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), pa.float16()), rows.shape[1],
                                             mask=pa.array(~kept))


def _score_bins(s: np.ndarray) -> np.ndarray:
    return np.clip(((s + 1.0) / 2.0 * _SCORE_BINS).astype(np.int64), 0, _SCORE_BINS - 1)


def _bin_centre(b: int) -> float:
    return (b + 0.5) / _SCORE_BINS * 2.0 - 1.0
