"""trainer.data: teacher rows follow the replayed augmentation and the chosen text, rank x worker
splits cover every sample once, seeded per-epoch order and online balancing, bad data counted or
refused before training, plain img2dataset shards, DataCompDR's sample layout (npz and bf16
pth.gz) and version-1 datasets."""
import gzip
import hashlib
import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from recap.pipeline.reinforced import (AugConfig, ReinforcedConfig, TeacherConfig, iter_shard, list_shards, npz_bytes,
                                       read_config, replay_augmentation, write_index)
from recap.pipeline.reinforced.testing import make_fixture
from recap.pipeline.shards import read_tar, sample_json, write_tar
from recap.trainer.data import OPENAI_MEAN, OPENAI_STD, DataError, ReinforcedDataset, make_loader
from tests.test_reinforced import (DATACOMPDR_AUG, DATACOMPDR_PARAMS, OP_NAMES, _v1_dataset, bin_magnitudes,
                                   reference_replay, v1_reference)

S = 16  # image side: small and fast


def tok(texts):
    """A reversible stand-in tokenizer: utf-8 bytes, zero-padded to 64."""
    out = torch.zeros((len(texts), 64), dtype=torch.long)
    for i, t in enumerate(texts):
        b = t.encode()[:64]
        out[i, :len(b)] = torch.tensor(list(b))
    return out


def untok(row):
    return bytes(int(x) for x in row if int(x)).decode()


@pytest.fixture(scope="module")
def idx_ds(tmp_path_factory):
    """Teacher row k = e_k in both teacher slices (dims 8 + 8): a row's argmax names its index."""
    out = tmp_path_factory.mktemp("idx") / "ds"
    fx = make_fixture(str(out), n_samples=24, n_shards=3, dims=(8, 8), seed=2, n_aug=4, n_syn=3, n_neg=2,
                      encode_index=True, image_size=S)
    return str(out), fx


@pytest.fixture(scope="module")
def many_ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("many") / "ds"
    fx = make_fixture(str(out), n_samples=40, n_shards=8, dims=(4,), seed=4, n_aug=2, n_syn=1, n_neg=0,
                      image_size=S, min_size=20, max_size=28)
    return str(out), fx


def _all(ds, batch_size=4, workers=0, drop_last=False):
    return list(make_loader(ds, batch_size, workers, drop_last=drop_last))


def _uids(batches):
    return [u for b in batches for u in b["uid"]]


def _norm(pil):
    x = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1).double() / 255
    return ((x - torch.tensor(OPENAI_MEAN).view(3, 1, 1)) / torch.tensor(OPENAI_STD).view(3, 1, 1)).float()


def test_teacher_rows_follow_the_replayed_aug_and_text(idx_ds):
    url, fx = idx_ds
    ds = ReinforcedDataset(url, epoch=1, seed=5, image_size=S, tokenizer=tok, text_choice="uniform",
                           use_teacher=True, hard_negatives=True, expected_dim=16)
    batches = _all(ds, batch_size=5)
    assert sorted(_uids(batches)) == sorted(fx["uids"]) and not ds.stats
    seen_aug, seen_txt = set(), set()
    for b in batches:
        assert b["image"].shape[1:] == (3, S, S) and b["teacher_image"].shape[1] == 16
        for r, uid in enumerate(b["uid"]):
            src = fx["samples"][uid]
            k, t = int(b["aug_index"][r]), int(b["text_index"][r])
            seen_aug.add(k), seen_txt.add(t)
            # the image is exactly param_aug[k] replayed; the teacher row is row k (both slices)
            img = Image.open(io.BytesIO(src["jpg"])).convert("RGB")
            want = _norm(replay_augmentation(img, src["param_aug"][k], fx["config"].aug, size=S))
            assert torch.allclose(b["image"][r], want, atol=1e-5)
            assert int(b["teacher_image"][r, :8].argmax()) == k == int(b["teacher_image"][r, 8:].argmax())
            # text row t of [GT] + syn_text, and its teacher row
            texts = [src["txt"]] + src["syn"]["syn_text"]
            assert untok(b["text"][r]) == texts[t]
            assert int(b["teacher_text"][r, :8].argmax()) == t
            assert b["text_source"][r] == (["gt"] + src["syn"]["syn_source"])[t]
            # one hard negative per sample, preferring the negative made from the chosen text
            (n,) = [i for i, owner in enumerate(b["neg_index"].tolist()) if owner == r]
            j = int(b["teacher_neg_text"][n, :8].argmax())
            assert untok(b["neg_text"][n]) == src["neg"]["neg_text_short"][j]
            if t in src["neg"]["neg_of"]:
                assert src["neg"]["neg_of"][j] == t
    assert seen_aug == {0, 1, 2, 3} and seen_txt == {0, 1, 2, 3}
    # GT choice: always row 0
    gt = _all(ReinforcedDataset(url, seed=5, image_size=S, tokenizer=tok, use_teacher=True))
    assert all(int(i) == 0 for b in gt for i in b["text_index"])
    assert all(int(r[:8].argmax()) == 0 for b in gt for r in b["teacher_text"])


def test_syn_weights_select_sources(idx_ds):
    url, fx = idx_ds
    ds = ReinforcedDataset(url, image_size=S, text_choice="uniform", syn_weights={"gt": 0, "caption": 0, "short": 0})
    srcs = {s for b in _all(ds) for s in b["text_source"]}
    assert srcs == {"rewrite"}
    with pytest.raises(ValueError, match="syn_weights"):
        ReinforcedDataset(url, syn_weights={"gt": -1})


@pytest.mark.parametrize("n_shards", [8, 3, 1])
def test_ranks_times_workers_cover_every_sample_once(tmp_path, many_ds, n_shards):
    url, fx = many_ds
    if n_shards != 8:  # the same 40 samples in fewer shards: splitting falls back to sample positions
        url = str(tmp_path / "re")
        make_fixture(url, 40, n_shards, dims=(4,), seed=4, n_aug=2, n_syn=1, n_neg=0, image_size=S,
                     min_size=20, max_size=28)
    got = []
    for rank in range(2):
        ds = ReinforcedDataset(url, epoch=0, seed=1, rank=rank, world_size=2, image_size=S, shuffle_buffer=8)
        got += _uids(_all(ds, batch_size=3, workers=2))
    assert sorted(got) == sorted(fx["uids"]) and len(got) == 40


def test_order_is_seeded_per_epoch(many_ds):
    url, fx = many_ds

    def order(epoch, seed=0):
        return _uids(_all(ReinforcedDataset(url, epoch=epoch, seed=seed, image_size=S, shuffle_buffer=10)))

    e0 = order(0)
    assert e0 == order(0)  # same seed, same epoch: same order
    assert e0 != order(1) and sorted(e0) == sorted(order(1)) == sorted(fx["uids"])
    assert e0 != order(0, seed=1)
    a = _all(ReinforcedDataset(url, epoch=3, image_size=S))
    b = _all(ReinforcedDataset(url, epoch=3, image_size=S))
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))  # pixels too (exact resume)


def test_resampled_draws_shards_with_replacement(many_ds):
    url, _ = many_ds

    def run(epoch):
        ds = ReinforcedDataset(url, epoch=epoch, image_size=S, resampled=True, samples_per_epoch=60, shuffle_buffer=4)
        return _uids(_all(ds, batch_size=6))

    a = run(0)
    assert len(a) == 60 and len(set(a)) < 60  # more than the 40 samples: repeats
    assert a == run(0) and a != run(1)


def test_online_balancing(tmp_path):
    url = str(tmp_path / "bal")
    fx = make_fixture(url, 400, 2, dims=(4,), seed=9, n_aug=1, n_syn=0, n_neg=0, image_size=8, min_size=16,
                      max_size=16, balance_prob=lambda i: 1.0 if i % 10 == 0 else 0.5)
    always = {u for i, u in enumerate(fx["uids"]) if i % 10 == 0}

    def kept(epoch, seed=0):
        ds = ReinforcedDataset(url, epoch=epoch, seed=seed, image_size=8, online_balance=True)
        uids = set(_uids(_all(ds, batch_size=50)))
        assert ds.stats["balanced_out"] == 400 - len(uids)
        return uids

    e0, e1 = kept(0), kept(1)
    assert always <= e0 and always <= e1
    assert 150 < len(e0 - always) < 210 and 150 < len(e1 - always) < 210  # about half of 360
    assert kept(0) == e0 and e0 != e1 and kept(0, seed=1) != e0
    # without balancing every sample enters
    assert len(_uids(_all(ReinforcedDataset(url, image_size=8), batch_size=50))) == 400


def test_bad_samples_and_shards_are_skipped_and_counted(tmp_path, idx_ds):
    src, fx = idx_ds
    url = str(tmp_path / "bad")
    make_fixture(url, 24, 3, dims=(8, 8), seed=2, n_aug=4, n_syn=3, n_neg=2, encode_index=True, image_size=S)
    shards = list_shards(url)
    g = read_tar(open(shards[0], "rb").read())
    keys = list(g)
    del g[keys[0]]["jpg"]
    g[keys[1]]["jpg"] = b"not an image"
    g[keys[2]]["npz"] = npz_bytes({"image_emb": np.eye(4, 12, dtype=np.float32)})  # wrong width
    del g[keys[3]]["txt"]
    open(shards[0], "wb").write(write_tar(g.items()))
    data = open(shards[1], "rb").read()
    open(shards[1], "wb").write(data[: len(data) // 2])  # truncated
    n_before = len(list(iter_shard(shards[1])))
    for workers in (0, 2):
        ds = ReinforcedDataset(url, image_size=S, tokenizer=tok, use_teacher=True, shuffle_buffer=4)
        uids = _uids(_all(ds, batch_size=2, workers=workers))
        assert ds.stats == {"missing_jpg": 1, "bad_image": 1, "bad_emb_dim": 1, "missing_txt": 1,
                            "truncated_shard": 1}, workers
        assert len(uids) == 4 + n_before + 8  # the rest of shard 0, what shard 1 kept, all of shard 2
        assert set(fx["shards"]["00002.tar"]) <= set(uids)


def test_dim_mismatch_fails_at_construction(idx_ds):
    url, _ = idx_ds
    with pytest.raises(DataError, match=r"16-d \(teacher0:8, teacher1:8\).*expects 32-d"):
        ReinforcedDataset(url, use_teacher=True, expected_dim=32)
    ReinforcedDataset(url, use_teacher=True, expected_dim=16)


def test_empty_shard_list_names_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no shards.*empty"):
        ReinforcedDataset(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="nowhere"):
        ReinforcedDataset(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="no shards"):
        ReinforcedDataset([])


def _plain(tmp_path, n=12):
    d = tmp_path / "plain" / "shards"
    d.mkdir(parents=True)
    g = np.random.default_rng(0)
    groups = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(g.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)).save(buf, format="JPEG")
        groups.append((f"{i:09d}", {"jpg": buf.getvalue(), "txt": f"caption {i}".encode(), "json": b"{}"}))
    (d / "00000.tar").write_bytes(write_tar(groups[: n // 2]))
    (d / "00001.tar").write_bytes(write_tar(groups[n // 2:]))
    return d


def test_plain_img2dataset_shards(tmp_path):
    d = _plain(tmp_path)
    for url in (str(d), str(d.parent)):
        ds = ReinforcedDataset(url, image_size=S, tokenizer=tok, text_choice="uniform", online_balance=True,
                               hard_negatives=True, expected_dim=512)
        batches = _all(ds, batch_size=4)
        assert not ds.reinforced and len(_uids(batches)) == 12 and not ds.stats
        assert all(int(k) == -1 for b in batches for k in b["aug_index"])
        assert all(untok(t) == f"caption {int(u)}" for b in batches for t, u in zip(b["text"], b["uid"]))
        assert batches[0]["neg_text"].shape == (0, 64)
        again = _all(ReinforcedDataset(url, image_size=S, tokenizer=tok), batch_size=4)
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(batches, again))  # seeded crops
    with pytest.raises(DataError, match="plain shards"):
        ReinforcedDataset(str(d), use_teacher=True)


def test_plain_shards_with_bad_captions(tmp_path):
    """Captions as the web has them: not UTF-8 and blank ones are skipped and counted, a 1.5 MB
    one trains (truncated by the tokenizer), accented text is kept as written."""
    d = tmp_path / "captions" / "shards"
    d.mkdir(parents=True)
    caps = [b"ok one", b"\xff\xfe not utf-8", b"", b"  \n ", ("word " * 300_000).encode(), "caf\u00e9 ok".encode()]
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (200, 30, 30)).save(buf, format="JPEG")
    (d / "00000.tar").write_bytes(write_tar([(f"{i:09d}", {"jpg": buf.getvalue(), "txt": c})
                                             for i, c in enumerate(caps)]))
    ds = ReinforcedDataset(str(d), image_size=S, tokenizer=tok)
    batches = _all(ds, batch_size=2)
    assert sorted(_uids(batches)) == ["000000000", "000000004", "000000005"]
    assert ds.stats == {"bad_txt": 1, "empty_txt": 2}
    texts = {u: untok(t) for b in batches for u, t in zip(b["uid"], b["text"])}
    assert texts["000000005"] == "caf\u00e9 ok" and texts["000000004"].startswith("word word")


def test_open_clip_tokenizer_and_drop_last(idx_ds):
    import open_clip

    url, _ = idx_ds
    ds = ReinforcedDataset(url, image_size=S, tokenizer=open_clip.get_tokenizer("ViT-B-32"))
    batches = _all(ds, batch_size=5, drop_last=True)
    assert len(batches) == 4 and all(b["text"].shape == (5, 77) and b["text"].dtype == torch.long for b in batches)
    assert read_config(url).dim == 16


def test_fsspec_urls_and_short_shards():
    url = "memory://recap-test-data/ds"
    fx = make_fixture(url, 6, 2, dims=(4,), seed=0, image_size=S)
    shards = list_shards(url)
    assert shards == [f"memory:///recap-test-data/ds/shards/0000{k}.tar" for k in range(2)]
    for source in (url, shards, url + "/shards/{00000..00001}.tar"):
        ds = ReinforcedDataset(source, image_size=S, use_teacher=True, expected_dim=4)
        assert ds.reinforced and sorted(_uids(_all(ds))) == sorted(fx["uids"]) and not ds.stats
    # a sound tar holding fewer samples than sizes.json says: counted, the rest still read
    g = read_tar(open_bytes(shards[0]))
    import fsspec

    with fsspec.open(shards[0], "wb") as f:
        f.write(write_tar(list(g.items())[:-1]))
    ds = ReinforcedDataset(url, image_size=S)
    assert len(_uids(_all(ds))) == 5 and ds.stats == {"short_shard": 1}


def open_bytes(url):
    import fsspec

    with fsspec.open(url, "rb") as f:
        return f.read()


def test_resampled_over_only_bad_shards_ends(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "00000.tar").write_bytes(b"garbage" * 100)
    ds = ReinforcedDataset(str(d), image_size=S, resampled=True)
    assert _all(ds) == [] and ds.stats["resampled_no_data"] == 1 and ds.stats["truncated_shard"] >= 16


def _datacompdr_shard(path, n=4, n_aug=30, n_syn=5, dims=(768, 768), emb="npz", seed=0):
    """One shard laid out as DataCompDR-12M publishes its samples (joined with DataComp-12M's image
    and caption): url.txt, json {uid, sha256}, syn.json {syn_text: 5}, paug.json {param_aug: 30
    entries in the compressed layout, 224 px magnitudes}, npz {image_emb [30, 1536], text_emb
    [1 + 5, 1536]} (float32), or DataCompDR-1B's pth.gz (the same, bf16 torch tensors, gzipped)."""
    g = np.random.default_rng(seed)
    table = bin_magnitudes(224)
    groups, want = [], {}
    for k in range(n):
        w, h = (1000, 720) if k == 0 else (int(g.integers(60, 400)), int(g.integers(60, 400)))
        buf = io.BytesIO()
        Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=95)
        jpg = buf.getvalue()
        paug = list(DATACOMPDR_PARAMS) if k == 0 else []
        while len(paug) < n_aug:
            bh, bw = int(g.integers(1, h + 1)), int(g.integers(1, w + 1))
            ops = []
            for _ in range(2):
                idx = int(g.integers(len(OP_NAMES)))
                values, signed = table[OP_NAMES[idx]]
                m = values[9] if values else 0.0
                ops.append([idx, -m if signed and g.integers(2) else m])
            paug.append([[int(g.integers(0, h - bh + 1)), int(g.integers(0, w - bw + 1)), bh, bw], ops])

        def unit(rows):
            x = g.standard_normal((rows, sum(dims))).astype(np.float32)
            at = 0
            for d in dims:
                x[:, at:at + d] /= np.linalg.norm(x[:, at:at + d], axis=1, keepdims=True)
                at += d
            return x

        arrays = {"image_emb": unit(n_aug), "text_emb": unit(1 + n_syn)}
        if emb == "npz":
            member = npz_bytes(arrays)
        else:
            raw = io.BytesIO()
            torch.save({k2: torch.from_numpy(v).bfloat16() for k2, v in arrays.items()}, raw)
            member = gzip.compress(raw.getvalue())
            arrays = {k2: torch.from_numpy(v).bfloat16().float().numpy() for k2, v in arrays.items()}
        uid = hashlib.md5(f"{seed}/{k}".encode()).hexdigest()
        syn = [f"synthetic caption {c} of image {k}" for c in range(n_syn)]
        groups.append((uid, {"jpg": jpg, "txt": f"caption of image {k}".encode(), "url.txt": b"https://x.invalid/i.jpg",
                             "json": json.dumps({"uid": uid, "sha256": hashlib.sha256(jpg).hexdigest()}).encode(),
                             "syn.json": json.dumps({"syn_text": syn}).encode(),
                             "paug.json": json.dumps({"param_aug": paug}).encode(), emb: member}))
        want[uid] = {"jpg": jpg, "paug": paug, "texts": [f"caption of image {k}", *syn], **arrays}
    path.mkdir(parents=True)
    (path / "00000000.tar").write_bytes(write_tar(groups))
    return want


@pytest.mark.parametrize("emb", ["npz", "pth.gz"])
def test_datacompdr_sample_layout_trains(tmp_path, emb):
    root = tmp_path / "dr"
    want = _datacompdr_shard(root / "shards", emb=emb)
    config = ReinforcedConfig(teachers=[TeacherConfig(name="ViT-L-14", pretrained="openai", dim=768),
                                        TeacherConfig(name="ViT-L-14", pretrained="datacomp_xl_s13b_b90k", dim=768)],
                              aug=AugConfig(image_size=224, interpolation="bicubic", n_aug=30))
    assert config.reinforce == {"image_augmentation": DATACOMPDR_AUG}
    write_index(str(root), config, [])
    for epoch in range(2):
        ds = ReinforcedDataset(str(root), epoch=epoch, image_size=224, tokenizer=tok, text_choice="uniform",
                               use_teacher=True, expected_dim=1536)
        batches = _all(ds, batch_size=2)
        assert sorted(_uids(batches)) == sorted(want) and not ds.stats
        for b in batches:
            for r, uid in enumerate(b["uid"]):
                src, k, t = want[uid], int(b["aug_index"][r]), int(b["text_index"][r])
                img = Image.open(io.BytesIO(src["jpg"])).convert("RGB")
                ref = _norm(reference_replay(img, src["paug"][k], 224, "bicubic"))
                assert torch.allclose(b["image"][r], ref, atol=1e-5)
                np.testing.assert_array_equal(b["teacher_image"][r].numpy(), src["image_emb"][k])
                np.testing.assert_array_equal(b["teacher_text"][r].numpy(), src["text_emb"][t])
                assert untok(b["text"][r]) == src["texts"][t] and b["text_source"][r] == ("gt" if t == 0 else "syn")


def test_version_1_datasets_still_train(tmp_path, caplog):
    root = tmp_path / "v1"
    images = _v1_dataset(root, n=6, size=S)
    aug = json.loads((root / "config.json").read_text())["aug"]
    with caplog.at_level(logging.WARNING, logger="recap.pipeline.reinforced"):
        for epoch in range(3):
            ds = ReinforcedDataset(str(root), epoch=epoch, image_size=S, use_teacher=True, tokenizer=tok)
            batches = _all(ds, batch_size=3, workers=2 if epoch == 2 else 0)
            assert sorted(_uids(batches)) == sorted(images) and not ds.stats
            for b in batches:
                for r, uid in enumerate(b["uid"]):
                    img, paug = images[uid]
                    k = int(b["aug_index"][r])
                    assert torch.allclose(b["image"][r], _norm(v1_reference(img.convert("RGB"), paug[k], aug)),
                                          atol=1e-5)
                    assert int(b["teacher_image"][r].argmax()) == k
    assert len([r for r in caplog.records if "version 1" in r.getMessage()]) == 1
