"""The webdataset source: existing tars curated in place through the demo job's stages, img2dataset's
own output among them; uids equal a download's; every kind of bad tar gets its own reason; a
referenced tar that changes is named; resume and worker count change no byte."""
import gzip
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import tracemalloc
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from recap.pipeline.inputs import InputError, InputSpec, plan_rows
from recap.pipeline.inspect import inspect_dataset
from recap.pipeline.job import build_job
from recap.pipeline.runner import JobFailed, run_job
from recap.pipeline.stage import StageContext
from recap.pipeline.uid import make_uid
from recap.stages.webdataset import TarChanged, WebDatasetConfig, WebDatasetInput, WebDatasetSource
from recap.world.generate import generate_world
from tests.conftest import free_port
from tests.test_engine import digest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "jobs" / "demo.yaml"
# the demo job's stages by name, as recap inspect lists them after the source
DEMO_STAGES = [next(iter(st)) if isinstance(st, dict) else st for st in yaml.safe_load(DEMO.read_text())["stages"]]
# The demo's curation stages (up to balancing): what a source's tests need downstream. The model
# stages after them read images the same way and cost a minute each run; one test per source kind
# that stores nothing of its own (Parquet in place) runs the whole list.
CURATION = yaml.safe_load(DEMO.read_text())["stages"][:DEMO_STAGES.index("balance") + 1]
CURATION_STAGES = DEMO_STAGES[:len(CURATION)]
RECAP = [sys.executable, "-m", "recap.cli"]


# -- inputs -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """The demo web's fault-free samples, as a download would fetch them (no server needed)."""
    out = tmp_path_factory.mktemp("web") / "w"
    generate_world(out, samples=150, heldout=0, seed=7, port=free_port())
    return world_samples(out)


def world_samples(world_dir: Path) -> list[dict]:
    routes = json.loads((world_dir / "routes.json").read_text())["routes"]
    truth = pq.read_table(world_dir / "truth.parquet").to_pylist()
    out = []
    for u, t in zip(pq.read_table(world_dir / "urls.parquet").to_pylist(), truth):
        route = routes.get(urlsplit(u["url"].strip()).path, {})
        if t["fault"] == "none" and "file" in route:
            out.append({**u, "image": (world_dir / route["file"]).read_bytes(), "ext": route["file"].rsplit(".", 1)[1]})
    return out


def write_tar(path: Path, entries: list) -> Path:
    """entries: (name, data) or (name, member type, link target)."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as t:
        for entry in entries:
            info = tarfile.TarInfo(entry[0])
            if len(entry) == 2:
                info.size = len(entry[1])
                t.addfile(info, io.BytesIO(entry[1]))
            else:
                info.type, info.linkname = entry[1], entry[2]
                t.addfile(info)
    return path


def write_shards(folder: Path, samples: list[dict], per: int, json_fields=("url", "caption", "license")) -> list[Path]:
    """img2dataset's layout: {shard}{index}.jpg/.json/.txt, shard by shard."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, len(samples), per)):
        entries = []
        for i, s in enumerate(samples[start:start + per]):
            key = f"{shard:05d}{i:04d}"
            meta = {"key": key, "status": "success", **{f: s.get(f) for f in json_fields}}
            entries += [(f"{key}.{s.get('ext', 'jpg')}", s["image"]), (f"{key}.json", json.dumps(meta).encode()),
                        (f"{key}.txt", (s["caption"] or "").encode())]
        paths.append(write_tar(folder / f"{shard:05d}.tar", entries))
    return paths


def jpeg(i: int, size: tuple[int, int] = (96, 80)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (i * 40 % 256, 90, 160)).save(buf, "JPEG")
    return buf.getvalue()


def demo_job(inp: dict, out: Path, section: dict | None = None, stages: list | None = None,
             section_key: str = "webdataset"):
    """The demo job's stages, seed and name on another input (its download section belongs to the
    urls source)."""
    data = yaml.safe_load(DEMO.read_text())
    job = {"name": data["name"], "seed": data["seed"], "input": inp, "output": str(out),
           "stages": data["stages"] if stages is None else stages}
    if section:
        job[section_key] = section
    return build_job(job, str(DEMO), base_dir=DEMO.parent)


def stage(**cfg) -> WebDatasetSource:
    return WebDatasetSource(WebDatasetConfig(**cfg), StageContext("t", 0, "webdataset_tars", "unused"))


def ingest(paths, src: WebDatasetSource | None = None, **spec) -> tuple[list[pa.Table], WebDatasetSource]:
    """plan + process, as the engine calls them, without Ray."""
    src = src or stage()
    return [src.process(t) for t in src.plan(WebDatasetInput(paths=paths, **spec))], src


def reasons(outs: list[pa.Table]) -> dict[str, str | None]:
    return {r["source_key"]: r["_drop"] for out in outs for r in out.select(["source_key", "_drop"]).to_pylist()}


def read_index(ds: Path) -> list[dict]:
    return pa.concat_tables([pq.read_table(p) for p in sorted((ds / "shards").glob("*.parquet"))]).to_pylist()


# -- end to end -------------------------------------------------------------------------------------

def test_own_tars_curate_in_place_through_the_curation_stages(web, tmp_path, ray_local):
    from recap.pipeline.steps import load_input
    from recap.pipeline.storage import Dataset

    tars = write_shards(tmp_path / "tars", web, per=40)
    before = {p: p.stat().st_mtime_ns for p in tars}
    out = tmp_path / "ds"
    run_job(demo_job({"kind": "webdataset", "paths": str(tmp_path / "tars/{00000..00003}.tar")}, out,
                     stages=CURATION), progress=False)
    rep = inspect_dataset(str(out))
    assert rep["invariant_ok"], rep["problems"]
    assert list(rep["stages"]) == ["webdataset_tars", *CURATION_STAGES]
    # the uids a download of the same URL list gives (its plan assigns them), repeats included
    pq.write_table(pa.table({"url": [s["url"] for s in web], "caption": [s["caption"] for s in web]}),
                   tmp_path / "urls.parquet")
    planned = list(plan_rows(InputSpec(path=str(tmp_path / "urls.parquet"))))
    repeats = sum(r["dup_of"] is not None for r in planned)
    assert repeats > 0  # the web repeats a few URLs with their caption
    assert rep["stages"]["webdataset_tars"] == {"in": len(web), "kept": len(web) - repeats,
                                                "dropped": {"duplicate_input": repeats}, "notes": {}}
    assert rep["stages"]["dedup"]["dropped"].get("duplicate_image", 0) > 0  # the web's exact copies
    assert rep["stages"]["balance"]["kept"] > 0
    # read in place: no shard tar written, each referenced with its size; the tars untouched
    assert not list((out / "shards").glob("*.tar"))
    record = json.loads((out / "shards/00001.source.json").read_text())
    assert record == {"url": str(tars[1]), "size": tars[1].stat().st_size}
    assert before == {p: p.stat().st_mtime_ns for p in tars}
    # and the json's other fields carried
    by_url = {s["url"]: s for s in web}
    index = read_index(out)
    assert [r["uid"] for r in index] == [r["uid"] for r in planned]
    assert all(r["license"] == by_url[r["url"]]["license"] for r in index)
    assert all(r["original_width"] > 0 and r["sha256"] for r in index if r["status"] == "success")
    # a later stage reading images gets the tar's bytes, through the key and member recorded
    got = load_input(Dataset(str(out)), 2, WebDatasetSource, ["basic"], ("jpg", "caption"))
    with tarfile.open(tars[2]) as t:
        members = {m.name: t.extractfile(m).read() for m in t}
    names = {r["uid"]: f"{r['key']}.{r['member']}" for r in index}
    assert got.num_rows > 0 and {n.rsplit(".", 1)[1] for n in names.values()} == {"jpg", "png"}
    assert all(img == members[names[u]] for u, img in zip(got.column("uid").to_pylist(), got.column("jpg").to_pylist()))


def test_copy_mode_writes_shards_with_the_same_samples(web, tmp_path, ray_local):
    tars = write_shards(tmp_path / "tars", web[:30], per=15)
    ref, copy = tmp_path / "ref", tmp_path / "copy"
    inp = {"kind": "webdataset", "paths": str(tmp_path / "tars/*.tar")}
    run_job(demo_job(inp, ref, stages=["basic"]), progress=False)
    run_job(demo_job(inp, copy, section={"copy": True}, stages=["basic"]), progress=False)
    for d in (ref, copy):
        assert inspect_dataset(str(d))["invariant_ok"]
    assert pq.read_table(ref / "stages/basic").equals(pq.read_table(copy / "stages/basic"))
    assert json.loads((copy / "shards/00000_stats.json").read_text())["stored"] == "copy"
    with tarfile.open(copy / "shards/00000.tar") as t, tarfile.open(tars[0]) as src:
        copied = {m.name: t.extractfile(m).read() for m in t}
        original = {m.name: src.extractfile(m).read() for m in src}
    assert {n: b for n, b in copied.items() if n.endswith(".jpg")} == \
        {n: b for n, b in original.items() if n.endswith(".jpg")}
    assert json.loads(copied["000000000.json"])["license"] == web[0]["license"]


# -- uids, metadata and paths -----------------------------------------------------------------------

def test_uid_rules_and_datacomp_metadata_beside_the_tar(tmp_path):
    imgs = [jpeg(i) for i in range(4)]
    write_tar(tmp_path / "00000.tar", [
        ("a.jpg", imgs[0]), ("a.json", b'{"url": "http://x/a.jpg"}'), ("a.txt", b"a red square"),
        ("b.jpg", imgs[1]), ("b.txt", b"no url here"),
        ("c.png", imgs[2]), ("c.json", b'{"url": "http://x/a.jpg"}'), ("c.txt", b"a red square"),  # repeat
        ("d.jpg", imgs[3]), ("d.json", b'{"uid": "own-uid", "url": "http://x/d.jpg"}'), ("d.txt", b"d"),
    ])
    # DataComp's metadata, as img2dataset writes it beside the tar with save_additional_columns
    pq.write_table(pa.table({"key": ["a", "d"], "uid": ["datacomp-a", None], "status": ["success", "success"],
                             "clip_b32_similarity_score": [0.31, 0.25], "clip_l14_similarity_score": [0.28, 0.22]}),
                   tmp_path / "00000.parquet")
    (out,), _ = ingest(str(tmp_path / "00000.tar"))
    rows = {r["source_key"]: r for r in out.to_pylist()}
    assert rows["a"]["uid"] == "datacomp-a" and rows["d"]["uid"] == "own-uid"
    assert rows["a"]["clip_b32_similarity_score"] == 0.31 and rows["d"]["clip_l14_similarity_score"] == 0.22
    from recap.stages.source_files import content_uid
    assert rows["b"]["uid"] == content_uid(str(tmp_path / "00000.tar"), "b", imgs[1])
    # c repeats a's url and caption, but a's uid is DataComp's: c keeps make_uid's, no clash
    assert rows["c"]["uid"] == make_uid("http://x/a.jpg", "a red square") and rows["c"]["_drop"] is None
    assert rows["c"]["member"] == "png" and rows["a"]["member"] == "jpg"
    # without the Parquet, a and c share url and caption: c is a repeat
    (out,), _ = ingest(str(tmp_path / "00000.tar"), metadata_parquet=False)
    rows = {r["source_key"]: r for r in out.to_pylist()}
    assert rows["a"]["uid"] == make_uid("http://x/a.jpg", "a red square")
    assert rows["c"]["_drop"] == "duplicate_input" and rows["c"]["_detail"] == rows["a"]["uid"]


def test_caption_from_a_json_field_and_image_extension_order(tmp_path):
    write_tar(tmp_path / "x.tar", [("s.json", b'{"text": "from json", "url": "u"}'), ("s.png", jpeg(1)),
                                   ("s.webp", b"not read"), ("s.txt", b"from txt")])
    (out,), _ = ingest(str(tmp_path / "x.tar"), caption_field="text", image_extensions=["png", "webp"])
    row = out.to_pylist()[0]
    assert row["caption"] == "from json" and row["member"] == "png" and row["_drop"] is None
    assert row["uid"] == make_uid("u", "from json")


def test_paths_lists_globs_braces_and_missing_files(tmp_path):
    for i in range(3):
        write_tar(tmp_path / f"{i:05d}.tar", [(f"k{i}.jpg", jpeg(i)), (f"k{i}.txt", b"two words")])
    src = stage()
    spec = lambda paths: WebDatasetInput(paths=paths)  # noqa: E731
    assert src.input_fingerprint(spec(str(tmp_path / "*.tar"))) == \
        src.input_fingerprint(spec(str(tmp_path / "{00000..00002}.tar"))) == \
        src.input_fingerprint(spec([str(tmp_path / f"{i:05d}.tar") for i in range(3)]))
    assert len(list(src.plan(spec(str(tmp_path / "{00000..00002}.tar"))))) == 3
    with pytest.raises(InputError, match=r"00003.tar: no such file \(5 of 8 named files are missing\)"):
        src.input_fingerprint(spec(str(tmp_path / "{00000..00007}.tar")))
    with pytest.raises(InputError, match=r"no file matches .*nothing-\*.tar"):
        src.input_fingerprint(spec(str(tmp_path / "nothing-*.tar")))


def test_reads_tars_on_an_object_store(tmp_path, s3_endpoint):
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.mkdir("wds-in")
    for i in range(2):
        local = write_tar(tmp_path / f"{i:05d}.tar", [(f"k{i}.jpg", jpeg(i)), (f"k{i}.txt", b"two words")])
        fs.put(str(local), f"wds-in/{i:05d}.tar")
    outs, src = ingest("s3://wds-in/{00000..00001}.tar")
    assert [o.column("tar")[0].as_py() for o in outs] == ["s3://wds-in/00000.tar", "s3://wds-in/00001.tar"]
    assert all(o.column("_drop")[0].as_py() is None for o in outs)
    (table,) = src.plan(WebDatasetInput(paths="s3://wds-in/00000.tar"))
    assert src.source_tar(table) == "s3://wds-in/00000.tar"


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_member_headers_read_as_tarfile_reads_them(tmp_path, fmt):
    from recap.stages.webdataset import tar_headers

    long_dir = "d" * 60 + "/" + "e" * 60  # over 100 characters: a ustar prefix, a GNU long name or a pax path
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=fmt) as t:
        for name, data in ((f"{long_dir}/k1.jpg", jpeg(1)), (f"{long_dir}/k1.txt", "caption é".encode()),
                           ("short/k2.jpg", b"x" * 1000), ("short/k2.txt", b"")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for name, kind in (("dir", tarfile.DIRTYPE), ("short/k3.jpg", tarfile.SYMTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "short/k2.jpg" if kind == tarfile.SYMTYPE else ""
            t.addfile(info)
    with tarfile.open(path) as t:
        want = [(m.name, m.offset_data, m.size if m.isfile() else 0) for m in t]
    with open(path, "rb") as f:
        got = [(h.name, h.offset, h.size) for h in tar_headers(f, path.stat().st_size)]
    assert got == want


# -- bad input --------------------------------------------------------------------------------------

def test_bad_members_each_get_their_own_reason(tmp_path):
    good, big = jpeg(1), jpeg(2, (400, 400))
    write_tar(tmp_path / "bad.tar", [
        ("good.jpg", good), ("good.txt", b"a good sample"),
        ("../evil.jpg", good), ("../evil.txt", b"escapes"),
        ("/abs.jpg", good), ("/abs.txt", b"absolute"),
        ("sym.jpg", tarfile.SYMTYPE, "/etc/passwd"), ("sym.txt", b"symlink"),
        ("hard.jpg", tarfile.LNKTYPE, "good.jpg"), ("hard.txt", b"hard link"),
        ("fifo.jpg", tarfile.FIFOTYPE, ""), ("fifo.txt", b"fifo"),
        ("dup.jpg", good), ("dup.txt", b"first"), ("other.jpg", good), ("other.txt", b"between"),
        ("dup.jpg", good), ("dup.txt", b"second"),
        ("twice.jpg", good), ("twice.jpg", good), ("twice.txt", b"two images"),
        ("noimg.txt", b"only a caption"), ("nocap.jpg", good),
        ("large.jpg", big), ("large.txt", b"too large"),
        ("broken.jpg", good[: len(good) // 2]), ("broken.txt", b"cut jpeg"),
        ("html.jpg", b"<html>not an image</html>"), ("html.txt", b"html"),
        ("badjson.jpg", good), ("badjson.json", b"{nope"), ("badjson.txt", b"bad json"),
        ("dir.v2/x.jpg", good), ("dir.v2/x.txt", b"dot in a directory"),
    ])
    outs, src = ingest(str(tmp_path / "bad.tar"), src=stage(max_member_bytes=len(big) - 1))
    got = reasons(outs)
    assert got.pop("good") is None
    assert got.pop("other") is None
    assert got == {"../evil": "unsafe_path", "/abs": "unsafe_path", "sym": "link_member", "hard": "link_member",
                   "fifo": "special_member", "dup": "duplicate_key", "twice": "duplicate_key", "noimg": "no_image",
                   "nocap": "no_caption", "large": "member_too_large", "broken": "decode_error",
                   "html": "not_an_image", "badjson": "bad_json", "dir.v2/x": "bad_key"}
    (out,) = outs
    assert len(set(out.column("uid").to_pylist())) == out.num_rows  # each accounted for once
    assert out.column("status").to_pylist().count("success") == 3  # good, other and the first dup
    # a repeated key shadows the first in place, and a member is over the limit: this tar is copied
    assert src.source_tar(next(iter(src.plan(WebDatasetInput(paths=str(tmp_path / "bad.tar")))))) is None


def test_the_image_check_fails_exactly_what_a_full_decode_fails():
    """JPEGs are checked without their inverse DCT: cut and damaged ones must fail all the same."""
    import random

    from recap.pipeline.imaging import check_and_prepare
    from recap.stages.source_files import check_image

    rng = random.Random(3)
    buf = io.BytesIO()
    Image.effect_noise((180, 120), 60).convert("RGB").save(buf, "JPEG", quality=85)
    progressive = io.BytesIO()
    Image.open(io.BytesIO(buf.getvalue())).save(progressive, "JPEG", progressive=True)
    cases = []
    for data in (buf.getvalue(), progressive.getvalue(), jpeg(5)):
        cases += [data[:k] for k in rng.sample(range(10, len(data)), 25)]
        for _ in range(25):
            damaged = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                damaged[rng.randrange(len(damaged))] = rng.randrange(256)
            cases.append(bytes(damaged))
    verdicts = [(check_image(c, 10**8).reason is None, check_and_prepare(c, None, 10**8)[1] is None) for c in cases]
    assert all(fast == full for fast, full in verdicts)
    assert sum(not ok for ok, _ in verdicts) > 50  # most cases are bad ones


def test_bad_tar_end_to_end_writes_only_good_members(tmp_path, ray_local):
    good = jpeg(3, (128, 128))
    (tmp_path / "in").mkdir()
    write_tar(tmp_path / "in/bad.tar", [
        ("../../escaped.jpg", good), ("../../escaped.txt", b"nope"),
        ("ok.jpg", good), ("ok.txt", b"a large red circle"),
        ("link.jpg", tarfile.SYMTYPE, "../../../etc/passwd"), ("link.txt", b"link"),
    ])
    out = tmp_path / "ds"
    run_job(demo_job({"kind": "webdataset", "paths": str(tmp_path / "in/bad.tar")}, out, section={"copy": True},
                     stages=[]), progress=False)
    rep = inspect_dataset(str(out))
    assert rep["invariant_ok"], rep["problems"]
    assert rep["stages"]["webdataset_tars"] == {"in": 3, "kept": 1, "dropped": {"unsafe_path": 1, "link_member": 1},
                                          "notes": {}}
    with tarfile.open(out / "shards/00000.tar") as t:
        assert sorted(t.getnames()) == ["ok.jpg", "ok.json", "ok.txt"]
    assert not list(tmp_path.rglob("escaped*"))


def _five(tmp_path: Path, name: str = "t.tar") -> tuple[Path, list[int]]:
    entries, ends = [], []
    for i in range(5):
        entries += [(f"s{i}.jpg", jpeg(i, (64 + i, 64))), (f"s{i}.txt", f"sample {i}".encode())]
    path = write_tar(tmp_path / name, entries)
    with tarfile.open(path) as t:
        ends = [m.offset_data for m in t if m.name.endswith(".jpg")]
    return path, ends


def test_a_truncated_tar_keeps_what_comes_before_the_damage(tmp_path):
    path, jpg_offsets = _five(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: jpg_offsets[2] + 100])  # inside sample 2's image
    # img2dataset's Parquet beside it lists all five
    pq.write_table(pa.table({"key": [f"s{i}" for i in range(5)], "url": [f"http://x/{i}" for i in range(5)],
                             "caption": [f"sample {i}" for i in range(5)], "status": ["success"] * 5}),
                   tmp_path / "t.parquet")
    (out,), src = ingest(str(path))
    assert reasons([out]) == {"s0": None, "s1": None, "s2": "truncated", "s3": "truncated", "s4": "truncated"}
    rows = out.to_pylist()
    assert [r["uid"] for r in rows] == [make_uid(f"http://x/{i}", f"sample {i}") for i in range(5)]
    (skipped,) = src.skipped_rows()
    assert skipped["reason"] == "truncated_tar" and str(path) in skipped["detail"] and "2 samples" in skipped["detail"]
    # cut between two members, with no Parquet: the samples before are kept, the last is suspect
    (tmp_path / "t.parquet").unlink()
    path2, offsets = _five(tmp_path, "u.tar")
    path2.write_bytes(path2.read_bytes()[: offsets[3] - 512])  # right before s3.jpg's header
    (out,), src = ingest(str(path2))
    assert reasons([out]) == {"s0": None, "s1": None, "s2": "truncated"}
    assert src.skipped_rows()[0]["reason"] == "truncated_tar"


def test_not_a_tar_gzip_and_empty_files(tmp_path):
    (tmp_path / "fake.tar").write_bytes(b"<html>this is not a tar</html>" * 40)
    path, _ = _five(tmp_path, "plain.tar")
    (tmp_path / "zipped.tar").write_bytes(gzip.compress(path.read_bytes()))
    write_tar(tmp_path / "empty.tar", [])
    outs, src = ingest([str(tmp_path / n) for n in ("fake.tar", "zipped.tar", "empty.tar")])
    assert [(s["location"], s["reason"]) for s in src.skipped_rows()] == [
        (str(tmp_path / "fake.tar"), "not_a_tar"), (str(tmp_path / "empty.tar"), "empty_tar")]
    (out,) = outs  # the gzip-compressed tar is read...
    assert reasons([out]) == {f"s{i}": None for i in range(5)}
    plans = list(src.plan(WebDatasetInput(paths=str(tmp_path / "zipped.tar"))))
    assert src.source_tar(plans[0]) is None  # ...and copied: a referenced tar must be plain


def test_an_over_large_member_is_never_read_whole(tmp_path):
    payload = os.urandom(8 << 20)
    write_tar(tmp_path / "big.tar", [("big.jpg", payload), ("big.txt", b"huge"), ("big2.txt", payload),
                                     ("big2.jpg", jpeg(1)), ("ok.jpg", jpeg(2)), ("ok.txt", b"fine")])
    del payload
    tracemalloc.start()
    outs, _ = ingest(str(tmp_path / "big.tar"), src=stage(max_member_bytes=1 << 20))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert reasons(outs) == {"big": "member_too_large", "big2": "member_too_large", "ok": None}
    assert peak < 4 << 20, f"peak {peak} bytes: an 8 MiB member was read"


def test_a_tar_that_changes_between_plan_and_read_is_named(tmp_path):
    path, _ = _five(tmp_path)
    src = stage()
    (table,) = src.plan(WebDatasetInput(paths=str(path)))
    with open(path, "ab") as f:
        f.write(b"\0" * 10240)
    with pytest.raises(TarChanged, match=str(path)):
        src.process(table)


def test_a_referenced_tar_changed_after_ingest_fails_the_next_stage_naming_it(tmp_path, ray_local, fake_stages):
    path, _ = _five(tmp_path)
    inp = {"kind": "webdataset", "paths": str(path)}
    out = tmp_path / "ds"
    run_job(demo_job(inp, out, stages=[]), progress=False)
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[:-10240]))  # a shorter copy of it
    with pytest.raises(JobFailed, match=re.escape(f"{path}: the source shard changed since it was read")):
        run_job(demo_job(inp, out, stages=["upper", {"coin": {"p": 1.0}}]), progress=False)


# -- img2dataset's own output -----------------------------------------------------------------------

# faults whose requests stay on 127.0.0.1 (redirect_blocked and blocked_url lead elsewhere; hang and
# too_large only cost time)
LOCAL_FAULTS = ("none", "redirect", "redirect_chain", "http_404", "http_500", "truncated", "corrupt", "html_as_image",
                "empty_body", "opted_out")


@pytest.fixture(scope="module")
def i2d(tmp_path_factory):
    """A webdataset made by img2dataset itself from the demo web, served on 127.0.0.1."""
    from img2dataset import download

    from recap.world.server import serve

    base = tmp_path_factory.mktemp("i2d")
    port = free_port()
    generate_world(base / "w", samples=170, heldout=0, seed=13, port=port)
    urls = pq.read_table(base / "w/urls.parquet")
    truth = pq.read_table(base / "w/truth.parquet")
    keep = pa.compute.is_in(truth.column("fault"), value_set=pa.array(LOCAL_FAULTS))
    pq.write_table(urls.filter(keep), base / "urls.parquet")
    with serve(base / "w", port=port) as srv:
        download(url_list=str(base / "urls.parquet"), input_format="parquet", url_col="url", caption_col="caption",
                 save_additional_columns=["license"], output_folder=str(base / "out"), output_format="webdataset",
                 processes_count=1, thread_count=8, number_sample_per_shard=50, timeout=2, retries=0,
                 image_size=128, resize_mode="border", distributor="multiprocessing", enable_wandb=False)
        assert sum(srv.trap_counts.values()) == 0
    return base


def test_img2dataset_output_curates_with_download_uids(i2d, tmp_path, ray_local):
    out = tmp_path / "ds"
    run_job(demo_job({"kind": "webdataset", "paths": str(i2d / "out/*.tar")}, out, stages=CURATION), progress=False)
    rep = inspect_dataset(str(out))
    assert rep["invariant_ok"], rep["problems"]
    assert list(rep["stages"]) == ["webdataset_tars", *CURATION_STAGES]
    written = sum(json.loads(p.read_text())["successes"] for p in (i2d / "out").glob("*_stats.json"))
    assert rep["stages"]["webdataset_tars"]["in"] == written > 100
    assert rep["stages"]["basic"]["in"] > 0 and rep["stages"]["balance"]["kept"] > 0
    # the uids a download of the same URL list gives (its plan assigns them)
    # (by URL: the plan truncates a huge caption after taking its uid)
    planned: dict[str, set] = {}
    for r in plan_rows(InputSpec(path=str(i2d / "urls.parquet"))):
        planned.setdefault(r["url"], set()).add(r["uid"])
    index = read_index(out)
    kept = [r for r in index if r["status"] == "success"]
    assert kept and all(r["uid"] == make_uid(r["url"], r["caption"]) for r in kept)
    assert not [r["url"] for r in index if r["uid"] not in planned.get(r["url"], ())]
    # img2dataset's columns are carried; its sha256 (of the fetched bytes) kept apart from ours
    assert all(r["license"] and r["input_sha256"] and r["sha256"] for r in kept)
    assert {r["tar"] for r in index} == {str(p) for p in (i2d / "out").glob("*.tar")}


# -- determinism: kill -9 + rerun, --cpus 1 vs 2 --------------------------------------------------------

def write_job(path: Path, inp: dict, section_name: str, section: dict) -> Path:
    data = yaml.safe_load(DEMO.read_text())
    job = {"name": data["name"], "seed": data["seed"], "input": inp, "output": "unused",
           section_name: section, "stages": data["stages"]}
    job["stages"][2]["balance"]["metadata"] = str(DEMO.parent / "demo-metadata.json")
    path.write_text(yaml.safe_dump(job))
    return path


def resume_and_workers_are_byte_identical(job: Path, work: Path, progress_glob: str) -> str:
    """kill -9 in the middle of `recap run` then rerun, and --cpus 1 vs --cpus 2, through the
    recap command in a temporary directory; returns the digest they share."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(out: Path, cpus: int) -> subprocess.Popen:
        return subprocess.Popen(RECAP + ["run", str(job), "--output", str(out), "--cpus", str(cpus), "--quiet"],
                                env=env, cwd=work, start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)

    a = run(work / "A", 2)
    assert a.wait(timeout=400) == 0, a.stdout.read().decode()[-2000:]
    b = run(work / "B", 2)
    deadline = time.time() + 200
    while time.time() < deadline and len(list((work / "B").glob(progress_glob))) < 2 and b.poll() is None:
        time.sleep(0.1)
    os.killpg(b.pid, signal.SIGKILL)
    assert b.wait() == -signal.SIGKILL, "the run ended before it could be interrupted"
    time.sleep(2)
    b2 = run(work / "B", 2)
    assert b2.wait(timeout=400) == 0, b2.stdout.read().decode()[-2000:]
    c = run(work / "C", 1)
    assert c.wait(timeout=400) == 0, c.stdout.read().decode()[-2000:]
    for d in "ABC":
        assert inspect_dataset(str(work / d))["invariant_ok"]
    da = digest(work / "A")
    assert digest(work / "B") == da, "kill -9 + resume differs from an uninterrupted run"
    assert digest(work / "C") == da, "--cpus 1 differs from --cpus 2"
    return da


@pytest.mark.slow
def test_webdataset_resume_and_cpus_are_byte_identical(web, tmp_path):
    write_shards(tmp_path / "tars", web, per=12)
    job = write_job(tmp_path / "job.yaml", {"kind": "webdataset", "paths": str(tmp_path / "tars/*.tar")},
                    "webdataset", {})
    resume_and_workers_are_byte_identical(job, tmp_path, "commits/webdataset_tars/*.json")
