"""CoCa captions from a checkpoint `recap train` wrote (``loss.kind: coca``), through the trainer's
own decoder (``recap.trainer.generate``: no ``transformers``).

MobileCLIP's synthetic captions: nucleus sampling with top-p 0.9, the caption cut before its first
"."; each caption draws from a generator seeded with its request's seed, so it depends on (job
seed, stage, uid, sample index) only. ``greedy`` decodes deterministically instead (every sample
index then gives the same caption). The model runs on CUDA in a Ray actor that Ray gave a GPU
(``resources: {gpus: 1}``); the sampling draws come from CPU generators on either device.
"""
from __future__ import annotations

import io
from collections.abc import Sequence

from recap.models.textgen.base import BackendConfig, BackendUnavailable, OnReply, Reply, Request


def first_sentence(text: str) -> str:
    return text.split(".", 1)[0].strip()


def checkpoint_model_name(path: str) -> str:
    """The model name a `recap train` checkpoint records; a clear error when it is not one."""
    from recap.trainer.weights import read_checkpoint

    try:
        ckpt = read_checkpoint(path)
    except Exception as e:  # noqa: BLE001 - missing, not torch, unpicklable: all the user's to fix
        raise BackendUnavailable(f"backend.model {path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    name = ckpt.get("name") if isinstance(ckpt, dict) else None
    if not name:
        raise BackendUnavailable(f"backend.model {path}: the checkpoint records no model name (write it with `recap train`)")
    return str(name)


class CocaCaptioner:
    """A ``Captioner``: images -> captions (the prompt and alt-text are not read)."""

    def __init__(self, cfg: BackendConfig, batch_size: int = 32):
        import torch

        from recap.models.encoders import default_device
        from recap.trainer.models import create_model

        self.cfg = cfg
        self.batch_size = batch_size
        name = checkpoint_model_name(cfg.model)
        model, _, preprocess, _ = create_model(name, pretrained=cfg.model)
        if not hasattr(model, "text_decoder"):
            raise BackendUnavailable(f"backend.model {cfg.model}: {name} has no text decoder: captions need a CoCa "
                                     f"model (train it with loss.kind: coca)")
        self.device = default_device()  # CUDA only in a Ray actor given a GPU
        self.model = model.eval().to(self.device)
        self.preprocess = preprocess
        self.top_p = cfg.top_p if cfg.top_p is not None else 0.9
        self.temperature = cfg.temperature if cfg.temperature is not None else 1.0
        self.model_id = f"coca:{name}:{cfg.model}"
        self._torch = torch

    def caption(self, requests: Sequence[Request], on_reply: OnReply | None = None) -> list[Reply]:
        from PIL import Image

        from recap.trainer.generate import decode, generate

        torch = self._torch
        out: list[Reply | None] = [None] * len(requests)
        ready: list[tuple[int, object]] = []
        for i, req in enumerate(requests):
            try:
                with Image.open(io.BytesIO(req.image or b"")) as im:
                    ready.append((i, self.preprocess(im.convert("RGB"))))
            except Exception as e:  # noqa: BLE001 - one unreadable image never costs the batch
                out[i] = Reply(reason="llm_bad_image", detail=f"{type(e).__name__}: {e}"[:200])
                if on_reply:
                    on_reply(i, out[i])
        for start in range(0, len(ready), self.batch_size):
            chunk = ready[start:start + self.batch_size]
            x = torch.stack([t for _, t in chunk]).to(self.device)
            if self.cfg.greedy:
                tokens = generate(self.model, x, max_len=self.cfg.max_len, min_len=min(5, self.cfg.max_len - 1))
            else:
                gens = [torch.Generator().manual_seed(requests[i].seed) for i, _ in chunk]
                tokens = generate(self.model, x, max_len=self.cfg.max_len, min_len=min(5, self.cfg.max_len - 1),
                                  top_p=self.top_p, temperature=self.temperature, generators=gens)
            for (i, _), text in zip(chunk, decode(tokens)):
                out[i] = Reply(text=first_sentence(text))
                if on_reply:
                    on_reply(i, out[i])
        return out  # type: ignore[return-value]

    generate = caption

    def close(self) -> None:
        self.model = None
