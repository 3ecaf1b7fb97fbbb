"""The two small interfaces every text backend implements, and what they exchange.

* a ``TextGenerator`` turns prompts into texts (an LLM rewriting a caption);
* a ``Captioner`` turns an image, with an optional alt-text and a prompt, into texts (CoCa, a VLM).

Both take a list of ``Request`` and return one ``Reply`` per request, in order. A reply either has
``text`` or a ledger ``reason`` starting with ``llm_`` (``llm_timeout``, ``llm_http_503``, ...): a
backend never raises for one bad request, so one failure never costs the batch. ``on_reply`` is
called as each request finishes (from any thread), so a caller can persist finished work before
the whole batch is done.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, model_validator

BackendKind = Literal["openai", "vllm", "transformers", "coca", "eda"]


class BackendUnavailable(RuntimeError):
    """The backend cannot serve at all (endpoint down, model missing): a job error, not a sample's."""


class BackendConfig(BaseModel):
    """``backend:`` of the text stages. Sampling fields left empty take the stage mode's defaults."""

    model_config = ConfigDict(extra="forbid")
    kind: BackendKind = Field(..., description="openai | vllm | transformers | coca | eda")
    model: str = Field("", description="served model name (openai), model path or name (vllm, "
                                       "transformers), checkpoint of `recap train` (coca)")
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    api_key_env: str | None = Field(None, description="name of the environment variable holding the API key")
    concurrency: int = Field(8, ge=1, le=1024, description="requests in flight per worker (openai)")
    timeout: float = Field(60.0, gt=0, description="seconds per request")
    max_retries: int = Field(5, ge=0, description="retries of a request on 429, 5xx, timeouts and dropped connections")
    retry_budget: float = Field(120.0, gt=0, description="seconds of backoff one request may spend in all")
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    structured_outputs: bool = Field(True, description="ask the server for JSON-schema output "
                                                       "(response_format / StructuredOutputsParams)")
    greedy: bool = Field(False, description="coca: greedy decoding (deterministic) instead of top-p sampling")
    max_len: int = Field(30, ge=3, description="coca: tokens per caption, start and end included")

    @model_validator(mode="after")
    def _needs(self) -> BackendConfig:
        if self.kind == "openai" and not self.base_url:
            raise ValueError("backend.base_url is required for kind openai")
        if self.kind == "openai" and not self.model:
            raise ValueError("backend.model is required for kind openai (the served model's name)")
        if self.kind in ("vllm", "transformers", "coca") and not self.model:
            raise ValueError(f"backend.model is required for kind {self.kind}")
        if self.api_key_env is not None and not self.api_key_env.replace("_", "").isalnum():
            raise ValueError("backend.api_key_env names an environment variable (letters, digits, _), "
                             "not the key itself")
        return self

    def fill_sampling(self, temperature: float | None = None, top_p: float | None = None,
                      max_tokens: int | None = None) -> None:
        """The mode's defaults for the sampling fields the job file left empty."""
        self.temperature = temperature if self.temperature is None else self.temperature
        self.top_p = top_p if self.top_p is None else self.top_p
        self.max_tokens = max_tokens if self.max_tokens is None else self.max_tokens

    def sampling(self) -> dict:
        """What decides a reply besides the prompt: part of every cache key."""
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens,
                "greedy": self.greedy if self.kind == "coca" else None,
                "max_len": self.max_len if self.kind == "coca" else None}


@dataclass(frozen=True)
class Request:
    """One generation: a system instruction and a user text, optionally an image (bytes) and a
    JSON schema the reply must follow. ``source`` is the text being rewritten (rule-based
    backends read it instead of the prompt); ``seed`` comes from (job seed, stage, uid, index)."""

    uid: str
    index: int
    seed: int
    system: str = ""
    user: str = ""
    image: bytes | None = None
    schema: dict | None = None
    source: str = ""
    attempt: int = 0

    def prompt_hash(self) -> str:
        h = hashlib.sha256()
        for part in (self.system, self.user, self.source):
            h.update(part.encode("utf-8", "surrogatepass"))
            h.update(b"\x00")
        h.update(hashlib.sha256(self.image).digest() if self.image is not None else b"-")
        h.update(json.dumps(self.schema, sort_keys=True).encode() if self.schema else b"-")
        return h.hexdigest()


@dataclass
class Reply:
    text: str | None = None
    reason: str | None = None  # llm_* when it failed
    detail: str | None = None
    meta: dict = field(default_factory=dict)  # finish_reason, attempts

    @property
    def ok(self) -> bool:
        return self.text is not None and self.reason is None

    def to_json(self) -> dict:
        return {"text": self.text, "reason": self.reason, "detail": self.detail, "meta": self.meta}

    @classmethod
    def from_json(cls, d: dict) -> Reply:
        return cls(d.get("text"), d.get("reason"), d.get("detail"), d.get("meta") or {})


OnReply = Callable[[int, Reply], None]


@runtime_checkable
class TextGenerator(Protocol):
    """Prompts -> texts."""

    model_id: str

    def generate(self, requests: Sequence[Request], on_reply: OnReply | None = None) -> list[Reply]: ...

    def close(self) -> None: ...


@runtime_checkable
class Captioner(Protocol):
    """Images (+ alt-text in the prompt) -> texts."""

    model_id: str

    def caption(self, requests: Sequence[Request], on_reply: OnReply | None = None) -> list[Reply]: ...

    def close(self) -> None: ...


def request_key(model_id: str, sampling: dict, req: Request) -> str:
    """The cache key: (model, prompt hash, sampling params, uid, sample index, attempt, seed)."""
    payload = json.dumps([model_id, req.prompt_hash(), sampling, req.uid, req.index, req.attempt, req.seed],
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]
