"""The Parquet source: tables holding their images (bytes, or datasets' {bytes, path} structs) curated
through the demo job's stages, read in place or copied into shards; wrong columns refused before any work; bad
images each with their reason; resume and worker count change no byte."""
import io
import json
import os
import re
import subprocess
import sys
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recap.pipeline.inputs import InputError, InputSpec, plan_rows
from recap.pipeline.inspect import inspect_dataset
from recap.pipeline.errors import UserError
from recap.pipeline.runner import run_job
from recap.pipeline.stage import StageContext, get_stage_class
from recap.pipeline.steps import SourceChanged, load_input
from recap.pipeline.storage import Dataset
from recap.stages.parquet_source import ParquetChanged, ParquetConfig, ParquetInput, ParquetSource
from recap.stages.source_files import content_uid
from tests.test_webdataset_source import (CURATION, CURATION_STAGES, DEMO_STAGES, ROOT, demo_job, jpeg, read_index,
                                          resume_and_workers_are_byte_identical,
                                          web, write_job)

__all__ = ["web"]  # the module fixture, shared
HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def stage(**cfg) -> ParquetSource:
    return ParquetSource(ParquetConfig(**cfg), StageContext("t", 0, "parquet_images", "unused"))


def ingest(spec: ParquetInput, src: ParquetSource | None = None) -> list[pa.Table]:
    src = src or stage()
    return [src.process(t) for t in src.plan(spec)]


def write_tables(folder, samples: list[dict], per_file: int) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, start in enumerate(range(0, len(samples), per_file)):
        chunk = samples[start:start + per_file]
        path = folder / f"part-{n}.parquet"
        pq.write_table(pa.table({"url": [s["url"] for s in chunk], "caption": [s["caption"] for s in chunk],
                                 "image": pa.array([s["image"] for s in chunk], pa.binary()),
                                 "license": [s["license"] for s in chunk]}), path, row_group_size=16)
        paths.append(path)
    return paths


def test_a_table_of_image_bytes_curates_in_place_through_the_demo_stages(web, tmp_path, ray_local):
    """By default the images stay in the tables: no tar is written, the shards reference the files,
    and every later stage reads exactly the bytes the table holds."""
    paths = write_tables(tmp_path / "in", web, per_file=50)
    out = tmp_path / "ds"
    run_job(demo_job({"kind": "parquet", "paths": str(tmp_path / "in/*.parquet")}, out, section={"rows_per_shard": 40},
                     section_key="parquet"), progress=False)
    rep = inspect_dataset(str(out))
    assert rep["invariant_ok"], rep["problems"]
    # the whole demo list: the model stages and reinforce's re-packing read the tables too
    assert list(rep["stages"]) == ["parquet_images", *DEMO_STAGES]
    assert (out / "reinforced" / "config.json").exists()
    assert rep["stages"]["dedup"]["dropped"].get("duplicate_image", 0) > 0 and rep["stages"]["balance"]["kept"] > 0
    assert not list((out / "shards").glob("*.tar"))
    records = [json.loads(p.read_text()) for p in sorted((out / "shards").glob("*.source.json"))]
    assert len(records) == -(-len(web) // 40)
    assert records[1]["files"] == [{"url": str(paths[0]), "size": paths[0].stat().st_size},
                                   {"url": str(paths[1]), "size": paths[1].stat().st_size}]
    by_url = {s["url"]: s for s in web}
    ds, src = Dataset(str(out)), get_stage_class("parquet_images")
    for shard in range(len(records)):
        got = load_input(ds, shard, src, ["basic"], ("jpg", "url"))
        assert got.num_rows and all(b == by_url[u]["image"] for u, b in
                                    zip(got.column("url").to_pylist(), got.column("jpg").to_pylist()))


def test_a_referenced_table_changed_after_ingest_is_named(web, tmp_path, ray_local):
    (path,) = write_tables(tmp_path / "in", web[:20], per_file=20)
    inp, out = {"kind": "parquet", "paths": str(path)}, tmp_path / "ds"
    run_job(demo_job(inp, out, stages=[], section_key="parquet"), progress=False)
    write_tables(tmp_path / "in", web[:19], per_file=20)  # the same file, one row short
    # a later stage of this run reading it
    with pytest.raises(SourceChanged, match=re.escape(f"{path}: the source file changed since it was read")):
        load_input(Dataset(str(out)), 0, get_stage_class("parquet_images"), [], ("jpg",))
    # the next run: its footer no longer matches the plan
    with pytest.raises(UserError, match="made from another input"):
        run_job(demo_job(inp, out, stages=["basic"], section_key="parquet"), progress=False)


def test_a_table_of_image_bytes_copied_into_shards_curates_through_the_curation_stages(web, tmp_path, ray_local):
    paths = write_tables(tmp_path / "in", web, per_file=50)
    out = tmp_path / "ds"
    run_job(demo_job({"kind": "parquet", "paths": str(tmp_path / "in/*.parquet")}, out, stages=CURATION,
                     section={"rows_per_shard": 40, "copy": True}, section_key="parquet"), progress=False)
    rep = inspect_dataset(str(out))
    assert rep["invariant_ok"], rep["problems"]
    assert list(rep["stages"]) == ["parquet_images", *CURATION_STAGES]
    src = rep["stages"]["parquet_images"]
    assert src["in"] == len(web) and src["kept"] == len(web) - src["dropped"].get("duplicate_input", 0)
    assert rep["stages"]["dedup"]["dropped"].get("duplicate_image", 0) > 0 and rep["stages"]["balance"]["kept"] > 0
    # shards of 40 rows across files of 50, the tars written with the member the format calls for
    assert len(list((out / "shards").glob("*.tar"))) == -(-len(web) // 40)
    index = read_index(out)
    assert [(r["source_file"], r["source_row"]) for r in index] == \
        [(str(p), i) for p in paths for i in range(pq.read_metadata(p).num_rows)]
    with tarfile.open(out / "shards/00001.tar") as t:
        members = {m.name: t.extractfile(m).read() for m in t}
    by_url = {s["url"]: s for s in web}
    shard1 = [r for r in index if r["key"].startswith("00001") and r["status"] == "success"]
    assert {r["member"] for r in index if r["member"]} == {"jpg", "png"}
    assert all(members[f"{r['key']}.{r['member']}"] == by_url[r["url"]]["image"] for r in shard1)
    assert all(r["license"] == by_url[r["url"]]["license"] for r in index)
    # the uids a download of the same URL list gives
    pq.write_table(pa.table({"url": [s["url"] for s in web], "caption": [s["caption"] for s in web]}),
                   tmp_path / "urls.parquet")
    assert [r["uid"] for r in index] == [r["uid"] for r in plan_rows(InputSpec(path=str(tmp_path / "urls.parquet")))]


def test_datasets_image_structs_paths_and_bad_images(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs/a.jpg").write_bytes(jpeg(1))
    (tmp_path / "imgs/big.jpg").write_bytes(jpeg(2, (300, 300)))
    buf = io.BytesIO()
    from PIL import Image
    Image.new("RGB", (20, 10), "red").save(buf, "PNG")
    rows = [
        ({"bytes": buf.getvalue(), "path": "ignored.png"}, "bytes win", "u-bytes"),
        ({"bytes": None, "path": "imgs/a.jpg"}, "beside the file", None),
        ({"bytes": None, "path": "imgs/missing.jpg"}, "missing", None),
        ({"bytes": None, "path": "https://example.com/x.jpg"}, "a url", None),
        ({"bytes": None, "path": None}, "nothing", None),
        ({"bytes": b"<html>no</html>", "path": None}, "html", None),
        ({"bytes": None, "path": "imgs/big.jpg"}, "too big", None),
        ({"bytes": buf.getvalue(), "path": None}, None, None),
        ({"bytes": buf.getvalue(), "path": None}, "bytes win", "u-bytes"),  # the same uid again
    ]
    pq.write_table(pa.table({"image": pa.array([r[0] for r in rows], HF_IMAGE), "text": [r[1] for r in rows],
                             "uid": [r[2] for r in rows], "score": list(range(len(rows)))}), tmp_path / "hf.parquet")
    spec = ParquetInput(paths=str(tmp_path / "hf.parquet"), caption_column="text")
    (out,) = ingest(spec, stage(max_image_bytes=(tmp_path / "imgs/big.jpg").stat().st_size - 1))
    got = out.select(["caption", "_drop", "member", "score", "uid"]).to_pylist()
    assert [r["_drop"] for r in got] == [None, None, "image_not_found", "image_path_unsupported", "no_image",
                                         "not_an_image", "image_too_large", "no_caption", "duplicate_input"]
    assert [r["member"] for r in got[:2]] == ["png", "jpg"]
    assert got[0]["uid"] == "u-bytes" and got[1]["uid"] == content_uid(str(tmp_path / "hf.parquet"), "1")
    assert [r["score"] for r in got] == list(range(len(rows)))  # extra columns carried
    assert out.column("width").to_pylist()[:2] == [20, 96]


@pytest.mark.parametrize("columns, setting, why", [
    ({"img": pa.array([b"x"]), "caption": pa.array(["c"])}, "image_column", "is missing"),
    ({"image": pa.array(["not bytes"]), "caption": pa.array(["c"])}, "image_column", "is string, expected binary"),
    ({"image": pa.array([b"x"]), "caption": pa.array([3])}, "caption_column", "is int64, expected string"),
    ({"image": pa.array([b"x"]), "caption": pa.array(["c"]), "url": pa.array([1.5])}, "url_column", "is double"),
])
def test_a_missing_or_mistyped_column_fails_before_any_work(tmp_path, columns, setting, why):
    good = tmp_path / "a-good.parquet"
    pq.write_table(pa.table({"image": pa.array([jpeg(1)]), "caption": ["fine"]}), good)
    bad = tmp_path / "b-bad.parquet"
    pq.write_table(pa.table(columns), bad)
    out = tmp_path / "ds"
    with pytest.raises(InputError, match=rf"{bad}: column .*\(input.{setting}\) .*{why}"):
        run_job(demo_job({"kind": "parquet", "paths": str(tmp_path / "*.parquet")}, out, stages=[]), progress=False)
    assert not out.exists()


def test_the_command_exits_2_naming_file_and_column(tmp_path):
    pq.write_table(pa.table({"picture": pa.array([b"x"]), "caption": ["c"]}), tmp_path / "t.parquet")
    job = tmp_path / "job.yaml"
    job.write_text(f"input: {{kind: parquet, paths: {tmp_path / 't.parquet'}}}\noutput: {tmp_path / 'ds'}\n")
    p = subprocess.run([sys.executable, "-m", "recap.cli", "run", str(job)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert p.returncode == 2, p.stderr
    assert f"{tmp_path / 't.parquet'}: column 'image' (input.image_column) is missing" in p.stderr


def test_extra_columns_of_other_types_in_two_files_are_named(tmp_path):
    pq.write_table(pa.table({"image": pa.array([jpeg(1)]), "caption": ["a"], "extra": [1]}), tmp_path / "1.parquet")
    pq.write_table(pa.table({"image": pa.array([jpeg(2)]), "caption": ["b"], "extra": [b"\x00"]}),
                   tmp_path / "2.parquet")
    with pytest.raises(InputError, match=r"1.parquet, .*2.parquet: an extra column has different types"):
        list(stage().plan(ParquetInput(paths=str(tmp_path / "*.parquet"))))
    assert len(list(stage().plan(ParquetInput(paths=str(tmp_path / "*.parquet"), columns=[])))) == 1


def test_a_parquet_that_changes_between_plan_and_read_is_named(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"image": pa.array([jpeg(1)]), "caption": ["a"]}), path)
    src = stage()
    (table,) = src.plan(ParquetInput(paths=str(path)))
    pq.write_table(pa.table({"image": pa.array([jpeg(2, (200, 100))]), "caption": ["b"]}), path)
    with pytest.raises(ParquetChanged, match=str(path)):
        src.process(table)


@pytest.mark.slow
def test_parquet_resume_and_cpus_are_byte_identical(web, tmp_path):
    write_tables(tmp_path / "in", web, per_file=30)
    job = write_job(tmp_path / "job.yaml", {"kind": "parquet", "paths": str(tmp_path / "in/*.parquet")},
                    "parquet", {"rows_per_shard": 12})
    resume_and_workers_are_byte_identical(job, tmp_path, "commits/parquet_images/*.json")
