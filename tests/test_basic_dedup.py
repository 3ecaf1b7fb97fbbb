"""The basic and dedup stages called directly (the engine runs them in test_engine / test_demo)."""
import pyarrow as pa

from recap.pipeline.stage import StageContext
from recap.stages.basic import BasicConfig, BasicStage
from recap.stages.dedup import DedupConfig, DedupStage

CTX = StageContext(job_name="t", seed=0, stage="basic", dataset="mem")


def _basic(**cfg):
    st = BasicStage(BasicConfig(**cfg), CTX)
    st.setup()
    return st


def test_basic_reasons():
    rows = [
        ("a", "a red circle and a blue square on a white background", 200, 200),
        ("b", "IMG_0412.JPG", 200, 200),
        ("c", "DSC00123", 200, 200),
        ("d", "ein roter Kreis und ein blaues Quadrat auf weißem Hintergrund", 200, 200),
        ("e", "a red circle", 30, 200),
        ("f", "a very long and thin picture of a green star", 900, 100),
        ("g", "circle", 200, 200),
        ("h", "", 200, 200),
    ]
    batch = pa.table({"uid": [r[0] for r in rows], "caption": [r[1] for r in rows],
                      "original_width": [r[2] for r in rows], "original_height": [r[3] for r in rows]})
    out = _basic(min_image_size=64, max_aspect_ratio=3, min_caption_words=2, languages=["en"]).process(batch)
    got = dict(zip(out.column("uid").to_pylist(), out.column("_drop").to_pylist()))
    assert got == {"a": None, "b": "caption_too_short", "c": "caption_too_short", "d": "caption_language",
                   "e": "image_too_small", "f": "aspect_ratio_too_large", "g": "caption_too_short", "h": "caption_too_short"}
    langs = dict(zip(out.column("uid").to_pylist(), out.column("lang").to_pylist()))
    assert langs["a"] == "en" and langs["d"] == "de" and langs["h"] == "und"
    # with the word minimum off, file names are caught by their own rule
    out = _basic(min_caption_words=0).process(batch)
    got = dict(zip(out.column("uid").to_pylist(), out.column("_drop").to_pylist()))
    assert got["b"] == "caption_filename" and got["c"] == "caption_filename" and got["d"] is None


def test_dedup_keeps_smallest_uid_across_shards_in_any_order():
    st = DedupStage(DedupConfig(), StageContext("t", 0, "dedup", "mem"))
    s1 = pa.table({"uid": ["u9", "u2", "u5"], "sha256": ["h1", "h2", None]})
    s2 = pa.table({"uid": ["u1", "u7"], "sha256": ["h1", "h3"]})
    state = st.reduce([st.partial(s1), st.partial(s2)])
    assert state == st.reduce([st.partial(s2), st.partial(s1)])
    assert state["exact"] == {"h1": "u1"} and state["drops"] == {}  # singletons stay out of the state
    out1, out2 = st.apply(s1, state), st.apply(s2, state)
    assert out1.column("_drop").to_pylist() == ["duplicate_image", None, None]
    assert out1.column("_detail").to_pylist()[0] == "same bytes as u1"
    assert out2.column("_drop").to_pylist() == [None, None]
