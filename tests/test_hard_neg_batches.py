"""Image hard negatives: a sample's kNN neighbours (neg.hard_neg_uids) land in its batch."""
from collections import Counter

import pytest

from recap.pipeline.reinforced import ReinforcedWriter
from recap.pipeline.reinforced.testing import make_fixture
from recap.trainer.data import ReinforcedDataset, make_loader


@pytest.fixture(scope="module")
def knn(tmp_path_factory):
    """60 samples in 3 shards; sample i's neighbours are i+7 and i+13 (mod 60), nearest first."""
    base = tmp_path_factory.mktemp("knn")
    fx = make_fixture(str(base / "fx"), n_samples=60, n_shards=1, dims=(), seed=5, n_aug=1, n_syn=0, n_neg=0)
    uids = fx["uids"]
    samples = []
    for i, u in enumerate(uids):
        s = dict(fx["samples"][u])
        s["neg"] = {"neg_text_short": [], "hard_neg_uids": [uids[(i + 7) % 60], uids[(i + 13) % 60], "not-a-uid"],
                    "hard_neg_sims": [0.9, 0.8, 0.7]}
        samples.append(s)
    with ReinforcedWriter(str(base / "ds"), fx["config"]) as w:
        for k in range(3):
            w.write_shard(k, samples[k * 20:(k + 1) * 20])
    return base / "ds", uids


def _batches(ds_path, k, epoch=0, buffer=100, workers=0):
    ds = ReinforcedDataset(str(ds_path), epoch=epoch, seed=1, image_size=32, image_hard_negatives=k,
                           shuffle_buffer=buffer)
    return [b["uid"] for b in make_loader(ds, 6, workers, drop_last=False)], ds


def test_neighbours_share_the_batch(knn):
    path, uids = knn
    nxt = {u: {uids[(i + 7) % 60], uids[(i + 13) % 60]} for i, u in enumerate(uids)}
    with_nb, ds = _batches(path, 1)
    without, _ = _batches(path, 0)

    def together(batches):  # anchors whose first neighbour sits in the same batch
        return sum(1 for b in batches for u in b if uids[(uids.index(u) + 7) % 60] in b)

    # every sample once per epoch, whatever the pulling
    for batches in (with_nb, without):
        assert Counter(u for b in batches for u in b) == Counter(uids)
    assert ds.stats["hard_neg_pulled"] > 15 and ds.stats["hard_neg_not_in_buffer"] > 0
    assert together(with_nb) >= 2 * together(without) + 10
    # a pulled sample directly follows its anchor, and is one of the anchor's neighbours
    flat = [u for b in with_nb for u in b]
    assert sum(1 for a, b in zip(flat, flat[1:]) if b in nxt[a]) >= ds.stats["hard_neg_pulled"]
    # deterministic for (seed, epoch); another epoch, another order
    assert _batches(path, 1)[0] == with_nb
    assert _batches(path, 1, epoch=1)[0] != with_nb


def test_two_neighbours_and_workers(knn):
    path, uids = knn
    batches, ds = _batches(path, 2, buffer=8, workers=2)
    assert Counter(u for b in batches for u in b) == Counter(uids)
    assert _batches(path, 2, buffer=8, workers=2)[0] == batches


def test_long_negatives_ride_along(tmp_path):
    fx = make_fixture(str(tmp_path / "ds"), n_samples=6, n_shards=1, dims=(), seed=3, n_aug=1, n_syn=1, n_neg=2)
    short = ReinforcedDataset(str(tmp_path / "ds"), image_size=32, hard_negatives=True)
    both = ReinforcedDataset(str(tmp_path / "ds"), image_size=32, hard_negatives=True, long_negatives=True)
    a = {s["uid"]: s for s in short.iter_samples(Counter())}
    b = {s["uid"]: s for s in both.iter_samples(Counter())}
    assert a.keys() == b.keys() == set(fx["uids"])
    for uid, s in b.items():
        neg = fx["samples"][uid]["neg"]
        assert len(a[uid]["neg_text"]) == 1 and s["neg_text"][0] == a[uid]["neg_text"][0]
        k = neg["neg_text_short"].index(s["neg_text"][0])
        assert s["neg_text"][1:] == [neg["neg_text_long"][k]]  # the long form of the same negative


def test_distill_kl_sees_the_teachers_negatives(tmp_path):
    """With stored neg_text_emb, the distillation KL covers the negative columns too (same rows as
    the student's negatives); with long negatives (no teacher rows) only the CLIP term sees them."""
    import torch
    import yaml

    from recap.trainer.config import load_train_config
    from recap.trainer.data import collate
    from recap.trainer.losses import DistillClipLoss
    from recap.trainer.models import create_model
    from recap.trainer.step import compute_loss

    make_fixture(str(tmp_path / "ds"), n_samples=8, n_shards=1, dims=(16,), seed=3, n_aug=1, n_syn=1, n_neg=2)
    model, _, _, tok = create_model("recap-tiny", output_dict=True)
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({
        "name": "n", "output": str(tmp_path / "run"), "steps": 1, "data": {"path": str(tmp_path / "ds")},
        "loss": {"kind": "distill", "hard_negatives": True, "lambda_distill": 1.0}}))
    cfg = load_train_config(tmp_path / "t.yaml")
    ds = ReinforcedDataset(str(tmp_path / "ds"), image_size=64, tokenizer=tok, use_teacher=True, hard_negatives=True)
    batch = collate(list(ds.iter_samples(Counter())))
    assert batch["teacher_neg_text"].shape[0] == batch["neg_text"].shape[0] == 8
    loss_fn = DistillClipLoss(lambda_distill=1.0)
    torch.manual_seed(0)
    with torch.no_grad():
        _, terms = compute_loss(model, loss_fn, batch, cfg)
        out = model(batch["image"], torch.cat([batch["text"], batch["neg_text"]]))
        args = (out["image_features"], out["text_features"][:8], out["logit_scale"])
        kw = dict(teacher_image_features=batch["teacher_image"], teacher_text_features=batch["teacher_text"],
                  negative_text_features=out["text_features"][8:], output_dict=True)
        want = loss_fn(*args, teacher_negative_text_features=batch["teacher_neg_text"], **kw)
        without = loss_fn(*args, **kw)
    assert torch.allclose(terms["distill_loss"], want["distill_loss"], rtol=1e-5)
    assert not torch.allclose(want["distill_loss"], without["distill_loss"], rtol=1e-3)


def test_several_negatives_per_sample(tmp_path):
    """negatives_per_sample draws that many distinct stored negatives per sample and epoch; the
    first is the single-negative draw, the teacher rows follow the same choice, and the collated
    batch's neg_index points each column at its sample."""
    import numpy as np

    from recap.trainer.data import collate

    fx = make_fixture(str(tmp_path / "ds"), n_samples=12, n_shards=1, dims=(8,), seed=4, n_aug=1, n_syn=0, n_neg=5)

    def draw(n, epoch=0, teacher=False):
        ds = ReinforcedDataset(str(tmp_path / "ds"), image_size=32, hard_negatives=True, epoch=epoch,
                               negatives_per_sample=n, use_teacher=teacher)
        return {s["uid"]: s for s in ds.iter_samples(Counter())}

    one, three, many = draw(1), draw(3), draw(9)
    for uid, s in three.items():
        stored = fx["samples"][uid]["neg"]["neg_text_short"]
        assert len(s["neg_text"]) == 3 and len(set(s["neg_text"])) == 3 and set(s["neg_text"]) <= set(stored)
        assert s["neg_text"][0] == one[uid]["neg_text"][0]
        assert sorted(many[uid]["neg_text"]) == sorted(stored)  # more asked than stored: all of them
    again = draw(3)
    assert all(again[u]["neg_text"] == three[u]["neg_text"] for u in three)
    other = draw(3, epoch=1)
    assert any(other[u]["neg_text"] != three[u]["neg_text"] for u in three)

    with_teacher = draw(3, teacher=True)
    for uid, s in with_teacher.items():
        stored = fx["samples"][uid]
        rows = [stored["neg"]["neg_text_short"].index(t) for t in s["neg_text"]]
        np.testing.assert_allclose(s["teacher_neg_text"].numpy(), np.asarray(stored["neg_text_emb"])[rows], rtol=1e-6)
    batch = collate([with_teacher[u] for u in sorted(with_teacher)][:4])
    assert batch["neg_index"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert batch["teacher_neg_text"].shape == (12, 8)
    with pytest.raises(ValueError, match="negatives_per_sample"):
        ReinforcedDataset(str(tmp_path / "ds"), image_size=32, negatives_per_sample=0)
