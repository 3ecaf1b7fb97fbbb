"""Near-duplicate and semantic dedup, and decontamination: the search finds every pair the
brute-force scan finds; SemDeDup follows the paper's rule and keep policy; on the demo world, run on
Ray after a real download, the planted duplicates and the pool's copies of held-out images leave
with details naming the kept uid, and nothing depends on the worker count."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from recap.pipeline.errors import UserError
from recap.pipeline.job import load_job
from recap.pipeline.runner import run_job
from recap.pipeline.stage import StageContext
from recap.stages.dedup import DedupConfig, DedupStage
from recap.stages.near_duplicates import all_pairs, hamming_pairs, phash_bytes
from recap.stages.semdedup import semdedup
from recap.world.generate import generate_world
from recap.world.server import serve
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


def _hashes(n: int, planted: int, max_flips: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 1 << 63, size=n, dtype=np.int64).view(np.uint64) << np.uint64(1)
    h |= rng.integers(0, 2, n).astype(np.uint64)
    src = rng.integers(0, n, planted)
    copies = h[src].copy()
    for k in range(planted):
        for b in rng.choice(64, rng.integers(0, max_flips + 1), replace=False):
            copies[k] ^= np.uint64(1) << np.uint64(int(b))
    return np.concatenate([h, copies])


@pytest.mark.parametrize("distance", [0, 1, 4, 7])
def test_multi_index_search_finds_exactly_the_brute_force_pairs(distance):
    h = _hashes(6000, 400, 9, seed=distance)
    i, j, bits = hamming_pairs(h, distance)
    a, b = all_pairs(h, distance)
    assert set(zip(i.tolist(), j.tolist())) == set(zip(a.tolist(), b.tolist()))
    assert len(i) >= 30 and (bits <= distance).all() and (i < j).all()
    assert (np.bitwise_count(h[i] ^ h[j]) == bits).all()


def test_query_search_pairs_only_queries_with_the_pool():
    pool = _hashes(3000, 0, 0, seed=1)
    queries = pool[[5, 77, 1500]] ^ np.array([0b1011, 0, 1 << 40], dtype=np.uint64)
    q, j, bits = hamming_pairs(pool, 3, queries=queries)
    brute = {(qi, pj) for qi in range(3) for pj in range(len(pool))
             if int(np.bitwise_count(queries[qi] ^ pool[pj])) <= 3}
    assert set(zip(q.tolist(), j.tolist())) == brute and {(0, 5), (1, 77), (2, 1500)} <= brute


def _photo(seed: int, size=(96, 72)) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (6, 8, 3)).astype(np.uint8)
    return Image.fromarray(base).resize(size, Image.Resampling.BICUBIC)


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_phash_sees_copies_alike_and_says_why_it_cannot_hash():
    img = _photo(0)
    h, _ = phash_bytes(_jpeg(img))
    png = io.BytesIO()
    img.save(png, "PNG")
    for other in (_jpeg(img, 60), _jpeg(img.resize((140, 105))), png.getvalue()):
        h2, why = phash_bytes(other)
        assert why is None and bin(h ^ h2).count("1") <= 4
    far, _ = phash_bytes(_jpeg(_photo(1)))
    assert bin(h ^ far).count("1") > 12
    assert phash_bytes(b"not an image")[0] is None
    flat, why = phash_bytes(_jpeg(Image.new("RGB", (64, 64), (200, 30, 30))))
    assert flat is None and why.startswith("flat image")


def _clustered(n_groups=6, per=5, dim=16, noise=0.02, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_groups, dim))
    rows, group = [], []
    for g in range(n_groups):
        for _ in range(per):
            rows.append(centres[g] + noise * rng.normal(size=dim))
            group.append(g)
    return np.array(rows, np.float32), np.array(group)


@pytest.mark.parametrize("keep", ["farthest", "closest"])
def test_semdedup_keeps_one_per_tight_group_by_the_keep_policy(keep):
    emb, group = _clustered()
    uids = [f"u{i:03d}" for i in range(len(emb))]
    # one cluster: its centroid is the normalised mean, so the expected survivor is known
    res = semdedup(emb, uids, eps=0.05, clusters=1, keep=keep, seed=0)
    kept = np.nonzero(~res.removed)[0]
    assert sorted(group[kept].tolist()) == list(range(6))  # one survivor per group
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    centre = e.mean(0) / np.linalg.norm(e.mean(0))
    for g in range(6):
        members = np.nonzero(group == g)[0]
        dist = 1 - e[members] @ centre
        want = members[np.argmax(dist) if keep == "farthest" else np.argmin(dist)]
        assert not res.removed[want]
        for m in members:
            if res.removed[m]:
                assert res.kept_as[m] == want and res.similarity[m] > 0.95
    assert (semdedup(emb, uids, eps=0.05, clusters=1, keep=keep, seed=0).removed == res.removed).all()


def test_semdedup_follows_the_papers_rule_inside_a_cluster():
    # a, b at cosine 0.999; c at 0.98 of a: with eps 0.01 only b goes; with eps 0.03 c goes too
    a = np.array([1.0, 0.0, 0.0])
    b = np.array([0.999, np.sqrt(1 - 0.999 ** 2), 0.0])
    c = np.array([0.98, 0.0, np.sqrt(1 - 0.98 ** 2)])
    emb = np.stack([a, b, c]).astype(np.float32)
    for eps, gone in ((0.01, 1), (0.03, 2)):
        res = semdedup(emb, ["a", "b", "c"], eps=eps, clusters=1, keep="closest", seed=0)
        assert res.removed.sum() == gone and not res.removed[0]


# -- config errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg,says", [
    ({"methods": []}, "nothing to do"),
    ({"methods": ["exact", "exact"]}, "twice"),
    ({"methods": ["fuzzy"]}, "methods"),
    ({"eval_set": "/nowhere/eval"}, "does not exist"),
    ({"phash_distance": 40}, "phash_distance"),
])
def test_bad_dedup_settings_are_job_errors(tmp_path, cfg, says):
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({"name": "t", "input": {"path": str(tmp_path / "urls.parquet")},
                               "output": str(tmp_path / "out"), "stages": [{"dedup": cfg}]}))
    with pytest.raises(UserError, match=says):
        load_job(job)


def test_an_eval_set_without_images_is_a_job_error(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "readme.txt").write_text("no images here")
    with pytest.raises(Exception, match="no images in"):
        DedupConfig(eval_set=str(tmp_path / "eval"))


# -- on the demo world ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    port = free_port()
    out = tmp_path_factory.mktemp("world") / "w"
    generate_world(out, samples=600, heldout=120, seed=5, port=port)
    with serve(out, port=port) as srv:
        yield out, port, srv


def run_dedup(world_dir: Path, port: int, out: Path, dedup: dict, cpus: int, resize_mode: str = "no",
              shard: int = 150) -> pa.Table:
    """The demo job's download, then ``dedup`` alone, on a local Ray; the dedup ledger."""
    job = load_job(ROOT / "jobs/demo.yaml", [
        f"input.path={world_dir / 'urls.parquet'}", f"download.allow_hosts=[127.0.0.1:{port}]",
        f"download.samples_per_shard={shard}", "download.timeout=2",
        f"download.resize_mode={resize_mode}",
        f"stages=[{{dedup: {json.dumps(dedup)}}}]"], output=str(out))
    run_job(job, cpus=cpus, progress=False)
    return _tables(out / "ledger" / "dedup")


def _tables(folder: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("*.parquet"))])


def dedup_figures(world_dir: Path, out: Path, ledger: pa.Table) -> dict:
    """Dedup's verdicts on a demo world against its truth.parquet: duplicate recall (of each
    planted group, all members but one dropped), false drops among samples that are neither
    duplicates nor copies of held-out images, and the held-out copies found."""
    truth = pq.read_table(world_dir / "truth.parquet").to_pandas()
    index = _tables(out / "shards").to_pandas()
    # a URL listed twice with one caption matches two truth rows: both of its duplicate group
    ok = index[index["status"] == "success"].merge(truth, on=["url", "caption"], suffixes=("", "_t"))
    ok = ok.drop_duplicates("uid")
    dropped = {r["uid"]: (r["reason"], r["detail"]) for r in ledger.to_pylist() if r["action"] == "drop"}
    groups = ok[ok["dup_group"] >= 0].groupby("dup_group")
    members = groups["uid"].apply(list)
    kinds = groups["dup_kind"].first()
    need = {k: 0 for k in ("exact", "near", "url")}
    found = dict(need)
    for g, uids in members.items():
        if len(uids) > 1:
            need[kinds[g]] += len(uids) - 1
            found[kinds[g]] += min(len(uids) - 1, sum(u in dropped for u in uids))
    innocent = ok[(ok["dup_group"] < 0) & (ok["heldout_of"] < 0)]
    contaminated = ok[ok["heldout_of"] >= 0]
    caught = [u for u in contaminated["uid"] if dropped.get(u, ("",))[0] == "eval_contamination"]
    return {"samples": len(ok), "dropped": dropped, "by_uid": ok.set_index("uid"),
            "need": need, "found": found,
            "recall": sum(found.values()) / max(1, sum(need.values())),
            "false": [u for u in innocent["uid"] if u in dropped], "innocent": len(innocent),
            "contaminated": len(contaminated), "caught": caught,
            "wrongly_contaminated": [u for u, (reason, _) in dropped.items()
                                     if reason == "eval_contamination" and u not in set(caught)]}


def test_world_duplicates_and_contamination_leave_with_the_kept_uid(world, tmp_path, ray_local):
    world_dir, port, _ = world
    cfg = {"methods": ["exact", "phash"], "eval_set": str(world_dir / "heldout")}
    ledger = run_dedup(world_dir, port, tmp_path / "a", cfg, cpus=2)
    fig = dedup_figures(world_dir, tmp_path / "a", ledger)
    dropped, by_uid = fig["dropped"], fig["by_uid"]

    # every kept-uid a detail names is a real sample of the same duplicate group
    for uid, (reason, detail) in dropped.items():
        assert reason in ("duplicate_image", "near_duplicate", "eval_contamination"), reason
        if reason == "eval_contamination":
            assert "from evaluation image shards/00000.tar:" in detail
            continue
        kept = detail.split()[3] if reason == "duplicate_image" else detail.split()[1]
        assert kept in by_uid.index and kept not in dropped
        assert by_uid.loc[kept, "dup_group"] == by_uid.loc[uid, "dup_group"] >= 0, (uid, detail)
    # byte-identical copies are all found; re-rendered near copies nearly all
    assert fig["found"]["exact"] == fig["need"]["exact"] and fig["found"]["url"] == fig["need"]["url"], fig
    assert fig["recall"] >= 0.95, (fig["need"], fig["found"])
    assert len(fig["false"]) <= 0.01 * fig["innocent"], [dropped[u] for u in fig["false"]]
    assert fig["contaminated"] >= 2
    assert len(fig["caught"]) >= 0.95 * fig["contaminated"], (fig["contaminated"], fig["caught"])
    assert len(fig["wrongly_contaminated"]) <= 0.01 * fig["samples"]

    # the same verdicts with one worker
    again = run_dedup(world_dir, port, tmp_path / "b", cfg, cpus=1)
    assert sorted(again.to_pylist(), key=lambda r: r["uid"]) == sorted(ledger.to_pylist(), key=lambda r: r["uid"])


def test_the_hash_alone_groups_look_alikes_the_thumbnails_refuse(world, tmp_path, ray_local):
    """Luminance hashes of plain shapes collide across colours; without the colour check the same
    distance drops many more distinct images."""
    world_dir, port, _ = world
    cfg = {"methods": ["exact", "phash"], "phash_distance": 8}
    with_check = dedup_figures(world_dir, tmp_path / "a", run_dedup(world_dir, port, tmp_path / "a", cfg, cpus=2))
    cfg["phash_rmse"] = None
    hash_only = dedup_figures(world_dir, tmp_path / "b", run_dedup(world_dir, port, tmp_path / "b", cfg, cpus=2))
    assert len(hash_only["false"]) > 3 * max(1, len(with_check["false"])), (hash_only["false"], with_check["false"])
    assert with_check["recall"] >= 0.95


def test_semantic_dedup_before_the_clip_stage_is_a_job_error(tmp_path):
    from recap.pipeline.preflight import check_stage_order

    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({"name": "t", "input": {"path": str(tmp_path / "urls.parquet")},
                               "output": str(tmp_path / "out"), "stages": [
                                   {"dedup": {"methods": ["semantic"]}},
                                   {"clip": {"model": "recap-tiny", "pretrained": None}}]}))
    loaded = load_job(job)
    with pytest.raises(UserError, match="'dedup' reads 'image_emb', which 'clip' writes after it"):
        check_stage_order(loaded, lambda name: StageContext("t", 0, name, "mem"))
    loaded.stages[1:] = loaded.stages[2:] + loaded.stages[1:2]  # clip, then dedup
    check_stage_order(loaded, lambda name: StageContext("t", 0, name, "mem"))
