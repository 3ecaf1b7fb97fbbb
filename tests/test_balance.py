"""The balance stage on a real local Ray: MetaCLIP's counts, probabilities and seeded keeps, checked
against a naive re-implementation of the paper's formulas written here."""
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recap.pipeline import rng
from recap.pipeline.inspect import format_report, inspect_dataset
from recap.pipeline.job import build_job
from recap.pipeline.runner import run_job

COLOURS = ["red", "blue", "green", "teal", "mauve", "ochre", "umber", "cyan"]
SHAPES = ["circle", "square", "star", "hexagon", "crescent", "trefoil", "rhombus", "lozenge"]
ENTRIES = COLOURS + SHAPES + ["red circle", "blue square", "hot dog", "dog", "U.S.", "!", "", "star", "Star"]


def _corpus(n: int, seed: int) -> list[str]:
    """Head-heavy: a few colours and shapes dominate, the rest is a long tail."""
    r = np.random.default_rng(seed)
    w = 1.0 / np.arange(1, 9) ** 1.6
    w /= w.sum()
    caps = []
    for i in range(n):
        kind = r.random()
        if kind < 0.08:
            caps.append(f"IMG_{i:04d}.JPG")  # no entry matches
        elif kind < 0.12:
            caps.append(f"a hot dog in the U.S. , wow! #{i}")
        else:
            objs = [f"{r.choice(COLOURS, p=w)} {r.choice(SHAPES, p=w)}" for _ in range(r.integers(1, 3))]
            caps.append(f"a {' and a '.join(objs)}, drawn #{i}.")
    return caps


def _norm(text: str) -> str:
    text = " " + text + " "
    for c in ",.;:?!`":
        text = text.replace(c, " " + c + " ")
    return text.replace("\t", " ").replace("\n", " ").replace("\r", " ")


def _naive_match(text: str) -> list[int]:
    t = _norm(text)
    return [i for i, e in enumerate(ENTRIES) if e and (" " + e + " ") in t]


@pytest.fixture
def corpus(tmp_path):
    caps = _corpus(400, seed=11)
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": [f"http://h/img/{i}.jpg" for i in range(len(caps))], "caption": caps}), urls)
    meta = tmp_path / "metadata.json"
    meta.write_text(json.dumps(ENTRIES))
    return tmp_path, urls, meta, caps


def _run(tmp, urls, meta, out, seed=5, **balance):
    job = build_job({"name": "b", "seed": seed, "input": {"path": str(urls)}, "output": str(out),
                     "download": {"samples_per_shard": 64},
                     "stages": [{"balance": {"metadata": str(meta), **balance}}]}, "b.yaml")
    run_job(job, progress=False)
    return out


def _sidecars(out, stage="balance"):
    return pa.concat_tables([pq.read_table(p) for p in sorted((out / "stages" / stage).glob("*.parquet"))])


def _ledger(out):
    return pa.concat_tables([pq.read_table(p) for p in sorted((out / "ledger/balance").glob("*.parquet"))])


def test_balance_matches_metaclip_semantics(corpus, ray_local, fake_stages):
    tmp, urls, meta, caps = corpus
    out = _run(tmp, urls, meta, tmp / "ds", t=30)
    # the fake source drops URLs containing 'fail' (none here): every caption reaches balance
    by_uid = {r["uid"]: r["caption"] for p in sorted((out / "shards").glob("*.parquet")) for r in pq.read_table(p).to_pylist()}
    assert len(by_uid) == len(caps)
    matches = {u: _naive_match(c) for u, c in by_uid.items()}
    counts = np.zeros(len(ENTRIES), np.int64)
    for m in matches.values():
        counts[m] += 1
    entry_counts = json.loads((out / "stages/balance/entry_counts.json").read_text())
    # MetaCLIP's dict: entry -> count (duplicate entries share a key and a count)
    assert {e: int(counts[i]) for i, e in enumerate(ENTRIES)} == entry_counts
    assert entry_counts["dog"] == entry_counts["hot dog"] > 0 and entry_counts["!"] > 0 and entry_counts["U.S."] == 0
    p = np.minimum(1.0, 30 / np.maximum(counts, 1))
    side = {r["uid"]: r for r in _sidecars(out).to_pylist()}
    drops = {r["uid"]: r["reason"] for r in _ledger(out).to_pylist()}
    assert set(side) | set(drops) == set(by_uid) and not set(side) & set(drops)
    u = dict(zip(by_uid, rng.uniform(5, "balance", list(by_uid))))
    for uid, m in matches.items():
        prob = 1 - math.prod(1 - p[i] for i in m) if m else 0.0
        if not m:
            assert drops[uid] == "no_metadata_match"
        elif u[uid] < prob:
            assert side[uid]["matched_entries"] == m
            assert side[uid]["balance_prob"] == pytest.approx(prob, rel=1e-12)
        else:
            assert drops[uid] == "balanced_out"
    assert 0 < sum(r == "balanced_out" for r in drops.values()) and len(side) > 0
    rep = inspect_dataset(str(out))
    assert rep["invariant_ok"], rep["problems"]
    summ = rep["summaries"]["balance"]
    # the head is cut, the tail kept: matches spread more evenly over entries afterwards
    assert summ["after"]["flatness"] > summ["before"]["flatness"]
    assert summ["after"]["head_share"] < summ["before"]["head_share"]
    assert summ["top_entries"][0]["after"] < summ["top_entries"][0]["before"]
    # the share of samples that carry a tail entry (count < t) grows: every one of them is kept
    tail_ids = {i for i, e in enumerate(ENTRIES) if 0 < entry_counts[e] < 30}
    with_match = [m for m in matches.values() if m]
    assert summ["before"]["samples_matched"] == len(with_match)
    assert summ["before"]["samples_in_tail"] == round(sum(bool(tail_ids & set(m)) for m in with_match) / len(with_match), 4)
    kept_m = [side[u]["matched_entries"] for u in side]
    assert summ["after"]["samples_in_tail"] == round(sum(bool(tail_ids & set(m)) for m in kept_m) / len(kept_m), 4)
    assert summ["after"]["samples_in_tail"] > summ["before"]["samples_in_tail"]
    assert "entry counts before -> after" in format_report(rep)


def test_same_keeps_whatever_the_batching_other_seed_differs(corpus, ray_local, fake_stages):
    tmp, urls, meta, _ = corpus
    a = _run(tmp, urls, meta, tmp / "a", t=30)
    b = _run(tmp, urls, meta, tmp / "b", t=30, batch_size=7)
    c = _run(tmp, urls, meta, tmp / "c", seed=6, t=30)
    ka, kb, kc = (set(_sidecars(x).column("uid").to_pylist()) for x in (a, b, c))
    assert ka == kb
    assert ka != kc
    # statistically equivalent: both near the expected kept size Σ P
    probs = _all_probs(a)
    mean, sd = probs.sum(), math.sqrt((probs * (1 - probs)).sum())
    assert abs(len(ka) - mean) < 4 * sd + 1 and abs(len(kc) - mean) < 4 * sd + 1


def test_same_keeps_with_1_2_4_workers(corpus, ray_local, fake_stages):
    """Shards go to whichever actor is free: the kept set, probabilities and counts must not care."""
    tmp, urls, meta, caps = corpus
    outs = [_run(tmp, urls, meta, tmp / f"w{n}", t=30, concurrency=n, resources={"cpus": 0.25}) for n in (1, 2, 4)]
    sides = [_sidecars(o).sort_by("uid") for o in outs]
    assert sides[0].num_rows > 0
    assert all(s.equals(sides[0]) for s in sides[1:])
    counts = [(o / "stages/balance/entry_counts.json").read_bytes() for o in outs]
    assert counts[1] == counts[0] == counts[2]
    # the matches the partial pass carried to apply are the ones the apply pass would compute
    carried = pa.concat_tables([pq.read_table(p) for p in sorted((outs[0] / "stages/balance/carry").glob("*.parquet"))])
    assert carried.num_rows == len(caps)
    kept = dict(zip(sides[0].column("uid").to_pylist(), sides[0].column("matched_entries").to_pylist()))
    carried = dict(zip(carried.column("uid").to_pylist(), carried.column("matched_entries").to_pylist()))
    assert all(carried[u] == m for u, m in kept.items())


def _all_probs(out) -> np.ndarray:
    """P for every sample that reached the stage, recomputed from the stage's own state."""
    state = json.loads((out / "stages/balance/state.json").read_text())["state"]
    counts = np.zeros(state["n_entries"], np.int64)
    for sparse in state["counts"].values():
        for k, v in zip(sparse["ids"], sparse["n"]):
            counts[k] += v
    p = np.minimum(1.0, state["t"] / np.maximum(counts, 1))
    caps = [r["caption"] for f in sorted((out / "shards").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    return np.array([1 - math.prod(1 - p[i] for i in _naive_match(c)) for c in caps])


def test_target_size_solves_t(corpus, ray_local, fake_stages):
    tmp, urls, meta, _ = corpus
    out = _run(tmp, urls, meta, tmp / "ds", target_size=150)
    state = json.loads((out / "stages/balance/state.json").read_text())["state"]
    probs = _all_probs(out)
    assert probs.sum() == pytest.approx(150, rel=0.05)  # the solved t gives the target in expectation
    assert state["t"] > 1
    kept = _sidecars(out).num_rows
    assert abs(kept - 150) < 4 * math.sqrt((probs * (1 - probs)).sum()) + 2


def test_keep_all_for_online_balancing(corpus, ray_local, fake_stages):
    tmp, urls, meta, caps = corpus
    out = _run(tmp, urls, meta, tmp / "ds", t=30, drop=False)
    side = _sidecars(out)
    n_matched = sum(bool(_naive_match(c)) for c in caps)
    assert side.num_rows == n_matched  # every matched sample stays, with its probability
    probs = side.column("balance_prob").to_numpy()
    assert ((probs > 0) & (probs <= 1)).all() and (probs < 1).any()
    assert set(_ledger(out).column("reason").to_pylist()) == {"no_metadata_match"}


def test_per_language_thresholds(tmp_path, ray_local, fake_stages):
    """MetaCLIP 2: each language gets the t at which its cumulative match share matches English's tail share."""
    from recap.metadata import language_threshold

    en = _corpus(300, seed=3)
    de = ["de: " + c for c in _corpus(120, seed=4)]
    urls = tmp_path / "urls.parquet"
    caps = en + de
    pq.write_table(pa.table({"url": [f"http://h/img/{i}.jpg" for i in range(len(caps))], "caption": caps}), urls)
    meta = tmp_path / "metadata.json"
    meta.write_text(json.dumps(ENTRIES))
    job = build_job({"name": "b", "seed": 1, "input": {"path": str(urls)}, "output": str(tmp_path / "ds"),
                     "download": {"samples_per_shard": 50},
                     "stages": [{"langtag": {}}, {"balance": {"metadata": str(meta), "t": 20, "per_language": True}}]},
                    "b.yaml")
    run_job(job, progress=False)
    state = json.loads((tmp_path / "ds/stages/balance/state.json").read_text())["state"]
    counts = {lang: np.zeros(len(ENTRIES), np.int64) for lang in ("en", "de")}
    for lang, group in (("en", en), ("de", de)):
        for c in group:
            counts[lang][_naive_match(c)] += 1
    assert state["t_lang"]["en"] == 20
    assert state["t_lang"]["de"] == language_threshold(counts["en"], counts["de"], 20)
    side = _sidecars(tmp_path / "ds")
    p_de = np.minimum(1.0, state["t_lang"]["de"] / np.maximum(counts["de"], 1))
    by_uid = {r["uid"]: r["caption"] for f in sorted((tmp_path / "ds/shards").glob("*.parquet")) for r in pq.read_table(f).to_pylist()}
    for r in side.to_pylist():
        cap = by_uid[r["uid"]]
        if cap.startswith("de: "):
            assert r["balance_prob"] == pytest.approx(1 - math.prod(1 - p_de[i] for i in _naive_match(cap)))
    assert inspect_dataset(str(tmp_path / "ds"))["invariant_ok"]


def test_bad_metadata_is_a_job_error_naming_the_field(tmp_path):
    from recap.pipeline.job import JobError

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(["dog", 3]))
    for meta, says in [(tmp_path / "none.json", "no such metadata file"), (bad, "item 1")]:
        with pytest.raises(JobError) as e:
            build_job({"name": "b", "seed": 0, "input": {"path": str(tmp_path / "u.parquet")}, "output": str(tmp_path / "o"),
                       "stages": [{"balance": {"metadata": str(meta), "t": 5}}]}, "b.yaml")
        assert "b.yaml" in str(e.value) and "stages" in str(e.value) and "metadata" in str(e.value)
        assert str(meta) in str(e.value) and says in str(e.value), str(e.value)


def test_text_column_of_bytes_or_not_text(tmp_path):
    """A bytes column (say, a raw caption with bad UTF-8) matches on what decodes; a column that is
    not text is an error naming it."""
    from recap.pipeline.stage import StageContext
    from recap.stages.balance import BalanceConfig, BalanceStage

    meta = tmp_path / "m.json"
    meta.write_text(json.dumps(["dog", "café"]))
    st = BalanceStage(BalanceConfig(metadata=str(meta), t=1, text_column="raw"), StageContext("j", 0, "balance", str(tmp_path), 3))
    st.setup()
    t = pa.table({"uid": ["a", "b", "c"], "raw": pa.array([b"a dog", b"\xff\xfe dog caf\xc3\xa9", None], pa.binary())})
    assert st._matches(t).to_pylist() == [[0], [0, 1], []]
    with pytest.raises(ValueError, match="balance.text_column 'raw' is list"):
        st._matches(pa.table({"uid": ["a"], "raw": pa.array([[1]])}))
