import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recap.pipeline.inputs import InputError, plan_shards
from recap.pipeline.inputs import InputSpec
from recap.pipeline.uid import make_uid


def _plan(path, sps=3, **kw):
    return pa.concat_tables(list(plan_shards(InputSpec(path=str(path), **kw), sps)), promote_options="permissive")


def test_all_formats_give_the_same_uids_and_keep_extra_columns(tmp_path):
    rows = [{"url": f"http://h/{i}.jpg", "caption": f"cap {i}", "license": "cc"} for i in range(5)]
    (tmp_path / "a.csv").write_text("url,caption,license\n" + "".join(f"{r['url']},{r['caption']},cc\n" for r in rows))
    (tmp_path / "a.tsv").write_text("url\tcaption\tlicense\n" + "".join(f"{r['url']}\t{r['caption']}\tcc\n" for r in rows))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    want = [make_uid(r["url"], r["caption"]) for r in rows]
    for ext in ("csv", "tsv", "jsonl", "json", "parquet"):
        t = _plan(tmp_path / f"a.{ext}")
        assert t.column("uid").to_pylist() == want, ext
        assert t.column("license").to_pylist() == ["cc"] * 5, ext
        assert t.column("key").to_pylist() == ["000000", "000001", "000002", "000010", "000011"], ext
    (tmp_path / "a.txt").write_text("".join(r["url"] + "\n" for r in rows))
    assert _plan(tmp_path / "a.txt").column("uid").to_pylist() == [make_uid(r["url"], "") for r in rows]


def test_bad_csv_row_names_the_line(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text('url,caption\nhttp://a/1.jpg,ok\nhttp://a/2.jpg,too,many\n')
    with pytest.raises(InputError, match=r"bad.csv: line 3: expected 2 fields"):
        _plan(p)
    p.write_text('url,caption\nhttp://a/1.jpg,"unclosed\n')
    with pytest.raises(InputError, match=r"bad.csv: line \d+"):
        _plan(p)
    j = tmp_path / "bad.jsonl"
    j.write_text('{"url": "http://a"}\n{"url": \n')
    with pytest.raises(InputError, match=r"bad.jsonl: line 2: not valid JSON"):
        _plan(j, caption_col=None)
    with pytest.raises(InputError, match="no column 'link'"):
        _plan(tmp_path / "bad.jsonl", url_col="link")


def test_non_utf8_huge_empty_and_duplicate_captions(tmp_path):
    p = tmp_path / "x.csv"
    huge = "word " * 300_000  # 1.5 MB
    p.write_bytes(b"url,caption\n"
                  b"http://a/1.jpg,caf\xe9 latin-1\n"
                  b"http://a/2.jpg," + huge.encode() + b"\n"
                  b"http://a/3.jpg,\n"
                  b"http://a/4.jpg,same\n"
                  b"http://a/4.jpg,same\n"
                  b"http://a/4.jpg,other caption\n")
    t = _plan(p, sps=100, max_caption_chars=1000).to_pylist()
    assert t[0]["caption"] == "caf\ufffd latin-1" and t[0]["input_note"] == "caption_not_utf8"
    assert len(t[1]["caption"]) == 1000 and t[1]["input_note"] == "caption_truncated"
    assert t[1]["uid"] == make_uid("http://a/2.jpg", huge)  # the id comes from the source text
    assert t[2]["caption"] == "" and t[2]["input_note"] is None
    assert t[3]["dup_of"] is None and t[4]["dup_of"] == t[3]["uid"] and t[4]["uid"] != t[3]["uid"]
    assert t[5]["dup_of"] is None
    assert len({r["uid"] for r in t}) == len(t)
