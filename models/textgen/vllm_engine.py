"""vLLM's offline engine as a text generator and a captioner (``LLM.chat`` with image parts for
VLMs), with structured outputs where a stage needs JSON:
``SamplingParams(structured_outputs=StructuredOutputsParams(json=schema))``.

vLLM is the ``gpu`` extra and is imported only when this backend is built. What it is asked is
plain data made here (``sampling_kwargs``, ``chat_messages``), so the request building is tested
without vLLM; ``build_sampling_params`` turns it into vLLM's objects.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from recap.models.textgen.base import BackendConfig, BackendUnavailable, OnReply, Reply, Request
from recap.models.textgen.openai_compat import chat_messages


def sampling_kwargs(cfg: BackendConfig, req: Request) -> dict[str, Any]:
    """``SamplingParams`` keyword arguments for one request: the seed is the request's, so each
    (uid, sample index) samples the same text on every run; ``structured_outputs`` holds the JSON
    schema as ``StructuredOutputsParams``' keyword arguments."""
    kw: dict[str, Any] = {"n": 1, "seed": req.seed}
    if cfg.temperature is not None:
        kw["temperature"] = cfg.temperature
    if cfg.top_p is not None:
        kw["top_p"] = cfg.top_p
    if cfg.max_tokens is not None:
        kw["max_tokens"] = cfg.max_tokens
    if req.schema is not None and cfg.structured_outputs:
        kw["structured_outputs"] = {"json": req.schema}
    return kw


def build_sampling_params(kw: dict[str, Any], vllm_sampling: Any) -> Any:
    """vLLM's ``SamplingParams`` from ``sampling_kwargs`` (``vllm_sampling``: the module
    ``vllm.sampling_params``)."""
    kw = dict(kw)
    so = kw.pop("structured_outputs", None)
    if so is not None:
        kw["structured_outputs"] = vllm_sampling.StructuredOutputsParams(**so)
    return vllm_sampling.SamplingParams(**kw)


class VllmBackend:
    """``LLM.chat`` over a batch of requests; one engine per worker (load it in the stage's setup)."""

    def __init__(self, cfg: BackendConfig, **engine_kwargs: Any):
        try:
            import vllm
            from vllm import sampling_params
        except ImportError as e:
            raise BackendUnavailable(f"backend.kind vllm needs vLLM (pip install 'recap-curate[gpu]'): {e}") from None
        self.cfg = cfg
        self.model_id = f"vllm:{cfg.model}"
        self._sp = sampling_params
        self.llm = vllm.LLM(model=cfg.model, **engine_kwargs)

    def generate(self, requests: Sequence[Request], on_reply: OnReply | None = None) -> list[Reply]:
        out: list[Reply | None] = [None] * len(requests)
        convs, params, rows = [], [], []
        for i, req in enumerate(requests):
            try:
                convs.append(chat_messages(req))
            except ValueError as e:
                out[i] = Reply(reason="llm_bad_image", detail=str(e))
                continue
            params.append(build_sampling_params(sampling_kwargs(self.cfg, req), self._sp))
            rows.append(i)
        if rows:
            results = self.llm.chat(convs, sampling_params=params, use_tqdm=False)
            for i, res in zip(rows, results):
                o = res.outputs[0]
                out[i] = Reply(text=o.text, meta={"finish_reason": o.finish_reason})
        for i, r in enumerate(out):
            if on_reply is not None:
                on_reply(i, r)  # type: ignore[arg-type]
        return out  # type: ignore[return-value]

    caption = generate

    def close(self) -> None:
        self.llm = None
