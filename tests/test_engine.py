"""The engine on a real local Ray, with network-free stages."""
import hashlib
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recap.pipeline.inspect import inspect_dataset
from recap.pipeline.job import build_job
from recap.pipeline.runner import JobFailed, run_job


def _input(tmp_path, n=22):
    rows = []
    for i in range(n):
        word = ["alpha", "beta", "gamma", "solo%d" % i][i % 4]
        cap = f"{word} thing {i}" + (" drop" if i % 7 == 3 else "")
        url = f"http://h/{'fail' if i % 5 == 2 else 'img'}/{i}.jpg"
        rows.append({"url": url, "caption": cap, "license": f"l{i}"})
    rows.append(dict(rows[0]))  # an exact repeat
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _job(tmp_path, out, stages, **dl):
    return build_job({"name": "t", "seed": 3, "input": {"path": str(_input(tmp_path))}, "output": str(out),
                      "download": {"samples_per_shard": 4, **dl}, "stages": stages}, "t.yaml")


def digest(root):
    h = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            rel = os.path.relpath(p, root)
            if f == "manifest.json" or f.endswith("_stats.json") or rel.startswith("logs"):
                continue
            h[rel] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return h


STAGES = [{"upper": {}}, {"coin": {"p": 0.7}}, {"firstword": {}}]


def test_full_run_accounts_for_every_sample(tmp_path, ray_local, fake_stages):
    out = tmp_path / "ds"
    res = run_job(_job(tmp_path, out, STAGES), progress=False)
    assert res.n_shards == 6
    rep = inspect_dataset(str(out))
    assert rep["invariant_ok"], rep["problems"]
    st = rep["stages"]
    assert list(st) == ["download", "upper", "coin", "firstword"]
    assert st["download"]["in"] == 23 and st["download"]["dropped"]["duplicate_input"] == 1
    assert st["download"]["dropped"]["http_404"] == 4
    for a, b in zip(list(st)[:-1], list(st)[1:]):
        assert st[b]["in"] == st[a]["kept"]
    assert st["upper"]["dropped"] == {"caption_says_drop": 2}
    assert 0 < st["coin"]["dropped"]["coin_flip"] < st["coin"]["in"]
    # sidecars are keyed by uid and carry what the stage wrote
    side = pq.read_table(out / "stages/upper/00000.parquet").to_pylist()
    assert all(r["caption_upper"].endswith("!") for r in side)
    coin = pq.read_table(out / "stages/coin/00000.parquet")
    assert set(coin.column_names) == {"uid", "u", "nbytes"} and set(coin.column("nbytes").to_pylist()) <= {32}
    # the global stage saw every shard: counts are dataset-wide
    state = json.load(open(out / "stages/firstword/state.json"))["state"]
    coin_kept = {u for i in range(6) for u in pq.read_table(out / f"stages/coin/{i:05d}.parquet").column("uid").to_pylist()}
    captions = [r["caption"] for i in range(6) for r in pq.read_table(out / f"shards/{i:05d}.parquet").to_pylist()
                if r["uid"] in coin_kept]
    assert state["alpha"] == sum(c.startswith("alpha ") for c in captions) > 1
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["status"] == "done" and manifest["stages"]["coin"]["counts"]["kept"] == st["coin"]["kept"]
    # tar: members in input order, fixed metadata
    import tarfile
    with tarfile.open(out / "shards/00000.tar") as t:
        names = t.getnames()
        assert names[:3] == ["000000.jpg", "000000.json", "000000.txt"]
        assert {m.mtime for m in t.getmembers()} == {0}


def test_resume_reruns_only_what_changed(tmp_path, ray_local, fake_stages):
    out = tmp_path / "ds"
    run_job(_job(tmp_path, out, STAGES), progress=False)
    first = digest(out)
    mtimes = {p: os.stat(out / p).st_mtime_ns for p in first}
    run_job(_job(tmp_path, out, STAGES), progress=False)  # nothing to do
    assert digest(out) == first
    assert all(os.stat(out / p).st_mtime_ns == t for p, t in mtimes.items())
    # change the middle stage: it and later ones rerun, earlier ones do not
    run_job(_job(tmp_path, out, [{"upper": {}}, {"coin": {"p": 0.3}}, {"firstword": {}}]), progress=False)
    assert os.stat(out / "stages/upper/00001.parquet").st_mtime_ns == mtimes["stages/upper/00001.parquet"]
    assert os.stat(out / "shards/00001.tar").st_mtime_ns == mtimes["shards/00001.tar"]
    assert os.stat(out / "stages/coin/00001.parquet").st_mtime_ns != mtimes["stages/coin/00001.parquet"]
    assert inspect_dataset(str(out))["invariant_ok"]


def test_truncated_tar_and_missing_marker_are_redone(tmp_path, ray_local, fake_stages):
    out = tmp_path / "ds"
    run_job(_job(tmp_path, out, STAGES), progress=False)
    first = digest(out)
    tar = out / "shards/00002.tar"
    tar.write_bytes(tar.read_bytes()[:700])  # truncated on disk
    os.remove(out / "commits/coin/00004.json")  # interrupted before its commit
    (out / ".tmp").mkdir(exist_ok=True)
    (out / ".tmp/halfwritten").write_bytes(b"x")
    run_job(_job(tmp_path, out, STAGES), progress=False)
    assert digest(out) == first


def test_same_output_whatever_the_batch_size_and_order(tmp_path, ray_local, fake_stages):
    a, b = tmp_path / "a", tmp_path / "b"
    run_job(_job(tmp_path, a, STAGES), progress=False)
    run_job(_job(tmp_path, b, [{"upper": {"batch_size": 1}}, {"coin": {"p": 0.7, "batch_size": 2}}, {"firstword": {"batch_size": 1}}]), progress=False)
    assert digest(a) == digest(b)


def test_a_failing_stage_names_stage_and_shard(tmp_path, ray_local, fake_stages):
    with pytest.raises(JobFailed, match=r"stage 'boom' failed on shard \d{5}: ValueError: kaboom"):
        run_job(_job(tmp_path, tmp_path / "ds", [{"upper": {}}, "boom"]), progress=False)
    manifest = json.load(open(tmp_path / "ds/manifest.json"))
    assert manifest["status"] == "failed" and "boom" in manifest["error"]


def test_inspect_detects_a_lost_sample(tmp_path, ray_local, fake_stages, capsys):
    from recap.cli import main

    out = tmp_path / "ds"
    run_job(_job(tmp_path, out, [{"upper": {}}]), progress=False)
    assert main(["inspect", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["invariant_ok"] and list(rep["stages"]) == ["download", "upper"]
    assert main(["inspect", str(out), "--samples", "2"]) == 0
    text = capsys.readouterr().out
    assert "http_404" in text and "404 Not Found" in text
    ledger = pq.read_table(out / "ledger/upper/00000.parquet")
    pq.write_table(ledger.slice(0, 0), out / "ledger/upper/00000.parquet")  # a drop goes missing
    if ledger.num_rows == 0:
        side = pq.read_table(out / "stages/upper/00000.parquet")
        pq.write_table(side.slice(1), out / "stages/upper/00000.parquet")
    assert main(["inspect", str(out), "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert not rep["invariant_ok"] and "upper: shard 00000" in rep["problems"][0]


def test_cli_bad_job_file_exits_2(tmp_path, capsys):
    from recap.cli import main

    job = tmp_path / "j.yaml"
    job.write_text("name: x\ninput: {path: u.csv}\noutput: o\ndownload: {timeout: -3}\n")
    assert main(["run", str(job)]) == 2
    err = capsys.readouterr().err
    assert f"{job}: download.timeout:" in err and "-3" in err


def test_object_store_dataset_matches_local(tmp_path, ray_local, fake_stages, s3_endpoint):
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.mkdir("recap-test")
    run_job(_job(tmp_path, tmp_path / "local", STAGES), progress=False)
    run_job(_job(tmp_path, "s3://recap-test/ds", STAGES), progress=False)
    assert inspect_dataset("s3://recap-test/ds")["invariant_ok"]
    local = digest(tmp_path / "local")
    remote = {p[len("recap-test/ds/"):]: hashlib.sha256(fs.cat(p)).hexdigest()
              for p in fs.find("recap-test/ds") if not p.endswith(("manifest.json", "_stats.json")) and "/logs/" not in p}
    assert remote == local
    # a marker whose file is gone is not trusted: the shard is redone
    fs.rm("recap-test/ds/stages/coin/00003.parquet")
    run_job(_job(tmp_path, "s3://recap-test/ds", STAGES), progress=False)
    assert hashlib.sha256(fs.cat("recap-test/ds/stages/coin/00003.parquet")).hexdigest() == local["stages/coin/00003.parquet"]


def test_empty_input_is_a_valid_empty_dataset(tmp_path, ray_local, fake_stages):
    path = tmp_path / "empty.csv"
    path.write_text("url,caption\n")
    job = build_job({"name": "t", "input": {"path": str(path)}, "output": str(tmp_path / "ds"),
                     "download": {"samples_per_shard": 4}, "stages": ["upper"]}, "t.yaml")
    assert run_job(job, progress=False).n_shards == 0
    rep = inspect_dataset(str(tmp_path / "ds"))
    assert rep["invariant_ok"] and rep["stages"]["download"] == {"in": 0, "kept": 0, "dropped": {}, "notes": {}}


def test_changed_input_discards_derived_files(tmp_path, ray_local, fake_stages):
    out = tmp_path / "ds"
    run_job(_job(tmp_path, out, [{"upper": {}}]), progress=False)
    assert (out / "shards/00005.tar").exists()
    job = _job(tmp_path, out, [{"upper": {}}], samples_per_shard=100)  # a different cut of the same input
    run_job(job, progress=False, overwrite=True)
    assert not (out / "shards/00005.tar").exists() and (out / "shards/00000.tar").exists()
    assert inspect_dataset(str(out))["invariant_ok"]
