"""Serving a demo world over real HTTP on 127.0.0.1, plus the trap on 127.0.0.2.

The server is generic: it answers from ``routes.json`` (path -> file or inline body or generated
body, status, delay, hang, headers, redirect target) and knows nothing about faults. Every request
path is counted, unknown paths included, so tests can check what a downloader really asked for.

The trap is a second server on 127.0.0.2 (same port) that answers anything with a small JPEG and
counts it: a downloader whose SSRF guard works never reaches it.

    with serve("demo-out/world", port=0) as srv:
        urllib.request.urlopen(srv.base_url + "/img/....jpg")
        assert sum(srv.trap_counts.values()) == 0
"""
from __future__ import annotations

import errno
import json
import signal
import socket
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from recap.world.generate import TRAP_HOST
from recap.world.render import jpeg_filler_head, tiny_jpeg

_CHUNK = 64 << 10


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a hanging handler must not hold up shutdown
    request_queue_size = 256


class _Counter:
    """A Counter updated by many handler threads; read as a snapshot, so that iterating it never
    races with an update."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self._counts)


class WorldServer:
    """Handle of a running world: ``port``, ``base_url``, ``counts``, ``trap_counts``."""

    def __init__(self, world_dir: str | Path, port: int | None = None, host: str = "127.0.0.1",
                 trap: bool = True) -> None:
        self.world_dir = Path(world_dir)
        meta_path = self.world_dir / "world.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path} not found: generate the world first (recap world)")
        self.world: dict[str, Any] = json.loads(meta_path.read_text())
        self.routes: dict[str, dict[str, Any]] = json.loads((self.world_dir / "routes.json").read_text())["routes"]
        self.host = host
        self.requested_port = self.world["port"] if port is None else port
        self.trap_enabled = trap
        self._counts = _Counter()
        self._trap_counts = _Counter()
        self._stop = threading.Event()
        self._servers: list[tuple[_HTTPServer, threading.Thread]] = []
        self.port = 0

    # -- public view ------------------------------------------------------------------------------
    @property
    def counts(self) -> Counter[str]:
        """Requests per path so far (a snapshot)."""
        return self._counts.snapshot()

    @property
    def trap_counts(self) -> Counter[str]:
        """Requests the trap on 127.0.0.2 received, per path (a snapshot)."""
        return self._trap_counts.snapshot()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def trap_url(self) -> str:
        return f"http://{TRAP_HOST}:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> WorldServer:
        # With an ephemeral port the trap must get the same number on 127.0.0.2: retry a few
        # times if that number happens to be taken there.
        for attempt in range(10):
            main = self._bind(self.host, self.requested_port, _world_handler(self))
            port = main.server_address[1]
            if not self.trap_enabled:
                break
            try:
                trap = self._bind(TRAP_HOST, port, _trap_handler(self))
                break
            except OSError as e:
                main.server_close()
                if e.errno == errno.EADDRINUSE and self.requested_port == 0 and attempt < 9:
                    continue
                raise RuntimeError(
                    f"cannot bind the trap server on {TRAP_HOST}:{port} ({e.strerror or e}). Linux routes all of "
                    f"127.0.0.0/8 to loopback; on macOS add the address with `sudo ifconfig lo0 alias {TRAP_HOST}`, "
                    f"or pass trap=False") from None
        self.port = port
        self._launch(main)
        if self.trap_enabled:
            self._launch(trap)
        return self

    def _bind(self, host: str, port: int, handler: type[BaseHTTPRequestHandler]) -> _HTTPServer:
        try:
            return _HTTPServer((host, port), handler)
        except OSError as e:
            if host != TRAP_HOST and e.errno == errno.EADDRINUSE:
                raise OSError(e.errno, f"{host}:{port} is already in use (another `recap serve`?)") from None
            raise

    def _launch(self, server: _HTTPServer) -> None:
        t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                             name=f"world-server-{server.server_address[0]}")
        t.start()
        self._servers.append((server, t))

    def stop(self) -> None:
        self._stop.set()  # wakes hanging and slow handlers and stops streaming bodies
        for server, thread in self._servers:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
        self._servers.clear()

    def __enter__(self) -> WorldServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- answering --------------------------------------------------------------------------------
    def handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = _request_path(h.path)
        self._counts.add(path)
        route = self.routes.get(path)
        if route is None:
            self._send(h, 404, b"not found\n", "text/plain", {}, head)
            return
        if route.get("delay") and self._stop.wait(route["delay"]):
            return
        if route.get("hang"):
            # Accept, read the request, then never answer; the stop event ends the wait early.
            self._stop.wait(route["hang"])
            h.close_connection = True
            return
        status = route.get("status", 200)
        headers = dict(route.get("headers", {}))
        if "location" in route:
            headers["Location"] = self._location(h, route["location"])
            self._send(h, status, b"", "text/html", headers, head)
        elif "generate" in route:
            self._stream(h, status, route, headers, head)
        elif "file" in route:
            data = (self.world_dir / route["file"]).read_bytes()
            self._send(h, status, data, route.get("content_type", "application/octet-stream"), headers, head)
        else:
            body = route.get("body", "").encode()
            self._send(h, status, body, route.get("content_type", "text/plain"), headers, head)

    def _location(self, h: BaseHTTPRequestHandler, target: str) -> str:
        # Built from the port we really listen on, so serve(port=...) may differ from world.json.
        target = target.replace("{port}", str(self.port))
        if target.startswith("/"):
            authority = h.headers.get("Host") or f"{self.host}:{self.port}"
            return f"http://{authority}{target}"
        return target

    def _send(self, h: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str,
              headers: dict[str, str], head: bool) -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        if not head and body:
            h.wfile.write(body)

    def _stream(self, h: BaseHTTPRequestHandler, status: int, route: dict[str, Any], headers: dict[str, str],
                head: bool) -> None:
        """A body made on the fly (too_large): never stored, stopped when the client goes away."""
        length = int(route["length"])
        h.send_response(status)
        h.send_header("Content-Type", route.get("content_type", "application/octet-stream"))
        h.send_header("Content-Length", str(length))
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        if head:
            return
        first = jpeg_filler_head()
        zeros = bytes(_CHUNK)
        sent = 0
        while sent < length and not self._stop.is_set():
            chunk = first if sent == 0 else zeros[:min(_CHUNK, length - sent)]
            h.wfile.write(chunk)
            sent += len(chunk)

    def handle_trap(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        self._trap_counts.add(_request_path(h.path))
        self._send(h, 200, _TRAP_JPEG, "image/jpeg", {}, head)


_TRAP_JPEG = tiny_jpeg()


def _request_path(target: str) -> str:
    """The path of a request target, without query or fragment. Origin-form ("/a?b") is split by
    hand: urlsplit would read "//x/y" as a host and a path."""
    if not target.startswith("/"):
        return urlsplit(target).path or "/"  # absolute-form, as sent to proxies
    return target.split("?", 1)[0].split("#", 1)[0]


class _QuietHandler(BaseHTTPRequestHandler):
    server_version = "recap-world/1"
    sys_version = ""
    timeout = 30  # a client that connects and sends nothing does not hold a thread for ever

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            # The client gave up (a downloader's timeout or size cap): nothing to report.
            self.close_connection = True


def _world_handler(world: WorldServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_QuietHandler):
        def do_GET(self) -> None:
            world.handle(self, head=False)

        def do_HEAD(self) -> None:
            world.handle(self, head=True)

    return Handler


def _trap_handler(world: WorldServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_QuietHandler):
        def do_GET(self) -> None:
            world.handle_trap(self, head=False)

        def do_HEAD(self) -> None:
            world.handle_trap(self, head=True)

    return Handler


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether the world's server could listen there now (it sets SO_REUSEADDR too, so a port an
    earlier run left in TIME_WAIT counts as free)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextmanager
def serve(world_dir: str | Path, port: int | None = None, host: str = "127.0.0.1",
          trap: bool = True) -> Iterator[WorldServer]:
    """Serve a world in background threads for the duration of the block. ``port=None``: the port
    in world.json; ``port=0``: an ephemeral one (read it from the handle)."""
    server = WorldServer(world_dir, port=port, host=host, trap=trap).start()
    try:
        yield server
    finally:
        server.stop()


def run_server(world_dir: str | Path, port: int | None = None, host: str = "127.0.0.1") -> None:
    """Serve until SIGTERM or SIGINT (``recap serve``)."""
    stop = threading.Event()
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        with serve(world_dir, port=port, host=host) as srv:
            print(f"serving {world_dir} on {srv.base_url}", flush=True)
            while not stop.wait(0.5):  # a timed wait lets the signal handler run promptly
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"stopped ({sum(srv.counts.values())} requests)", file=sys.stderr, flush=True)
