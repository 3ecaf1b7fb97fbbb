"""A second source stage, for tests only: a folder of PNG images with a caption in a ``.txt`` beside
each. It lives outside the engine and registers like any third-party stage."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict

from recap.pipeline.stage import SourceStage, StageConfig
from recap.pipeline.uid import make_uid
from recap.pipeline.verdicts import verdicts


class FolderInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["folder"] = "folder"
    path: str


class FolderConfig(StageConfig):
    files_per_shard: int = 3


class FolderSource(SourceStage):
    """One sample per ``NAME.png``; an empty image file is dropped as ``empty_file``."""

    name = "folder"
    input_kind = "folder"
    InputConfig = FolderInput
    Config = FolderConfig
    key_column = "name"

    @classmethod
    def section(cls) -> str:
        return "scan"

    def _files(self, spec: FolderInput) -> list[Path]:
        return sorted(Path(spec.path).glob("*.png"))

    def input_fingerprint(self, spec: FolderInput) -> str:
        listing = [(p.name, p.stat().st_size) for p in self._files(spec)]
        return hashlib.sha256(json.dumps([listing, self.config.files_per_shard]).encode()).hexdigest()[:16]

    def plan(self, spec: FolderInput):
        files = self._files(spec)
        per = self.config.files_per_shard
        for start in range(0, len(files), per):
            chunk = files[start:start + per]
            texts = [p.with_suffix(".txt").read_text() for p in chunk]
            yield pa.table({"uid": [make_uid(str(p), t) for p, t in zip(chunk, texts)],
                            "name": [p.stem for p in chunk], "caption": texts, "file": [str(p) for p in chunk]})

    def process(self, batch: pa.Table) -> pa.Table:
        data = [Path(f).read_bytes() for f in batch.column("file").to_pylist()]
        ok = [len(d) > 0 for d in data]
        return verdicts(batch.column("uid"), {
            "name": batch.column("name"), "caption": batch.column("caption"),
            "ok": pa.array(ok), "nbytes": pa.array([len(d) for d in data], pa.int64()),
            "jpg": pa.array([d if k else None for d, k in zip(data, ok)], pa.binary()),
        }, drop=[None if k else "empty_file" for k in ok])

    def image_member(self) -> str:
        return "png"

    @classmethod
    def kept(cls, index: pa.Table) -> pa.Array:
        return pc.fill_null(index.column("ok"), False)
