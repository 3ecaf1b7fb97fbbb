"""HQ-CLIP's short-tag loss through the training loop: vocabulary from the data (or a file), the
head learns, checkpoints keep it outside open_clip's state_dict, and resume stays exact."""
import io
import json
import tarfile

import pytest
import torch
import yaml

from recap.pipeline.reinforced import ReinforcedWriter
from recap.trainer.config import load_train_config
from recap.trainer.tags import TagVocabError, build_tag_vocab, load_tag_vocab, tag_ids
from recap.trainer.train import train


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    """The demo world's clean split as reinforced shards whose syn.json carries short tags: the colour
    and background colour (positive), another colour (negative), plus a rare tag and junk to ignore."""
    from recap.world.generate import generate_world
    from recap.world.scenes import COLOURS

    base = tmp_path_factory.mktemp("tagged")
    generate_world(base / "w", samples=20, heldout=240, seed=3, port=8765)
    groups: dict[str, dict] = {}
    with tarfile.open(base / "w/heldout/shards/00000.tar") as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            groups.setdefault(key, {})[ext] = tf.extractfile(m).read()
    rows = []
    for i, key in enumerate(sorted(groups)):
        g = groups[key]
        scene = json.loads(g["json"])["scene"]
        colour = scene["objects"][0]["colour"]
        others = sorted({c for c in COLOURS if c != colour})
        pos = [colour, scene["background"] + " background"] + (["rare tag"] if i == 0 else [])
        rows.append({"uid": f"s{key}", "jpg": g["jpg"], "txt": g["txt"].decode(),
                     "syn": {"syn_text": [], "short_positive": pos + [7, ""],
                             "short_negative": [others[i % len(others)], colour]}})
    with ReinforcedWriter(str(base / "ds"), {}) as w:
        w.write_shard(0, rows[:120])
        w.write_shard(1, rows[120:])
    return base / "ds"


def _cfg(tmp_path, data, **over):
    raw = {"name": "tags", "seed": 0, "output": str(tmp_path / "run"), "steps": 8, "log_every": 1, "threads": 1,
           "tensorboard": False, "data": {"path": str(data), "batch_size": 24},
           "model": {"name": "recap-tiny"}, "optim": {"lr": 3e-3, "warmup": 1},
           "loss": {"kind": "clip", "short_tags": {"weight": 1.0, "min_count": 2}}}
    raw.update(over)
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(raw))
    return load_train_config(tmp_path / "t.yaml")


def test_vocab_and_ids(tagged, tmp_path):
    from recap.pipeline.reinforced import list_shards

    vocab = build_tag_vocab(list_shards(str(tagged)), max_tags=100, min_count=2)
    assert "rare tag" not in vocab and "7" not in vocab and "" not in vocab  # under min_count; not tags
    assert "red" in vocab and any(t.endswith(" background") for t in vocab)
    assert build_tag_vocab(list_shards(str(tagged)), max_tags=3, min_count=1) == vocab[:3]
    index = {t: i for i, t in enumerate(vocab)}
    # a tag that is both positive and negative counts as positive; unknown tags are left out
    assert tag_ids({"short_positive": ["red", "nope"], "short_negative": ["red", "blue"]}, index) == \
        ([index["red"]], [index["blue"]])
    assert tag_ids(None, index) == ([], [])
    for text, says in [("{}", "JSON list"), ('["a", "a"]', "more than once"), ('["a", 3]', "item 1"), ("[", "not JSON")]:
        (tmp_path / "v.json").write_text(text)
        with pytest.raises(TagVocabError, match=says):
            load_tag_vocab(str(tmp_path / "v.json"))


def test_head_learns_and_resume_is_exact(tagged, tmp_path):
    cfg = _cfg(tmp_path / "a", tagged)
    summary = train(cfg)
    rows = [dict(zip(*[r.split(",") for r in (lines[0], line)]))
            for lines in [(tmp_path / "a/run/metrics.csv").read_text().splitlines()] for line in lines[1:]]
    tag = [float(r["short_tag_loss"]) for r in rows]
    assert len(tag) == 8 and all(0 < x < 10 for x in tag)
    # the head learns (BCE starts at ln 2 = 0.693 for an untrained head)
    assert abs(tag[0] - 0.693) < 0.05 and sum(tag[-3:]) / 3 < 0.9 * sum(tag[:3]) / 3 and tag[-1] < 0.62, tag
    assert summary["step"] == 8
    vocab = json.loads((tmp_path / "a/run/tag_vocab.json").read_text())
    ckpt = torch.load(tmp_path / "a/run/checkpoints/step_8.pt", map_location="cpu", weights_only=False)
    assert ckpt["heads"]["short_tags"]["head.weight"].shape[0] == len(vocab) > 10
    assert not any("head" in k and "short" in k for k in ckpt["state_dict"])  # open_clip's state_dict untouched

    part = _cfg(tmp_path / "b", tagged)
    train(part, stop_after=3)
    train(part, resume="latest")
    other = torch.load(tmp_path / "b/run/checkpoints/step_8.pt", map_location="cpu", weights_only=False)
    assert all(torch.equal(ckpt["state_dict"][k], other["state_dict"][k]) for k in ckpt["state_dict"])
    assert all(torch.equal(ckpt["heads"]["short_tags"][k], other["heads"]["short_tags"][k])
               for k in ckpt["heads"]["short_tags"])


def test_vocab_file_and_no_tags_in_data(tagged, tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps(["red", "blue"]))
    cfg = _cfg(tmp_path / "c", tagged, steps=2,
               loss={"kind": "clip", "short_tags": {"vocab": str(tmp_path / "vocab.json")}})
    train(cfg)
    ckpt = torch.load(tmp_path / "c/run/checkpoints/step_2.pt", map_location="cpu", weights_only=False)
    assert ckpt["heads"]["short_tags"]["head.weight"].shape[0] == 2
    # plain shards have no syn.json: asking for the tag loss on them is an error before step 1
    plain = tmp_path / "plain"
    plain.mkdir()
    with tarfile.open(plain / "00000.tar", "w") as tf:
        with tarfile.open(tagged / "shards/00000.tar") as src:
            for m in src.getmembers():
                if m.name.endswith((".jpg", ".txt")):
                    tf.addfile(m, io.BytesIO(src.extractfile(m).read()))
    with pytest.raises(TagVocabError, match="short_positive"):
        train(_cfg(tmp_path / "d", plain, steps=2))


def test_two_ranks_train_the_head(tagged, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    cfg = _cfg(tmp_path, tagged, steps=3)
    raw = yaml.safe_load((tmp_path / "t.yaml").read_text())
    raw["data"]["batch_size"] = 8
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(raw))
    assert cfg.loss.short_tags is not None
    r = subprocess.run([sys.executable, "-m", "recap.cli", "train", str(tmp_path / "t.yaml"), "--nproc", "2"],
                       cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["world_size"] == 2 and out["step"] == 3 and 0 < out["short_tag_loss"] < 1
    ckpt = torch.load(tmp_path / "run/checkpoints/step_3.pt", map_location="cpu", weights_only=False)
    assert torch.isfinite(ckpt["heads"]["short_tags"]["head.weight"]).all()


def test_cnn_tower_trains_the_head(tagged, tmp_path):
    """A timm image tower (no ``visual.output_dim``) gets its head sized from the model."""
    summary = train(_cfg(tmp_path, tagged, steps=2, model={"name": "recap-tiny-cnn"}))
    assert summary["step"] == 2 and 0 < summary["short_tag_loss"] < 1
    ckpt = torch.load(tmp_path / "run/checkpoints/step_2.pt", map_location="cpu", weights_only=False)
    assert ckpt["heads"]["short_tags"]["head.weight"].shape[1] == 128
