"""Datasets on object storage, against moto's S3 server on 127.0.0.1: the input URL list, shards,
sidecars, ledger, commit markers and the reinforced output on ``s3://`` are the bytes the same job
writes to a local folder; kill -9 then rerun on ``s3://`` gives the uninterrupted bytes (no rename
there: only commit markers say what is complete); throttling (503 SlowDown from a proxy on
127.0.0.1) is retried; a missing bucket, bad credentials or throttling that never stops are a clear
error naming the URL, exit 2; the secret key is never written anywhere."""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from recap.pipeline.job import load_job
from recap.pipeline.runner import run_job
from recap.world.generate import generate_world
from recap.world.server import serve
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
RECAP = [sys.executable, "-m", "recap.cli"]
BUCKET = "recap-s3"
# the demo job sliced to what runs in seconds: filters, dedup, a random-init tiny CLIP, and
# reinforced shards from a random-init tiny teacher
STAGES = ("[{basic: {min_image_size: 64, max_aspect_ratio: 3.0, min_caption_words: 2, languages: [en], "
          "min_language_score: 0.0}}, {dedup: {}}, {clip: {model: recap-tiny, pretrained: null}}, "
          "{reinforce: {teachers: [{model: recap-tiny-cnn, pretrained: null}], aug: {image_size: 48, n_aug: 2}}}]")
SHORT_STAGES = STAGES.split(", {clip")[0] + "]"  # download, basic, dedup: what the kill -9 case reruns


def job_sets(urls: str, port: int, stages: str = STAGES) -> list[str]:
    return [f"input.path={urls}", f"download.allow_hosts=[127.0.0.1:{port}]", "download.samples_per_shard=50",
            "download.timeout=2", f"stages={stages}"]


def cli(sets: list[str], out: str, env: dict, **kw) -> subprocess.Popen:
    cmd = RECAP + ["run", str(ROOT / "jobs/demo.yaml"), "--output", out, "--cpus", "2", "--quiet"]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.Popen(cmd, env={**env, "PYTHONPATH": str(ROOT)}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def s3_env(endpoint: str, secret: str, key: str = "recap-test-key") -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_S3"))}
    return {**env, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
            "FSSPEC_S3_ENDPOINT_URL": endpoint}


def ignored(rel: str) -> bool:
    """Files that say when and where a run happened, not what it made."""
    return rel == "manifest.json" or rel.startswith("logs/") or rel.endswith("_stats.json")


def s3_files(prefix: str) -> dict[str, bytes]:
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    root = prefix.removeprefix("s3://").rstrip("/") + "/"
    return {p[len(root):]: fs.cat_file(p) for p in fs.find(prefix)}


def local_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def digests(files: dict[str, bytes]) -> dict[str, str]:
    return {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items() if not ignored(rel)}


# -- the world, its URL list on s3://, and the job run to s3:// and to a local folder ------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory, s3_endpoint):
    import fsspec

    port = free_port()
    out = tmp_path_factory.mktemp("s3world") / "w"
    generate_world(out, samples=240, heldout=40, seed=5, port=port)
    fs = fsspec.filesystem("s3")
    fs.mkdir(f"s3://{BUCKET}")
    fs.put_file(str(out / "urls.parquet"), f"s3://{BUCKET}/input/urls.parquet")
    with serve(out, port=port) as srv:
        yield out, port, srv


@pytest.fixture(scope="module")
def reference(world, ray_local, tmp_path_factory):
    """The job with its URL list and output on s3://, and the same job read and written locally."""
    world_dir, port, _ = world
    remote = f"s3://{BUCKET}/reference"
    local = tmp_path_factory.mktemp("s3local") / "ds"
    run_job(load_job(ROOT / "jobs/demo.yaml", job_sets(f"s3://{BUCKET}/input/urls.parquet", port), output=remote),
            progress=False)
    run_job(load_job(ROOT / "jobs/demo.yaml", job_sets(str(world_dir / "urls.parquet"), port), output=str(local)),
            progress=False)
    return remote, local


def test_the_dataset_on_s3_is_the_local_dataset_byte_for_byte(reference):
    from recap.pipeline.inspect import inspect_dataset

    remote, local = reference
    got, want = s3_files(remote), local_files(local)
    assert set(got) == set(want)
    for part in ("shards/", "stages/basic/", "stages/dedup/", "stages/clip/", "ledger/basic/", "ledger/dedup/",
                 "commits/download/", "reinforced/shards/", "reinforced/config.json"):
        assert any(rel.startswith(part) for rel in got), part
    assert sum(rel.startswith("shards/") and rel.endswith(".tar") for rel in got) == 5  # 240 URLs, 50 a shard
    plan_rel = "input/_plan.json"  # names the input list it planned from: the one on s3:// vs the local copy
    plan_got, plan_want = json.loads(got.pop(plan_rel)), json.loads(want.pop(plan_rel))
    assert plan_got["input"].pop("path") == f"s3://{BUCKET}/input/urls.parquet"
    plan_want["input"].pop("path")
    assert plan_got == plan_want
    assert digests(got) == digests(want)
    rep = inspect_dataset(remote)  # inspect reads it back from s3://: every input is kept or dropped
    assert rep["invariant_ok"], rep["problems"]
    assert rep["stages"]["download"]["in"] == 240
    assert list(rep["stages"]) == ["download", "basic", "dedup", "clip", "reinforce"]


# -- kill -9 in the middle of a run writing to s3:// -----------------------------------------------------------

@pytest.mark.parametrize("case", [
    "curation",  # download, basic, dedup: killed once two download shards are committed
    pytest.param("model_stages", marks=pytest.mark.slow),  # the whole list: killed after clip's first shard
])
def test_kill_9_then_rerun_on_s3_gives_the_uninterrupted_bytes(world, reference, s3_endpoint, case):
    """The rerun's dataset holds the uninterrupted run's files for the steps it ran, byte for byte
    (for the curation slice the reference ran more stages after them; files are step-scoped, so
    they compare)."""
    import fsspec

    _, port, _ = world
    secret = "s3-secret-" + secrets.token_hex(8)
    env = s3_env(s3_endpoint, secret)
    out = f"s3://{BUCKET}/killed-{case}"
    step, enough = ("download", 2) if case == "curation" else ("clip", 1)
    sets = job_sets(f"s3://{BUCKET}/input/urls.parquet", port, SHORT_STAGES if case == "curation" else STAGES)
    fs = fsspec.filesystem("s3")
    first = cli(sets, out, env)
    deadline, seen = time.time() + 300, []
    while time.time() < deadline and first.poll() is None:
        fs.invalidate_cache()
        seen = [p for p in fs.find(f"{out}/commits") if f"/commits/{step}/" in p]
        if len(seen) >= enough:
            break
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL, "the run ended before it could be interrupted"
    err1 = first.stderr.read()
    left = s3_files(out)
    assert any(rel.startswith("commits/") for rel in left) and len(seen) < 5
    time.sleep(2)
    again = cli(sets, out, env)
    stdout, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr[-3000:]
    got = digests(s3_files(out))
    want = digests(s3_files(reference[0]))
    assert got and set(got) <= set(want)
    assert {rel: want[rel] for rel in got} == got
    if case == "curation":
        ran = ("download", "basic", "dedup")
        want = {rel: d for rel, d in want.items() if rel.split("/")[0] in ("shards", "input")
                or (rel.split("/")[0] in ("stages", "ledger", "commits") and rel.split("/")[1].split(".")[0] in ran)}
    assert set(got) == set(want)
    for text in (err1, stdout, stderr):
        assert secret not in text
    assert not any(secret.encode() in data for data in s3_files(out).values())


# -- throttling, a missing bucket, bad credentials -------------------------------------------------------------

class SlowDownProxy:
    """A proxy on 127.0.0.1 in front of moto that answers some requests 503 SlowDown, as S3 does when
    a prefix is hot: ``always`` every request, otherwise the first try of every third request path."""

    def __init__(self, upstream: str, always: bool = False):
        self.upstream = upstream.removeprefix("http://")
        self.always = always
        self.seen: set[tuple[str, str]] = set()
        self.throttled = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                key = (self.command, self.path)
                with proxy.lock:
                    first = key not in proxy.seen
                    proxy.seen.add(key)
                    slow = proxy.always or (first and int(hashlib.sha256(repr(key).encode()).hexdigest(), 16) % 3 == 0)
                    proxy.throttled += slow
                if slow:
                    msg = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                           b"<Message>Please reduce your request rate.</Message></Error>")
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                conn.request(self.command, self.path, body=body or None,
                             headers={k: v for k, v in self.headers.items() if k.lower() != "connection"})
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(k, v)
                # a HEAD answer has no body but states the object's size
                self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD"
                                 else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow  # ~15 s alone, a minute on a loaded machine: botocore backs off before each retry
def test_throttled_requests_are_retried_and_the_bytes_do_not_change(world, reference, s3_endpoint):
    _, port, _ = world
    secret = "s3-secret-" + secrets.token_hex(8)
    out = f"s3://{BUCKET}/throttled"
    with SlowDownProxy(s3_endpoint) as proxy:
        p = cli(job_sets(f"s3://{BUCKET}/input/urls.parquet", port, "[]"), out, s3_env(proxy.url, secret))
        stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-3000:]
    assert proxy.throttled >= 20  # reads, writes and listings were all refused once
    got = digests(s3_files(out))
    want = digests(s3_files(reference[0]))
    assert set(got) == {rel for rel in want if rel.split("/")[0] in ("shards", "input")
                        or rel.split("/")[1] == "download"}
    assert {rel: want[rel] for rel in got} == got
    assert secret not in stdout + stderr


def _moto_with_auth() -> tuple[subprocess.Popen, str]:
    """A second moto server that checks credentials (the session's accepts any)."""
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            http.client.HTTPConnection("127.0.0.1", port, timeout=1).request("GET", "/")
            return server, url
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("moto_server did not start")


@pytest.mark.parametrize("case", ["missing_bucket", "missing_input_bucket", "bad_credentials", "throttled_for_good"])
def test_storage_errors_exit_2_naming_the_url_within_seconds(world, tmp_path, s3_endpoint, case):
    world_dir, port, _ = world
    secret = "s3-secret-" + secrets.token_hex(8)
    out = {"missing_bucket": "s3://no-such-bucket-here/ds", "missing_input_bucket": str(tmp_path / "ds")}.get(
        case, f"s3://{BUCKET}/ds")
    urls = "s3://no-such-bucket-here/urls.parquet" if case == "missing_input_bucket" else str(world_dir / "urls.parquet")
    sets = job_sets(urls, port, "[]")
    started = time.time()
    if case.startswith("missing"):
        p = cli(sets, out, s3_env(s3_endpoint, secret))
        stdout, stderr = p.communicate(timeout=120)
    elif case == "bad_credentials":
        server, url = _moto_with_auth()
        try:
            p = cli(sets, out, s3_env(url, secret, key="AKIANOTAREALKEY00000"))
            stdout, stderr = p.communicate(timeout=120)
        finally:
            server.kill()
            server.wait()
    else:
        with SlowDownProxy(s3_endpoint, always=True) as proxy:
            p = cli(sets, out, s3_env(proxy.url, secret))
            stdout, stderr = p.communicate(timeout=120)
    took = time.time() - started
    assert p.returncode == 2, (stdout[-2000:], stderr[-2000:])
    assert (urls if case == "missing_input_bucket" else out) in stderr and "Traceback" not in stderr + stdout
    says = {"missing_bucket": ["does not exist"], "missing_input_bucket": ["bucket does not exist"],
            "bad_credentials": ["refused access"],
            "throttled_for_good": ["did not answer", "Service Unavailable"]}[case]
    assert any(s in stderr for s in says), stderr[-2000:]
    assert took < 60, took
    assert secret not in stdout + stderr
    print(case, f"{took:.1f}s", stderr.strip().splitlines()[-1])
