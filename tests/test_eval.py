"""trainer.eval on the demo world's held-out split: valid, near-chance numbers for an untrained model;
exactly 1.0 for an oracle (the metric code is right); chance for a model that sees nothing (ties);
damaged samples and shards skipped and counted; ``recap eval``."""
from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from recap.trainer.checkpoint import save_checkpoint
from recap.trainer.eval import eval_cli, evaluate, flatten, format_table, retrieval_metrics
from recap.trainer.models import create_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    from recap.world.generate import generate_world

    out = tmp_path_factory.mktemp("world") / "w"
    generate_world(out, samples=50, heldout=60, seed=0, port=8765)
    return out / "heldout"


def _samples(data: Path) -> list[dict]:
    """key → {image bytes, caption, label, meta} straight from the tars."""
    groups: dict[str, dict] = {}
    for shard in sorted((data / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                groups.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return [{"key": k, "image": g["jpg"], "caption": g["txt"].decode(), "label": int(g["cls"]),
             "meta": json.loads(g["json"])} for k, g in sorted(groups.items())]


def _pixels_hash(img: Image.Image) -> str:
    return hashlib.sha256(img.convert("RGB").tobytes()).hexdigest()


class Oracle(torch.nn.Module):
    """Knows every sample: ``preprocess`` turns an image into its sample index (by pixel hash), the
    tokenizer turns a text into an index into a text table. Embeddings: one-hot of the class (from
    the sample's label for its caption and image, from the class word for a prompt) plus a small
    text-specific direction, so an image equals exactly its own caption's embedding."""

    def __init__(self, samples: list[dict], classnames: list[str], image_text: str = "caption"):
        super().__init__()
        self.samples, self.classnames = samples, classnames
        self.by_pixels = {_pixels_hash(Image.open(io.BytesIO(s["image"]))): i for i, s in enumerate(samples)}
        self.label_of_text = {s["caption"]: s["label"] for s in samples}
        self.texts: list[str] = []
        self.image_text = image_text  # "caption", or "neg" for an anti-oracle that sees the negative
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        return torch.tensor([float(self.by_pixels[_pixels_hash(img)])])

    def tokenizer(self, texts: list[str]) -> torch.Tensor:
        ids = []
        for t in texts:
            self.texts.append(t)
            ids.append(len(self.texts) - 1)
        return torch.tensor(ids)

    def _embed(self, text: str, label: int | None) -> torch.Tensor:
        if label is None:
            label = self.label_of_text.get(text)
        if label is None:  # a prompt: its single class word
            words = set(text.lower().replace(".", " ").split())
            found = [i for i, c in enumerate(self.classnames) if c in words]
            label = found[0] if len(found) == 1 else -1
        onehot = torch.zeros(len(self.classnames))
        if label >= 0:
            onehot[label] = 1.0
        g = torch.Generator().manual_seed(int(hashlib.sha256(text.encode()).hexdigest()[:12], 16))
        return F.normalize(torch.cat([onehot, 0.1 * F.normalize(torch.randn(64, generator=g), dim=0)]), dim=0)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for i in x[:, 0].long().tolist():
            s = self.samples[i]
            if self.image_text == "caption":
                out.append(self._embed(s["caption"], s["label"]))
            else:  # exactly what the negative caption embeds to
                out.append(self._embed(s["meta"]["neg_caption"], None))
        return torch.stack(out)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.stack([self._embed(self.texts[i], None) for i in ids.tolist()])


class Blind(torch.nn.Module):
    """Every image and every text embeds to the same vector: all scores tie."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def encode_image(self, x):
        return torch.ones(x.shape[0], 8)

    def encode_text(self, ids):
        return torch.ones(ids.shape[0], 8)


def _check_valid(result: dict) -> None:
    for k, v in flatten(result).items():
        assert 0.0 <= v <= 1.0, (k, v)


def test_untrained_tiny_model_near_chance(heldout):
    model, _, preprocess, tok = create_model("recap-tiny")
    model.train()
    r = evaluate(model, preprocess, tok, str(heldout), batch_size=16)
    assert model.training  # mode restored
    assert r["n"] == 60 and r["skipped"] == {}
    _check_valid(r)
    zs, rt, cp = r["zeroshot"], r["retrieval"], r["compositional"]
    assert zs["n_classes"] == 14 and zs["chance_top1"] == pytest.approx(1 / 14) and zs["chance_top5"] == pytest.approx(5 / 14)
    assert rt["chance"] == {"R@1": pytest.approx(1 / 60), "R@5": pytest.approx(5 / 60), "R@10": pytest.approx(10 / 60)}
    assert cp["chance"] == 0.5 and cp["n"] == 60 and sum(v["n"] for v in cp["by_type"].values()) == 60
    assert set(cp["by_type"]) <= {"swap_colour", "replace_colour", "replace_shape"}
    # near chance (60 samples: generous bounds)
    assert zs["top1"] < 0.35 and zs["top5"] < 0.8
    assert rt["image_to_text"]["R@1"] < 0.2 and rt["text_to_image"]["R@1"] < 0.2
    assert 0.2 < cp["accuracy"] < 0.8
    assert "zero-shot top-1" in format_table(r)


def test_oracle_scores_one(heldout):
    samples = _samples(heldout)
    classnames = (heldout / "classnames.txt").read_text().split()
    oracle = Oracle(samples, classnames)
    r = evaluate(oracle, oracle.preprocess, oracle.tokenizer, str(heldout), batch_size=7)
    assert r["n"] == 60 and r["skipped"] == {}
    assert r["zeroshot"]["top1"] == 1.0 and r["zeroshot"]["top5"] == 1.0
    assert all(v == 1.0 for v in r["zeroshot"]["per_class_top1"].values())
    for d in ("image_to_text", "text_to_image"):
        assert r["retrieval"][d] == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0}
    assert r["compositional"]["accuracy"] == 1.0
    assert all(v["accuracy"] == 1.0 for v in r["compositional"]["by_type"].values())

    # an image that "looks like" its negative caption: the compositional test must fail every time
    anti = Oracle(samples, classnames, image_text="neg")
    r = evaluate(anti, anti.preprocess, anti.tokenizer, str(heldout), tasks=("compositional", "retrieval"))
    assert r["compositional"]["accuracy"] == 0.0 and "zeroshot" not in r
    assert r["retrieval"]["image_to_text"]["R@1"] < 0.5


class Watched(torch.nn.Module):
    """A real model whose encoders note the autocast state they run under."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, set()

    def _note(self, what):
        self.seen.add((what, torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")))

    def encode_image(self, x):
        self._note("image")
        return self.model.encode_image(x)

    def encode_text(self, ids):
        self._note("text")
        return self.model.encode_text(ids)


def test_precision_autocasts_the_encoders(heldout):
    torch.manual_seed(0)
    model, _, preprocess, tok = create_model("recap-tiny")
    results = {}
    for precision, dtype in (("fp32", False), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        watched = Watched(model)
        results[precision] = evaluate(watched, preprocess, tok, str(heldout), batch_size=32, precision=precision)
        assert watched.seen == {("image", dtype), ("text", dtype)}, precision
    for precision in ("bf16", "fp16"):  # the same numbers up to half-precision features
        a, b = flatten(results["fp32"]), flatten(results[precision])
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 0.1 for k in a), (precision, a, b)
    with pytest.raises(ValueError, match="precision 'int8'"):
        evaluate(model, preprocess, tok, str(heldout), precision="int8")


def test_all_ties_score_exactly_chance(heldout):
    blind = Blind()
    tok = lambda texts: torch.zeros(len(texts), 1)  # noqa: E731
    _, _, preprocess, _ = create_model("recap-tiny")
    r = evaluate(blind, preprocess, tok, str(heldout))
    assert r["zeroshot"]["top1"] == pytest.approx(1 / 14) and r["zeroshot"]["top5"] == pytest.approx(5 / 14)
    # the only exact-duplicate captions are positives of each other; otherwise exactly k/n
    assert len({s["caption"] for s in _samples(heldout)}) == 60
    assert r["retrieval"]["image_to_text"]["R@1"] == pytest.approx(1 / 60)
    assert r["retrieval"]["text_to_image"]["R@10"] == pytest.approx(10 / 60)
    assert r["compositional"]["accuracy"] == 0.5


def test_retrieval_identical_captions_are_positives_and_ties_are_shared():
    img = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    txt = img.clone()
    r = retrieval_metrics(img, txt, ["a cat", "a cat", "a dog"], ks=(1, 2))
    assert r["image_to_text"] == {"R@1": 1.0, "R@2": 1.0} and r["text_to_image"]["R@1"] == 1.0
    r = retrieval_metrics(img, txt, ["a cat", "another cat", "a dog"], ks=(1, 2))
    # images 0 and 1 each tie with one other text: a coin flip at R@1, certain at R@2
    assert r["image_to_text"]["R@1"] == pytest.approx((0.5 + 0.5 + 1) / 3) and r["image_to_text"]["R@2"] == 1.0


def _rewrite_tar(src: Path, dst: Path, edit) -> None:
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.USTAR_FORMAT) as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            data = edit(m.name, data)
            if data is None:
                continue
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


def test_damaged_members_and_shards_are_skipped_and_counted(heldout, tmp_path):
    data = tmp_path / "damaged"
    shutil.copytree(heldout, data)
    src = heldout / "shards" / "00000.tar"
    keys = sorted({n.split(".")[0] for n in tarfile.open(src).getnames()})

    def edit(name, payload):
        key, ext = name.split(".", 1)
        if key == keys[3] and ext == "jpg":
            return b"\xff\xd8 this is not a jpeg"
        if key == keys[7] and ext == "txt":
            return None  # missing caption
        if key == keys[9] and ext == "json":
            return b"{not json"
        if key == keys[11] and ext == "cls":
            return b"seven"
        if key == keys[13] and ext == "jpg":
            return None  # missing image
        return payload

    _rewrite_tar(src, data / "shards" / "00000.tar", edit)
    # a second shard cut off in the middle of a member: what came before it still counts
    whole = src.read_bytes()
    (data / "shards" / "00001.tar").write_bytes(whole[: len(whole) // 3])
    _, _, preprocess, tok = create_model("recap-tiny")
    model, *_ = create_model("recap-tiny")
    r = evaluate(model, preprocess, tok, str(data))
    skipped = r["skipped"]
    assert skipped["bad_image"] == 1 and skipped["missing_caption"] == 1 and skipped["missing_image"] == 1
    assert skipped["bad_json"] == 1 and skipped["bad_label"] == 1 and skipped["truncated_shard"] == 1
    first = 60 - 3  # bad image, missing caption, missing image
    assert first < r["n"] < first + 60 // 3 + 1
    assert r["zeroshot"]["n"] == r["n"] - 1  # the sample with a bad label leaves zero-shot only
    assert r["compositional"]["n"] == r["n"] - 1  # the sample with broken json has no negative
    _check_valid(r)


def test_further_label_sets(heldout, tmp_path):
    """label_sets/NAME/: labels read from each sample's json ``labels``, scored like the main one
    (an oracle: 1.0 where the labels are the truth, 0.0 where they are shifted by one class);
    missing labels leave only that set, bad ones are counted, a folder without class names is
    reported as skipped."""
    data = tmp_path / "sets"
    shutil.copytree(heldout, data)
    shutil.rmtree(data / "label_sets")
    shapes = (heldout / "classnames.txt").read_text()
    for name in ("same", "shifted", "partial"):
        (data / "label_sets" / name).mkdir(parents=True)
        (data / "label_sets" / name / "classnames.txt").write_text(shapes)
    (data / "label_sets" / "nonames").mkdir()
    keys = sorted({n.split(".")[0] for n in tarfile.open(heldout / "shards" / "00000.tar").getnames()})
    odd = {keys[1]: "x", keys[2]: True, keys[3]: 99}  # bad, bad (a bool is no label), out of range
    cls = {}

    def edit(name, payload):
        key, ext = name.split(".", 1)
        if ext == "cls":
            cls[key] = int(payload)
        if ext != "json":
            return payload
        meta = json.loads(payload)
        labels = {"same": cls[key], "shifted": (cls[key] + 1) % 14}
        if keys.index(key) % 2 == 0 or key in odd:
            labels["partial"] = odd.get(key, cls[key])
        meta["labels"] = labels
        return json.dumps(meta).encode()

    _rewrite_tar(heldout / "shards" / "00000.tar", data / "shards" / "00000.tar", edit)
    oracle = Oracle(_samples(heldout), shapes.split())
    r = evaluate(oracle, oracle.preprocess, oracle.tokenizer, str(data))
    sets = r["zeroshot_label_sets"]
    assert list(sets) == ["nonames", "partial", "same", "shifted"]
    assert sets["same"]["top1"] == r["zeroshot"]["top1"] == 1.0 and sets["same"]["n"] == 60
    assert sets["shifted"]["top1"] == 0.0 and sets["shifted"]["n"] == 60
    assert sets["partial"]["top1"] == 1.0 and sets["partial"]["n"] == 30 - 1  # keys[2] is even: bool
    assert r["skipped"] == {"bad_label[partial]": 2, "label_out_of_range[partial]": 1}
    assert sets["nonames"] == {"skipped": "no classnames.txt"}
    assert flatten(r)["zeroshot/same/top1"] == 1.0 and flatten(r)["zeroshot/shifted/top1"] == 0.0
    table = format_table(r)
    assert "zero-shot top-1, shifted (14 classes)" in table and "zero-shot, nonames" in table

    # a label set with its own prompts: the oracle reads no plural, so that set falls to about chance
    (data / "label_sets" / "same" / "templates.txt").write_text("a photo of {}s.\n")
    r = evaluate(oracle, oracle.preprocess, oracle.tokenizer, str(data), tasks=("zeroshot",))
    assert r["zeroshot"]["top1"] == 1.0 and r["zeroshot_label_sets"]["same"]["top1"] < 0.4


def _as_class_folders(heldout: Path, dst: Path) -> dict[str, str]:
    """The held-out split rewritten as class folders (dst/<shape>/<key>.jpg); key -> class name."""
    classes = (heldout / "classnames.txt").read_text().split()
    where = {}
    for s in _samples(heldout):
        name = classes[s["label"]]
        (dst / name).mkdir(parents=True, exist_ok=True)
        (dst / name / f"{s['key']}.jpg").write_bytes(s["image"])
        where[s["key"]] = name
    return where


def test_class_folders_give_the_same_zero_shot(heldout, tmp_path):
    """torchvision's ImageFolder layout: labels from the sorted folder names, prompts from the
    folder names; each image is classified as it is from the shards, so top-1 is the same."""
    model, _, preprocess, tok = create_model("recap-tiny")
    shards = evaluate(model, preprocess, tok, str(heldout), batch_size=32)
    folders = tmp_path / "folders"
    where = _as_class_folders(heldout, folders)
    (folders / "templates.txt").write_text((heldout / "templates.txt").read_text())
    (folders / sorted(set(where.values()))[0] / "notes.txt").write_text("not an image")
    (folders / sorted(set(where.values()))[-1] / "broken.jpg").write_bytes(b"not a jpeg")
    r = evaluate(model, preprocess, tok, str(folders), batch_size=32)
    assert r["n"] == shards["n"] == 60
    assert r["skipped"] == {"bad_image": 1, "not_an_image_file": 1}
    assert r["zeroshot"]["n_classes"] == len(set(where.values()))
    assert r["zeroshot"]["top1"] == pytest.approx(shards["zeroshot"]["top1"])
    assert r["retrieval"] == {"skipped": "no captions (class folders)"}
    assert r["compositional"] == {"skipped": "no captions (class folders)"}
    # classnames.txt names the folders' classes in folder order; a count that does not match is an error
    (folders / "classnames.txt").write_text("".join(f"{n}\n" for n in sorted(set(where.values()))))
    again = evaluate(model, preprocess, tok, str(folders), batch_size=32)
    assert again["zeroshot"]["top1"] == pytest.approx(r["zeroshot"]["top1"])
    (folders / "classnames.txt").write_text("circle\nsquare\n")
    with pytest.raises(ValueError, match="2 lines for"):
        evaluate(model, preprocess, tok, str(folders))
    with pytest.raises(FileNotFoundError, match="no class folders"):
        evaluate(model, preprocess, tok, str(tmp_path / "nothing-here"))


def test_missing_data_and_task_skips(tmp_path, heldout):
    model, _, preprocess, tok = create_model("recap-tiny")
    with pytest.raises(FileNotFoundError):
        evaluate(model, preprocess, tok, str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="unknown tasks"):
        evaluate(model, preprocess, tok, str(heldout), tasks=("zeroshot", "vqa"))
    data = tmp_path / "nolabels"
    shutil.copytree(heldout, data)
    (data / "classnames.txt").unlink()
    (data / "templates.txt").unlink()
    r = evaluate(model, preprocess, tok, str(data))
    assert r["zeroshot"] == {"skipped": "no classnames.txt"} and "image_to_text" in r["retrieval"]


def test_eval_cli(tmp_path, heldout, capsys):
    model, *_ = create_model("recap-tiny")
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_3.pt"
    save_checkpoint(str(ckpt), model=model, step=3, epoch=0, data_position={}, config=None, name="recap-tiny")
    out = tmp_path / "result.json"
    # a run directory → its latest checkpoint; the model name comes from the checkpoint
    assert eval_cli([str(run), "--data", str(heldout), "--json", "--out", str(out), "--batch-size", "32"]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads(out.read_text())
    assert printed == written and written["model"] == "recap-tiny" and written["pretrained"] == str(ckpt)
    assert written["n"] == 60 and math.isfinite(written["zeroshot"]["top1"])
    # table output, an explicit checkpoint and --model, a subset of tasks
    assert eval_cli([str(ckpt), "--model", "recap-tiny", "--data", str(heldout), "--tasks", "compositional"]) == 0
    text = capsys.readouterr().out
    assert "compositional" in text and "zero-shot" not in text
    # a bare model name (random init)
    assert eval_cli(["recap-tiny", "--data", str(heldout), "--tasks", "zeroshot", "--precision", "bf16"]) == 0
    capsys.readouterr()
    # failures: exit 1 with a message; usage errors: exit 2
    assert eval_cli([str(tmp_path / "missing.pt"), "--data", str(heldout)]) == 1
    assert "no checkpoint" in capsys.readouterr().err
    assert eval_cli([str(tmp_path / "empty-run-dir-x")]) == 2
    assert eval_cli([str(ckpt), "--data", str(heldout), "--tasks", "vqa"]) == 2
    (tmp_path / "empty").mkdir()
    assert eval_cli([str(tmp_path / "empty"), "--data", str(heldout)]) == 1
    capsys.readouterr()


def test_eval_cli_clip_benchmark_needs_the_package(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "clip_benchmark", None)  # import fails as if not installed
    assert eval_cli(["recap-tiny", "--clip-benchmark"]) == 1
    assert "pip install clip_benchmark" in capsys.readouterr().err


def test_eval_cli_clip_benchmark_bridge(tmp_path, capsys, monkeypatch):
    """A stand-in with clip_benchmark's entry points (cli.get_parser_args reading sys.argv,
    cli.main_eval, models.TYPE2FUNC/MODEL_TYPES): our checkpoint is loaded through the registered
    `recap` model type and its JSON dump comes back."""
    import argparse
    import types

    calls = {}
    models_mod = types.ModuleType("clip_benchmark.models")
    models_mod.TYPE2FUNC, models_mod.MODEL_TYPES = {}, ["open_clip"]
    cli_mod = types.ModuleType("clip_benchmark.cli")

    def get_parser_args():
        p = argparse.ArgumentParser()
        sub = p.add_subparsers()
        e = sub.add_parser("eval")
        for a in ("--dataset", "--dataset_root", "--model", "--pretrained", "--output"):
            e.add_argument(a)
        e.add_argument("--model_type", choices=models_mod.MODEL_TYPES)
        return p.parse_args(sys.argv[1:])

    def main_eval(base):
        model, transform, tokenizer = models_mod.TYPE2FUNC[base.model_type](
            model_name=base.model, pretrained=base.pretrained, cache_dir=None, device="cpu")
        calls["ctx"] = tokenizer.context_length
        calls["params"] = {k: v.clone() for k, v in model.state_dict().items()}
        with open(base.output.format(dataset=base.dataset, language="en", task="zeroshot_classification"), "w") as f:
            json.dump({"dataset": base.dataset, "model": base.model, "metrics": {"acc1": 0.5}}, f)

    cli_mod.get_parser_args, cli_mod.main_eval = get_parser_args, main_eval
    pkg = types.ModuleType("clip_benchmark")
    pkg.cli, pkg.models = cli_mod, models_mod
    monkeypatch.setitem(sys.modules, "clip_benchmark", pkg)
    monkeypatch.setitem(sys.modules, "clip_benchmark.cli", cli_mod)
    monkeypatch.setitem(sys.modules, "clip_benchmark.models", models_mod)

    model, *_ = create_model("recap-tiny", context_length=100)
    ckpt = tmp_path / "step_1.pt"
    save_checkpoint(str(ckpt), model=model, step=1, epoch=0, data_position={}, config=None, name="recap-tiny")
    assert eval_cli([str(ckpt), "--clip-benchmark", "--json", "--", "--dataset", "cifar10"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["clip_benchmark"] == [{"dataset": "cifar10", "model": "recap-tiny", "metrics": {"acc1": 0.5}}]
    assert calls["ctx"] == 100  # our loader: the stretched context comes back
    assert all(torch.equal(calls["params"][k], v) for k, v in model.state_dict().items())


def _relabel(src: Path, dst: Path, label_of) -> None:
    """A copy of the labelled set ``src`` whose .cls members say ``label_of(key, meta)``."""
    shutil.copytree(src, dst)
    metas = {s["key"]: s["meta"] for s in _samples(src)}
    for shard in sorted((src / "shards").glob("*.tar")):
        _rewrite_tar(shard, dst / "shards" / shard.name,
                     lambda name, data: str(label_of(name.split(".")[0], metas[name.split(".")[0]])).encode()
                     if name.endswith(".cls") else data)


def test_linear_probe_reads_what_the_embeddings_hold(heldout, tmp_path, capsys):
    """An untrained CNN's random features keep each image's colours, so a probe for the dominant
    object's colour scores far above chance on another world's images; the same probe for labels
    that are a hash of the sample key (nothing to read) stays near chance. ``recap eval
    --linear-probe`` prints it."""
    from recap.world.generate import generate_world
    from recap.world.scenes import COLOURS

    from recap.trainer.eval import linear_probe

    generate_world(tmp_path / "w3", samples=20, heldout=260, seed=3, port=8765)
    colours = list(COLOURS)
    by_colour = lambda key, meta: colours.index(meta["scene"]["objects"][0]["colour"])  # noqa: E731
    by_hash = lambda key, meta: int(hashlib.sha256(key.encode()).hexdigest(), 16) % 13  # noqa: E731
    for name, fn in (("colour", by_colour), ("hash", by_hash)):
        _relabel(tmp_path / "w3" / "heldout", tmp_path / f"train-{name}", fn)
        _relabel(heldout, tmp_path / f"eval-{name}", fn)
    torch.manual_seed(0)
    model, _, pre, _ = create_model("recap-tiny-cnn")
    colour = linear_probe(model, pre, str(tmp_path / "train-colour"), str(tmp_path / "eval-colour"))
    hashed = linear_probe(model, pre, str(tmp_path / "train-hash"), str(tmp_path / "eval-hash"))
    assert colour["n_train"] == 260 and colour["n"] == 60 and colour["n_classes"] == 13
    assert colour["top1"] > 0.4 and colour["top1"] > 3 * colour["chance_top1"], colour
    assert hashed["top1"] < 0.3, hashed
    assert model.training  # restored

    run = tmp_path / "run"
    save_checkpoint(str(run / "checkpoints" / "step_1.pt"), model=model, step=1, epoch=0, data_position={},
                    config=None, name="recap-tiny-cnn")
    assert eval_cli([str(run), "--data", str(tmp_path / "eval-colour"), "--tasks", "zeroshot",
                     "--linear-probe", str(tmp_path / "train-colour"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["linear_probe"]["top1"] == pytest.approx(colour["top1"])
    assert eval_cli([str(run), "--linear-probe", str(tmp_path / "train-colour")]) == 2
    assert "needs --data" in capsys.readouterr().err

    # the world's own `colour` label set gives the same probe as the relabelled copies
    by_set = linear_probe(model, pre, str(tmp_path / "w3" / "heldout"), str(heldout), label_set="colour")
    assert by_set["label_set"] == "colour" and by_set["n_classes"] == 13
    assert by_set["top1"] == pytest.approx(colour["top1"]) and by_set["n"] == colour["n"]
    assert "no samples with label set 'size'" in linear_probe(model, pre, str(tmp_path / "w3" / "heldout"),
                                                             str(heldout), label_set="size")["skipped"]
    assert eval_cli([str(run), "--data", str(heldout), "--tasks", "retrieval", "--linear-probe",
                     str(tmp_path / "w3" / "heldout"), "--probe-labels", "colour"]) == 0
    assert f"linear probe top-1, colour (13 classes, 260 train)  {colour['top1']:8.4f}" in capsys.readouterr().out
    assert eval_cli([str(run), "--data", str(heldout), "--probe-labels", "colour"]) == 2
    assert "goes with --linear-probe" in capsys.readouterr().err
