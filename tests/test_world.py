"""The demo web: deterministic generation, ground truth that matches what is served, every fault
behaving as its truth row says over real HTTP (127.0.0.1, and the trap on 127.0.0.2), a clean
held-out split, and a server that stops at once even with requests hanging."""
from __future__ import annotations

import collections
import hashlib
import http.client
import io
import json
import random
import re
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import free_port
from recap.world import DEFAULT_PORT, generate_world, serve
from recap.world.captions import exact_en, foreign
from recap.world.generate import FAULTS, TOO_LARGE_BYTES
from recap.world.scenes import COLOURS, CONCEPTS, SHAPES, concept_of, image_size, sample_scene

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = 300


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("world") / "w"
    port = free_port()
    generate_world(out, samples=SAMPLES, heldout=60, seed=7, port=port, workers=2)
    return out, json.loads((out / "world.json").read_text())


@pytest.fixture(scope="module")
def truth(world) -> list[dict]:
    return pq.read_table(world[0] / "truth.parquet").to_pylist()


@pytest.fixture()
def server(world):
    # port=0: a port other than world.json's, so redirects must be built from the real one
    with serve(world[0], port=0) as srv:
        yield srv


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def get(url: str, timeout: float = 5.0, read: int | None = None) -> tuple[int, dict[str, str], bytes]:
    """One GET, no redirects followed, no proxy: (status, headers, body)."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("GET", u.path or "/")
        resp = conn.getresponse()
        body = resp.read() if read is None else resp.read(read)
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def _local(url: str, port: int) -> str:
    """A world URL re-pointed at the port the test server really listens on."""
    u = urlsplit(url)
    return u._replace(netloc=f"{u.hostname}:{port}").geturl()


def _decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001
        return False


# -- generation ------------------------------------------------------------------------------------

def test_same_seed_same_bytes_whatever_the_worker_count(world, tmp_path):
    out, meta = world
    again = tmp_path / "again"
    generate_world(again, samples=SAMPLES, heldout=60, seed=7, port=meta["port"], workers=1)
    assert _digests(again) == _digests(out)
    other = tmp_path / "other"
    generate_world(other, samples=SAMPLES, heldout=60, seed=8, port=meta["port"], workers=1)
    assert _digests(other)["urls.parquet"] != _digests(out)["urls.parquet"]


def test_regenerating_replaces_a_world_but_never_a_foreign_directory(tmp_path):
    stray = tmp_path / "mine"
    stray.mkdir()
    (stray / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        generate_world(stray, samples=20, heldout=0, seed=0)
    assert (stray / "notes.txt").read_text() == "keep me"
    w = tmp_path / "w"
    generate_world(w, samples=30, heldout=5, seed=0, workers=1)
    generate_world(w, samples=20, heldout=0, seed=1, workers=1)
    assert json.loads((w / "world.json").read_text())["samples"] == 20
    assert not (w / "heldout").exists()


def test_truth_lines_up_with_the_url_list(world, truth):
    out, meta = world
    urls = pq.read_table(out / "urls.parquet").to_pylist()
    assert len(urls) == len(truth) == SAMPLES == meta["samples"]
    assert {"url", "caption", "source_page", "license"} <= set(urls[0])
    assert [t["row"] for t in truth] == list(range(SAMPLES))
    assert [(u["url"], u["caption"]) for u in urls] == [(t["url"], t["caption"]) for t in truth]
    for t in truth:
        scene = json.loads(t["scene"])
        assert 1 <= len(scene["objects"]) <= 4 and t["concept"] == concept_of(scene)
        assert all(o["size"] in ("small", "medium", "large") and 0 <= o["x"] <= 1 and 0 <= o["y"] <= 1
                   for o in scene["objects"])
        if t["fault"] == "none":
            assert t["expected_reason"] is None
        else:
            assert t["expected_reason"] == FAULTS[t["fault"]][1]
        if t["fault"] not in ("blocked_url", "bad_scheme", "invalid_url"):
            assert t["url"].startswith(f"http://127.0.0.1:{meta['port']}/")
    # the web's order is shuffled, not grouped by kind or fault
    kinds = [t["caption_kind"] for t in truth]
    assert sum(a != b for a, b in zip(kinds, kinds[1:])) > SAMPLES // 3


def test_caption_kinds_languages_faults_and_duplicates_are_all_there(truth):
    kinds = collections.Counter(t["caption_kind"] for t in truth)
    assert set(kinds) == {"exact", "partial", "wrong", "junk", "foreign", "empty", "huge"}
    assert 0.35 < kinds["exact"] / SAMPLES < 0.6
    assert len({t["lang"] for t in truth if t["caption_kind"] == "foreign"}) >= 3
    assert all(t["lang"] == "en" for t in truth if t["caption_kind"] in ("exact", "partial", "wrong"))
    assert any(t["caption"] == "" for t in truth)
    assert max(len(t["caption"]) for t in truth) >= 1_000_000
    faults = collections.Counter(t["fault"] for t in truth)
    assert set(FAULTS) <= set(faults)
    assert 0.08 <= (SAMPLES - faults["none"]) / SAMPLES <= 0.13

    groups = collections.defaultdict(list)
    for t in truth:
        assert (t["dup_group"] == -1) == (t["dup_kind"] == "none")
        if t["dup_group"] >= 0:
            groups[t["dup_group"]].append(t)
    assert {g[0]["dup_kind"] for g in groups.values()} == {"exact", "near", "url"}
    for g in groups.values():
        assert len(g) >= 2 and len({t["dup_kind"] for t in g}) == 1 and len({t["scene"] for t in g}) == 1
        assert all(t["expected_reason"] is None for t in g)
        kind = g[0]["dup_kind"]
        if kind == "exact":
            assert len({t["image_sha256"] for t in g}) == 1 and len({t["url"] for t in g}) == len(g)
        elif kind == "near":
            assert len({t["image_sha256"] for t in g}) == len(g)
        else:
            assert len({t["url"] for t in g}) == 1
    url_groups = [g for g in groups.values() if g[0]["dup_kind"] == "url"]
    assert any(len({t["caption"] for t in g}) == 1 for g in url_groups)  # same URL, same caption
    assert any(len({t["caption"] for t in g}) > 1 for g in url_groups)  # same URL, another caption


def test_wrong_captions_are_exact_captions_of_another_concept(truth):
    from recap.world.captions import EXACT_TEMPLATES

    def exact_captions(scene):
        return {exact_en(scene, t, v, st) for t in range(len(EXACT_TEMPLATES)) for v in range(2) for st in range(4)}

    by_caption: dict[str, set[str]] = collections.defaultdict(set)
    for t in truth:
        for c in exact_captions(json.loads(t["scene"])):
            by_caption[c].add(t["concept"])
    wrong = [t for t in truth if t["caption_kind"] == "wrong"]
    assert wrong
    for t in wrong:
        assert by_caption[t["caption"]] - {t["concept"]}, t["caption"]
        assert t["caption"] not in exact_captions(json.loads(t["scene"]))


def test_concepts_are_head_heavy():
    rng = random.Random(0)
    counts = collections.Counter(concept_of(sample_scene(rng, *image_size(rng, 128, 256))) for _ in range(6000))
    top3 = sum(n for _, n in counts.most_common(3)) / 6000
    assert 0.33 < top3 < 0.5, top3
    assert counts.most_common(1)[0][0] == "red circle"
    assert len(counts) > 120  # a long tail, rarely seen
    assert sum(1 for n in counts.values() if n <= 20) > 60
    assert len(CONCEPTS) >= 12 * 12 and len(SHAPES) >= 12


def test_exact_and_translated_captions():
    scene = {"background": "white", "objects": [
        {"shape": "circle", "colour": "red", "size": "large", "x": 0.5, "y": 0.5, "scale": 0.25, "angle": 0},
        {"shape": "square", "colour": "blue", "size": "small", "x": 0.2, "y": 0.2, "scale": 0.1, "angle": 0},
        {"shape": "square", "colour": "blue", "size": "small", "x": 0.8, "y": 0.8, "scale": 0.1, "angle": 0}]}
    assert exact_en(scene, 0) == "a large red circle and two small blue squares on a white background"
    assert foreign(scene, "de", 0) == "Ein großer roter Kreis und zwei kleine blaue Quadrate auf weißem Hintergrund"
    assert foreign(scene, "fr", 0) == "Un grand cercle rouge et deux petits carrés bleus sur fond blanc"
    assert foreign(scene, "es", 0) == "Un círculo rojo grande y dos cuadrados azules pequeños sobre fondo blanco"
    assert foreign(scene, "nl", 0) == "Een grote rode cirkel en twee kleine blauwe vierkanten op een witte achtergrond"


# -- serving -----------------------------------------------------------------------------------------

def _rows(truth, fault):
    return [t for t in truth if t["fault"] == fault]


def test_every_fault_behaves_as_its_truth_row_says(server, truth, world):
    out, meta = world
    p = server.port
    assert p != meta["port"]
    seen: set[str] = set()

    def fetch(t, **kw):
        seen.add(urlsplit(t["url"]).path)
        return get(_local(t["url"], p), **kw)

    for t in _rows(truth, "none")[:20]:
        status, headers, body = fetch(t)
        assert status == 200 and headers["content-type"] in ("image/jpeg", "image/png")
        assert hashlib.sha256(body).hexdigest() == t["image_sha256"] and _decodes(body)
        with Image.open(io.BytesIO(body)) as im:
            assert im.size == (t["width"], t["height"])
    for code in (404, 500):
        assert fetch(_rows(truth, f"http_{code}")[0])[0] == code

    t0 = time.monotonic()
    status, _, body = fetch(_rows(truth, "slow")[0])
    assert status == 200 and _decodes(body) and time.monotonic() - t0 >= 0.29

    with pytest.raises(TimeoutError):
        fetch(_rows(truth, "hang")[0], timeout=0.5)

    for fault in ("truncated", "corrupt"):
        for t in _rows(truth, fault):
            status, headers, body = fetch(t)
            assert status == 200 and body[:2] == b"\xff\xd8" and not _decodes(body), fault
    status, headers, body = fetch(_rows(truth, "html_as_image")[0])
    assert headers["content-type"] == "image/jpeg" and body.lstrip().lower().startswith(b"<!doctype html")
    status, headers, body = fetch(_rows(truth, "empty_body")[0])
    assert status == 200 and body == b"" and headers["content-type"] == "image/jpeg"

    status, _, body = fetch(_rows(truth, "bomb")[0])
    assert status == 200 and len(body) < 100_000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(body))

    status, headers, body = fetch(_rows(truth, "too_large")[0], read=65536)
    assert status == 200 and int(headers["content-length"]) == TOO_LARGE_BYTES == 64 << 20 and len(body) == 65536
    assert max(f.stat().st_size for f in (out / "files").rglob("*") if f.is_file()) < 1 << 20  # never stored

    status, headers, _ = fetch(_rows(truth, "opted_out")[0])
    assert status == 200 and ("noai" in headers["x-robots-tag"] or "noimageai" in headers["x-robots-tag"])

    # redirects: Location is built from the port the server really listens on
    t = _rows(truth, "redirect")[0]
    status, headers, _ = fetch(t)
    assert status == 302 and headers["location"].startswith(f"http://127.0.0.1:{p}/")
    status, _, body = get(headers["location"])
    assert status == 200 and hashlib.sha256(body).hexdigest() == t["image_sha256"]
    seen.add(urlsplit(headers["location"]).path)

    t = _rows(truth, "redirect_chain")[0]
    url, statuses = _local(t["url"], p), []
    for _ in range(5):
        status, headers, body = get(url)
        seen.add(urlsplit(url).path)
        statuses.append(status)
        if status != 200:
            url = headers["location"]
            assert url.startswith(f"http://127.0.0.1:{p}/")
            continue
        break
    assert statuses == [301, 302, 307, 200] and hashlib.sha256(body).hexdigest() == t["image_sha256"]

    t = _rows(truth, "redirect_loop")[0]
    a = _local(t["url"], p)
    status, headers, _ = get(a)
    b = headers["location"]
    status2, headers2, _ = get(b)
    assert status in (301, 302) and status2 in (301, 302) and headers2["location"] == a
    seen |= {urlsplit(a).path, urlsplit(b).path}

    status, headers, _ = fetch(_rows(truth, "redirect_blocked")[0])
    assert status == 302 and headers["location"].startswith(f"http://127.0.0.2:{p}/")
    assert urlsplit(_rows(truth, "blocked_url")[0]["url"]).hostname == "127.0.0.2"
    for t in _rows(truth, "bad_scheme"):
        assert urlsplit(t["url"]).scheme not in ("http", "https")
    for t in _rows(truth, "invalid_url"):
        try:
            u = urlsplit(t["url"])
            assert not (u.scheme and u.hostname)
        except ValueError:
            pass

    # every path requested was counted, including redirect hops, and nothing reached the trap
    assert seen <= set(server.counts)
    assert sum(server.trap_counts.values()) == 0


def test_unknown_paths_are_404_and_counted_and_the_trap_counts_its_own(server):
    assert get(server.url("/no/such/thing.jpg"))[0] == 404
    assert get(server.url("/no/such/thing.jpg"))[0] == 404
    assert server.counts["/no/such/thing.jpg"] == 2
    status, headers, body = get(f"http://127.0.0.2:{server.port}/latest/meta-data/")
    assert status == 200 and headers["content-type"] == "image/jpeg" and _decodes(body)
    assert server.trap_counts == collections.Counter({"/latest/meta-data/": 1})
    assert "/latest/meta-data/" not in server.counts


def test_requests_are_served_concurrently_and_counted(server, truth):
    # A request hanging in its handler must not hold up the others: one thread per connection.
    hang_path = urlsplit(_rows(truth, "hang")[0]["url"]).path
    def hang():
        try:
            get(server.url(hang_path), timeout=3)
        except OSError:  # timed out, or the server closed when the test ended: either is fine
            pass

    blocker = threading.Thread(target=hang, daemon=True)
    blocker.start()
    deadline = time.monotonic() + 5
    while server.counts[hang_path] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    paths = [urlsplit(t["url"]).path for t in _rows(truth, "none")[:40]]
    results: list[int] = []

    def worker(chunk):
        for path in chunk:
            results.append(get(server.url(path))[0])

    threads = [threading.Thread(target=worker, args=(paths[i::8],)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert blocker.is_alive()  # still hanging while all of these were answered
    assert results.count(200) == len(paths)
    assert all(server.counts[p] >= 1 for p in paths) and server.counts[hang_path] == 1


def test_default_port_comes_from_world_json(world):
    out, meta = world
    with serve(out) as srv:
        assert srv.port == meta["port"] and srv.base_url == f"http://127.0.0.1:{meta['port']}"
        assert get(srv.url("/nothing"))[0] == 404


def test_trap_address_taken_is_a_clear_error_and_frees_the_main_port(world):
    out, _ = world
    port = free_port()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.2", port))
        squatter.listen()
        with pytest.raises(RuntimeError, match=r"127\.0\.0\.2"):
            with serve(out, port=port):
                pass
    with serve(out, port=port) as srv:  # nothing left bound on 127.0.0.1
        assert srv.port == port


def test_shutdown_is_quick_with_hanging_and_streaming_requests_in_flight(world, truth):
    out, _ = world
    errors: list[BaseException] = []

    def hang(url):
        try:
            get(url, timeout=20)
        except BaseException as e:  # noqa: BLE001 - the server closing on us is expected
            errors.append(e)

    with serve(out, port=0) as srv:
        hang_url = _local(_rows(truth, "hang")[0]["url"], srv.port)
        threads = [threading.Thread(target=hang, args=(hang_url,), daemon=True) for _ in range(3)]
        for th in threads:
            th.start()
        big = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
        big.request("GET", urlsplit(_rows(truth, "too_large")[0]["url"]).path)
        big.getresponse().read(1000)  # a 64 MiB body in flight, not read further
        deadline = time.monotonic() + 5
        while srv.counts[urlsplit(hang_url).path] < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 2.0
    big.close()
    for th in threads:
        th.join(timeout=2)
        assert not th.is_alive()


def test_run_server_serves_until_sigterm(world):
    out, _ = world
    code = f"from world.server import run_server; run_server({str(out)!r}, port=0)"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        m = re.fullmatch(rf"serving {re.escape(str(out))} on http://127\.0\.0\.1:(\d+)\n", line)
        assert m, line
        assert get(f"http://127.0.0.1:{m.group(1)}/missing")[0] == 404
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        assert time.monotonic() - t0 < 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- held-out split ----------------------------------------------------------------------------------

def test_heldout_split_is_clean_readable_and_consistent(world):
    out, _ = world
    d = out / "heldout"
    classnames = (d / "classnames.txt").read_text().splitlines()
    assert classnames == list(SHAPES)
    assert all("{}" in t for t in (d / "templates.txt").read_text().splitlines())
    # further label sets: the dominant colour (own prompts) and the concept (the main prompts)
    assert sorted(p.name for p in (d / "label_sets").iterdir()) == ["colour", "concept"]
    colours = (d / "label_sets/colour/classnames.txt").read_text().splitlines()
    concepts = (d / "label_sets/concept/classnames.txt").read_text().splitlines()
    assert colours == list(COLOURS) and len(concepts) == len(set(concepts)) == len(COLOURS) * len(SHAPES)
    assert all("{}" in t for t in (d / "label_sets/colour/templates.txt").read_text().splitlines())
    assert not (d / "label_sets/concept/templates.txt").exists()
    index = pq.read_table(d / "index.parquet").to_pylist()
    assert len(index) == 60
    with tarfile.open(d / "shards/00000.tar") as tar:
        members = tar.getmembers()
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" and m.gname == "" for m in members)
        files = {m.name: tar.extractfile(m).read() for m in members}
    names = [m.name for m in members]
    assert names == [f"{r['key']}.{ext}" for r in index for ext in ("cls", "jpg", "json", "txt")]
    labels = collections.Counter()
    for r in index:
        k = r["key"]
        meta = json.loads(files[f"{k}.json"])
        scene = meta["scene"]
        dom = scene["objects"][0]
        label = int(files[f"{k}.cls"])
        assert label == r["label"] == meta["label"] == classnames.index(dom["shape"])
        assert meta["labels"] == {"colour": colours.index(dom["colour"]),
                                  "concept": concepts.index(f"{dom['colour']} {dom['shape']}")}
        assert meta["classname"] == r["classname"] == dom["shape"]
        assert all(o["size"] == "small" for o in scene["objects"][1:]) and dom["size"] != "small"
        caption = files[f"{k}.txt"].decode()
        assert caption == r["caption"] and f"{dom['colour']} {dom['shape']}" in caption
        assert r["neg_caption"] == meta["neg_caption"] != caption
        assert json.loads(r["scene"]) == scene
        with Image.open(io.BytesIO(files[f"{k}.jpg"])) as im:
            im.load()
            assert im.format == "JPEG"
        labels[label] += 1
    assert max(labels.values()) - min(labels.values()) <= 1 and len(labels) == len(SHAPES)  # balanced classes


def test_default_port_constant():
    assert DEFAULT_PORT == 8765
