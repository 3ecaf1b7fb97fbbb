"""A small threaded HTTP server for tests, on a loopback address and an OS-chosen port.

    with TestServer() as srv:
        srv.route("/a.jpg", static(jpeg_bytes))
        srv.route("/gone", static(b"no", status=404))
        srv.route("/hop", redirect("/a.jpg"))
        fetch(srv.url("/hop"))
        assert srv.hits["/a.jpg"] == 1

A route is a callable taking the request handler (``h.path``, ``h.headers``, ``h.wfile``) and the
server. Helpers below build the usual ones: static bodies, redirects, hangs, slow drips, chunked
bodies, flaky responses. Every request is counted (``hits``, ``requests``), and the number of
requests in their handler at once is tracked (``max_in_flight``).
"""
from __future__ import annotations

import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Route = Callable[[BaseHTTPRequestHandler, "TestServer"], None]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a hanging route must not hold up stop()
    request_queue_size = 128


class TestServer:
    __test__ = False  # not a pytest class

    def __init__(self, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None):
        self.host = host
        self.tls = tls
        self.routes: dict[str, Route] = {}
        self.hits: Counter[str] = Counter()
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> TestServer:
        self._httpd = _Server((self.host, 0), _handler_class(self))
        if self.tls is not None:
            # Handshake in the request thread (first read), not in accept(): a stuck client
            # must not stall the whole server.
            self._httpd.socket = self.tls.wrap_socket(self._httpd.socket, server_side=True,
                                                      do_handshake_on_connect=False)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> TestServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- addresses ----------------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def netloc(self) -> str:
        """'host:port', as allow_hosts wants it."""
        return f"{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return f"{'https' if self.tls else 'http'}://{self.netloc}{path}"

    # -- routes -------------------------------------------------------------------------------
    def route(self, path: str, handler: Route) -> str:
        """Serve ``handler`` at ``path`` (query strings ignored); returns the full URL."""
        self.routes[path] = handler
        return self.url(path)

    def total_hits(self) -> int:
        with self._lock:
            return sum(self.hits.values())

    def _record(self, path: str, headers: dict[str, str]) -> None:
        with self._lock:
            self.hits[path] += 1
            self.requests.append((path, headers))

    def enter(self) -> None:
        """Count a request as in flight (routes call this around their slow part)."""
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1


def _handler_class(server: TestServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            server._record(path, {k.lower(): v for k, v in self.headers.items()})
            route = server.routes.get(path)
            try:
                if route is None:
                    send(self, b"not found", status=404, content_type="text/plain")
                else:
                    route(self, server)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                pass  # the client gave up first, which is often the point of the test
            self.close_connection = True

        def handle(self) -> None:
            try:
                super().handle()
            except (ssl.SSLError, ConnectionError, TimeoutError):
                pass  # a refused TLS handshake or a client that left: the client test says what it expects

        def log_message(self, format: str, *args) -> None:  # noqa: A002
            pass

    return Handler


# -- route builders ---------------------------------------------------------------------------------

def send(h: BaseHTTPRequestHandler, body: bytes, status: int = 200, content_type: str = "image/jpeg",
         headers: Sequence[tuple[str, str]] = (), length: int | None = None) -> None:
    h.send_response(status)
    h.send_header("Content-Type", content_type)
    h.send_header("Content-Length", str(len(body) if length is None else length))
    h.send_header("Connection", "close")
    for k, v in headers:
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(body)
    h.wfile.flush()


def static(body: bytes, status: int = 200, content_type: str = "image/jpeg",
           headers: Sequence[tuple[str, str]] = (), delay: float = 0.0) -> Route:
    """A fixed response, after ``delay`` seconds (counted as in flight)."""
    def route(h, srv):
        if delay:
            srv.enter()
            try:
                srv.stopping.wait(delay)
            finally:
                srv.leave()  # before answering: the client may start its next request right after
        send(h, body, status, content_type, headers)
    return route


def redirect(location: str, status: int = 302) -> Route:
    def route(h, srv):
        send(h, b"", status, "text/plain", [("Location", location)])
    return route


def hang(seconds: float = 30.0) -> Route:
    """Accept, then say nothing (until the server stops)."""
    def route(h, srv):
        srv.stopping.wait(seconds)
    return route


def drip(body: bytes, interval: float, length: int | None = None, headers_too: bool = False) -> Route:
    """Send the body (or, with ``headers_too``, the whole response) one byte per ``interval``."""
    def route(h, srv):
        head = (f"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: {length or len(body)}\r\n"
                "Connection: close\r\n\r\n").encode()
        if not headers_too:
            h.wfile.write(head)
            h.wfile.flush()
        for byte in ((head + body) if headers_too else body):
            if srv.stopping.wait(interval):
                return
            h.wfile.write(bytes([byte]))
            h.wfile.flush()
    return route


def chunked(body: bytes, chunk: int = 4096, content_type: str = "image/jpeg") -> Route:
    """Transfer-Encoding: chunked, so there is no Content-Length to check up front."""
    def route(h, srv):
        h.send_response(200)
        h.send_header("Content-Type", content_type)
        h.send_header("Transfer-Encoding", "chunked")
        h.send_header("Connection", "close")
        h.end_headers()
        for i in range(0, len(body), chunk):
            part = body[i:i + chunk]
            h.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        h.wfile.write(b"0\r\n\r\n")
        h.wfile.flush()
    return route


def flaky(statuses: Sequence[int], body: bytes, content_type: str = "image/jpeg") -> Route:
    """Answer the n-th request with statuses[n] (an error page), then ``body`` with 200."""
    calls = [0]
    lock = threading.Lock()

    def route(h, srv):
        with lock:
            n = calls[0]
            calls[0] += 1
        if n < len(statuses):
            send(h, b"try again", statuses[n], "text/plain")
        else:
            send(h, body, 200, content_type)
    return route


def self_signed(directory, names: Sequence[str] = ("img.test",), ips: Sequence[str] = ("127.0.0.1",)
                ) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting it) for a throwaway certificate."""
    import datetime
    import ipaddress
    from pathlib import Path

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    san = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA256()))
    d = Path(directory)
    cert_file, key_file = d / "cert.pem", d / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cafile=str(cert_file))
    return server, client


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()
