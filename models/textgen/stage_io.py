"""What the text stages share around a backend: per-request seeds from (job seed, stage, uid,
sample index, attempt), the replay cache in the stage's own folder, and the per-sample verdict
bookkeeping (notes for failed generations, drops under ``on_failure: drop``)."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from recap.models.textgen.base import BackendConfig, Reply, Request
from recap.models.textgen.cache import RequestCache, local_dir, run_cached
from recap.pipeline.rng import generator


def request_seed(job_seed: int, stage: str, uid: str, index: int, attempt: int = 0) -> int:
    """A 31-bit seed (what servers and torch accept) for one generation."""
    return int(generator(job_seed, stage, f"{uid}\x00{index}\x00{attempt}").integers(0, 2**31 - 1))


def stage_cache(dataset_url: str, stage: str, enabled: bool) -> RequestCache:
    """The replay cache in ``stages/<stage>/cache/`` of a local dataset (None elsewhere)."""
    from recap.pipeline.stage_data import output_rel

    base = local_dir(dataset_url) if enabled else None
    return RequestCache(f"{base.rstrip('/')}/{output_rel(stage, 'cache')}" if base else None)


def servable_image(data: bytes | None) -> bytes | None:
    """The image as bytes a VLM takes (JPEG, PNG, WebP, GIF as they are; other formats PIL reads,
    re-encoded as PNG), or None when no decoder takes it."""
    import io

    from PIL import Image

    from recap.models.textgen.openai_compat import image_mime

    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if image_mime(data) is not None:
                return data
            buf = io.BytesIO()
            im.convert("RGBA" if "A" in im.getbands() else "RGB").save(buf, "PNG")
            return buf.getvalue()
    except Exception:  # noqa: BLE001 - any decoder failure means the same: this image cannot be sent
        return None


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


class Runner:
    """A backend behind the replay cache, for one stage on one worker."""

    def __init__(self, backend, cfg: BackendConfig, cache: RequestCache, *, images: bool = False):
        self.backend = backend
        self.cfg = cfg
        self.cache = cache
        self.call = backend.caption if images else backend.generate
        self.sent = 0

    def run(self, requests: Sequence[Request], name: str) -> list[Reply]:
        if not requests:
            return []
        replies, sent = run_cached(self.call, requests, model_id=self.backend.model_id, sampling=self.cfg.sampling(),
                                   cache=self.cache, name=name)
        self.sent += sent
        return replies


@dataclass
class Outcome:
    """One sample's generation failures, in the order met."""

    reasons: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)

    def fail(self, reason: str, detail: str | None) -> None:
        self.reasons.append(reason)
        if detail:
            self.details.append(f"{reason}: {detail}")

    @property
    def failed(self) -> bool:
        return bool(self.reasons)


def verdict_lists(outcomes: Sequence[Outcome], extra_notes: Sequence[list[str]], on_failure: str
                  ) -> tuple[list[str | None], list[str | None], list[str | None]]:
    """(drop, detail, note) columns: a failed sample is dropped with its first reason under
    ``on_failure: drop``, else noted with every distinct reason; ``extra_notes`` (a caption cut
    before prompting) are notes either way."""
    drops, details, notes = [], [], []
    for o, extra in zip(outcomes, extra_notes):
        detail = "; ".join(dict.fromkeys(o.details))[:500] or None
        if o.failed and on_failure == "drop":
            drops.append(o.reasons[0])
            notes.append(None)
        else:
            drops.append(None)
            reasons = list(dict.fromkeys([*o.reasons, *extra]))
            notes.append(",".join(reasons) or None)
        details.append(detail)
    return drops, details, notes
