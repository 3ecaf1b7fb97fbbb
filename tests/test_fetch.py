"""pipeline.fetch against real HTTP servers on loopback addresses.

The "forbidden" server listens on 127.0.0.2, which is never allow-listed: every guard test
asserts it saw no request at all, directly or through a redirect.
"""
import io
import socket
import time

import pytest
from PIL import Image

from recap.pipeline.fetch import (DEFAULT_USER_AGENT, FetchConfig, Fetcher, _Fail, address_problem, opted_out,
                            parse_host_entry, parse_url)
from tests.httpd import TestServer, chunked, drip, flaky, hang, redirect, self_signed, send, static


def _jpeg(w: int = 32, h: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 60)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


JPEG = _jpeg()


@pytest.fixture(scope="module")
def srv():
    with TestServer("127.0.0.1") as s:
        yield s


@pytest.fixture(scope="module")
def forbidden():
    with TestServer("127.0.0.2") as s:
        s.route("/secret.jpg", static(JPEG))
        yield s


@pytest.fixture
def make(srv):
    """A Fetcher allowed to reach the test server, with test-sized timeouts."""
    fetchers = []

    def _make(**kw) -> Fetcher:
        opts = dict(allow_hosts=[srv.netloc], timeout=2.0, connect_timeout=1.0, retries=0, backoff=0.01)
        f = Fetcher(**{**opts, **kw})
        fetchers.append(f)
        return f

    yield _make
    for f in fetchers:
        f.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- success and the request we send ------------------------------------------------------------------

def test_success_sends_original_host_and_project_user_agent(srv, make):
    url = srv.route("/ok.jpg", static(JPEG))
    r = make().fetch(url)
    assert r.ok and r.data == JPEG and r.reason is None and r.status == 200
    assert r.attempts == 1 and r.redirects == [] and r.final_url == url
    assert r.headers["content-type"] == "image/jpeg"
    path, headers = [q for q in srv.requests if q[0] == "/ok.jpg"][-1]
    assert headers["user-agent"] == DEFAULT_USER_AGENT
    assert headers["host"] == srv.netloc


def test_non_ascii_path_is_percent_encoded(srv, make):
    srv.route("/caf%C3%A9.jpg", static(JPEG))
    assert make().fetch(srv.url("/café.jpg")).ok


def test_fetch_never_raises_on_garbage_input(make):
    for bad in (None, 42, b"http://x"):
        r = make().fetch(bad)
        assert not r.ok and r.reason == "invalid_url"


# -- HTTP errors and retries ------------------------------------------------------------------------------

@pytest.mark.parametrize("code", [404, 500])
def test_http_errors(srv, make, code):
    url = srv.route(f"/e{code}", static(b"nope", status=code, content_type="text/html"))
    r = make(retries=0).fetch(url)
    assert not r.ok and r.reason == f"http_{code}" and r.status == code
    assert r.detail.startswith(f"HTTP {code}")


def test_client_errors_are_not_retried(srv, make):
    url = srv.route("/gone404", static(b"nope", status=404))
    r = make(retries=2).fetch(url)
    assert r.reason == "http_404" and r.attempts == 1 and srv.hits["/gone404"] == 1


def test_retries_on_500_and_503_then_success(srv, make):
    url = srv.route("/flaky", flaky([500, 503], JPEG))
    r = make(retries=2).fetch(url)
    assert r.ok and r.data == JPEG and r.attempts == 3 and srv.hits["/flaky"] == 3


def test_retries_exhausted_report_the_last_failure(srv, make):
    url = srv.route("/always500", static(b"down", status=500))
    r = make(retries=1).fetch(url)
    assert r.reason == "http_500" and r.attempts == 2 and srv.hits["/always500"] == 2


def test_429_is_retried(srv, make):
    url = srv.route("/busy", flaky([429], JPEG))
    r = make(retries=1).fetch(url)
    assert r.ok and r.attempts == 2


def test_connection_refused_is_retried_then_named(make):
    r = make(retries=1, allow_hosts=["127.0.0.1"]).fetch(f"http://127.0.0.1:{_closed_port()}/x.jpg")
    assert r.reason == "connection_error" and r.attempts == 2


def test_body_cut_short(srv, make):
    def short(h, s):
        send(h, b"\xff\xd8\xff" + b"x" * 7, length=1000)
    url = srv.route("/short", short)
    r = make().fetch(url)
    assert r.reason == "connection_error" and "cut short" in r.detail


def test_body_without_length_ends_at_close(srv, make):
    def http10(h, s):  # neither Content-Length nor chunked: the body is whatever comes before close
        h.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Type: image/jpeg\r\n\r\n" + JPEG)
    url = srv.route("/http10", http10)
    r = make().fetch(url)
    assert r.ok and r.data == JPEG
    assert make(max_bytes=100).fetch(url).reason == "too_large"


def test_redirect_status_without_location_is_an_error(srv, make):
    url = srv.route("/nowhere", static(b"", status=302, content_type="text/plain"))
    assert make().fetch(url).reason == "http_302"


def test_empty_body(srv, make):
    url = srv.route("/empty", static(b""))
    assert make().fetch(url).reason == "empty_response"


# -- time limits ------------------------------------------------------------------------------------------

def test_slow_within_timeout_succeeds(srv, make):
    url = srv.route("/slow", static(JPEG, delay=0.4))
    r = make(timeout=3.0).fetch(url)
    assert r.ok and r.data == JPEG


def test_hanging_server_times_out_in_bounded_time(srv, make):
    url = srv.route("/hang", hang())
    t0 = time.monotonic()
    r = make(timeout=1.0).fetch(url)
    elapsed = time.monotonic() - t0
    assert r.reason == "timeout" and r.attempts == 1
    assert 0.9 <= elapsed < 2.0


def test_slow_drip_body_hits_the_total_deadline(srv, make):
    # Each byte arrives well within any per-read timeout; only a total deadline ends this.
    url = srv.route("/drip", drip(JPEG[:200], interval=0.05))
    t0 = time.monotonic()
    r = make(timeout=1.0).fetch(url)
    assert r.reason == "timeout" and time.monotonic() - t0 < 2.0


def test_slow_drip_headers_hit_the_total_deadline(srv, make):
    url = srv.route("/driphead", drip(JPEG[:50], interval=0.05, headers_too=True))
    t0 = time.monotonic()
    r = make(timeout=1.0).fetch(url)
    assert r.reason == "timeout" and time.monotonic() - t0 < 2.0


# -- size cap ---------------------------------------------------------------------------------------------

def test_content_length_over_cap_is_refused_before_reading(srv, make):
    url = srv.route("/big", static(b"\0" * 5000))
    r = make(max_bytes=1000).fetch(url)
    assert r.reason == "too_large" and "Content-Length 5000" in r.detail


def test_chunked_body_over_cap_stops_reading(srv, make):
    url = srv.route("/bigchunked", chunked(b"\0" * 50_000, chunk=1000))
    r = make(max_bytes=10_000).fetch(url)
    assert r.reason == "too_large" and "body over 10000" in r.detail


def test_chunked_body_under_cap_is_fine(srv, make):
    url = srv.route("/okchunked", chunked(JPEG, chunk=100))
    r = make().fetch(url)
    assert r.ok and r.data == JPEG


# -- redirects --------------------------------------------------------------------------------------------

def test_single_redirect(srv, make):
    target = srv.route("/r/target.jpg", static(JPEG))
    url = srv.route("/r/one", redirect("target.jpg", 301))  # relative to the current URL
    r = make().fetch(url)
    assert r.ok and r.data == JPEG and r.redirects == [target] and r.final_url == target


def test_chained_redirects(srv, make):
    srv.route("/c/end.jpg", static(JPEG))
    srv.route("/c/3", redirect("/c/end.jpg", 308))
    srv.route("/c/2", redirect(srv.url("/c/3"), 307))
    url = srv.route("/c/1", redirect("/c/2", 303))
    r = make().fetch(url)
    assert r.ok and len(r.redirects) == 3 and r.final_url == srv.url("/c/end.jpg")


def test_redirect_loop(srv, make):
    srv.route("/loop/a", redirect("/loop/b"))
    url = srv.route("/loop/b", redirect("/loop/a"))
    r = make(max_redirects=10).fetch(url)
    assert r.reason == "redirect_loop"
    assert srv.hits["/loop/a"] == 1 and srv.hits["/loop/b"] == 1


def test_too_many_redirects(srv, make):
    for i in range(5):
        srv.route(f"/many/{i}", redirect(f"/many/{i + 1}"))
    srv.route("/many/5", static(JPEG))
    r = make(max_redirects=2).fetch(srv.url("/many/0"))
    assert r.reason == "too_many_redirects" and len(r.redirects) == 2
    assert srv.hits["/many/3"] == 0  # the hop past the limit is never requested
    assert make(max_redirects=5).fetch(srv.url("/many/0")).ok


def test_redirect_to_another_scheme_is_refused(srv, make):
    url = srv.route("/tofile", redirect("file:///etc/passwd"))
    assert make().fetch(url).reason == "unsupported_scheme"


# -- SSRF guard -------------------------------------------------------------------------------------------

def test_non_allowed_loopback_host_gets_no_request(make, forbidden):
    r = make().fetch(forbidden.url("/secret.jpg"))
    assert r.reason == "blocked_address" and "loopback" in r.detail
    assert forbidden.total_hits() == 0


def test_redirect_to_non_allowed_host_gets_no_request(srv, make, forbidden):
    url = srv.route("/to-forbidden", redirect(forbidden.url("/secret.jpg")))
    r = make().fetch(url)
    assert r.reason == "blocked_address" and r.redirects == [forbidden.url("/secret.jpg")]
    assert srv.hits["/to-forbidden"] == 1 and forbidden.total_hits() == 0


def test_allow_list_forms(srv, make, forbidden):
    url = srv.route("/allow.jpg", static(JPEG))
    before = srv.hits["/allow.jpg"]
    assert make(allow_hosts=[]).fetch(url).reason == "blocked_address"
    assert make(allow_hosts=[f"127.0.0.1:{srv.port + 1}"]).fetch(url).reason == "blocked_address"
    assert srv.hits["/allow.jpg"] == before
    assert make(allow_hosts=["127.0.0.1"]).fetch(url).ok  # a bare host allows any port
    assert make(allow_hosts=[f"http://127.0.0.1:{srv.port}"]).fetch(url).ok
    assert forbidden.total_hits() == 0


def test_guard_off_reaches_internal_hosts():
    with TestServer("127.0.0.3") as other:
        url = other.route("/x.jpg", static(JPEG))
        with Fetcher(ssrf_guard=False, timeout=2.0) as f:
            assert f.fetch(url).ok and other.hits["/x.jpg"] == 1


def test_connects_to_the_vetted_address_with_the_original_host_header(srv, make):
    srv.route("/named.jpg", static(JPEG))
    calls = []

    def resolve(host, port):
        calls.append(host)
        return [(socket.AF_INET, ("127.0.0.1", port))] if host == "img.test" else []

    f = make(allow_hosts=[f"img.test:{srv.port}"], resolve=resolve)
    r = f.fetch(f"http://IMG.test:{srv.port}/named.jpg")
    assert r.ok and calls == ["img.test"]  # resolved once: no second lookup to rebind
    assert [h for p, h in srv.requests if p == "/named.jpg"][-1]["host"] == f"img.test:{srv.port}"


def test_any_internal_address_blocks_the_host(make):
    def resolve(host, port):  # a public address and a private one: the host is refused outright
        return [(socket.AF_INET, ("93.184.216.34", port)), (socket.AF_INET, ("10.1.2.3", port))]

    f = make(allow_hosts=[], resolve=resolve)
    with pytest.raises(_Fail) as e:  # checked on the vetting step alone: nothing is connected
        f._vet(parse_url("http://mixed.test/a.jpg"))
    assert e.value.reason == "blocked_address" and "10.1.2.3" in e.value.detail


@pytest.mark.parametrize("ip,problem", [
    ("127.0.0.1", "loopback"), ("127.0.0.2", "loopback"), ("10.0.0.1", "private"), ("192.168.1.1", "private"),
    ("172.16.0.1", "private"), ("169.254.169.254", "link_local"), ("224.0.0.1", "multicast"),
    ("0.0.0.0", "unspecified"), ("240.0.0.1", "reserved"), ("100.64.0.1", "not global"), ("::1", "loopback"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"), ("fe80::1", "link_local"),
    ("fc00::1", "private"), ("2002:7f00:1::", "loopback"), ("93.184.216.34", None), ("2606:4700::1111", None),
])
def test_address_classes(ip, problem):
    assert address_problem(ip) == problem


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/a.jpg", "file:///etc/passwd", "data:image/png;base64,AAAA",
                                 "javascript:alert(1)", "gopher://127.0.0.1:70/"])
def test_unsupported_schemes(make, url):
    assert make().fetch(url).reason == "unsupported_scheme"


@pytest.mark.parametrize("url", ["", "   ", "not a url", "example.com/a.jpg", "http://", "http://[::1",
                                 "http://exa mple.com/a.jpg", "http://127.0.0.1:99999/a.jpg", "https:///a.jpg"])
def test_invalid_urls(make, url):
    r = make().fetch(url)
    assert r.reason == "invalid_url", (url, r)


def test_allow_hosts_are_validated():
    assert parse_host_entry("Example.COM:443") == ("example.com", 443)
    assert parse_host_entry("[::1]:8080") == ("::1", 8080)
    assert parse_host_entry("::1") == ("::1", None)
    for bad in ("", "host:port", "a b:80", "h:0"):
        with pytest.raises(ValueError):
            FetchConfig(allow_hosts=[bad])


def test_default_port_matches_allow_entry(make):
    f = make(allow_hosts=["img.test:443", "plain.test"])
    assert f.is_allowed(parse_url("https://IMG.test/x").host, 443)
    assert not f.is_allowed("img.test", 80)
    assert f.is_allowed("plain.test", 8080)


# -- opt-out ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value,refused", [
    ("noai", True), ("NoImageAI", True), ("noindex, nofollow", True), ("noimageindex", True),
    ("recap: noai", True), ("RECAP: noimageai, nofollow", True), ("otherbot: noai", False),
    ("nofollow", False), ("noindex, unavailable_after: 25 Jun 2010 15:00:00 PST", True),
    ("unavailable_after: 25 Jun 2010 15:00:00 PST", False),
])
def test_opt_out_reading(value, refused):
    assert opted_out([value], "recap", ["noai", "noimageai", "noindex", "noimageindex"]) is refused


def test_opt_out_header(srv, make):
    url = srv.route("/optout.jpg", static(JPEG, headers=[("X-Robots-Tag", "nofollow"), ("X-Robots-Tag", "recap: noai")]))
    r = make().fetch(url)
    assert r.reason == "opted_out" and "noai" in r.detail
    assert make(respect_opt_out=False).fetch(url).ok
    other = srv.route("/otherbot.jpg", static(JPEG, headers=[("X-Robots-Tag", "otherbot: noai")]))
    assert make().fetch(other).ok


# -- concurrency ------------------------------------------------------------------------------------------

def test_per_host_connection_cap(srv, make):
    srv.route("/capped.jpg", static(JPEG, delay=0.25))
    srv.max_in_flight = 0
    f = make(threads=12, per_host_connections=3)
    results = f.fetch_many([srv.url(f"/capped.jpg?i={i}") for i in range(12)])
    assert all(r.ok for r in results)
    assert srv.max_in_flight == 3


def test_order_is_preserved_with_many_threads(srv, make):
    urls = []
    for i in range(64):
        urls.append(srv.route(f"/order/{i}", static(str(i).encode(), delay=(i * 7 % 5) * 0.02)))
    results = make(threads=32, per_host_connections=32).fetch_many(urls)
    assert [r.data for r in results] == [str(i).encode() for i in range(64)]
    assert [r.final_url for r in results] == urls


def test_fetch_many_applies_then_in_order(srv, make):
    urls = [srv.route(f"/then/{i}", static(b"x" * (i + 1))) for i in range(10)]
    assert make(threads=4).fetch_many(urls, then=lambda r: len(r.data)) == list(range(1, 11))


# -- TLS --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    server_ctx, client_ctx = self_signed(tmp_path_factory.mktemp("tls"))
    with TestServer("127.0.0.1", tls=server_ctx) as s:
        s.route("/secure.jpg", static(JPEG))
        yield s, client_ctx


def _resolve_to_loopback(host, port):
    return [(socket.AF_INET, ("127.0.0.1", port))]


def test_https_to_the_vetted_address_verifies_the_original_name(tls):
    s, client_ctx = tls
    with Fetcher(allow_hosts=[f"img.test:{s.port}"], resolve=_resolve_to_loopback, tls_context=client_ctx,
                 timeout=3.0) as f:
        r = f.fetch(f"https://img.test:{s.port}/secure.jpg")
    assert r.ok and r.data == JPEG
    assert [h for p, h in s.requests if p == "/secure.jpg"][-1]["host"] == f"img.test:{s.port}"


def test_https_certificate_problems_are_ssl_errors_and_not_retried(tls):
    s, client_ctx = tls
    before = s.total_hits()
    # untrusted certificate (the default context does not know our throwaway CA)
    with Fetcher(allow_hosts=["127.0.0.1"], timeout=3.0, retries=2, backoff=0.01) as f:
        r = f.fetch(s.url("/secure.jpg"))
    assert r.reason == "ssl_error" and r.attempts == 1
    # trusted certificate, wrong name
    with Fetcher(allow_hosts=[f"other.test:{s.port}"], resolve=_resolve_to_loopback, tls_context=client_ctx,
                 timeout=3.0) as f:
        r = f.fetch(f"https://other.test:{s.port}/secure.jpg")
    assert r.reason == "ssl_error" and "other.test" in r.detail
    assert s.total_hits() == before  # no request went out over an unverified connection
