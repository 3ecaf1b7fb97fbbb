"""Basic filtering (DataComp's "basic" baseline, generalised): image size and aspect ratio,
caption length, camera-filename captions, and caption language (py3langid, offline)."""
from __future__ import annotations

import math
import re
import pyarrow as pa
from pydantic import Field

from recap.pipeline.stage import MapStage, StageConfig
from recap.pipeline.verdicts import verdicts

_FILENAME = re.compile(r"^\s*(?:IMG|DSC|DSCN|DCIM|PXL|MVIMG|Screenshot|image|photo|pic)?[\s_\-]*\d{2,}[\w\-]*(?:\.(?:jpe?g|png|gif|webp|heic|tiff?))?\s*$"
                       r"|^\s*[\w\-]+\.(?:jpe?g|png|gif|webp|heic|tiff?)\s*$", re.IGNORECASE)


class BasicConfig(StageConfig):
    min_image_size: int = Field(0, ge=0, description="drop when the original's shorter side is smaller")
    max_aspect_ratio: float = Field(math.inf, gt=0, description="drop when long side / short side is larger")
    min_caption_words: int = Field(1, ge=0)
    drop_filename_captions: bool = Field(True, description="drop captions that are only a file name (IMG_0412.JPG)")
    languages: list[str] = Field(default_factory=list, description="keep only these caption languages; [] keeps all")
    min_language_score: float = Field(0.0, ge=0, le=1, description="with `languages`: minimum langid probability")


class BasicStage(MapStage):
    name = "basic"
    Config = BasicConfig
    default_batch_size = 4096

    def reads(self) -> tuple[str, ...]:
        return ("caption", "original_width", "original_height")

    def writes(self) -> tuple[str, ...]:
        return ("lang", "lang_score", "caption_words")

    def setup(self) -> None:
        from py3langid import langid

        self._langid = langid.LanguageIdentifier.from_model_file(langid.MODEL_FILE, norm_probs=True)

    def process(self, batch: pa.Table) -> pa.Table:
        captions = batch.column("caption").to_pylist()
        widths = batch.column("original_width").to_pylist()
        heights = batch.column("original_height").to_pylist()
        langs, scores, words, drops, details = [], [], [], [], []
        for cap, w, h in zip(captions, widths, heights):
            cap = cap or ""
            lang, score = self._langid.classify(cap) if cap.strip() else ("und", 0.0)
            n_words = len(cap.split())
            langs.append(lang)
            scores.append(round(float(score), 4))
            words.append(n_words)
            reason, detail = self._verdict(cap, n_words, lang, float(score), w or 0, h or 0)
            drops.append(reason)
            details.append(detail)
        return verdicts(batch.column("uid"), {
            "lang": pa.array(langs, pa.string()),
            "lang_score": pa.array(scores, pa.float32()),
            "caption_words": pa.array(words, pa.int32()),
        }, drop=drops, detail=details)

    def _verdict(self, cap: str, n_words: int, lang: str, score: float, w: int, h: int) -> tuple[str | None, str | None]:
        cfg: BasicConfig = self.config
        if min(w, h) < cfg.min_image_size:
            return "image_too_small", f"{w}x{h} < {cfg.min_image_size}"
        if min(w, h) > 0 and max(w, h) / min(w, h) > cfg.max_aspect_ratio:
            return "aspect_ratio_too_large", f"{w}x{h}"
        if n_words < cfg.min_caption_words:
            return "caption_too_short", f"{n_words} words"
        if cfg.drop_filename_captions and _FILENAME.match(cap):
            return "caption_filename", cap[:80]
        if cfg.languages and (lang not in cfg.languages or score < cfg.min_language_score):
            return "caption_language", f"{lang} ({score:.2f})"
        return None, None
