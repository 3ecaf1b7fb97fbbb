import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recap.pipeline.inputs import InputError, plan_shards
from recap.pipeline.inputs import InputSpec
from recap.pipeline.stage import StageContext
from recap.pipeline.uid import make_uid
from recap.stages.download import DownloadConfig, DownloadStage


def _plan(path, sps=3, **kw):
    return pa.concat_tables(list(plan_shards(InputSpec(path=str(path), **kw), sps)), promote_options="permissive")


def _plan_with_skips(path, **kw):
    """Planned by a source stage, which keeps the skipped rows for the engine's report."""
    source = DownloadStage(DownloadConfig(samples_per_shard=3), StageContext("j", 0, "download", "d"))
    t = pa.concat_tables(list(source.plan(InputSpec(path=str(path), on_bad_row="skip", **kw))), promote_options="permissive")
    return t, source.skipped_rows()


GOOD = [(f"http://a/{i}.jpg", f"cap {i}") for i in range(1, 9)]


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


def test_bad_utf8_note_stays_on_its_row_after_multiline_and_skipped_rows(tmp_path):
    p = tmp_path / "m.csv"
    p.write_bytes(b'url,caption\nhttp://a/1.jpg,"two\nlines"\nhttp://a/2.jpg,x,y\nhttp://a/3.jpg,caf\xe9\nhttp://a/4.jpg,ok\n')
    t = _plan_with_skips(p)[0].to_pylist()
    assert [(r["url"], r["input_note"]) for r in t] == [
        ("http://a/1.jpg", None), ("http://a/3.jpg", "caption_not_utf8"), ("http://a/4.jpg", None)]


def test_tsv_caption_starting_with_a_quote_is_text(tmp_path):
    rows = list(GOOD)
    rows[2] = ("http://a/3.jpg", '"Hello, world, he said')
    rows[5] = ("http://a/6.jpg", '"Quoted" and then more')
    p = tmp_path / "q.tsv"
    p.write_text("url\tcaption\n" + "".join(f"{u}\t{c}\n" for u, c in rows))
    t = _plan(p)
    assert t.column("caption").to_pylist() == [c for _, c in rows]
    assert t.column("uid").to_pylist() == [make_uid(u, c) for u, c in rows]
    with pytest.raises(InputError, match=r"q.tsv: line 4: bad quoting .* at line 7"):
        _plan(p, tsv_quoting="csv")


def test_tsv_quoting_csv_reads_a_tsv_written_by_a_csv_writer(tmp_path):
    import csv
    rows = [("http://a/1.jpg", 'a "quoted"\tword'), ("http://a/2.jpg", "two\nlines"), ("http://a/3.jpg", "plain")]
    p = tmp_path / "w.tsv"
    with open(p, "w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([("url", "caption"), *rows])
    assert _plan(p, tsv_quoting="csv").column("caption").to_pylist() == [c for _, c in rows]


def test_csv_unterminated_quote_names_the_line_it_starts_on(tmp_path):
    p = tmp_path / "urls.csv"
    p.write_text("url,caption\n" + "".join(f'{u},{c if i != 2 else chr(34) + c}\n' for i, (u, c) in enumerate(GOOD)))
    with pytest.raises(InputError, match=r"/urls.csv: line 4: unterminated quote \(the quoted field starting here never ends\)$"):
        _plan(p)


def test_wrong_field_count_names_the_line_the_row_starts_on(tmp_path):
    p = tmp_path / "w.csv"
    p.write_text('url,caption\nhttp://a/1.jpg,"two\nlines"\nhttp://a/2.jpg,ok\nhttp://a/3.jpg,"x\ny",extra\n')
    with pytest.raises(InputError, match=r"w.csv: line 5: expected 2 fields \(','-separated, as in the header\), found 3"):
        _plan(p)
    p.write_text("url\tcaption\nhttp://a/1.jpg\tok\nhttp://a/2.jpg\ta\tb\n")
    with pytest.raises(InputError, match=r"w.csv: line 3: expected 2 fields \('\\t'-separated"):
        _plan(p, format="tsv")


def test_skip_leaves_out_exactly_the_bad_rows_and_reports_them(tmp_path):
    clean = tmp_path / "clean.csv"
    clean.write_text("url,caption\n" + "".join(f"{u},{c}\n" for u, c in GOOD))
    g = [f"{u},{c}\n" for u, c in GOOD]
    bad = tmp_path / "bad.csv"
    bad.write_text("".join([
        "url,caption\n", g[0], g[1],
        "http://bad/1.jpg,too,many\n",              # line 4: one field too many
        g[2], g[3],
        'http://bad/2.jpg,"ab"cd\n',                # line 7: text after the closing quote
        g[4],
        'http://bad/3.jpg,"runs on\n',              # line 9: closes badly on line 10
        'http://a/x.jpg,"fine"\n',                  # read again as its own row
        g[5], g[6], g[7],
        'http://bad/4.jpg,"never closed\n',         # line 14
    ]))
    t, skipped = _plan_with_skips(bad)
    uids, want = t.column("uid").to_pylist(), _plan(clean).column("uid").to_pylist()
    assert uids[:5] + uids[6:] == want and t.column("url").to_pylist()[5] == "http://a/x.jpg"
    assert [(s["location"], s["reason"]) for s in skipped] == [
        ("line 4", "wrong_field_count"), ("line 7", "bad_quoting"), ("line 9", "bad_quoting"),
        ("line 14", "unterminated_quote")]
    assert all(s["detail"].startswith(f"{bad}: {s['location']}: ") for s in skipped)
    assert "at line 10" in skipped[2]["detail"]
    with pytest.raises(InputError, match=r"bad.csv: line 4: expected 2 fields"):
        _plan(bad)


def test_jsonl_bad_lines_are_named_and_skippable(tmp_path):
    good = [json.dumps({"url": u, "caption": c}) + "\n" for u, c in GOOD]
    clean = tmp_path / "clean.jsonl"
    clean.write_text("".join(good))
    lines = list(good)
    lines.insert(2, '{"url": "http://bad/1.jpg", \n')    # line 3
    lines.insert(4, '["not", "an", "object"]\n')         # line 5
    lines.insert(5, '{"url": ["http://bad/3.jpg"]}\n')   # line 6
    lines.insert(6, '{"link": "http://bad/4.jpg"}\n')    # line 7
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(lines))
    with pytest.raises(InputError, match=r"bad.jsonl: line 3: not valid JSON"):
        _plan(bad)
    t, skipped = _plan_with_skips(bad)
    assert t.column("uid").to_pylist() == _plan(clean).column("uid").to_pylist()
    assert [(s["location"], s["reason"]) for s in skipped] == [
        ("line 3", "invalid_json"), ("line 5", "not_an_object"), ("line 6", "url_not_text"), ("line 7", "no_url_column")]


def test_skip_details_are_short_and_settings_mistakes_still_fail(tmp_path):
    p = tmp_path / "wide.jsonl"
    p.write_text(json.dumps({"url": "http://a/1.jpg", "caption": "c"}) + "\n"
                 + json.dumps({f"column_{i}": i for i in range(200)}) + "\n")
    _, skipped = _plan_with_skips(p)
    assert skipped[0]["location"] == "line 2" and len(skipped[0]["detail"]) <= 300
    with pytest.raises(InputError, match="no column 'link'"):
        _plan_with_skips(p, url_col="link")
    q = tmp_path / "header.csv"
    q.write_text('url,"caption\nhttp://a/1.jpg,x\n')
    with pytest.raises(InputError, match=r"header.csv: line 1: unterminated quote"):
        _plan_with_skips(q)


def test_fingerprint_is_unchanged_by_the_defaults_of_newer_settings(tmp_path):
    import hashlib

    from recap.pipeline.inputs import input_fingerprint

    def before(path, sps):  # how the fingerprint was computed before on_bad_row and tsv_quoting
        spec = {"format": "auto", "url_col": "url", "caption_col": "caption", "save_additional_columns": None,
                "max_caption_chars": 16384}
        h = hashlib.sha256(path.read_bytes())
        h.update(json.dumps({"spec": spec, "sps": sps}, sort_keys=True).encode())
        return h.hexdigest()[:16]

    plain, quoted, quoted_csv = tmp_path / "p.tsv", tmp_path / "q.tsv", tmp_path / "q.csv"
    plain.write_text("url\tcaption\nhttp://a/1.jpg\tok\n")
    quoted.write_text('url\tcaption\nhttp://a/1.jpg\t"ok"\n')
    quoted_csv.write_text('url,caption\nhttp://a/1.jpg,"ok"\n')
    for p in (plain, quoted_csv):
        assert input_fingerprint(InputSpec(path=str(p)), 3) == before(p, 3)
    for p in (plain, quoted, quoted_csv):  # TSV quotes were read as in CSV before
        assert input_fingerprint(InputSpec(path=str(p), tsv_quoting="csv"), 3) == before(p, 3)
    # a TSV with a quote in it reads differently now, so its dataset is cut again
    assert input_fingerprint(InputSpec(path=str(quoted)), 3) != before(quoted, 3)
    assert input_fingerprint(InputSpec(path=str(plain), on_bad_row="skip"), 3) != before(plain, 3)
