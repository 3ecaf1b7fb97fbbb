"""The matcher and the balancing math against MetaCLIP's definitions, written naively here."""
import json
import math
import pickle
import random
import string

import numpy as np
import pyarrow as pa
import pytest

from recap.metadata import (Matcher, MetadataError, count_entries, entry_probabilities, keep_probabilities, keep_probability,
                      language_threshold, load_entries, solve_threshold)


def naive_norm(text):
    text = f" {text} "
    for c in [",", ".", ";", ":", "?", "!", "`"]:
        text = text.replace(c, f" {c} ")
    for c in ["\t", "\n", "\r"]:
        text = text.replace(c, " ")
    return text


def cjkish(ch):
    cp = ord(ch)
    ranges = [(0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
              (0x2B820, 0x2CEAF), (0x2CEB0, 0x2EBEF), (0xF900, 0xFAFF), (0x2E80, 0x2EFF), (0x2F00, 0x2FDF),
              (0x2FF0, 0x2FFF), (0x0E00, 0x0E7F), (0x0E80, 0x0EFF), (0x1000, 0x109F), (0x1780, 0x17FF), (0x0F00, 0x0FFF)]
    return any(a <= cp <= b for a, b in ranges) or ch in string.punctuation or ch in "，。、；：？！“”‘’（）【】《》〈〉「」『』～—"


def naive_match(entries, text, mode="metaclip1"):
    # MetaCLIP 2's curate.py strips the text before substr_match; MetaCLIP 1's indexing does not
    t = naive_norm(text.strip() if mode == "metaclip2" else text)
    out = []
    for i, e in enumerate(entries):
        if not e:
            continue
        if mode == "metaclip1":
            key = f" {e} "
        else:
            key = ("" if cjkish(e[0]) else " ") + e + ("" if cjkish(e[-1]) else " ")
        if key in t:
            out.append(i)
    return out


ENTRIES = ["hot dog", "dog", "U.S.", "St. Louis", "!", "Dog", "猫", "可爱", "ไทย", "(c)", "e-mail", "dog", "", "a b", "?x"]


@pytest.mark.parametrize("text,expected", [
    ("a hot dog stand", ["hot dog", "dog"]),
    ("made in the U.S. today", []),  # padding breaks entries with marks...
    ("wow!", ["!"]),  # ...but a bare mark matches
    ("Dog\tdog\nhot  dog", ["dog", "Dog"]),  # case-sensitive; double space is not collapsed
    ("St. Louis", []),
    ("", []),
    ("!!!,,,", ["!"]),
    ("a b", ["a b"]),
])
def test_metaclip1_cases(text, expected):
    m = Matcher(ENTRIES)
    got = [ENTRIES[i] for i in m.match_one(text)]
    assert sorted(set(got)) == sorted(set(expected))
    assert m.match_one(text) == naive_match(ENTRIES, text)


def test_duplicated_and_empty_entries():
    m = Matcher(ENTRIES)
    ids = m.match_one("my dog")
    assert 1 in ids and 11 in ids and 12 not in ids  # both copies of "dog"; "" never matches


def test_metaclip2_cjk_and_thai_without_spaces():
    m = Matcher(ENTRIES, mode="metaclip2")
    assert [ENTRIES[i] for i in m.match_one("我的猫很可爱")] == ["猫", "可爱"]
    assert "ไทย" in [ENTRIES[i] for i in m.match_one("ภาษาไทยดี")]
    assert m.match_one("(c)2020") == naive_match(ENTRIES, "(c)2020", "metaclip2")
    assert Matcher(ENTRIES).match_one("我的猫很可爱") == []  # metaclip1 needs spaces


@pytest.mark.parametrize("entry,text,m1,m2", [
    ("C++", "I like C++!", True, True),          # '+' is punctuation: no right space in metaclip2
    ("C++", "C++code", False, True),
    ("(c)", "(c)2020", False, True),
    ("ねこ", "わたしのねこ", False, False),        # kana is not in upstream's CJK-like set: spaces needed
    ("ねこ", "わたしの ねこ です", True, True),
    ("한국", "한국어", False, False),               # nor Hangul
    ("ລາວ", "ພາສາລາວດີ", False, True),            # Lao
    ("ខ្មែរ", "ភាសាខ្មែរ", False, True),           # Khmer (ends in a Khmer sign)
    ("「猫」", "我的「猫」呢", False, True),         # full-width marks from upstream's list
    ("«a»", "x«a»y", False, False),               # « » are not punctuation upstream
    ("dog", "dog。", False, False),               # 。 is not padded in texts
    ("猫", "猫。", False, True),
    ("a b", "a\tb", True, True),                  # tab → space
    ("a b", "a\u00a0b", False, False),             # NBSP is not whitespace here
    ("a  b", "a\r\nb", True, True),               # \r\n → two spaces, never collapsed
    ("Dog", "dog", False, False),
])
def test_modes_on_single_entries(entry, text, m1, m2):
    assert (Matcher([entry]).match_one(text) == [0]) is m1
    assert (Matcher([entry], mode="metaclip2").match_one(text) == [0]) is m2
    assert Matcher([entry]).match_one(text) == naive_match([entry], text)
    assert Matcher([entry], "metaclip2").match_one(text) == naive_match([entry], text, "metaclip2")


def test_spacing_is_upstreams():
    from recap.metadata import spacing
    assert spacing("a,b.c;d:e?f!g`h\ti\nj\rk") == " a , b . c ; d : e ? f ! g ` h i j k "
    assert spacing("") == "  " and spacing("x  y") == " x  y "
    assert spacing("Ünï\u00a0code") == " Ünï\u00a0code "
    with pytest.raises(ValueError):
        Matcher(["a"], mode="metaclip3")


def test_bad_texts_never_crash():
    m = Matcher(ENTRIES)
    texts = [None, b"hot dog \xff\xfe", "x" * (1 << 20) + " dog", "".join(string.punctuation), "\x00dog\x00"]
    got = m.match(texts)
    assert got[0] == [] and got[1] == [0, 1, 11] and got[2] == [1, 11] and got[3] == naive_match(ENTRIES, string.punctuation)
    arr = m.match_arrow(pa.array([None, "hot dog", None]))
    assert arr.type == pa.list_(pa.int32()) and arr.to_pylist() == [[], [0, 1, 11], []]
    assert m.match_arrow(pa.array([b"dog", None], pa.binary())).to_pylist() == [[1, 11], []]
    assert Matcher([]).match(["anything"]) == [[]] and Matcher(["", ""]).match_one("x") == []
    assert Matcher([]).match_arrow(pa.array(["a", None])).to_pylist() == [[], []]
    chunked = pa.chunked_array([["hot dog"], [None, "dog!"]])
    assert m.match_arrow(chunked).to_pylist() == [[0, 1, 11], [], [1, 4, 11]]
    assert m.match_arrow(pa.chunked_array([], pa.string())).to_pylist() == []
    assert m.match_arrow(pa.array(["dog"], pa.large_string())).to_pylist() == [[1, 11]]


# -- whitespace at the ends: MetaCLIP 2 strips (curate.py), MetaCLIP 1 matches the raw text ----------

UNICODE_SPACES = ["\u3000", "\u00a0", "\u2009", "\u3000 \t\u00a0", "\u2009\n\u3000", "\u202f\u2028\x1c"]


@pytest.mark.parametrize("ws", UNICODE_SPACES)
def test_whitespace_ends_follow_each_modes_upstream(ws):
    texts = [ws + "dog", "hot dog" + ws, ws + "hot dog" + ws, ws + "dog " + ws, ws + " dog", ws, ws + "!" + ws]
    for mode in ("metaclip1", "metaclip2"):
        m = Matcher(ENTRIES, mode=mode)
        want = [naive_match(ENTRIES, t, mode) for t in texts]
        assert m.match(texts) == want
        assert m.match_arrow(pa.array(texts)).to_pylist() == want
        assert [m.match_one(t) for t in texts] == want
    m1, m2 = Matcher(ENTRIES), Matcher(ENTRIES, mode="metaclip2")
    names = lambda m, t: sorted(ENTRIES[i] for i in m.match_one(t))  # noqa: E731
    assert names(m2, ws + "dog") == ["dog", "dog"] and names(m2, "hot dog" + ws) == ["dog", "dog", "hot dog"]
    assert names(m2, ws + "!" + ws) == ["!"]
    if ws[-1] not in " \t\n\r":  # against the word, a space spacing keeps: MetaCLIP 1 sees no boundary
        assert names(m1, ws + "dog") == []
    if ws[0] not in " \t\n\r":
        assert names(m1, "hot dog" + ws) == []
    assert names(m1, ws + " dog") == names(m2, ws + " dog") == ["dog", "dog"]  # an ASCII space is a boundary anyway


def test_metaclip2_strips_exactly_what_str_strip_strips():
    import sys
    spaces = [chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()]
    assert len(spaces) == 29
    not_spaces = ["\u200b", "\ufeff", "\u180e", "\u2060", "\x00"]
    texts = [c + "dog" + c for c in spaces + not_spaces]
    m2 = Matcher(["dog"], mode="metaclip2")
    assert m2.match(texts) == [[0]] * len(spaces) + [[]] * len(not_spaces)
    assert m2.match_arrow(pa.array(texts)).to_pylist() == m2.match(texts)
    m1 = Matcher(["dog"])
    assert m1.match(texts) == [[0] if c in " \t\n\r" else [] for c in spaces + not_spaces]  # only what spacing spaces


def test_ascii_space_ends_matter_only_to_entries_that_begin_or_end_with_a_space():
    entries = ["dog", " dog", "dog ", "hot dog"]
    texts = [" dog", "dog\t", "\n hot dog \r", "  dog  "]
    m1, m2 = Matcher(entries), Matcher(entries, mode="metaclip2")
    assert m1.match(texts) == [[0, 1], [0, 2], [0, 2, 3], [0, 1, 2]]
    assert m2.match(texts) == [[0], [0], [0, 3], [0]]
    assert m2.match(texts) == [naive_match(entries, t, "metaclip2") for t in texts]


# -- deliberate differences from upstream's code ------------------------------------------------------

def _upstream_automaton(entries):
    """Upstream's automaton build (substr_matching_ahocorasick.py): add_word per entry, in order."""
    import ahocorasick
    a = ahocorasick.Automaton()
    for i, e in enumerate(entries):
        a.add_word(f" {e} ", (i, e))
    a.make_automaton()
    return a


@pytest.mark.parametrize("mode", ["metaclip1", "metaclip2"])
def test_every_copy_of_a_duplicated_entry_matches(mode):
    entries = ["dog", "cat", "dog", "hot dog", "dog"]
    m = Matcher(entries, mode=mode)
    assert m.match_one("a hot dog") == [0, 2, 3, 4] == naive_match(entries, "a hot dog", mode)  # the reference loop
    assert m.match_arrow(pa.array(["dog", "cat", None])).to_pylist() == [[0, 2, 4], [1], []]
    # upstream's automaton keeps the last id only: add_word on an existing key replaces its value
    assert sorted({i for _, (i, _) in _upstream_automaton(entries).iter(naive_norm("a hot dog"))}) == [3, 4]


@pytest.mark.parametrize("mode", ["metaclip1", "metaclip2"])
def test_the_empty_entry_never_matches(mode):
    m = Matcher(["", "dog", ""], mode=mode)
    texts = ["a, b.", "", "  ", "dog.", "x,,y", " dog "]
    assert m.match(texts) == [[], [], [], [1], [], [1]]
    # upstream MetaCLIP 1's key for it is two spaces, which spacing makes of every one of these texts
    assert all(f" {''} " in naive_norm(t) for t in texts)
    assert "  " not in naive_norm("x,y") and "  " not in naive_norm("dog")


@pytest.mark.parametrize("mode", ["metaclip1", "metaclip2"])
def test_missing_texts_match_nothing(mode):
    m = Matcher(["None", "dog"], mode=mode)
    assert m.match([None, "None", "dog"]) == [[], [0], [1]]
    assert m.match_arrow(pa.array([None, "None", None, "dog"])).to_pylist() == [[], [0], [], [1]]
    assert m.match_one(None) == []
    assert f" {None} " == " None "  # what upstream's f-string would have matched


def test_a_fractional_t_is_a_real_threshold():
    counts = np.array([0, 1, 2, 3, 5, 10])
    assert entry_probabilities(counts, 2.5).tolist() == [1.0, 1.0, 1.0, 2.5 / 3, 0.5, 0.25]
    # upstream's count_to_prob writes t into the integer counts (2.5 -> 2): p = 1.25 below t
    upstream = counts.copy()
    upstream[upstream < 2.5] = 2.5
    assert (2.5 / upstream).tolist()[:3] == [1.25, 1.25, 1.25]
    for t in (1, 3, 7):  # an integer t, as upstream's always is: the same p
        upstream = counts.copy()
        upstream[upstream < t] = t
        assert entry_probabilities(counts, t).tolist() == (t / upstream).tolist()


# -- keys the matcher rewrites or drops, tokens of every length, odd bytes -----------------------------

@pytest.mark.parametrize("mode", ["metaclip1", "metaclip2"])
def test_keys_with_marks_spaces_and_long_tokens(mode):
    entries = ["!", "! a", "a !", "!!", ".猫", "猫.", "U.S.", "?x", "x?", "C++", "a.b", ",", "` `",
               " dog", "dog ", "a  b", "   ", "abcdefg", "abcdefgh", "abcdefghi", "abcdefghijklmnop",
               "abcdefghijklmnopq", "internationalization", "hot internationalization", "a\x00", "\x00", "a\x00b",
               "ខ្មែរ", "မြန်မာ ខ្មែរ", "a\ud800b", "tab\there"]
    texts = ["wow! a", "a ! b !!", "猫.猫", "a.猫 猫.", "the U.S. and x? ?x", "C++code", "a,b , ` `", "  dog  ",
             "dog  x", "a  b a b", "       ", "abcdefg abcdefgh abcdefghi", "abcdefghijklmnop abcdefghijklmnopq",
             "abcdefghijklmnopqr abcdefghijklmnoq", "hot internationalization!", "internationalizatio",
             "a\x00 \x00 a\x00b a", "ខ្មែរ မြန်မာ ខ្មែរ", "x a\ud800b y", "tab\there", "abcdefgh\tabcdefgh"]
    m = Matcher(entries, mode=mode)
    want = [naive_match(entries, t, mode) for t in texts]
    assert m.match(texts) == want
    assert sum(map(len, want)) > 20
    ok = [t for t in texts if "\ud800" not in t]  # Arrow strings cannot hold lone surrogates
    assert m.match_arrow(pa.array(ok)).to_pylist() == [w for t, w in zip(texts, want) if "\ud800" not in t]


def test_large_batches_and_many_entries_agree_with_the_reference(monkeypatch):
    r = random.Random(5)
    words = ["".join(r.choice("abcdefghij") for _ in range(r.randint(1, 12))) for _ in range(3000)]
    entries = list(dict.fromkeys(words[:1500] + [f"{r.choice(words)} {r.choice(words)}" for _ in range(1500)]
                                 + [" ".join(r.choice(words) for _ in range(r.randint(3, 6))) for _ in range(200)]))
    texts = [" ".join(r.choice(words) for _ in range(r.randint(0, 25))) + r.choice(["", ".", "!", "\u3000"])
             for _ in range(2000)]
    for mode in ("metaclip1", "metaclip2"):
        m = Matcher(entries, mode=mode)
        want = [naive_match(entries, t, mode) for t in texts[:300]]
        got = m.match_arrow(pa.array(texts)).to_pylist()
        assert got[:300] == want and m.match(texts) == got
        assert sum(map(len, want)) > 1000
        assert m.match_arrow(pa.array(texts).slice(7, 50)).to_pylist() == got[7:57]
        with monkeypatch.context() as patch:  # a batch is matched in chunks of rows; their seams change nothing
            patch.setattr("recap.metadata.matcher.CHUNK_BYTES", 300)
            assert m.match_arrow(pa.array(texts[:-1] + [None])).to_pylist() == got[:-1] + [[]]
            assert m.match(texts[5:400]) == got[5:400]


def _random_corpus(seed):
    r = random.Random(seed)
    words = ["".join(r.choice("abcdeAB") for _ in range(r.randint(1, 3))) for _ in range(60)]
    words += ["猫", "狗", "ไทย", "é", "e\u0301", "U.S.", "a.b", "x:y", "!", "?", "`", "(a)", "—", "ねこ", "한국", "ລາວ",
              "ខ្មែរ", "བོད", "မြန်မာ", "C++", "「猫」", "¿qué", "«a»", "𠀋", "ｱ", "a\u3000b", "\u00a0", "。a", "a、"]
    entries = [r.choice(words) if r.random() < 0.7 else f"{r.choice(words)} {r.choice(words)}" for _ in range(400)]
    entries += ["", " ", "a  b", "\ta"]
    seps = [" ", " ", " ", "  ", ",", ", ", ".", "!", "\t", "\n", "\r", "\r\n", "", "`", ";", ":", "?", "\u00a0",
            "。", "，", "！", "—", "(", ")", "'", "\u3000"]
    texts = ["".join(r.choice(words) + r.choice(seps) for _ in range(r.randint(0, 12))) for _ in range(3000)]
    return entries, texts


@pytest.mark.parametrize("mode", ["metaclip1", "metaclip2"])
@pytest.mark.parametrize("seed", [0, 1])
def test_matcher_equals_the_naive_definition(mode, seed):
    entries, texts = _random_corpus(seed)
    m = Matcher(entries, mode=mode)
    want = [naive_match(entries, t, mode) for t in texts]
    assert m.match(texts) == want
    assert m.match_arrow(pa.array(texts)).to_pylist() == want
    assert sum(map(len, want)) > len(texts)  # the corpus really exercises matching
    again = pickle.loads(pickle.dumps(m))
    assert again.match(texts[:50]) == want[:50]


def test_balancing_math_against_formulas():
    r = np.random.default_rng(0)
    n = 30
    matches = [sorted(set(r.integers(0, n, r.integers(0, 5)).tolist())) for _ in range(500)]
    counts = count_entries(matches, n)
    assert counts.tolist() == [sum(i in m for m in matches) for i in range(n)]
    assert count_entries([[1, 1, 2]], 4).tolist() == [0, 1, 1, 0]  # once per text
    p = entry_probabilities(counts, 20)
    assert p.tolist() == [1.0 if c < 20 else 20 / c for c in counts]
    probs = keep_probabilities(pa.array(matches, pa.list_(pa.int32())), p)
    for m, got in zip(matches, probs):
        want = 1 - math.prod(1 - p[i] for i in m) if m else 0.0
        assert got == pytest.approx(want, abs=1e-12) and keep_probability(m, p) == pytest.approx(want, abs=1e-12)
    assert keep_probabilities(matches, p).tolist() == pytest.approx(probs.tolist())


def test_language_threshold_is_upstreams_p_to_t():
    en = np.array([0, 1, 5, 10, 50, 100, 1000])
    t = 60
    p_tail = en[en < t].sum() / en.sum()  # upstream t_to_p
    de = np.array([3, 0, 7, 2, 40, 9, 1])
    c = np.sort(de)
    share = np.cumsum(c) / c.sum()
    assert language_threshold(en, de, t) == c[np.abs(share - p_tail).argmin()]


def test_solve_threshold_hits_the_target():
    r = np.random.default_rng(1)
    n = 50
    w = 1 / np.arange(1, n + 1) ** 1.2
    matches = [sorted(set(r.choice(n, r.integers(1, 4), p=w / w.sum()).tolist())) for _ in range(3000)]
    counts = count_entries(matches, n)
    t = solve_threshold(matches, counts, 1200)
    kept = keep_probabilities(matches, entry_probabilities(counts, t)).sum()
    assert kept == pytest.approx(1200, rel=1e-3)
    assert solve_threshold(matches, counts, 10_000) == counts.max()
    for target in (10, 2999):
        t = solve_threshold(pa.array(matches, pa.list_(pa.int32())), counts, target)
        assert keep_probabilities(matches, entry_probabilities(counts, t)).sum() == pytest.approx(target, rel=1e-3)
    assert solve_threshold(matches + [[]] * 100, counts, 3000) == counts.max()  # unmatched texts never count


def test_load_entries_errors_name_file_and_item(tmp_path):
    good = tmp_path / "m.json"
    good.write_text(json.dumps(["a", "b c", ""]))
    assert load_entries(str(good)) == ["a", "b c", ""]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(["a", 3, "c"]))
    with pytest.raises(MetadataError, match=r"bad\.json: item 1 is not a string \(got 3\)"):
        load_entries(str(bad))
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps({"a": 1}))
    with pytest.raises(MetadataError, match="obj.json: expected a JSON list"):
        load_entries(str(obj))
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(MetadataError, match="empty.json: not JSON"):
        load_entries(str(empty))
    with pytest.raises(MetadataError, match="missing.json"):
        load_entries(str(tmp_path / "missing.json"))
    import fsspec
    with fsspec.open("memory://m/metadata.json", "w") as f:
        json.dump(["x", None], f)
    with pytest.raises(MetadataError, match=r"memory://m/metadata\.json: item 1 is not a string \(got null\)"):
        load_entries("memory://m/metadata.json")
    broken = tmp_path / "broken.json"
    broken.write_text('["a", ')
    with pytest.raises(MetadataError, match="broken.json: not JSON"):
        load_entries(str(broken))


def test_probabilities_edge_cases_without_warnings():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert entry_probabilities(np.array([0, 5, 10, 40]), 10).tolist() == [1.0, 1.0, 1.0, 0.25]
        assert entry_probabilities(np.array([0, 5]), 0).tolist() == [0.0, 0.0]
        p = np.array([1.0, 0.5, 0.25, 0.0])
        # duplicates in a list count once; empty lists give 0; a sliced Arrow column is read at its offset
        assert keep_probabilities([[1, 1], [], [2, 1], [3], [0, 3]], p).tolist() == [0.5, 0.0, 0.625, 0.0, 1.0]
        assert keep_probability([1, 1], p) == 0.5 and keep_probability([], p) == 0.0
        col = pa.array([[0], [], [1, 2], None, [3]], pa.list_(pa.int32()))
        assert keep_probabilities(col.slice(2), p).tolist() == [0.625, 0.0, 0.0]
        assert keep_probabilities(col.take(pa.array([4, 2])), p).tolist() == [0.0, 0.625]
        assert keep_probabilities([], p).tolist() == [] and keep_probabilities([[], []], p).tolist() == [0.0, 0.0]
        assert count_entries(col.slice(2), 4).tolist() == [0, 1, 1, 1] and count_entries([], 3).tolist() == [0, 0, 0]
        assert language_threshold(np.zeros(3), np.zeros(3), 5) == 0
    with pytest.raises(ValueError, match=r"entry ids must be in \[0, 3\)"):
        count_entries([[0, 5]], 3)


def test_language_threshold_by_hand():
    en = np.array([1, 2, 3, 4, 10])  # t = 4: tail = 1 + 2 + 3 = 6 of 20 → p = 0.3
    lang = np.array([5, 1, 1, 3])    # sorted 1 1 3 5, shares .1 .2 .5 1 → closest to .3 is .2 → t = 1
    assert language_threshold(en, lang, 4) == 1
    assert language_threshold(en, lang, 5) == 3  # p = 10/20 = .5 → share .5 → 3
    assert language_threshold(en, lang, 4.5) == 3  # count < t, strictly: 4 joins the tail only above 4
    assert language_threshold(np.array([3, 5]), np.array([2, 1, 1]), 4) == 1  # p = .375 between .25 and .5: first
    # upstream sorts the zeros in: p = .04 is nearest their share 0, so t = 0 (not the smallest count, 10)
    assert language_threshold(np.array([1, 24]), np.array([0, 90, 0, 10]), 2) == 0
    assert language_threshold(np.array([1, 24]), np.array([90, 10]), 2) == 10
