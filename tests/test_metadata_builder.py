"""`recap metadata build`: sources combined into MetaCLIP's flat list, with provenance and warnings."""
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recap.metadata.builder import metadata_cli, pmi_bigrams
from recap.metadata.wordnet import wordnet_names

LICENCE = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
NOUN = LICENCE + (
    "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived  \n"
    "02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 007 @ 02083346 n 0000 | a member of the genus Canis  \n"
    "07697537 13 n 02 hotdog 0 hot_dog 0 003 @ 07697100 n 0000 | a frankfurter served hot  \n")
ADJ = LICENCE + "00001740 00 a 01 able 0 005 = 05207437 n 0000 | (usually followed by `to')  \n" \
                "01846413 00 s 01 galore(ip) 0 001 & 01846413 a 0000 | in great numbers  \n"


@pytest.fixture
def wordnet_dir(tmp_path):
    d = tmp_path / "wn"
    d.mkdir()
    (d / "data.noun").write_text(NOUN)
    (d / "data.adj").write_text(ADJ)
    return d


def test_wordnet_names(wordnet_dir):
    assert wordnet_names(str(wordnet_dir)) == ["entity", "dog", "domestic dog", "Canis familiaris", "hotdog", "hot dog",
                                               "able", "galore"]  # (ip) marker gone
    assert wordnet_names(str(wordnet_dir), "synsets") == ["entity", "dog", "hotdog", "able", "galore"]


def test_wordnet_bad_line_and_missing_dir(tmp_path, wordnet_dir):
    (wordnet_dir / "data.verb").write_text(LICENCE + "00001740 29 v 03 breathe 0 | too few words\n")
    with pytest.raises(ValueError, match=r"data\.verb:2: not a WordNet data line"):
        wordnet_names(str(wordnet_dir))
    with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base"):
        wordnet_names(str(tmp_path / "nowhere"))


@pytest.mark.skipif(not os.path.exists("/usr/share/wordnet/data.noun"), reason="Debian's wordnet-base is not installed")
def test_real_wordnet_files():
    synsets = wordnet_names("/usr/share/wordnet", "synsets")
    assert len(synsets) == 117659  # WordNet 3.0's synsets
    assert "dog" in synsets and "physical entity" in synsets and "st" in synsets  # st._louis.n.01 cut at '.', as upstream
    lemmas = set(wordnet_names("/usr/share/wordnet"))
    assert {"Canis familiaris", "St. Louis", "hot dog"} <= lemmas and len(lemmas) > 140_000


def test_pmi_bigrams_prefer_collocations():
    texts = ["new york city at night"] * 6 + ["the cat and the dog"] * 6 + [f"the {w} of the day" for w in "abcdefgh"]
    got = pmi_bigrams(texts, min_count=5, min_pmi=2.5)
    assert "new york" in got and "the cat" not in got  # PMI 3.0 vs 1.5: "the" is everywhere
    ranked = pmi_bigrams(texts, min_count=5, min_pmi=-10)
    assert ranked.index("new york") < ranked.index("the cat") and "the a" not in ranked  # min_count


def test_build_combines_sources(tmp_path, wordnet_dir, capsys):
    corpus = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"caption": ["a red circle on blue"] * 6 + ["a hot dog stand"] * 6 + ["x"]}), corpus)
    titles = tmp_path / "titles.txt"
    titles.write_text("St._Louis\nRed circle\n\n!\ndog\nU.S.\n")
    out = tmp_path / "m" / "metadata.json"
    rc = metadata_cli(["build", "--out", str(out), "--wordnet", str(wordnet_dir), "--unigrams", "--min-zipf", "6.5",
                       "--bigrams-from", str(corpus), "--min-count", "5", "--min-pmi", "0.5", "--titles", str(titles)])
    assert rc == 0
    entries = json.loads(out.read_text())
    sources = json.loads((tmp_path / "m" / "metadata.sources.json").read_text())
    assert entries[:3] == ["0", "1", "10"] and len(entries) == len(set(entries)) == len(sources)
    assert list(sources) == entries  # {entry: [sources]} in entry order
    assert sources["dog"] == ["wordnet", "titles"] and sources["Canis familiaris"] == ["wordnet"]
    assert "the" in sources and "unigrams" in sources["the"]
    assert sources["red circle"] == ["bigrams"] and sources["Red circle"] == ["titles"]  # case-sensitive
    assert sources["St. Louis"] == sources["U.S."] == ["titles"] and "!" not in sources  # kept / dropped as upstream
    # sources in a fixed order, each sorted: numbers, wordnet, unigrams, bigrams, titles
    order = ["numbers", "wordnet", "unigrams", "bigrams", "titles"]
    firsts = [order.index(sources[e][0]) for e in entries]
    assert firsts == sorted(firsts)
    wordnet_part = [e for e in entries if sources[e][0] == "wordnet"]
    assert wordnet_part == sorted(wordnet_part)
    err = capsys.readouterr().err
    assert "1 entries were a single punctuation mark (dropped, as upstream): '!'" in err
    assert "duplicated" in err and "'dog'" in err
    assert "'St. Louis', 'U.S.'" in err and "never match" in err
    # same inputs, same bytes
    again = tmp_path / "m2.json"
    metadata_cli(["build", "--out", str(again), "--wordnet", str(wordnet_dir), "--unigrams", "--min-zipf", "6.5",
                  "--bigrams-from", str(corpus), "--min-count", "5", "--min-pmi", "0.5", "--titles", str(titles)])
    assert again.read_bytes() == out.read_bytes()


def test_build_errors(tmp_path, capsys):
    assert metadata_cli(["build", "--out", str(tmp_path / "m.json"), "--wordnet", str(tmp_path / "nowhere")]) == 1
    assert "wordnet-base" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        metadata_cli(["build", "--out", str(tmp_path / "m.json")])  # no source named


def test_bigram_corpus_formats_and_unigram_floor(tmp_path, capsys):
    import wordfreq

    rows = ["new york city at night"] * 6 + ["the cat and the dog"] * 3 + ["x y"]
    (tmp_path / "c.txt").write_text("\n".join(rows) + "\n")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    (tmp_path / "c.csv").write_text("text,other\n" + "".join(f"{r},1\n" for r in rows))
    d = tmp_path / "input"
    d.mkdir()
    pq.write_table(pa.table({"text": rows[:5]}), d / "a.parquet")
    pq.write_table(pa.table({"text": rows[5:]}), d / "b.parquet")
    got = {}
    for src in ["c.txt", "c.jsonl", "c.csv", "input", "input/*.parquet"]:
        out = tmp_path / f"{src.replace('/', '_').replace('*', 'all')}.json"
        assert metadata_cli(["build", "--out", str(out), "--no-numbers", "--bigrams-from", str(tmp_path / src),
                             "--text-col", "text", "--min-count", "3", "--min-pmi", "1", "--max-bigrams", "2"]) == 0
        got[src] = json.loads(out.read_text())
    # PMI: "cat and" = log(3/n / (3/N * 3/N)) beats the pairs at 1/6 of that, which tie (broken alphabetically)
    assert all(v == got["c.txt"] for v in got.values()) and got["c.txt"] == ["and the", "cat and"]  # top 2, then sorted
    assert metadata_cli(["build", "--out", str(tmp_path / "u.json"), "--no-numbers", "--unigrams", "--min-zipf", "6"]) == 0
    words = json.loads((tmp_path / "u.json").read_text())
    assert words == sorted(words) and "the" in words
    assert all(wordfreq.zipf_frequency(w, "en") >= 6 for w in words)
    assert metadata_cli(["build", "--out", str(tmp_path / "bad.json"), "--bigrams-from", str(tmp_path / "c.csv"),
                         "--text-col", "caption"]) == 1
    assert "no column 'caption'" in capsys.readouterr().err


def test_wordnet_synset_names_via_cli(tmp_path, wordnet_dir):
    out = tmp_path / "m.json"
    assert metadata_cli(["build", "--out", str(out), "--no-numbers", "--wordnet", str(wordnet_dir),
                         "--wordnet-names", "synsets"]) == 0
    assert json.loads(out.read_text()) == ["able", "dog", "entity", "galore", "hotdog"]


def test_shipped_demo_metadata_is_the_builders_output(tmp_path):
    """jobs/demo-metadata.json is reproducible: the builder on the world's vocabulary remakes it."""
    from pathlib import Path

    from recap.world.scenes import metadata_titles

    titles = tmp_path / "titles.txt"
    titles.write_text("".join(f"{w}\n" for w in metadata_titles()))
    out = tmp_path / "metadata.json"
    assert metadata_cli(["build", "--out", str(out), "--no-numbers", "--titles", str(titles)]) == 0
    shipped = Path(__file__).resolve().parent.parent / "jobs" / "demo-metadata.json"
    assert json.loads(out.read_text()) == json.loads(shipped.read_text())


def test_bigrams_from_the_jobs_own_captions(tmp_path, capsys):
    rows = ["new york city at night"] * 6 + ["the cat and the dog"] * 3 + ["x y"]
    (tmp_path / "urls.jsonl").write_text("".join(json.dumps({"u": f"http://h/{i}", "alt": r}) + "\n"
                                                 for i, r in enumerate(rows)))
    job = tmp_path / "job.yaml"
    job.write_text(f"name: j\nseed: 0\ninput: {{path: {tmp_path / 'urls.jsonl'}, url_col: u, caption_col: alt}}\n"
                   f"output: {tmp_path / 'ds'}\nstages: []\n")
    out = tmp_path / "m.json"
    args = ["build", "--out", str(out), "--no-numbers", "--job", str(job), "--min-count", "3", "--min-pmi", "1",
            "--max-bigrams", "2"]
    assert metadata_cli(args) == 0
    assert json.loads(out.read_text()) == ["and the", "cat and"]
    # --set reaches the job as in recap run; a bad job is a clear error
    assert metadata_cli(args + ["--set", "input.caption_col=nope"]) == 1
    assert "urls.jsonl: no record has a field 'nope'" in capsys.readouterr().err
    assert metadata_cli(["build", "--out", str(out), "--job", str(job), "--set", "seed=x"]) == 2
    assert "seed" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"alt": "a b"}\n[1, 2]\n')
    assert metadata_cli(["build", "--out", str(out), "--bigrams-from", str(bad), "--text-col", "alt"]) == 1
    assert f"{bad}:2: expected a JSON object" in capsys.readouterr().err
