"""trainer.generate: greedy and beam-search captions from a CoCa without transformers. Decoding
step by step must agree with one teacher-forced forward, not depend on the batch, respect the
length bounds, and, after a short training run on the demo world, speak the world's language."""
from __future__ import annotations

import io
import re
import tarfile

import pytest
import torch
import yaml
from PIL import Image

from recap.trainer.generate import EOT, PAD, SOT, decode, generate
from recap.trainer.models import create_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def coca():
    torch.manual_seed(0)
    model, _, _, _ = create_model("recap-tiny-coca")
    return model


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_greedy_agrees_with_teacher_forcing_and_the_batch(coca):
    x = _images(4)
    tokens = generate(coca, x, max_len=12, min_len=3)
    assert tokens.shape[0] == 4 and tokens.shape[1] <= 12 and (tokens[:, 0] == SOT).all()
    with torch.no_grad():
        logits = coca(x, tokens[:, :-1], output_labels=False)["logits"]
    for i, row in enumerate(tokens.tolist()):
        end = row.index(EOT) if EOT in row else len(row) - 1
        assert end >= 3 or end == len(row) - 1  # no end token before min_len
        for t in range(1, end):
            step = logits[i, t - 1].clone()
            if t < 3:
                step[EOT] = float("-inf")
            assert int(step.argmax()) == row[t], (i, t)
        assert all(tok == PAD for tok in row[end + 1:])
    # one image alone decodes exactly as it did in the batch
    for i in range(4):
        alone = generate(coca, x[i:i + 1], max_len=12, min_len=3)[0].tolist()
        assert decode(torch.tensor([alone])) == decode(tokens[i:i + 1])
    assert coca.training  # restored


def test_beam_search_bounds_and_batch_independence(coca):
    x = _images(3, seed=1)
    beams = generate(coca, x, max_len=10, min_len=4, num_beams=3)
    assert beams.shape[1] <= 10 and (beams[:, 0] == SOT).all()
    for i, row in enumerate(beams.tolist()):
        assert EOT in row and row.index(EOT) >= 4
        alone = generate(coca, x[i:i + 1], max_len=10, min_len=4, num_beams=3)
        assert decode(alone) == decode(beams[i:i + 1])
    # raw sums (no length penalty) with 3 beams find a caption at least as likely as greedy's
    greedy = generate(coca, x, max_len=10, min_len=4)
    best = generate(coca, x, max_len=10, min_len=4, num_beams=3, length_penalty=0.0)

    def logprob(tokens):
        with torch.no_grad():
            lp = torch.log_softmax(coca(x, tokens[:, :-1], output_labels=False)["logits"].float(), -1)
        total = []
        for i, row in enumerate(tokens.tolist()):
            end = row.index(EOT)
            total.append(sum(float(lp[i, t - 1, row[t]]) for t in range(1, end + 1)))
        return torch.tensor(total)

    assert (logprob(best) >= logprob(greedy) - 1e-4).all()


def test_not_a_captioner_or_bad_lengths():
    clip, *_ = create_model("recap-tiny")
    with pytest.raises(ValueError, match="CoCa"):
        generate(clip, _images(1))
    coca, *_ = create_model("recap-tiny-coca")
    with pytest.raises(ValueError, match="min_len"):
        generate(coca, _images(1), max_len=5, min_len=5)


def test_a_briefly_trained_captioner_speaks_the_worlds_language(tmp_path):
    """30 CoCa steps on the demo world: greedy and beam captions of another world's images use
    the world's caption words; the untrained model's do not."""
    from recap.trainer.config import load_train_config
    from recap.trainer.train import train
    from recap.world.generate import generate_world

    generate_world(tmp_path / "train", samples=20, heldout=480, seed=1, port=8765)
    generate_world(tmp_path / "eval", samples=20, heldout=8, seed=2, port=8765)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "name": "cap", "seed": 0, "output": str(tmp_path / "run"), "steps": 30, "log_every": 10, "threads": 2,
        "tensorboard": False, "data": {"path": str(tmp_path / "train/heldout/shards"), "batch_size": 16},
        "model": {"name": "recap-tiny-coca"}, "loss": {"kind": "coca"}, "optim": {"lr": 2e-3, "warmup": 5}}))
    train(load_train_config(tmp_path / "c.yaml"))
    model, _, pre, _ = create_model("recap-tiny-coca", pretrained=str(tmp_path / "run/checkpoints/step_30.pt"))
    words, images = set(), []
    with tarfile.open(tmp_path / "train/heldout/shards/00000.tar") as tf:
        for m in tf.getmembers():
            if m.name.endswith(".txt"):
                words |= set(re.findall(r"[a-z]+", tf.extractfile(m).read().decode().lower()))
    with tarfile.open(tmp_path / "eval/heldout/shards/00000.tar") as tf:
        for m in tf.getmembers():
            if m.name.endswith(".jpg"):
                images.append(pre(Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")))
    x = torch.stack(images)

    def known(captions: list[str]) -> float:
        found = [w for c in captions for w in re.findall(r"\S+", c.lower())]
        return sum(w.strip(".,:") in words for w in found) / max(1, len(found))

    greedy, beams = decode(generate(model, x)), decode(generate(model, x, num_beams=3))
    assert all(greedy) and all(beams)
    assert known(greedy) > 0.9 and known(beams) > 0.9, (greedy, beams)
    torch.manual_seed(0)
    untrained, *_ = create_model("recap-tiny-coca")
    assert known(decode(generate(untrained, x))) < 0.5
