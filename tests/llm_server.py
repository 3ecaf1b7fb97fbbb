"""A protocol test double of an OpenAI-compatible chat-completions server, on 127.0.0.1: it
speaks the wire format (``POST /v1/chat/completions``, ``GET /v1/models``) and scripts its
replies; it is not a language model. Replies are derived from the request so tests can check
them: a rewrite of the caption between ``<caption>`` tags, a caption of the image, or JSON in the
shape the request's instruction asks for (HQ-CLIP fields or typed negatives).

Behaviours, chosen per request by ``rules`` (a substring of the user text -> behaviour) or the
server's ``default``: ``valid``, ``malformed_body`` (HTTP 200 that is not a chat completion),
``malformed_json`` (content that is not JSON), ``truncated_json`` (valid JSON cut short, as at max_tokens),
``http_429`` (429 with ``Retry-After``, ``fail_times`` times per request, then valid),
``http_500`` (always 500), ``flaky_500`` (500 ``fail_times`` times, then valid), ``slow``
(``delay`` seconds, then valid), ``hang`` (sleeps ``hang`` seconds), ``echo`` (the whole prompt
back, as a model obeying an injected instruction would), ``bad_image`` (400 for requests with an
image). Every request is counted, by its ``seed`` (one per uid, sample index and attempt) so a
test can tell a repeated request from a new one.

    with LLMServer(default="valid", delay=0.01) as srv:
        ... srv.base_url ...   # http://127.0.0.1:PORT/v1
"""
from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "test-llm"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 256


def _caption(user: str) -> str:
    m = re.search(r"<caption>(.*?)</caption>", user, re.S)
    return (m.group(1) if m else "").replace("&lt;", "<").replace("&gt;", ">")


def _user_text(messages: list[dict]) -> tuple[str, str, bool]:
    system = " ".join(m["content"] for m in messages if m["role"] == "system" and isinstance(m["content"], str))
    user, image = "", False
    for m in messages:
        if m["role"] != "user":
            continue
        if isinstance(m["content"], str):
            user += m["content"]
        else:
            for part in m["content"]:
                if part["type"] == "text":
                    user += part["text"]
                elif part["type"] == "image_url":
                    image = part["image_url"]["url"].startswith("data:image/")
    return system, user, image


def valid_content(system: str, user: str, image: bool, seed: int) -> str:
    cap = _caption(user)
    words = [w for w in re.findall(r"[a-z]+", cap.lower())] or ["thing"]
    if "long_positive" in system:
        return json.dumps({"long_positive": f"a detailed picture showing {cap or 'an image'}, variant {seed % 7}",
                           "long_negative": f"a detailed picture showing no {cap or 'image'} at all",
                           "short_positive": words[:3], "short_negative": ["zebra", words[0]]})
    if "negatives" in system:
        return json.dumps({"negatives": [
            {"type": "swap_nouns", "text": " ".join(reversed(cap.split())) or "nothing here"},
            {"type": "replace_noun", "text": f"{cap} next to a dog".strip()},
            {"type": "replace_attribute", "text": cap}]})  # the caption itself: no negative
    if image and not cap:
        return f"a picture of shape {seed % 97}. Second sentence here"
    if image:
        return f"a picture fusing {cap} with what is seen"
    return f"a new rewrite of {cap} number {seed}\nsecond line that is cut"  # the whole seed: two never collide


class LLMServer:
    __test__ = False

    def __init__(self, *, default: str = "valid", rules: dict[str, str] | None = None, delay: float = 0.0,
                 fail_times: int = 2, retry_after: float = 0.05, hang: float = 30.0, model: str = MODEL,
                 api_key: str | None = None):
        self.default, self.rules = default, dict(rules or {})
        self.delay, self.fail_times, self.retry_after, self.hang = delay, fail_times, retry_after, hang
        self.model, self.api_key = model, api_key
        self.by_seed: Counter[int] = Counter()     # every POST, by the request's seed
        self.served: Counter[int] = Counter()      # valid replies sent, by seed
        self.statuses: Counter[int] = Counter()
        self.auth_headers: list[str] = []
        self.in_flight = self.max_in_flight = 0
        self.max_body = 0  # bytes of the largest request
        self._lock = threading.Lock()
        self._httpd: _Server | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> LLMServer:
        self._httpd = _Server(("127.0.0.1", 0), _handler(self))
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> LLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def total(self) -> int:
        return sum(self.by_seed.values())

    def behaviour(self, user: str) -> str:
        for needle, b in self.rules.items():
            if needle in user:
                return b
        return self.default


def _handler(srv: LLMServer):
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
            with srv._lock:
                srv.statuses[status] += 1
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            try:
                self.wfile.write(body)
            except OSError:
                pass

        def _authorised(self) -> bool:
            got = self.headers.get("Authorization", "")
            with srv._lock:
                srv.auth_headers.append(got)
            if srv.api_key and got != f"Bearer {srv.api_key}":
                # a careless server echoes what it got: the client must not pass it on
                self._send(401, json.dumps({"error": f"bad key {got}"}).encode())
                return False
            return True

        def do_GET(self):
            if not self._authorised():
                return
            if self.path.rstrip("/").endswith("/models"):
                self._send(200, json.dumps({"object": "list", "data": [{"id": srv.model, "object": "model"}]}).encode())
            else:
                self._send(404, b'{"error": "not found"}')

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with srv._lock:
                srv.max_body = max(srv.max_body, len(raw))
            body = json.loads(raw or b"{}")
            if not self._authorised():
                return
            seed = int(body.get("seed", -1))
            with srv._lock:
                srv.by_seed[seed] += 1
                n = srv.by_seed[seed]
                srv.in_flight += 1
                srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
            try:
                self._reply(body, seed, n)
            finally:
                with srv._lock:
                    srv.in_flight -= 1

        def _reply(self, body: dict, seed: int, n: int) -> None:
            system, user, image = _user_text(body.get("messages", []))
            b = srv.behaviour(user)
            if srv.delay:
                time.sleep(srv.delay)
            if b == "http_429" and n <= srv.fail_times:
                return self._send(429, b'{"error": "rate limited"}', {"Retry-After": f"{srv.retry_after:g}"})
            if b == "http_500" or (b == "flaky_500" and n <= srv.fail_times):
                return self._send(500, b'{"error": "internal"}')
            if b == "bad_image" and image:
                return self._send(400, b'{"error": "cannot read the image"}')
            if b == "hang":
                time.sleep(srv.hang)
            if b == "malformed_body":
                return self._send(200, b"<html>this is not json</html>")
            content = valid_content(system, user, image, seed)
            if b == "malformed_json":
                content = "Sure! Here is what you asked for: {long_positive: oops"
            elif b == "truncated_json":
                content = content[:-4]  # cut inside the last list, as max_tokens would
            elif b == "echo":
                content = system + "\n" + user
            with srv._lock:
                if b in ("valid", "slow", "http_429", "flaky_500"):
                    srv.served[seed] += 1
            self._send(200, json.dumps({
                "id": f"cmpl-{seed}", "object": "chat.completion", "model": srv.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": "stop"}]}).encode())

    return H


def main() -> None:
    """Serve in a process of its own (benchmarks: the client's threads then never share a GIL with
    the server's): prints the base URL, serves until stdin closes."""
    import argparse
    import sys

    ap = argparse.ArgumentParser()
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--default", default="valid")
    a = ap.parse_args()
    with LLMServer(default=a.default, delay=a.delay) as srv:
        print(srv.base_url, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
