"""A test-only map stage that writes the columns a recaptioning stage would (synthetic captions,
HQ-CLIP fields, LLM negatives), with a null where an LLM call "failed", so the stages after it can
be tested without an LLM. It registers like any third-party stage."""
from __future__ import annotations

import hashlib

import pyarrow as pa

from recap.pipeline.stage import MapStage, StageConfig
from recap.pipeline.verdicts import verdicts


class FakeTextsConfig(StageConfig):
    fail_every: int = 5  # every n-th sample (by uid hash) has no recaption


class FakeTexts(MapStage):
    name = "fake_texts"
    Config = FakeTextsConfig

    def reads(self) -> tuple[str, ...]:
        return ("caption",)

    def writes(self) -> tuple[str, ...]:
        return ("syn_text_caption", "syn_text_rewrite", "short_positive", "neg_text_llm", "neg_type_llm")

    def process(self, batch: pa.Table) -> pa.Table:
        uids = batch.column("uid").to_pylist()
        caps = batch.column("caption").to_pylist()
        failed = [int(hashlib.sha256(u.encode()).hexdigest(), 16) % self.config.fail_every == 0 for u in uids]
        syn = [None if f else [f"a synthetic description of {c}"] for c, f in zip(caps, failed)]
        rewrite = [[f"rewritten: {c}"] for c in caps]
        tags = [c.split()[1:3] for c in caps]
        neg = [[f"nothing like {c}"] for c in caps]
        return verdicts(batch.column("uid"), {
            "syn_text_caption": pa.array(syn, pa.list_(pa.string())),
            "syn_text_rewrite": pa.array(rewrite, pa.list_(pa.string())),
            "short_positive": pa.array(tags, pa.list_(pa.string())),
            "neg_text_llm": pa.array(neg, pa.list_(pa.string())),
            "neg_type_llm": pa.array([["relation"]] * len(caps), pa.list_(pa.string()))})
