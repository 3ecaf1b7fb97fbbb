"""pipeline.reinforced: writer -> reader round trip, byte determinism, param_aug sampling in
DataCompDR's layout and its replay against a reference written from the published description,
version-1 datasets converted on read, bf16 pth.gz embeddings, validation errors that name the uid
and field, and a tolerant reader."""
import gzip
import hashlib
import io
import json
import logging
import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from recap.pipeline.reinforced import (AugConfig, ReinforcedConfig, ReinforcedFormatError, ReinforcedWriter,
                                       TeacherConfig, iter_shard, list_shards, load_npz, load_pth_gz, npz_bytes,
                                       pth_gz_bytes, read_config, read_sizes, replay_augmentation, sample_param_aug)
from recap.pipeline.reinforced.testing import make_fixture
from recap.pipeline.shards import read_tar, sample_json, write_tar

# DataCompDR's RandAugment op_names, in the order paug.json's op_index counts them
OP_NAMES = ["Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
            "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize"]
# DataCompDR-12M's config.json, reinforce.image_augmentation
DATACOMPDR_AUG = {"normalize": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                "std": [0.26862954, 0.26130258, 0.27577711]},
                  "rand_augment": {"enable": True, "p": 1.0},
                  "random_resized_crop": {"interpolation": "bicubic", "size": 224},
                  "to_rgb": {"enable": True}, "to_tensor": {"enable": True}}
# param_aug entries as DataCompDR's sample viewer shows them (224 px output)
DATACOMPDR_PARAMS = [[[14, 347, 370, 427], [[0, 0.0], [6, 0.26999998092651367]]],
                     [[45, 20, 54, 64], [[11, 178.5], [12, 0.0]]],
                     [[32, 291, 657, 709], [[2, -0.09000000357627869], [4, -30.45317268371582]]],
                     [[36, 12, 157, 153], [[7, 0.26999998092651367], [1, -0.09000000357627869]]]]


def reference_replay(img, entry, size, interpolation="bilinear", flip=False):
    """DataCompDR's replay as published, with torchvision.transforms.functional: RandomResizedCrop's
    box resized (antialiased) to size x size, the stored flip (when the config flips), then every
    RandAugment op with its stored magnitude as torchvision's RandAugment applies it (NEAREST, no fill)."""
    import torchvision.transforms.functional as F
    from torchvision.transforms import InterpolationMode as M

    i, j, h, w = entry[0]
    out = F.resized_crop(img, i, j, h, w, [size, size], interpolation=M(interpolation), antialias=True)
    if flip and entry[1]:
        out = F.hflip(out)
    for idx, m in entry[-1]:
        name = OP_NAMES[idx]
        geo = {"interpolation": M.NEAREST, "fill": None}
        if name in ("ShearX", "ShearY"):  # RandAugment's magnitude is the shear's tangent
            deg = math.degrees(math.atan(m))
            out = F.affine(out, angle=0.0, translate=[0, 0], scale=1.0,
                           shear=[deg, 0.0] if name == "ShearX" else [0.0, deg], center=[0, 0], **geo)
        elif name in ("TranslateX", "TranslateY"):  # whole pixels
            t = [int(m), 0] if name == "TranslateX" else [0, int(m)]
            out = F.affine(out, angle=0.0, translate=t, scale=1.0, shear=[0.0, 0.0], **geo)
        elif name == "Rotate":
            out = F.rotate(out, m, **geo)
        elif name in ("Brightness", "Color", "Contrast", "Sharpness"):
            fn = {"Brightness": F.adjust_brightness, "Color": F.adjust_saturation, "Contrast": F.adjust_contrast,
                  "Sharpness": F.adjust_sharpness}[name]
            out = fn(out, 1.0 + m)
        elif name == "Posterize":
            out = F.posterize(out, int(m))
        elif name == "Solarize":
            out = F.solarize(out, m)
        elif name == "AutoContrast":
            out = F.autocontrast(out)
        elif name == "Equalize":
            out = F.equalize(out)
    return out


def bin_magnitudes(size, num_bins=31):
    """torchvision RandAugment's magnitude table at a size x size output: op -> (values, signed)."""
    from torchvision.transforms import RandAugment

    return {k: ([float(x) for x in v.tolist()] if v.ndim else [], s)  # [] for ops without a magnitude
            for k, (v, s) in RandAugment()._augmentation_space(num_bins, (size, size)).items()}


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
    table = bin_magnitudes(32)
    for params in forward.values():
        assert len(params) == 4
        for (i, j, h, w), ops in params:
            assert 0 <= i and 0 <= j and i + h <= 80 and j + w <= 100 and h > 0 and w > 0
            assert len(ops) == 2
            for idx, mag in ops:  # the value of bin 9 at the 32 px output, signed where the op is
                values, signed = table[OP_NAMES[idx]]
                assert isinstance(mag, float) and abs(mag) == (values[9] if values else 0.0)
                assert mag >= 0 or signed
    # random magnitudes are drawn when magnitude is None
    free = AugConfig(magnitude=None, n_aug=50)
    mags = {abs(m) for _, ops in sample_param_aug(64, 64, free, 0, "x", 50) for _, m in ops}
    assert len(mags) > 5


def test_magnitudes_are_datacompdr_values():
    """At 224 px and bin 9 the stored values are DataCompDR's, float for float, and survive JSON."""
    cfg = AugConfig(image_size=224, interpolation="bicubic", n_aug=400)
    seen: dict[str, set] = {}
    for _, ops in sample_param_aug(500, 400, cfg, 0, "u", 400):
        for idx, mag in ops:
            seen.setdefault(OP_NAMES[idx], set()).add(mag)
    assert set(seen) == set(OP_NAMES)
    published = {name: {abs(m)} for e in DATACOMPDR_PARAMS for idx, m in e[1] for name in [OP_NAMES[idx]]}
    published.update(Rotate={9.0}, Posterize={7.0})
    for name, values in published.items():
        assert {abs(m) for m in seen[name]} == values, name
    assert seen["ShearX"] == {0.09000000357627869, -0.09000000357627869}
    assert json.loads(json.dumps(sorted(seen["TranslateY"]))) == sorted(seen["TranslateY"])
    assert cfg.image_augmentation() == DATACOMPDR_AUG
    # what ml-mobileclip's reapply needs beyond DataCompDR's defaults is spelled out
    other = AugConfig(image_size=64, num_ops=3, hflip=0.5, scale=(0.5, 1.0)).image_augmentation()
    assert other["rand_augment"] == {"enable": True, "p": 1.0, "num_ops": 3}
    assert other["random_horizontal_flip"] == {"p": 0.5}
    assert other["random_resized_crop"] == {"interpolation": "bilinear", "size": 64, "scale": [0.5, 1.0]}


def _image(w=90, h=70, seed=0):
    g = np.random.default_rng(seed)
    return Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8))


# (width, height): wide, tall, square, odd, and smaller than the 64 px output
SIZES = [(90, 70), (200, 50), (50, 300), (64, 64), (97, 61), (30, 20), (17, 90)]


@pytest.mark.parametrize("aug", [{"interpolation": "bicubic"}, {"interpolation": "bilinear", "hflip": 0.5},
                                 {"interpolation": "nearest", "magnitude": None, "num_ops": 3}])
def test_replay_equals_the_published_reference(aug):
    cfg = AugConfig(image_size=64, **aug)
    n = 0
    for k, (w, h) in enumerate(SIZES):
        img = _image(w, h, seed=k)
        for p in sample_param_aug(w, h, cfg, k, f"img{k}", 12):
            want = reference_replay(img, p, 64, cfg.interpolation, flip=bool(cfg.hflip))
            got = replay_augmentation(img, p, cfg)
            assert got.size == (64, 64)
            np.testing.assert_array_equal(_tensor(got), _tensor(want), err_msg=f"{w}x{h} {p}")
            n += 1
    assert n == 12 * len(SIZES)
    if cfg.hflip:
        flips = [p[1] for p in sample_param_aug(90, 70, cfg, 0, "f", 40)]
        assert True in flips and False in flips


def test_replay_of_datacompdr_params_and_size():
    cfg = AugConfig(image_size=224, interpolation="bicubic")
    img = _image(1000, 720)
    for p in DATACOMPDR_PARAMS:
        np.testing.assert_array_equal(_tensor(replay_augmentation(img, p, cfg)),
                                      _tensor(reference_replay(img, p, 224, "bicubic")))
    # another output size: the stored magnitudes apply unchanged
    p = DATACOMPDR_PARAMS[2]
    got = replay_augmentation(img, p, cfg, size=96)
    assert got.size == (96, 96)
    np.testing.assert_array_equal(_tensor(got), _tensor(reference_replay(img, p, 96, "bicubic")))
    # replay is pure, and params matter
    outs = [_tensor(replay_augmentation(img, q, cfg)) for q in DATACOMPDR_PARAMS]
    assert all(np.array_equal(a, _tensor(replay_augmentation(img.copy(), q, cfg)))
               for a, q in zip(outs, DATACOMPDR_PARAMS))
    assert len({o.tobytes() for o in outs}) == len(outs)


@pytest.mark.parametrize("bad", [
    [[0, 0, 4], []],                         # box of 3
    [[0, 0, 4, 0], [[0, 0.0], [0, 0.0]]],    # empty box
    [[0, 0, 4, 4], [[0, 0.0]]],              # fewer ops than num_ops: reapply would fail
    [[0, 0, 4, 4], [[14, 0.0], [0, 0.0]]],   # op_index past the op table
    [[0, 0, 4, 4], [[10, 9.0], [0, 0.0]]],   # Posterize keeps at most 8 bits (a version-1 bin)
    [[0, 0, 4, 4], [[5, float("nan")], [0, 0.0]]],
    [[0, 0, 4, 4], True, [[0, 0.0], [0, 0.0]]],  # a flip the config does not have
])
def test_check_param_refuses(bad):
    from recap.pipeline.reinforced import check_param

    with pytest.raises(ReinforcedFormatError, match="expected"):
        check_param(bad, AugConfig())
    with pytest.raises(ValueError):
        replay_augmentation(_image(), bad, AugConfig(image_size=8))
    check_param([[0, 0, 4, 4], [[10, 7.0], [5, -9.0]]], AugConfig())
    check_param([[0, 0, 4, 4], False, [[10, 7.0], [5, -9.0]]], AugConfig(hflip=0.5))


def _v1_dataset(root, n=5, size=16, ops=("Posterize", "TranslateX", "Rotate", "ShearY", "Solarize", "Identity")):
    """A dataset as format version 1 wrote it: config.json without the newer fields, and param_aug
    entries [[i, j, h, w], [[op_idx into aug.ops, signed bin], ...]] (bins drawn at random)."""
    g = np.random.default_rng(1)
    aug = {"image_size": size, "scale": [0.08, 1.0], "ratio": [0.75, 4 / 3], "interpolation": "bilinear",
           "n_aug": 3, "num_ops": 2, "num_magnitude_bins": 31, "magnitude": None, "ops": list(ops)}
    config = {"format": "recap-reinforced", "version": 1, "teachers": [{"name": "t", "pretrained": None, "dim": 4}],
              "aug": aug, "emb_dtype": "float32", "generators": {}}
    signed = {k: s for k, (_, s) in bin_magnitudes(size).items()}
    groups, images = [], {}
    for k in range(n):
        w, h = int(g.integers(12, 60)), int(g.integers(12, 60))
        img = _image(w, h, seed=10 + k)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        paug = []
        for _ in range(3):
            bh, bw = int(g.integers(1, h + 1)), int(g.integers(1, w + 1))
            box = [int(g.integers(0, h - bh + 1)), int(g.integers(0, w - bw + 1)), bh, bw]
            entry_ops = []
            for _ in range(2):
                idx, b = int(g.integers(len(ops))), int(g.integers(31))
                entry_ops.append([idx, -b if signed[ops[idx]] and g.integers(2) else b])
            paug.append([box, entry_ops])
        emb = np.zeros((3, 4), np.float32)
        emb[np.arange(3), np.arange(3)] = 1.0
        uid = f"old{k}"
        images[uid] = (img, paug)
        groups.append((uid, {"png": buf.getvalue(), "txt": f"old caption {k}".encode(),
                             "json": sample_json({"uid": uid}), "paug.json": sample_json({"param_aug": paug}),
                             "npz": npz_bytes({"image_emb": emb, "text_emb": emb[:1]})}))
    (root / "shards").mkdir(parents=True)
    (root / "shards/00000.tar").write_bytes(write_tar(groups))
    (root / "config.json").write_text(json.dumps(config))
    return images


def v1_reference(img, entry, aug):
    """What format version 1 meant: each bin's torchvision value at the config's output size."""
    table = bin_magnitudes(aug["image_size"], aug["num_magnitude_bins"])
    ops = []
    for idx, b in entry[1]:
        values, _ = table[aug["ops"][idx]]
        m = values[abs(b)] if values else 0.0
        ops.append([OP_NAMES.index(aug["ops"][idx]), -m if b < 0 else m])
    return reference_replay(img, [entry[0], ops], aug["image_size"], aug["interpolation"])


def test_version_1_datasets_are_converted_on_read(tmp_path, caplog):
    root = tmp_path / "v1"
    images = _v1_dataset(root)
    aug = json.loads((root / "config.json").read_text())["aug"]
    with caplog.at_level(logging.WARNING, logger="recap.pipeline.reinforced"):
        cfg = read_config(str(root))
        read_config(str(root))
    assert cfg.version == 1 and cfg.aug.ops == aug["ops"]
    assert [r.getMessage().count("version 1") for r in caplog.records] == [1]  # said once
    stats = Counter()
    got = list(iter_shard(list_shards(str(root))[0], stats, config=cfg))
    assert not stats and len(got) == len(images)
    for s in got:
        img, old = images[s["uid"]]
        assert len(s["param_aug"]) == len(old)
        for new, entry in zip(s["param_aug"], old):
            assert new[0] == entry[0] and [OP_NAMES[i] for i, _ in new[1]] == [aug["ops"][i] for i, _ in entry[1]]
            np.testing.assert_array_equal(_tensor(replay_augmentation(img, new, cfg.aug)),
                                          _tensor(v1_reference(img, entry, aug)))
    # without the config the reader cannot know the layout: entries come as stored
    raw = next(iter_shard(list_shards(str(root))[0]))
    assert raw["param_aug"] == images[raw["uid"]][1]
    # an entry version 1 refused: the sample is counted, not trained
    g = read_tar((root / "shards/00000.tar").read_bytes())
    first = next(iter(g))
    g[first]["paug.json"] = sample_json({"param_aug": [[[0, 0, 4, 4], [[0, 99], [0, 0]]]]})
    (root / "shards/00000.tar").write_bytes(write_tar(g.items()))
    stats = Counter()
    assert len(list(iter_shard(list_shards(str(root))[0], stats, config=cfg))) == len(images) - 1
    assert stats == {"bad_paug": 1}
    # only the current version is written
    with pytest.raises(ReinforcedFormatError, match="only version 2"):
        ReinforcedWriter(str(tmp_path / "again"), cfg)


def test_config_records_the_augmentation_for_datacompdr(tmp_path):
    fx = make_fixture(str(tmp_path / "ds"), 2, 1, dims=(4,), image_size=224, aug={"interpolation": "bicubic"})
    raw = json.loads((tmp_path / "ds/config.json").read_text())
    assert raw["version"] == 2 and raw["reinforce"] == {"image_augmentation": DATACOMPDR_AUG}
    assert read_config(str(tmp_path / "ds")) == fx["config"]
    raw["reinforce"]["image_augmentation"]["random_resized_crop"]["size"] = 256  # edited by hand: refused
    (tmp_path / "ds/config.json").write_text(json.dumps(raw))
    with pytest.raises(ReinforcedFormatError, match="disagrees with aug"):
        read_config(str(tmp_path / "ds"))
    raw["version"] = 3
    with pytest.raises(ValueError, match="format version 3"):
        ReinforcedConfig.model_validate(raw)


def test_pth_gz_embeddings(tmp_path):
    with pytest.raises(ValueError, match="bfloat16 needs"):
        ReinforcedConfig(emb_dtype="bfloat16")
    fx = make_fixture(str(tmp_path / "a"), 4, 1, dims=(8, 4), seed=1, n_aug=3, aug=None)
    cfg = ReinforcedConfig(**{**fx["config"].model_dump(exclude={"reinforce"}), "emb_dtype": "bfloat16",
                              "emb_format": "pth.gz"})
    samples = [fx["samples"][u] for u in fx["uids"]]
    for name in ("b", "c"):
        with ReinforcedWriter(str(tmp_path / name), cfg) as w:
            w.write_shard(0, samples)
    data = (tmp_path / "b/shards/00000.tar").read_bytes()
    assert data == (tmp_path / "c/shards/00000.tar").read_bytes()  # deterministic bytes
    groups = read_tar(data)
    assert all("pth.gz" in m and "npz" not in m for m in groups.values())
    # plain torch reads it, as DataCompDR's loader does: bf16 tensors
    raw = torch.load(io.BytesIO(gzip.decompress(next(iter(groups.values()))["pth.gz"])), weights_only=True)
    assert {k: v.dtype for k, v in raw.items()} == dict.fromkeys(("image_emb", "neg_text_emb", "text_emb"),
                                                                 torch.bfloat16)
    got = list(iter_shard(list_shards(str(tmp_path / "b"))[0], config=read_config(str(tmp_path / "b"))))
    for s in got:
        want = fx["samples"][s["uid"]]
        for key in ("image_emb", "text_emb", "neg_text_emb"):
            assert s[key].dtype == np.float32
            bf = torch.from_numpy(want[key]).bfloat16().float().numpy()
            np.testing.assert_array_equal(s[key], bf)
    # the helpers round-trip, and a damaged member is counted
    arrays = {"image_emb": np.eye(2, 3, dtype=np.float32)}
    np.testing.assert_array_equal(load_pth_gz(pth_gz_bytes(arrays, "float32"))["image_emb"], arrays["image_emb"])
    key = next(iter(groups))
    groups[key]["pth.gz"] = b"garbage"
    (tmp_path / "bad.tar").write_bytes(write_tar(groups.items()))
    stats = Counter()
    assert len(list(iter_shard(str(tmp_path / "bad.tar"), stats))) == len(groups) - 1 and stats == {"bad_pth_gz": 1}


def _sample(cfg, uid="abc", n_aug=2, n_syn=1, **over):
    d = cfg.dim
    e = np.zeros((8, d), np.float32)
    e[:, 0] = 1.0
    s = {"uid": uid, "jpg": b"\xff\xd8fake", "txt": "a caption", "url": "http://x/y.jpg", "json": {"width": 9},
         "param_aug": [[[0, 0, 4, 4], [[0, 0.0], [1, -0.09000000357627869]]]] * n_aug,
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
    ({"param_aug": [[[0, 0, 4, 4], [[99, 1.0], [0, 0.0]]]] * 2}, r"abc: param_aug\[0\]"),
    ({"param_aug": [[[0, 0, 4, 4], [[10, 9], [0, 0]]]] * 2}, r"abc: param_aug\[0\].*Posterize"),
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
