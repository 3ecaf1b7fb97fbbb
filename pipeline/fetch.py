"""HTTP fetching for the download stage: our own small client on http.client + socket + ssl.

Why not img2dataset's fetcher (urllib): it cannot bound a slow-drip body (the timeout is per
socket read), cannot cap the body size, retries everything the same way, and resolves and connects
wherever a URL (or a redirect) points, internal addresses included. Here every request:

* is vetted before any packet leaves (scheme, URL shape, every resolved address public unless the
  host is allow-listed), on the first request and on every redirect hop;
* connects to the vetted IP itself, so a second DNS answer cannot point it elsewhere (rebinding);
* runs under one deadline per attempt across connect, TLS, headers and body, all hops included;
* stops reading past ``max_bytes``; honours ``X-Robots-Tag`` opt-outs; caps connections per host;
* never raises: every failure is a ``FetchResult`` with a short machine reason.

Reasons: invalid_url, unsupported_scheme, blocked_address, dns_error, connection_error, timeout,
ssl_error, bad_response, http_<code>, redirect_loop, too_many_redirects, too_large,
empty_response, opted_out, fetch_error (an unexpected exception; a bug worth reporting).
"""
from __future__ import annotations

import http.client
import io
import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_USER_AGENT = "recap/0.1 (image-text dataset curation; +https://github.com/recap-data/recap)"
# The same directives img2dataset refuses by default.
DEFAULT_OPT_OUT = ("noai", "noimageai", "noindex", "noimageindex")
DEFAULT_PORTS = {"http": 80, "https": 443}
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_READ_CHUNK = 1 << 16
_HOST_CHARS = re.compile(r"^[a-z0-9_\-.]+$")
_UA_TOKEN = re.compile(r"^[A-Za-z0-9_\-.]+$")
_PATH_SAFE = "/%:@!$&'()*+,;=~"
_QUERY_SAFE = _PATH_SAFE + "?"

T = TypeVar("T")


class FetchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timeout: float = Field(10.0, gt=0, description="seconds per attempt: connect + headers + body, all redirect hops")
    connect_timeout: float = Field(5.0, gt=0, description="seconds per TCP connect (within `timeout`)")
    retries: int = Field(2, ge=0, description="extra attempts after timeouts, connection errors, 429 and 5xx")
    backoff: float = Field(0.5, ge=0, description="seconds before the first retry; doubles each retry")
    backoff_max: float = Field(10.0, ge=0, description="cap on one backoff sleep (Retry-After included)")
    max_bytes: int = Field(16 << 20, gt=0, description="largest body accepted")
    max_redirects: int = Field(5, ge=0)
    user_agent: str = Field(DEFAULT_USER_AGENT, min_length=1)
    user_agent_token: str = Field("recap", min_length=1,
                                  description="our name in user-agent-scoped X-Robots-Tag values ('recap: noai')")
    respect_opt_out: bool = True
    opt_out_directives: list[str] = Field(default_factory=lambda: list(DEFAULT_OPT_OUT))
    ssrf_guard: bool = True
    allow_hosts: list[str] = Field(default_factory=list,
                                   description="'host' (any port) or 'host:port' exempt from the address guard")
    per_host_connections: int = Field(8, ge=1)
    threads: int = Field(32, ge=1)

    @field_validator("allow_hosts")
    @classmethod
    def _valid_hosts(cls, v: list[str]) -> list[str]:
        for entry in v:
            parse_host_entry(entry)  # raises ValueError naming the entry
        return v


@dataclass
class FetchResult:
    ok: bool
    data: bytes | None
    reason: str | None
    detail: str | None
    final_url: str
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    attempts: int = 0
    redirects: list[str] = field(default_factory=list)


class _Fail(Exception):
    """A failed request, already named. ``transient`` failures are worth another attempt."""

    def __init__(self, reason: str, detail: str | None = None, *, transient: bool = False,
                 status: int | None = None, headers: dict[str, str] | None = None, retry_after: float | None = None):
        super().__init__(reason, detail)
        self.reason, self.detail, self.transient = reason, detail, transient
        self.status, self.headers, self.retry_after = status, headers or {}, retry_after


# -- URLs, hosts and addresses --------------------------------------------------------------------

@dataclass(frozen=True)
class _Url:
    scheme: str
    host: str  # ASCII (IDNA), lowercase, no brackets, no trailing dot
    port: int
    target: str  # request target: path + query, percent-encoded
    host_header: str


def _ascii_host(host: str) -> str:
    host = host.rstrip(".")
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    try:
        host = host.encode("idna").decode("ascii").lower()
    except (UnicodeError, ValueError) as e:
        raise ValueError(f"bad host name {host!r}: {e}") from None
    if not host or not _HOST_CHARS.match(host):
        raise ValueError(f"bad host name {host!r}")
    return host


def parse_host_entry(entry: str) -> tuple[str, int | None]:
    """'host', 'host:port', '[v6]:port', a bare IPv6 address or a URL -> (normalised host, port or None)."""
    raw = entry.strip()
    if "://" in raw:
        parts = urlsplit(raw)
        host, port = parts.hostname or "", parts.port
    elif raw.startswith("["):
        host, _, rest = raw[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else None
    elif raw.count(":") == 1:
        host, _, p = raw.partition(":")
        port = int(p) if p.isdigit() else -1
    else:
        host, port = raw, None
    if not host or (port is not None and not 0 < port < 65536):
        raise ValueError(f"allow_hosts entry {entry!r}: expected 'host' or 'host:port'")
    return _ascii_host(host.lower()), port


def parse_url(url: Any) -> _Url:
    """Check and normalise one URL, without touching the network."""
    if not isinstance(url, str) or not url.strip():
        raise _Fail("invalid_url", "empty URL")
    url = url.strip()
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise _Fail("invalid_url", str(e)) from None
    scheme = parts.scheme.lower()
    if not scheme:
        raise _Fail("invalid_url", "no scheme")
    if scheme not in DEFAULT_PORTS:
        raise _Fail("unsupported_scheme", f"scheme {scheme!r}")
    if not parts.hostname:
        raise _Fail("invalid_url", "no host")
    try:
        host = _ascii_host(parts.hostname)
    except ValueError as e:
        raise _Fail("invalid_url", str(e)) from None
    port = port or DEFAULT_PORTS[scheme]
    target = quote(parts.path or "/", safe=_PATH_SAFE)
    if parts.query:
        target += "?" + quote(parts.query, safe=_QUERY_SAFE)
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if port == DEFAULT_PORTS[scheme] else f"{shown}:{port}"
    return _Url(scheme, host, port, target, host_header)


def _without_fragment(url: str) -> str:
    try:
        return urlunsplit(urlsplit(url)._replace(fragment=""))
    except ValueError:
        return url


def address_problem(ip: str) -> str | None:
    """Why an address must not be fetched from (loopback, private, ...), or None when it is public."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address):
        # An IPv4 address wrapped in IPv6 reaches the IPv4 host: judge the inner one.
        inner = addr.ipv4_mapped or addr.sixtofour or (addr.teredo[1] if addr.teredo else None)
        if inner is not None:
            problem = address_problem(str(inner))
            if problem:
                return problem
    for name in ("unspecified", "loopback", "link_local", "multicast", "reserved", "private"):
        if getattr(addr, f"is_{name}"):
            return name
    if not addr.is_global:  # shared address space (100.64/10) and the like
        return "not global"
    return None


Resolver = Callable[[str, int], list[tuple[int, tuple]]]


def system_resolve(host: str, port: int) -> list[tuple[int, tuple]]:
    """[(family, sockaddr)] for host:port, from the system resolver."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    seen, out = set(), []
    for family, _, _, _, sockaddr in infos:
        if sockaddr[0] not in seen:
            seen.add(sockaddr[0])
            out.append((family, sockaddr))
    return out


# -- robots opt-out -------------------------------------------------------------------------------

def opted_out(values: Sequence[str], token: str, directives: Sequence[str]) -> bool:
    """True when an X-Robots-Tag value, unscoped or scoped to ``token``, holds a refused directive.
    Same reading as img2dataset's ``is_disallowed``, case-insensitive throughout."""
    refused = {d.strip().lower() for d in directives}
    token = token.strip().lower()
    for value in values:
        scope, sep, rest = value.partition(":")
        scoped = sep and _UA_TOKEN.match(scope.strip())  # "noindex, unavailable_after: <date>" is unscoped
        ua, body = (scope.strip().lower(), rest) if scoped else (None, value)
        if ua is not None and ua != token:
            continue  # another bot's rule, or "unavailable_after: <date>": not about us
        if any(d.strip().lower() in refused for d in body.split(",")):
            return True
    return False


# -- deadline-bounded socket ----------------------------------------------------------------------

class _DeadlineReader(io.RawIOBase):
    """Every recv bounded by what is left of the deadline: a server dripping one byte a second
    (into the headers or the body) still ends at the deadline."""

    def __init__(self, sock: socket.socket, deadline: float):
        self._sock, self._deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline reached")
        self._sock.settimeout(left)
        return self._sock.recv_into(b)


class _DeadlineSocket:
    """The part of the socket interface http.client uses (sendall, makefile, close)."""

    def __init__(self, sock: socket.socket, deadline: float):
        self._sock, self._deadline = sock, deadline

    def sendall(self, data: bytes) -> None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline reached")
        self._sock.settimeout(left)  # since 3.5 a total bound for the whole sendall
        self._sock.sendall(data)

    def makefile(self, mode: str = "rb", *args, **kwargs) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline), _READ_CHUNK)

    def close(self) -> None:
        # http.client closes the "socket" as soon as it sees Connection: close, before the body is
        # read (a real socket stays open while its makefile() reader lives). The exchange closes
        # the real socket when it is done.
        pass


# -- the fetcher ----------------------------------------------------------------------------------

class Fetcher:
    """Holds the config, the TLS context and the per-host connection slots; reuse it for a shard
    (or a worker's lifetime). Thread-safe."""

    def __init__(self, config: FetchConfig | None = None, *, resolve: Resolver | None = None,
                 tls_context: ssl.SSLContext | None = None, **overrides: Any):
        """``resolve`` and ``tls_context`` replace the system resolver and the default (verifying)
        TLS context: tests, private CAs."""
        base = config.model_dump() if config is not None else {}
        self.config = FetchConfig(**{**base, **overrides})
        self._resolve = resolve or system_resolve
        self._allowed = self._allow_set(self.config.allow_hosts)
        self._tls = tls_context or ssl.create_default_context()
        self._slots: dict[str, threading.BoundedSemaphore] = {}
        self._slots_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    # -- public ------------------------------------------------------------------------------
    def fetch(self, url: str) -> FetchResult:
        """One URL, with retries. Never raises."""
        cfg = self.config
        attempts, last = 0, None
        while True:
            attempts += 1
            result, retry_after = self._attempt(url)
            result.attempts = attempts
            last = result
            if result.ok or retry_after is None or attempts > cfg.retries:
                return last
            delay = min(cfg.backoff_max, max(cfg.backoff * 2 ** (attempts - 1), retry_after))
            time.sleep(delay)

    def fetch_many(self, urls: Sequence[str], then: Callable[[FetchResult], T] | None = None) -> list:
        """Fetch in the thread pool; results in input order. ``then`` runs in the worker thread on
        each result (decode there, so CPU work overlaps the waiting)."""
        def one(u: str):
            r = self.fetch(u)
            return then(r) if then is not None else r

        if len(urls) <= 1:
            return [one(u) for u in urls]
        return list(self._executor().map(one, urls))

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def is_allowed(self, host: str, port: int) -> bool:
        return host in self._allowed or (host, port) in self._allowed

    # -- one attempt: the redirect chain under one deadline budget ----------------------------
    def _attempt(self, url: str) -> tuple[FetchResult, float | None]:
        """(result, retry_after): retry_after is None unless the failure is transient."""
        redirects: list[str] = []
        current = url if isinstance(url, str) else ""
        seen = {_without_fragment(current.strip())}
        budget = self.config.timeout
        try:
            while True:
                target = parse_url(current)
                addrs = self._vet(target)
                with self._slot(target.host):
                    started = time.monotonic()
                    try:
                        status, headers, payload = self._exchange(target, addrs, started + budget)
                    finally:
                        budget -= time.monotonic() - started
                if status in REDIRECT_CODES and headers.get("location"):
                    current = self._next_hop(current, headers["location"], redirects, seen)
                    continue
                return FetchResult(True, payload, None, None, current, status, headers, 0, redirects), None
        except _Fail as f:
            result = FetchResult(False, None, f.reason, f.detail, current, f.status, f.headers, 0, redirects)
            return result, (f.retry_after or 0.0) if f.transient else None
        except Exception as e:  # noqa: BLE001 - the contract is "never raises"; name it and move on
            return FetchResult(False, None, "fetch_error", f"{type(e).__name__}: {e}", current, None, {}, 0,
                               redirects), None

    def _next_hop(self, current: str, location: str, redirects: list[str], seen: set[str]) -> str:
        nxt = urljoin(current, location.strip())
        key = _without_fragment(nxt)
        if key in seen:
            raise _Fail("redirect_loop", f"{current} -> {nxt} (seen before)")
        if len(redirects) >= self.config.max_redirects:
            raise _Fail("too_many_redirects", f"more than {self.config.max_redirects} redirects")
        seen.add(key)
        redirects.append(nxt)
        return nxt

    def _vet(self, target: _Url) -> list[tuple[int, tuple]]:
        """Resolve once; refuse if any address is internal (unless allow-listed). The caller
        connects to exactly these addresses."""
        try:
            addrs = self._resolve(target.host, target.port)
        except socket.gaierror as e:
            raise _Fail("dns_error", f"{target.host}: {e.strerror or e}", transient=e.errno == socket.EAI_AGAIN) from None
        except (OSError, UnicodeError) as e:
            raise _Fail("dns_error", f"{target.host}: {e}") from None
        if not addrs:
            raise _Fail("dns_error", f"{target.host}: no address")
        if self.config.ssrf_guard and not self.is_allowed(target.host, target.port):
            for _, sockaddr in addrs:
                problem = address_problem(sockaddr[0])
                if problem:
                    shown = target.host if target.host == sockaddr[0] else f"{target.host} -> {sockaddr[0]}"
                    raise _Fail("blocked_address", f"{shown} is {problem}")
        return addrs

    @contextmanager
    def _slot(self, host: str) -> Iterator[None]:
        with self._slots_lock:
            sem = self._slots.get(host)
            if sem is None:
                sem = self._slots[host] = threading.BoundedSemaphore(self.config.per_host_connections)
        with sem:
            yield

    # -- one HTTP exchange ------------------------------------------------------------------------
    def _exchange(self, target: _Url, addrs: list[tuple[int, tuple]], deadline: float
                  ) -> tuple[int, dict[str, str], bytes | None]:
        """(status, headers, body); body is None for a redirect. Raises _Fail."""
        sock = None
        try:
            sock = self._connect(target, addrs, deadline)
            conn = http.client.HTTPConnection(target.host, target.port)
            conn.sock = _DeadlineSocket(sock, deadline)  # type: ignore[assignment]
            conn.putrequest("GET", target.target, skip_host=True, skip_accept_encoding=True)
            for k, v in (("Host", target.host_header), ("User-Agent", self.config.user_agent),
                         ("Accept", "image/avif,image/webp,image/png,image/jpeg,image/*;q=0.9,*/*;q=0.5"),
                         ("Accept-Encoding", "identity"), ("Connection", "close")):
                conn.putheader(k, v)
            conn.endheaders()
            resp = conn.getresponse()
            headers = {k.lower(): v for k, v in resp.getheaders()}
            status = resp.status
            if status in REDIRECT_CODES and headers.get("location"):
                return status, headers, None
            self._check_status(resp, headers)
            self._check_opt_out(resp, headers)
            return status, headers, self._read_body(resp, headers)
        except _Fail:
            raise
        except Exception as e:  # noqa: BLE001
            raise _from_exception(e, self.config) from None
        finally:
            if sock is not None:
                sock.close()

    def _connect(self, target: _Url, addrs: list[tuple[int, tuple]], deadline: float) -> socket.socket:
        last: Exception | None = None
        for family, sockaddr in addrs:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("deadline reached while connecting")
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.settimeout(min(self.config.connect_timeout, left))
                sock.connect(sockaddr)
                if target.scheme == "https":
                    sock.settimeout(max(deadline - time.monotonic(), 0.001))
                    sock = self._tls.wrap_socket(sock, server_hostname=target.host)
                return sock
            except Exception as e:  # noqa: BLE001 - try the next address, report the last failure
                sock.close()
                last = e
                if isinstance(e, ssl.SSLError):
                    break  # the certificate or TLS setup, not this address
        assert last is not None
        raise last

    def _check_status(self, resp: http.client.HTTPResponse, headers: dict[str, str]) -> None:
        status = resp.status
        if 200 <= status < 300:
            return
        transient = status == 429 or 500 <= status < 600
        raise _Fail(f"http_{status}", f"HTTP {status} {resp.reason}".strip(), transient=transient, status=status,
                    headers=headers, retry_after=_retry_after(headers) if transient else None)

    def _check_opt_out(self, resp: http.client.HTTPResponse, headers: dict[str, str]) -> None:
        cfg = self.config
        if not cfg.respect_opt_out:
            return
        values = resp.msg.get_all("X-Robots-Tag") or []
        if opted_out(values, cfg.user_agent_token, cfg.opt_out_directives):
            raise _Fail("opted_out", f"X-Robots-Tag: {', '.join(values)}"[:200], status=resp.status, headers=headers)

    def _read_body(self, resp: http.client.HTTPResponse, headers: dict[str, str]) -> bytes:
        cap = self.config.max_bytes
        length = _int_or_none(headers.get("content-length"))
        if length is not None and length > cap:
            raise _Fail("too_large", f"Content-Length {length} > {cap}", status=resp.status, headers=headers)
        body = bytearray()
        while True:
            chunk = resp.read(_READ_CHUNK)
            if not chunk:
                break
            body += chunk
            if len(body) > cap:
                raise _Fail("too_large", f"body over {cap} bytes", status=resp.status, headers=headers)
        if resp.length:  # the server closed before sending what Content-Length promised
            raise _Fail("connection_error", f"body cut short: {len(body)} of {length} bytes", transient=True,
                        status=resp.status, headers=headers)
        if not body:
            raise _Fail("empty_response", f"HTTP {resp.status} with an empty body", status=resp.status,
                        headers=headers)
        return bytes(body)

    # -- plumbing --------------------------------------------------------------------------------
    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.config.threads, thread_name_prefix="recap-fetch")
            return self._pool

    @staticmethod
    def _allow_set(entries: Sequence[str]) -> set:
        out: set = set()
        for entry in entries:
            host, port = parse_host_entry(entry)
            out.add(host if port is None else (host, port))
        return out


def _from_exception(e: Exception, cfg: FetchConfig) -> _Fail:
    """Name an exception from connect/TLS/http.client. Details stay free of timings so that two runs
    of the same input give the same ledger."""
    if isinstance(e, TimeoutError):
        return _Fail("timeout", f"no complete response within {cfg.timeout:g}s", transient=True)
    if isinstance(e, ssl.SSLCertVerificationError):
        return _Fail("ssl_error", f"certificate: {e.verify_message or e.reason}")
    if isinstance(e, ssl.SSLError):
        return _Fail("ssl_error", f"{type(e).__name__}: {e.reason or e}")
    if isinstance(e, http.client.IncompleteRead):
        return _Fail("connection_error", f"body cut short: {len(e.partial)} bytes read", transient=True)
    if isinstance(e, ConnectionError):  # refused, reset, aborted, RemoteDisconnected
        return _Fail("connection_error", f"{type(e).__name__}: {e}", transient=True)
    if isinstance(e, http.client.HTTPException):
        return _Fail("bad_response", f"{type(e).__name__}: {e}"[:300])
    if isinstance(e, OSError):  # unreachable network or host
        return _Fail("connection_error", f"{type(e).__name__}: {e}", transient=True)
    return _Fail("fetch_error", f"{type(e).__name__}: {e}")


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _retry_after(headers: dict[str, str]) -> float | None:
    # Only the delta-seconds form: an HTTP date would tie retries to the wall clock.
    value = _int_or_none((headers.get("retry-after") or "").strip() or None)
    return float(value) if value is not None and value >= 0 else None
