"""Small Hugging Face ``transformers`` causal LMs from a local folder (``save_pretrained``'s
output), for CPU runs without a server. Text only (a rewrite, negatives, laclip); a request with an
image is answered ``llm_bad_image``.

Each request is generated on its own, sampling under ``torch.manual_seed(request seed)`` inside
``torch.random.fork_rng`` (the worker's global RNG is left as it was), so a reply depends on the
request alone. The prompt is the tokenizer's chat template when it has one, else the instruction,
a blank line and the user text. ``transformers`` is optional and imported only when this backend is
built.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from recap.models.textgen.base import BackendConfig, BackendUnavailable, OnReply, Reply, Request


def check_local_model(cfg: BackendConfig) -> None:
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        raise BackendUnavailable("backend.kind transformers needs the transformers package (pip install transformers)")
    if not Path(cfg.model).is_dir():
        raise BackendUnavailable(f"backend.model {cfg.model}: not a folder; kind transformers loads a local model "
                                 f"folder (save_pretrained's output), never a download")


class TransformersBackend:
    """A ``TextGenerator`` over ``AutoModelForCausalLM.generate``."""

    def __init__(self, cfg: BackendConfig):
        check_local_model(cfg)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.tok = AutoTokenizer.from_pretrained(cfg.model, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(cfg.model, local_files_only=True).eval()
        self.model_id = f"transformers:{Path(cfg.model).resolve()}"
        self._torch = torch

    def prompt(self, req: Request) -> str:
        if getattr(self.tok, "chat_template", None):
            messages = ([{"role": "system", "content": req.system}] if req.system else []) + \
                       [{"role": "user", "content": req.user}]
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return (f"{req.system}\n\n" if req.system else "") + req.user + "\n"

    def _one(self, req: Request) -> Reply:
        if req.image is not None:
            return Reply(reason="llm_bad_image", detail="the transformers backend serves text only")
        torch, cfg = self._torch, self.cfg
        inputs = self.tok(self.prompt(req), return_tensors="pt")
        sample = (cfg.temperature or 0) > 0
        kwargs = {"max_new_tokens": cfg.max_tokens or 77, "do_sample": sample,
                  "pad_token_id": self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id}
        if sample:
            kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p if cfg.top_p is not None else 1.0)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(req.seed)
            out = self.model.generate(**inputs, **kwargs)
        new = out[0, inputs["input_ids"].shape[1]:]
        finish = "length" if len(new) >= kwargs["max_new_tokens"] else "stop"
        return Reply(text=self.tok.decode(new, skip_special_tokens=True), meta={"finish_reason": finish})

    def generate(self, requests: Sequence[Request], on_reply: OnReply | None = None) -> list[Reply]:
        out = []
        for i, req in enumerate(requests):
            try:
                reply = self._one(req)
            except Exception as e:  # noqa: BLE001 - one failing prompt never costs the batch
                reply = Reply(reason="llm_error", detail=f"{type(e).__name__}: {e}"[:300])
            out.append(reply)
            if on_reply is not None:
                on_reply(i, reply)
        return out

    def close(self) -> None:
        self.model = None
