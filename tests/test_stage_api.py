"""The Stage API from outside the engine: a second source stage, job-file paths, Ray operator
names, and resume that trusts markers and sizes unless asked to re-hash."""
import io
import json
import os
import tarfile

import pytest
from PIL import Image

from recap.pipeline.inspect import inspect_dataset
from recap.pipeline.job import JobError, build_job, load_job
from recap.pipeline.runner import run_job
from tests.test_engine import STAGES, _job, digest


def _folder(path, n=7, empty=(4,)):
    path.mkdir()
    sizes = {}
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (8 + i, 8), (i * 30, 0, 0)).save(buf, "PNG")
        data = b"" if i in empty else buf.getvalue()
        (path / f"img{i}.png").write_bytes(data)
        (path / f"img{i}.txt").write_text(f"picture number {i}")
        sizes[f"img{i}"] = len(data)
    return sizes


def test_a_second_source_runs_without_touching_the_engine(tmp_path, ray_local, folder_source):
    sizes = _folder(tmp_path / "pics")
    job = build_job({"name": "f", "input": {"kind": "folder", "path": str(tmp_path / "pics")},
                     "output": str(tmp_path / "ds"), "scan": {"files_per_shard": 3},
                     "stages": [{"upper": {}}, {"coin": {"p": 1.0}}]}, "f.yaml")
    assert job.stages[0].name == "folder" and job.stages[0].config.files_per_shard == 3
    res = run_job(job, progress=False)
    assert res.n_shards == 3
    rep = inspect_dataset(str(tmp_path / "ds"))
    assert rep["invariant_ok"], rep["problems"]
    assert rep["stages"]["folder"] == {"in": 7, "kept": 6, "dropped": {"empty_file": 1}, "notes": {}}
    assert rep["stages"]["coin"]["kept"] == 6
    # a later stage reads the source's images through the member and key the source declared
    import pyarrow.parquet as pq
    coin = pq.read_table(tmp_path / "ds/stages/coin").to_pylist()
    index = pq.read_table(tmp_path / "ds/shards/00000.parquet").to_pylist()
    names = {r["uid"]: r["name"] for r in index}
    for r in coin:
        if r["uid"] in names:
            assert r["nbytes"] == sizes[names[r["uid"]]] > 0
    with tarfile.open(tmp_path / "ds/shards/00000.tar") as t:
        assert t.getnames() == ["img0.json", "img0.png", "img0.txt", "img1.json", "img1.png", "img1.txt",
                                "img2.json", "img2.png", "img2.txt"]
        assert t.extractfile("img1.txt").read() == b"picture number 1"
    # the download section belongs to another source: here it is an unknown key
    with pytest.raises(JobError, match=r"f.yaml: download: unknown key"):
        build_job({"input": {"kind": "folder", "path": "x"}, "output": "o", "download": {}}, "f.yaml")
    with pytest.raises(JobError, match=r"input.kind: unknown input kind 'tapes' \(available: .*folder.*urls"):
        build_job({"input": {"kind": "tapes", "path": "x"}, "output": "o"}, "f.yaml")


def test_a_source_stage_cannot_run_as_a_later_stage(fake_stages):
    with pytest.raises(JobError, match=r"stages\[0\].download: stage 'download' of kind 'source' cannot run here"):
        build_job({"input": {"path": "x.csv"}, "output": "o", "stages": ["download"]}, "t.yaml")


def test_job_file_paths_resolve_beside_the_job_file(tmp_path, monkeypatch):
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "meta.json").write_text(json.dumps(["dog", "cat"]))
    (jobs / "job.yaml").write_text("input: {path: urls.csv}\noutput: out\n"
                                   "stages:\n  - balance: {metadata: meta.json, t: 3}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    job = load_job(jobs / "job.yaml")
    assert job.stages[1].config.metadata == str(jobs / "meta.json")
    # a path relative to the working directory (older job files, --set values) still works
    (elsewhere / "other.json").write_text(json.dumps(["bird"]))
    job = load_job(jobs / "job.yaml", ["stages.0.balance.metadata=other.json"])
    assert job.stages[1].config.metadata == str(elsewhere / "other.json")
    with pytest.raises(JobError, match=r"stages\[0\].balance.metadata: .*missing.json"):
        load_job(jobs / "job.yaml", ["stages.0.balance.metadata=missing.json"])


def test_ray_operators_are_named_after_stage_and_phase(tmp_path, ray_local, fake_stages):
    out = tmp_path / "ds"
    run_job(_job(tmp_path, out, STAGES), progress=False)
    stats = "".join(p.read_text() for p in (out / "logs/ray").iterdir())
    for op in ("download", "upper", "coin", "firstword.partial", "firstword.apply"):
        assert f"MapBatches({op})" in stats


def test_resume_trusts_sizes_and_verify_rehashes(tmp_path, ray_local, fake_stages):
    out = tmp_path / "ds"
    run_job(_job(tmp_path, out, STAGES), progress=False)
    first = digest(out)
    side = out / "stages/upper/00001.parquet"
    data = bytearray(side.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only a re-hash can tell
    side.write_bytes(bytes(data))
    mtime = os.stat(side).st_mtime_ns
    run_job(_job(tmp_path, out, STAGES), progress=False)
    assert os.stat(side).st_mtime_ns == mtime  # a plain rerun reads no data file
    rep = inspect_dataset(str(out), verify=True)
    assert not rep["invariant_ok"]
    assert any("stages/upper/00001.parquet is damaged (its bytes changed" in p for p in rep["problems"])
    run_job(_job(tmp_path, out, STAGES), progress=False, verify=True)
    assert digest(out) == first
    assert inspect_dataset(str(out), verify=True)["invariant_ok"]


def test_the_readme_stage_example_runs():
    import re
    from pathlib import Path

    import pyarrow as pa

    from recap.pipeline.stage import StageContext

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = re.search(r"## Extending.*?```python\n(.*?)```", readme, flags=re.S).group(1)
    ns: dict = {}
    exec(code, ns)
    stage = ns["ShortCaption"](ns["ShortCaptionConfig"](min_chars=6), StageContext("j", 0, "short_caption", "d"))
    out = stage.process(pa.table({"uid": ["a", "b"], "caption": ["a long caption", "tiny"]}))
    assert out.column("caption_chars").to_pylist() == [14, 4]
    assert out.column("_drop").to_pylist() == [None, "caption_too_short"]
    assert stage.kind == "map" and stage.writes() == ("caption_chars",)
