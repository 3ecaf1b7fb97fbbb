"""Hard negatives: the rule-based text negatives, the faiss kNN (exact and approximate), the index
checks, and on the demo world (a CLIP our trainer makes, real downloads, a local Ray) image
negatives that share the positive's concept more often than random pairs do, with the planted
duplicates filtered out, both measured against truth.parquet."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recap.pipeline import rng
from recap.stages.knn import IndexConfig, IndexTooSmall, build_index, check_trainable, search
from recap.stages.text_negatives import RULES, Lexicon, make_negatives

WORDNET = Path("/usr/share/wordnet")
CAPTION = "a small red triangle and two blue circles on a white background"


def _negs(text: str, uid: str = "u", lex: Lexicon | None = None, rules=RULES) -> dict[str, str]:
    g = rng.generator(0, "negatives/text", uid)
    return {t: n for n, t in make_negatives(text, rules, g, lex or Lexicon(None))}


def test_each_rule_makes_its_kind_of_negative():
    negs = _negs(CAPTION)
    assert set(negs) == set(RULES)
    words = CAPTION.split()
    # swaps and shuffles keep the words, in another order
    for t in ("swap_nouns", "swap_attributes", "shuffle"):
        assert negs[t] != CAPTION
    assert sorted(negs["shuffle"].split()) == sorted(words)
    assert sorted(negs["swap_attributes"].split()) == sorted(words)
    # swapping attributes moves two attributes between their objects: same nouns in the same places
    a = negs["swap_attributes"].split()
    assert [w for w in a if w in ("triangle", "circles", "background")] == ["triangle", "circles", "background"]
    # a replacement changes one word into a word of the same kind
    diff = [(x, y) for x, y in zip(CAPTION.split(), negs["replace_attribute"].split()) if x != y]
    assert len(diff) == 1 and diff[0][1] in ("orange", "yellow", "green", "blue", "purple", "pink", "brown", "black",
                                             "white", "cyan", "magenta", "large", "big", "little", "tiny", "huge",
                                             "wooden", "metal", "plastic", "glass", "stone", "paper", "small", "red")
    # counts: "two" becomes another count, or "a triangle" several
    c = negs["count"].split()
    assert c != words and any(w in ("one", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "two")
                              for w in c)
    # nothing without something to change
    assert _negs("sunset") == {}
    assert _negs("3 dogs", rules=["count"])["count"].split()[0] in {str(n) for n in range(1, 11)} - {"3"}


def test_negatives_depend_only_on_seed_and_uid():
    assert _negs(CAPTION, "x") == _negs(CAPTION, "x")
    assert any(_negs(CAPTION, f"u{i}") != _negs(CAPTION, "x") for i in range(5))


@pytest.mark.skipif(not (WORDNET / "data.noun").is_file(), reason="WordNet 3.0 (wordnet-base) not installed")
def test_wordnet_co_hyponyms_share_a_hypernym():
    lex = Lexicon(str(WORDNET))
    sibs = lex.co_hyponyms("violin")  # not in the built-in lexicon: WordNet's alone
    assert "viola" in sibs or "cello" in sibs, sibs[:20]
    assert "green" in lex.co_hyponyms("red")
    negs = _negs("a man playing a violin", lex=lex, rules=["replace_noun"])
    assert negs["replace_noun"] != "a man playing a violin"


def _unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_flat_search_is_exact_and_ordered():
    x = _unit(500, 32)
    ids, sims = search(build_index(x, IndexConfig()), x, x[:50], 5, exclude_self=np.arange(50))
    full = x[:50].astype(np.float64) @ x.T.astype(np.float64)
    full[np.arange(50), np.arange(50)] = -np.inf
    want = np.argsort(-full, axis=1, kind="stable")[:, :5]
    assert (ids == want).all()
    assert np.allclose(sims, np.take_along_axis(full, want, 1), atol=1e-6)
    assert (np.diff(sims, axis=1) <= 0).all()


@pytest.mark.parametrize("kind", ["ivf", "ivfpq", "hnsw"])
def test_approximate_indexes_find_most_true_neighbours(kind):
    # clustered data, as embeddings are: approximate search is meant for it
    g = np.random.default_rng(1)
    centres = _unit(40, 32, 2)
    x = centres[g.integers(0, 40, 6000)] + 0.25 * g.standard_normal((6000, 32)).astype(np.float32) / np.sqrt(32)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    q = np.arange(0, 6000, 60)
    exact, _ = search(build_index(x, IndexConfig()), x, x[q], 10, exclude_self=q)
    cfg = IndexConfig(kind=kind, nlist=40, nprobe=8, pq_m=8)
    a, _ = search(build_index(x, cfg, seed=0), x, x[q], 10, exclude_self=q, rerank=cfg.rerank)
    recall = np.mean([len(set(r) & set(e)) / 10 for r, e in zip(a, exact)])
    assert recall >= 0.9, recall
    b, _ = search(build_index(x, cfg, seed=0), x, x[q], 10, exclude_self=q, rerank=cfg.rerank)
    assert (a == b).all()  # the same index and answers on a second build


def test_an_index_that_cannot_be_trained_names_the_field():
    with pytest.raises(IndexTooSmall, match=r"negatives\.index\.nlist: 100 cells x 39.*gives 500"):
        check_trainable(IndexConfig(kind="ivf", nlist=100), 500, "negatives.index")
    with pytest.raises(IndexTooSmall, match=r"negatives\.index\.train_size"):
        check_trainable(IndexConfig(kind="ivf", nlist=10, train_size=100), 5000, "negatives.index")
    check_trainable(IndexConfig(kind="ivf"), 500, "negatives.index")  # the default nlist fits
    check_trainable(IndexConfig(kind="hnsw"), 5, "negatives.index")


def test_the_job_fails_before_any_shard_when_the_index_cannot_be_trained(tmp_path, ray_local, folder_source):
    from recap.pipeline.job import build_job
    from recap.pipeline.runner import JobFailed, run_job
    from tests.test_reinforce import make_pictures

    make_pictures(tmp_path / "pics", 8)
    job = build_job({"name": "n", "input": {"kind": "folder", "path": str(tmp_path / "pics")},
                     "output": str(tmp_path / "o"), "scan": {"files_per_shard": 4},
                     "stages": [{"clip": {"model": "recap-tiny", "pretrained": None}},
                                {"negatives": {"index": {"kind": "ivf", "nlist": 50}}}]}, "n.yaml")
    with pytest.raises(JobFailed, match=r"negatives\.index\.kind 'ivf'.*negatives\.index\.nlist"):
        run_job(job, progress=False)
    assert not list((tmp_path / "o/stages/negatives").glob("*.parquet"))
    assert not list((tmp_path / "o/commits").glob("negatives*/*.json"))


# -- the demo world --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from recap.world.generate import generate_world
    from recap.world.server import serve
    from tests.conftest import free_port

    port = free_port()
    out = tmp_path_factory.mktemp("negatives") / "world"
    generate_world(out, samples=500, heldout=1400, seed=5, port=port)
    with serve(out, port=port):
        yield out, port


def _parts(out: Path, rel: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted((out / rel).glob("0*.parquet"))])


def negative_figures(world_dir: Path, out: Path) -> dict:
    """Against truth.parquet: how often a mined image negative has the positive's concept, vs random
    pairs of the same samples; how often it is the same scene; planted duplicates among them."""
    truth = pq.read_table(world_dir / "truth.parquet").to_pylist()
    inputs = _parts(out, "input").to_pylist()
    assert [r["url"] for r in inputs] == [t["url"].strip() for t in truth]
    by_uid = {r["uid"]: t for r, t in zip(inputs, truth)}
    side = _parts(out, "stages/negatives").to_pylist()
    uids = [r["uid"] for r in side]
    pairs = [(r["uid"], u) for r in side for u in r["hard_neg_uids"]]
    same = lambda f: lambda a, b: by_uid[a][f] == by_uid[b][f]  # noqa: E731
    g = np.random.default_rng(0)
    rand = [(uids[i], uids[j]) for i, j in g.integers(0, len(uids), (20000, 2)) if i != j]
    dup = lambda a, b: by_uid[a]["dup_group"] >= 0 and by_uid[a]["dup_group"] == by_uid[b]["dup_group"]  # noqa: E731
    planted = sum(1 for a in uids for b in uids if a < b and dup(a, b))
    return {"samples": len(uids), "pairs": len(pairs),
            "same_concept": float(np.mean([same("concept")(a, b) for a, b in pairs])),
            "random_same_concept": float(np.mean([same("concept")(a, b) for a, b in rand])),
            "same_scene": float(np.mean([same("scene")(a, b) for a, b in pairs])),
            "duplicates_in_negatives": sum(dup(a, b) for a, b in pairs), "planted_duplicate_pairs": planted}


def test_on_the_demo_world_negatives_share_the_concept_and_skip_duplicates(world, ray_local, tmp_path):
    from recap.pipeline.job import build_job
    from recap.pipeline.runner import run_job
    from tests.test_clip_quality import MODEL, train_clip

    world_dir, port = world
    ckpt = train_clip(world_dir / "heldout", tmp_path / "train")
    import yaml

    demo = yaml.safe_load((Path(__file__).resolve().parent.parent / "jobs/demo.yaml").read_text())
    pre = [s for s in demo["stages"] if next(iter(s)) in ("basic",)]

    def job(negatives: dict):
        return build_job({**demo, "name": "neg", "output": str(tmp_path / "ds"),
                          "input": {**demo["input"], "path": str(world_dir / "urls.parquet")},
                          "download": {**demo["download"], "allow_hosts": [f"127.0.0.1:{port}"],
                                       "samples_per_shard": 200, "timeout": 2},
                          "stages": [*pre, {"clip": {"model": MODEL, "pretrained": ckpt}},
                                     {"negatives": {"k": 4, "text_k": 0, "rules": [], **negatives}}]},
                         "neg.yaml", base_dir=Path(__file__).resolve().parent.parent / "jobs")

    # no false-negative filtering first (a margin nothing exceeds, duplicates only when identical)
    run_job(job({"margin": 2.0, "near_dup_eps": 1e-9, "phash_distance": None}), progress=False)
    raw = negative_figures(world_dir, tmp_path / "ds")
    run_job(job({}), progress=False)  # only the negatives stage reruns (its config changed)
    f = negative_figures(world_dir, tmp_path / "ds")
    print({"unfiltered": raw, "filtered": f})
    assert f["samples"] > 200 and f["pairs"] >= 3 * f["samples"], f
    # mined negatives share the positive's concept far more often than random pairs...
    assert f["same_concept"] >= 2 * f["random_same_concept"], f
    # ...yet are other scenes
    assert f["same_scene"] <= 0.02, f
    # the planted duplicates the exact dedup left are among the unfiltered neighbours, and filtered out
    assert raw["duplicates_in_negatives"] > 0 and f["duplicates_in_negatives"] == 0, (raw, f)


def _unit_rows(rows: list[list[float]]) -> np.ndarray:
    a = np.array(rows, np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_false_negative_filtering_drops_each_kind_and_keeps_true_negatives():
    """Sample 0 and five neighbours, one per rule: a near-duplicate image, the same caption, a caption
    that fits sample 0's image better than its own (margin), the same group, and a true negative."""
    from recap.pipeline.stage import StageContext
    from recap.pipeline.stage_data import StageData
    from recap.stages.negatives import NegativesConfig, NegativesStage

    d = 8
    base = np.eye(d, dtype=np.float32)
    img = _unit_rows([base[0] + 0.0 * base[1],          # 0: the positive
                      base[0] + 0.01 * base[1],         # 1: near-duplicate image
                      base[0] + 0.5 * base[2],          # 2: same caption as 0
                      base[0] + 0.6 * base[3],          # 3: its caption fits image 0 better than 0's own
                      base[0] + 0.7 * base[4],          # 4: same group as 0
                      base[0] + 0.8 * base[5]])         # 5: a true hard negative
    txt = _unit_rows([base[0] + 2.0 * base[6], base[6], base[6], base[0], base[7], base[7] + 0.1 * base[6]])
    captions = ["a red cube", "a cube", "A  red cube", "a red cube, exactly", "a blue ball", "a green cone"]
    uids = [f"u{i}" for i in range(6)]
    fl = lambda m: pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1).astype(np.float16)), d)  # noqa: E731
    table = pa.table({"uid": uids, "caption": captions, "image_emb": fl(img), "text_emb": fl(txt),
                      "dedup_group": [7, None, None, None, 7, None]})
    cfg = NegativesConfig(k=5, text_k=0, rules=[], phash_distance=None)
    stage = NegativesStage(cfg, StageContext("j", 0, "negatives", "/tmp", 6))
    stage.data = StageData(None, "negatives", 1, read_inputs=lambda shard, cols: table)
    state = stage.reduce([{"n": 6}])
    assert state["neighbours"]["u0"][0] == ["u5"], state["neighbours"]["u0"]
    dropped = state["summary"]["false_negatives_dropped"]
    assert dropped["near_duplicate"] >= 1 and dropped["same_caption"] >= 1 and dropped["margin"] >= 1
    assert dropped["same_group"] >= 1
    # without filtering, all five come back, nearest first
    loose = NegativesStage(NegativesConfig(k=5, text_k=0, rules=[], phash_distance=None, margin=5.0,
                                           near_dup_eps=1e-9, group_column="none"),
                           StageContext("j", 0, "negatives", "/tmp", 6))
    loose.data = StageData(None, "negatives", 1, read_inputs=lambda shard, cols: table)
    got = loose.reduce([{"n": 6}])["neighbours"]["u0"]
    same_caption = {"u2"}  # the caption rule has no switch: "A  red cube" is "a red cube"
    assert set(got[0]) == {"u1", "u3", "u4", "u5"} and not set(got[0]) & same_caption
    assert got[1] == sorted(got[1], reverse=True)
