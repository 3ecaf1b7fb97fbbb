"""pipeline.reinforced: writer -> reader round trip, byte determinism, param_aug sampling and exact
replay, validation errors that name the uid and field, and a tolerant reader."""
import hashlib
import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from recap.pipeline.reinforced import (AugConfig, ReinforcedConfig, ReinforcedFormatError, ReinforcedWriter,
                                       TeacherConfig, apply_param_aug, iter_shard, list_shards, load_npz, npz_bytes,
                                       read_config, read_sizes, sample_param_aug)
from recap.pipeline.reinforced.testing import make_fixture
from recap.pipeline.shards import read_tar, write_tar


@pytest.fixture(scope="module")
def fixture_ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("fx") / "ds"
    fx = make_fixture(str(out), n_samples=12, n_shards=3, dims=(8, 4), seed=3, n_aug=3, n_syn=2, n_neg=2)
    return out, fx


def _tensor(img):
    return np.asarray(img, dtype=np.uint8)


def test_round_trip_every_member(fixture_ds):
    out, fx = fixture_ds
    cfg = read_config(str(out))
    assert cfg == fx["config"] and cfg.dim == 12
    shards = list_shards(str(out))
    assert [s.rsplit("/", 1)[-1] for s in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    stats = Counter()
    got = [s for url in shards for s in iter_shard(url, stats, config=cfg)]
    assert not stats
    assert [s["uid"] for s in got] == fx["uids"]  # input order kept
    for s in got:
        want = fx["samples"][s["uid"]]
        for key in ("jpg", "txt", "url", "param_aug", "syn", "neg"):
            assert s[key] == want[key], key
        assert s["json"] == want["json"]
        for key in ("image_emb", "text_emb", "neg_text_emb"):
            assert s[key].dtype == np.float32
            np.testing.assert_array_equal(s[key], want[key])
        assert s["image_emb"].shape[0] == len(s["param_aug"])
        assert s["text_emb"].shape[0] == 1 + len(s["syn"]["syn_text"])


def test_index_files(fixture_ds):
    out, fx = fixture_ds
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {name: len(uids) for name, uids in fx["shards"].items()} == read_sizes(str(out))
    assert json.loads((out / "shards/sizes.json").read_text()) == sizes  # where open_clip looks
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [x["name"] for x in lines] == sorted(sizes)
    for x in lines:
        data = (out / x["path"]).read_bytes()
        assert x["n"] == sizes[x["name"]] and x["bytes"] == len(data)
        assert x["sha256"] == hashlib.sha256(data).hexdigest()


def test_writes_are_byte_identical(tmp_path):
    a = make_fixture(str(tmp_path / "a"), 6, 2, dims=(8,), seed=5)
    make_fixture(str(tmp_path / "b"), 6, 2, dims=(8,), seed=5)
    for rel in ("shards/00000.tar", "shards/00001.tar", "sizes.json", "manifest.jsonl", "config.json"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    # tar members: fixed mtime/uid, in input order
    tar = (tmp_path / "a/shards/00000.tar").read_bytes()
    assert list(read_tar(tar)) == a["shards"]["00000.tar"]


def test_npz_bytes_deterministic_and_loadable():
    arrays = {"image_emb": np.eye(3, 4, dtype=np.float16), "text_emb": np.ones((2, 4), np.float32)}
    b1 = npz_bytes(arrays)
    b2 = npz_bytes({k: v.copy() for k, v in reversed(arrays.items())})
    assert b1 == b2
    back = load_npz(b1)
    assert back.keys() == arrays.keys()
    for k in arrays:
        np.testing.assert_array_equal(back[k], arrays[k])
        assert back[k].dtype == arrays[k].dtype
    with np.load(io.BytesIO(b1)) as z:  # plain numpy reads it
        assert sorted(z.files) == ["image_emb", "text_emb"]


def test_sample_param_aug_is_a_function_of_uid():
    cfg = AugConfig(image_size=32, n_aug=4)
    uids = [f"u{i}" for i in range(20)]
    forward = {u: sample_param_aug(100, 80, cfg, 7, u, 4) for u in uids}
    backward = {u: sample_param_aug(100, 80, cfg, 7, u, 4) for u in reversed(uids)}
    assert forward == backward
    assert sample_param_aug(100, 80, cfg, 8, "u0", 4) != forward["u0"]  # seed matters
    assert len({json.dumps(p) for p in forward.values()}) == len(uids)
    for params in forward.values():
        assert len(params) == 4
        for (i, j, h, w), ops in params:
            assert 0 <= i and 0 <= j and i + h <= 80 and j + w <= 100 and h > 0 and w > 0
            assert len(ops) == 2
            for idx, mag in ops:
                assert 0 <= idx < len(cfg.ops) and abs(mag) == 9
    # random magnitudes are drawn when magnitude is None
    free = AugConfig(magnitude=None, n_aug=50)
    mags = {abs(m) for _, ops in sample_param_aug(64, 64, free, 0, "x", 50) for _, m in ops}
    assert len(mags) > 5


def _image(w=90, h=70, seed=0):
    g = np.random.default_rng(seed)
    return Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_replay_is_exact_and_params_matter():
    cfg = AugConfig(image_size=32)
    img = _image()
    params = sample_param_aug(90, 70, cfg, 1, "uid", 8)
    outs = [_tensor(apply_param_aug(img, p, cfg)) for p in params]
    again = [_tensor(apply_param_aug(img.copy(), p, cfg)) for p in params]
    for a, b in zip(outs, again):
        assert a.shape == (32, 32, 3)
        np.testing.assert_array_equal(a, b)
    assert len({o.tobytes() for o in outs}) == len(outs)
    # different crop boxes (no ops) give different pixels; image_size overrides the config's
    plain = AugConfig(image_size=32, num_ops=0)
    a = _tensor(apply_param_aug(img, [[0, 0, 40, 40], []], plain))
    b = _tensor(apply_param_aug(img, [[10, 20, 40, 40], []], plain))
    assert not np.array_equal(a, b)
    assert _tensor(apply_param_aug(img, [[0, 0, 40, 40], []], plain, image_size=16)).shape == (16, 16, 3)


def test_replay_matches_torchvision_randaugment_ops():
    """An op replayed by index/bin equals torchvision's own op with RandAugment's magnitude."""
    import torchvision.transforms.functional as F
    from torchvision.transforms import InterpolationMode, RandAugment
    from torchvision.transforms.autoaugment import _apply_op

    cfg = AugConfig(image_size=32)
    img = _image()
    crop = F.resized_crop(img, 5, 6, 50, 60, [32, 32], interpolation=InterpolationMode.BILINEAR, antialias=True)
    space = RandAugment()._augmentation_space(31, (32, 32))
    for idx, name in enumerate(cfg.ops):
        mags, signed = space[name]
        for mag in ([9, -9] if signed else [9]):
            m = float(mags[abs(mag)]) if mags.ndim else 0.0
            want = _apply_op(crop, name, -m if mag < 0 else m, InterpolationMode.NEAREST, None)
            got = apply_param_aug(img, [[5, 6, 50, 60], [[idx, mag]]], cfg)
            np.testing.assert_array_equal(_tensor(got), _tensor(want), err_msg=name)


def _sample(cfg, uid="abc", n_aug=2, n_syn=1, **over):
    d = cfg.dim
    e = np.zeros((8, d), np.float32)
    e[:, 0] = 1.0
    s = {"uid": uid, "jpg": b"\xff\xd8fake", "txt": "a caption", "url": "http://x/y.jpg", "json": {"width": 9},
         "param_aug": [[[0, 0, 4, 4], [[0, 0], [1, 9]]]] * n_aug,
         "syn": {"syn_text": ["s"] * n_syn, "syn_source": ["rewrite"] * n_syn},
         "neg": {"neg_text_short": ["n"], "neg_of": [0], "neg_type": ["swap"]},
         "image_emb": e[:n_aug], "text_emb": e[:1 + n_syn], "neg_text_emb": e[:1]}
    s.update(over)
    return s


@pytest.mark.parametrize("over, match", [
    ({"image_emb": np.zeros((3, 4), np.float32)}, r"abc: image_emb has 3 rows but param_aug's length needs 2"),
    ({"text_emb": np.ones((1, 4), np.float32) / 2}, r"abc: text_emb has 1 rows but 1 \+ len\(syn_text\) needs 2"),
    ({"neg_text_emb": np.ones((1, 5), np.float32)}, r"abc: neg_text_emb has width 5 but the teachers' dims sum to 4"),
    ({"image_emb": np.ones((2, 4), np.float32)}, r"abc: image_emb: teacher 't' slice is not L2-normalised"),
    ({"param_aug": [[[0, 0, 4], []]] * 2}, r"abc: param_aug\[0\]"),
    ({"param_aug": [[[0, 0, 4, 4], [[99, 1]]]] * 2}, r"abc: param_aug\[0\]"),
    ({"syn": {"syn_text": ["a"], "syn_source": []}}, r"abc: syn.syn_source"),
    ({"neg": {"neg_text_short": ["a"], "neg_type": []}}, r"abc: neg.neg_type"),
    ({"uid": "a.b"}, r"'a.b'"),
    ({"jpg": b""}, r"abc: jpg"),
])
def test_writer_validates(tmp_path, over, match):
    cfg = ReinforcedConfig(teachers=[TeacherConfig(name="t", dim=4)])
    w = ReinforcedWriter(str(tmp_path / "ds"), cfg)
    with pytest.raises(ReinforcedFormatError, match=match):
        w.write_shard(0, [_sample(cfg, **over)])
    w.write_shard(0, [_sample(cfg)])  # the valid sample writes
    with pytest.raises(ReinforcedFormatError, match="twice"):
        w.write_shard(1, [_sample(cfg), _sample(cfg)])


def test_config_is_validated():
    with pytest.raises(ValueError, match="unknown RandAugment ops"):
        AugConfig(ops=["Identity", "Explode"])
    with pytest.raises(ValueError, match="scale"):
        AugConfig(scale=(0.5, 0.1))
    with pytest.raises(ValueError):
        ReinforcedConfig.model_validate({"teachers": [{"name": "t", "dim": 4}], "typo": 1})


def test_reader_is_tolerant(tmp_path, fixture_ds):
    out, fx = fixture_ds
    url = list_shards(str(out))[0]
    groups = read_tar(open(url, "rb").read())
    keys = list(groups)
    del groups[keys[0]]["jpg"]  # missing image
    groups[keys[1]]["json"] = b"{not json"  # undecodable member
    groups[keys[2]]["npz"] = npz_bytes({"image_emb": np.ones((1, 12), np.float32)})  # rows != len(param_aug)
    bad = tmp_path / "bad.tar"
    bad.write_bytes(write_tar(groups.items()))
    stats = Counter()
    got = list(iter_shard(str(bad), stats))
    assert [s["uid"] for s in got] == keys[3:]
    assert stats == {"missing_jpg": 1, "bad_json": 1, "bad_shapes": 1}
    # a truncated tar ends the shard with a counted error; samples before the damage come through
    whole = {k: v for u in list_shards(str(out)) for k, v in read_tar(open(u, "rb").read()).items()}
    data = write_tar(whole.items())
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])
    stats = Counter()
    got = list(iter_shard(str(cut), stats))
    assert stats == {"truncated_shard": 1} and 0 < len(got) < len(whole)
    assert [s["uid"] for s in got] == list(whole)[: len(got)]
    # cut exactly where the 3rd sample's first header starts: tarfile stops silently there, the
    # reader does not (a complete tar ends with a zero block); the 2nd sample may be cut, so dropped
    import tarfile
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        third = next(m.offset for m in t.getmembers() if m.name.startswith(list(whole)[2] + "."))
    blocks = tmp_path / "blocks.tar"
    blocks.write_bytes(data[:third])
    stats = Counter()
    got = list(iter_shard(str(blocks), stats))
    assert stats == {"truncated_shard": 1} and [s["uid"] for s in got] == list(whole)[:1]
    stats = Counter()
    assert list(iter_shard(str(absent := tmp_path / "absent.tar"), stats)) == [] and stats == {"missing_shard": 1}
    assert not absent.exists()


def test_list_shards_forms(fixture_ds, tmp_path):
    out, _ = fixture_ds
    full = list_shards(str(out))
    assert list_shards(str(out / "shards")) == full
    assert list_shards(str(out / "shards/{00000..00002}.tar")) == full
    assert list_shards([full[0], full[2]]) == [full[0], full[2]]
    assert list_shards(str(tmp_path / "nothing")) == []


def test_fixture_from_image_folder(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k in range(2):
        _image(50 + k, 40, seed=k).save(folder / f"{k}.png")
    fx = make_fixture(str(tmp_path / "ds"), 3, 1, dims=(4,), images_from=str(folder), n_syn=0, n_neg=0)
    got = list(iter_shard(list_shards(str(tmp_path / "ds"))[0]))
    assert [s["json"]["width"] for s in got] == [50, 51, 50]
    assert got[0]["jpg"] == (folder / "0.png").read_bytes() and fx["uids"] == [s["uid"] for s in got]
