"""Any OpenAI-compatible chat-completions endpoint (vLLM serve, SGLang, hosted APIs) as a text
generator and a captioner: images go as base64 data URLs in ``image_url`` parts.

Requests run ``concurrency`` at a time in threads. A request that meets a 429, a 5xx, a timeout or a
dropped connection is retried up to ``max_retries`` times with exponential backoff and full jitter,
waiting what the server's ``Retry-After`` asks when it says; the waiting of one request is bounded
by ``retry_budget`` seconds in all, so a 429 storm ends in ledger notes, not a stuck job. Other 4xx
answers are final. The API key is read from the environment variable ``api_key_env`` names and
sent in the ``Authorization`` header only: it is scrubbed from every detail a reply carries.
"""
from __future__ import annotations

import base64
import email.utils
import http.client
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from recap.models.textgen.base import BackendConfig, BackendUnavailable, OnReply, Reply, Request

_BACKOFF_BASE = 0.5
_BACKOFF_CAP = 30.0
_RETRY_STATUS = frozenset({408, 409, 425, 429}) | frozenset(range(500, 600))


def image_mime(data: bytes) -> str | None:
    """The media type of an image the usual VLM servers take, from its magic bytes."""
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return None


def data_url(data: bytes) -> str:
    mime = image_mime(data)
    if mime is None:
        raise ValueError("not a JPEG, PNG, WebP or GIF image")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def chat_messages(req: Request) -> list[dict]:
    """The request as chat messages: the instruction as the system message, the user text (and
    image) as the user message."""
    messages = [{"role": "system", "content": req.system}] if req.system else []
    if req.image is None:
        messages.append({"role": "user", "content": req.user})
    else:
        messages.append({"role": "user", "content": [
            {"type": "text", "text": req.user},
            {"type": "image_url", "image_url": {"url": data_url(req.image)}}]})
    return messages


def request_body(cfg: BackendConfig, req: Request) -> dict:
    body = {"model": cfg.model, "messages": chat_messages(req), "n": 1, "seed": req.seed,
            "temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens}
    if req.schema is not None and cfg.structured_outputs:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "reply", "schema": req.schema, "strict": True}}
    return {k: v for k, v in body.items() if v is not None}


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


class _Retryable(Exception):
    def __init__(self, reason: str, detail: str, wait: float | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.wait = reason, detail, wait


class _Final(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class OpenAIBackend:
    """Chat completions over HTTP; implements both ``TextGenerator`` and ``Captioner``."""

    def __init__(self, cfg: BackendConfig, *, sleep=time.sleep):
        self.cfg = cfg
        self.model_id = f"openai:{cfg.model}"
        self.base = cfg.base_url.rstrip("/")
        self._key = api_key(cfg)
        self._sleep = sleep
        self._local = threading.local()
        self.stats = {"requests": 0, "retries": 0}
        self._lock = threading.Lock()

    # -- protocol ---------------------------------------------------------------------------------
    def generate(self, requests: Sequence[Request], on_reply: OnReply | None = None) -> list[Reply]:
        out: list[Reply | None] = [None] * len(requests)

        def one(i: int) -> None:
            reply = self._one(requests[i])
            out[i] = reply
            if on_reply is not None:
                on_reply(i, reply)

        if len(requests) <= 1 or self.cfg.concurrency == 1:
            for i in range(len(requests)):
                one(i)
        else:
            with ThreadPoolExecutor(min(self.cfg.concurrency, len(requests))) as pool:
                for f in [pool.submit(one, i) for i in range(len(requests))]:
                    f.result()
        return out  # type: ignore[return-value]

    caption = generate

    def close(self) -> None:
        pass

    # -- one request ------------------------------------------------------------------------------
    def _one(self, req: Request) -> Reply:
        try:
            payload = json.dumps(request_body(self.cfg, req)).encode()
        except ValueError as e:
            return Reply(reason="llm_bad_image", detail=str(e))
        deadline = time.monotonic() + self.cfg.retry_budget
        rng = random.Random(req.seed)  # jitter: spread retries apart, reproducibly
        attempts = 0
        while True:
            attempts += 1
            try:
                status, data = self._post(payload)
                return self._parse(data, attempts)
            except _Final as e:
                return Reply(reason=e.reason, detail=self._scrub(e.detail), meta={"attempts": attempts})
            except _Retryable as e:
                if attempts > self.cfg.max_retries:
                    return Reply(reason=e.reason, detail=self._scrub(f"{e.detail} (after {attempts} attempts)"),
                                 meta={"attempts": attempts})
                backoff = rng.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2 ** (attempts - 1)))
                wait = e.wait if e.wait is not None else backoff
                if time.monotonic() + wait > deadline:
                    return Reply(reason=e.reason, detail=self._scrub(
                        f"{e.detail} (gave up after {attempts} attempts: retry_budget "
                        f"{self.cfg.retry_budget:g}s spent)"), meta={"attempts": attempts})
                with self._lock:
                    self.stats["retries"] += 1
                self._sleep(wait)

    def _headers(self) -> dict:
        h = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            h["Authorization"] = f"Bearer {self._key}"
        return h

    def _post(self, payload: bytes) -> tuple[int, bytes]:
        with self._lock:
            self.stats["requests"] += 1
        req = urllib.request.Request(f"{self.base}/chat/completions", data=payload, headers=self._headers(),
                                     method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            body = _excerpt(e)
            if e.code in _RETRY_STATUS:
                raise _Retryable(f"llm_http_{e.code}", f"HTTP {e.code}{body}",
                                 retry_after(e.headers.get("Retry-After")) if e.headers else None) from None
            raise _Final(f"llm_http_{e.code}", f"HTTP {e.code}{body}") from None
        except (TimeoutError, socket.timeout) as e:
            raise _Retryable("llm_timeout", f"no answer within {self.cfg.timeout:g}s ({e})") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise _Retryable("llm_timeout", f"no answer within {self.cfg.timeout:g}s") from None
            raise _Retryable("llm_connection", f"connection failed: {e.reason}") from None
        except (OSError, http.client.HTTPException) as e:
            raise _Retryable("llm_connection", f"connection failed: {type(e).__name__}: {e}") from None

    def _parse(self, data: bytes, attempts: int) -> Reply:
        try:
            doc = json.loads(data)
            choice = doc["choices"][0]
            content = choice["message"].get("content")
            finish = choice.get("finish_reason")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise _Final("llm_malformed", f"not a chat completion: {data[:200]!r}") from None
        meta = {"attempts": attempts, "finish_reason": finish}
        if finish == "content_filter":
            return Reply(reason="llm_content_filter", detail="the server's content filter stopped the reply", meta=meta)
        if content is not None and not isinstance(content, str):
            raise _Final("llm_malformed", f"message content is {type(content).__name__}, not text")
        return Reply(text=content or "", meta=meta)

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "[redacted]") if self._key else text

    # -- before any shard -------------------------------------------------------------------------
    def preflight(self, timeout: float = 5.0) -> None:
        """Raise ``BackendUnavailable`` with the fix when the endpoint does not answer, refuses the
        key or does not serve the model (a server without ``/models`` passes)."""
        where = f"backend.base_url {self.base}"
        req = urllib.request.Request(f"{self.base}/models", headers=self._headers())
        try:
            with urllib.request.urlopen(req, timeout=min(timeout, self.cfg.timeout)) as r:
                data = r.read()
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise BackendUnavailable(f"{where}: the server refused the API key (HTTP {e.code}); check the "
                                         f"variable backend.api_key_env names ({self.cfg.api_key_env})") from None
            if e.code >= 500:
                raise BackendUnavailable(f"{where}: the server answers HTTP {e.code} to GET /models") from None
            return  # 404 & co: no model listing here, which is allowed
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise BackendUnavailable(f"{where}: no server answers ({reason}); start it or fix the URL") from None
        try:
            served = [m["id"] for m in json.loads(data)["data"]]
        except (ValueError, KeyError, TypeError):
            return
        if served and self.cfg.model not in served:
            raise BackendUnavailable(f"backend.model {self.cfg.model!r} is not served at {self.base} "
                                     f"(it serves {', '.join(map(str, served[:10]))})")


def api_key(cfg: BackendConfig) -> str | None:
    if not cfg.api_key_env:
        return None
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise BackendUnavailable(f"backend.api_key_env: the environment variable {cfg.api_key_env} is not set")
    return key


def _excerpt(e: urllib.error.HTTPError) -> str:
    try:
        body = e.read(300).decode("utf-8", "replace").strip()
    except Exception:  # noqa: BLE001 - the status is what matters
        return ""
    return f": {body[:200]}" if body else ""
