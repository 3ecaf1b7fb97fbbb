"""The reinforce stage end to end on a local Ray: a folder of images -> clip -> (fake) recaptions ->
negatives -> reinforce, then the shards read back by our reader, webdataset and Ray Data, teacher
embeddings reproduced by replaying param_aug, our trainer trained on them with distillation,
synthetic texts and negatives, and the same bytes whatever the number of workers."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
TEACHERS = [{"model": "recap-tiny", "pretrained": None}, {"model": "recap-tiny-cnn", "pretrained": None}]
AUG = {"image_size": 48, "n_aug": 3}
# the shared run re-packs: 23 samples from 3 pipeline shards into tars of 5 in a seeded order
REPACK = {"samples_per_shard": 5, "shuffle": True}


def _picture(colour: str, shape: str, size: int, shift: int) -> bytes:
    img = Image.new("RGB", (size + 8, size), (245, 245, 245))
    d = ImageDraw.Draw(img)
    box = (6 + shift, 6, size - 6 + shift, size - 6)
    if shape == "circle":
        d.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        d.rectangle(box, fill=COLOURS[colour])
    else:
        d.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=COLOURS[colour])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_pictures(folder: Path, n: int = 24) -> dict[str, str]:
    """n captioned pictures of coloured shapes (name -> caption); p03 is a broken file."""
    folder.mkdir(parents=True, exist_ok=True)
    captions = {}
    for i in range(n):
        colour, shape = list(COLOURS)[i % 4], SHAPES[i % 3]
        name = f"p{i:02d}"
        data = _picture(colour, shape, 40 + 2 * (i % 7), i % 5)
        if i == 3:
            data = b"\x89PNG\r\n\x1a\n broken"
        (folder / f"{name}.png").write_bytes(data)
        captions[name] = f"a {colour} {shape} on a white background, picture {i}"
        (folder / f"{name}.txt").write_text(captions[name])
    return captions


def job_data(pics: Path, out: Path, *, concurrency: int = 1, files_per_shard: int = 10, extra: dict | None = None,
             negatives: dict | None = None, texts: bool = True) -> dict:
    stages = [{"clip": {"model": "recap-tiny", "pretrained": None}}]
    if texts:
        stages.append({"fake_texts": {}})
    stages.append({"negatives": {"k": 4, "text_k": 1, "candidates": 12, **(negatives or {})}})
    stages.append({"reinforce": {"teachers": TEACHERS, "aug": AUG, "concurrency": concurrency, **(extra or {})}})
    return {"name": "rf", "seed": 3, "input": {"kind": "folder", "path": str(pics)}, "output": str(out),
            "scan": {"files_per_shard": files_per_shard}, "stages": stages}


@pytest.fixture
def text_stage(folder_source):
    from ray import cloudpickle

    from recap.pipeline import stage as stage_mod
    from tests import text_enrichment_stages

    cloudpickle.register_pickle_by_value(text_enrichment_stages)
    stage_mod.register(text_enrichment_stages.FakeTexts)
    yield
    stage_mod._registered.pop("fake_texts", None)


def run(data: dict):
    from recap.pipeline.job import build_job
    from recap.pipeline.runner import run_job

    return run_job(build_job(data, "rf.yaml"), progress=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Filled by the first test that runs the job (module fixtures cannot use function fixtures)."""
    return {"root": tmp_path_factory.mktemp("reinforce")}


@pytest.fixture
def dataset(built, ray_local, text_stage):
    if "out" not in built:
        root = built["root"]
        built["captions"] = make_pictures(root / "pics")
        built["out"] = root / "a"
        run(job_data(root / "pics", built["out"], concurrency=2, extra=REPACK))
    return built


def _samples(out: Path):
    from recap.pipeline.reinforced import iter_shard, list_shards, read_config

    config = read_config(str(out / "reinforced"))
    samples = [s for url in list_shards(str(out / "reinforced")) for s in iter_shard(url, config=config)]
    return config, samples


def test_shards_hold_every_member_with_teacher_embeddings(dataset):
    from recap.pipeline.inspect import format_report, inspect_dataset

    out = dataset["out"]
    rep = inspect_dataset(str(out))
    assert rep["invariant_ok"], rep["problems"]
    assert rep["stages"]["reinforce"]["kept"] == 23  # p03 never decodes: the source keeps it, clip drops it
    config, samples = _samples(out)
    assert [t.name for t in config.teachers] == ["recap-tiny", "recap-tiny-cnn"]
    assert [t.dim for t in config.teachers] == [128, 128] and config.aug.n_aug == 3
    assert len(samples) == 23
    sizes = json.loads((out / "reinforced/sizes.json").read_text())
    assert sum(sizes.values()) == 23 and (out / "reinforced/shards/sizes.json").read_bytes() == \
        (out / "reinforced/sizes.json").read_bytes()
    manifest = [json.loads(x) for x in (out / "reinforced/manifest.jsonl").read_text().splitlines()]
    assert [m["name"] for m in manifest] == sorted(sizes)
    for s in samples:
        assert s["txt"] in dataset["captions"].values()
        assert len(s["param_aug"]) == 3 and s["image_emb"].shape == (3, 256)
        n_syn = len(s["syn"]["syn_text"])
        assert s["text_emb"].shape == (1 + n_syn, 256)
        assert s["neg_text_emb"].shape == (len(s["neg"]["neg_text_short"]), 256)
        assert set(s["syn"]["syn_source"]) <= {"caption", "rewrite"} and "rewrite" in s["syn"]["syn_source"]
        assert s["syn"]["short_positive"]
        assert 1 <= len(s["neg"]["hard_neg_uids"]) <= 4 and s["neg"]["neg_type"]
        assert {"swap_attributes", "replace_attribute", "llm_relation"} <= set(s["neg"]["neg_type"]) \
            or "count" in s["neg"]["neg_type"]
        assert all(0 <= k <= n_syn for k in s["neg"]["neg_of"])
        meta = s["json"]
        assert meta["width"] > 0 and meta["height"] > 0 and len(meta["sha256"]) == 64 and "clip_score" in meta["scores"]
        for _, sl in config.slices():
            for f in ("image_emb", "text_emb", "neg_text_emb"):
                assert np.allclose(np.linalg.norm(s[f][:, sl].astype(np.float64), axis=1), 1.0, atol=2e-3)
    # a failed recaption: written with what exists, and noted
    no_syn = [s for s in samples if "caption" not in s["syn"]["syn_source"]]
    assert no_syn and rep["stages"]["reinforce"]["notes"].get("missing_syn_text_caption") == len(no_syn)
    text = format_report(rep)
    assert "reinforce: 23 samples in 5 shards" in text and "coverage: " in text and "syn_caption " in text
    assert "neg (swap_attributes)" in text or "neg (" in text
    assert "embeddings: image_emb [3, 256]" in text


def test_webdataset_and_ray_data_read_every_member(dataset):
    import ray
    import webdataset as wds

    out = dataset["out"]
    tars = sorted(str(p) for p in (out / "reinforced/shards").glob("*.tar"))
    members = {}
    for t in tars:
        with tarfile.open(t) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, set()).add(ext)
    want = {"jpg", "txt", "url.txt", "json", "paug.json", "syn.json", "neg.json", "npz"} - {"url.txt"}
    assert all(v == want for v in members.values()), members  # the folder source has no URLs
    got = {}
    for sample in wds.WebDataset(tars, shardshuffle=False).decode("pil"):
        got[sample["__key__"]] = sample
    assert set(got) == set(members)
    for s in got.values():
        assert isinstance(s["jpg"], Image.Image) and isinstance(s["txt"], str)
        assert isinstance(s["paug.json"]["param_aug"], list) and "syn_text" in s["syn.json"]
        assert "neg_text_short" in s["neg.json"] and s["npz"]["image_emb"].shape == (3, 256)
    ds = ray.data.read_webdataset(tars, decoder=None)
    rows = ds.take_all()
    assert len(rows) == len(members)
    for r in rows:
        for ext in want:
            assert r.get(ext) is not None, (ext, sorted(r))


def test_replaying_param_aug_reproduces_each_teachers_slice(dataset):
    from recap.models.encoders import EncoderSpec, load_encoder
    from recap.pipeline.reinforced import replay_augmentation

    config, samples = _samples(dataset["out"])
    teachers = [load_encoder(EncoderSpec(t["model"], None), device="cpu") for t in TEACHERS]
    worst = 1.0
    for s in samples[:8]:
        img = Image.open(io.BytesIO(s["jpg"])).convert("RGB")
        for i, p in enumerate(s["param_aug"]):
            crop = replay_augmentation(img, p, config.aug)
            for enc, (_, sl) in zip(teachers, config.slices()):
                e = enc.encode_preprocessed([enc.preprocess(crop)])[0]
                stored = s["image_emb"][i, sl].astype(np.float64)
                worst = min(worst, float(e @ stored / np.linalg.norm(stored)))
        for enc, (_, sl) in zip(teachers, config.slices()):
            t, _ = enc.encode_texts([s["txt"], *s["syn"]["syn_text"]])
            cos = np.sum(t * s["text_emb"][:, sl], axis=1) / np.linalg.norm(s["text_emb"][:, sl].astype(np.float64), axis=1)
            assert cos.min() >= 0.999
    assert worst >= 0.999, worst


def test_our_trainer_trains_on_the_shards_with_distillation_syn_texts_and_negatives(dataset, tmp_path):
    from recap.trainer.config import TrainConfig
    from recap.trainer.train import train

    cfg = TrainConfig.model_validate({
        "name": "rf", "seed": 0, "output": str(tmp_path / "run"), "steps": 3, "log_every": 1, "threads": 1,
        "tensorboard": False,
        "data": {"path": str(dataset["out"] / "reinforced"), "batch_size": 8, "text_choice": "uniform",
                 "image_hard_negatives": 1, "shuffle_buffer": 16},
        "model": {"name": "recap-tiny"},
        "loss": {"kind": "distill", "teacher_dims": [128, 128], "hard_negatives": True},
        "optim": {"lr": 1e-3, "warmup": 1}})
    summary = train(cfg)
    assert summary["step"] == 3
    assert (tmp_path / "run/checkpoints/step_3.pt").is_file()


def test_output_shards_have_the_asked_size_every_uid_once_in_the_seeded_order(dataset):
    from recap.pipeline.rng import uniform

    out = dataset["out"] / "reinforced"
    sizes = json.loads((out / "sizes.json").read_text())
    assert list(sizes.items()) == [(f"{i:05d}.tar", 5) for i in range(4)] + [("00004.tar", 3)]
    manifest = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(m["name"], m["n"], m["bytes"]) for m in manifest] == \
        [(p.name, sizes[p.name], p.stat().st_size) for p in sorted((out / "shards").glob("*.tar"))]
    uids = []
    for m in manifest:
        with tarfile.open(out / m["path"]) as tf:
            keys = list(dict.fromkeys(x.name.split(".", 1)[0] for x in tf.getmembers()))
        assert len(keys) == m["n"]
        uids.extend(keys)
    kept = pq.read_table(dataset["out"] / "stages/reinforce/carry").to_pylist()
    assert sorted(uids) == sorted(r["uid"] for r in kept if r["reinforce_drop"] is None) and len(set(uids)) == 23
    # the order: a hash of (job seed, uid) alone, not the pipeline's order
    keys = uniform(3, "reinforce.shuffle", uids)
    assert list(keys) == sorted(keys)
    assert uids != sorted(uids, key=lambda u: [r["uid"] for r in kept].index(u))
    # the partials' tars wait in parts/, never where readers look
    assert len(list((out / "parts").glob("*.tar"))) == 3


def test_same_bytes_with_one_worker_and_after_a_lost_tar(dataset):
    """One teacher worker instead of two gives the same reinforced dataset; a tar cut short is
    redone on the next run (its commit's marker no longer holds)."""
    a = dataset["out"]
    b = dataset["root"] / "b"
    run(job_data(dataset["root"] / "pics", b, concurrency=1, extra=REPACK))

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "reinforced").rglob("*")) if p.is_file()}

    fa = files(a)
    assert fa == files(b) and len(fa) == 5 + 3 + 3 + 1  # 5 shards, 3 partial tars, config, 2 sizes, manifest
    for cut in ("reinforced/shards/00001.tar", "reinforced/parts/00002.tar"):
        tar = b / cut
        tar.write_bytes(tar.read_bytes()[:1000])
        run(job_data(dataset["root"] / "pics", b, concurrency=1, extra=REPACK))
        assert files(b) == fa, cut


def test_missing_texts_and_no_negatives_stage_still_write_shards(ray_local, folder_source, tmp_path):
    """Without the text stages, no syn.json; with the negatives stage absent, no neg.json, and the
    pth.gz option writes DataCompDR's bf16 embeddings that the reader reads."""
    pics = tmp_path / "pics"
    make_pictures(pics, 8)
    data = job_data(pics, tmp_path / "o", texts=False, extra={"emb_format": "pth.gz", "emb_dtype": "bfloat16"})
    data["stages"] = [s for s in data["stages"] if "negatives" not in s]
    run(data)
    config, samples = _samples(tmp_path / "o")
    assert len(samples) == 7 and config.emb_format == "pth.gz"
    for s in samples:
        assert s["syn"] is None and s["neg"] is None
        assert s["image_emb"].shape == (3, 256) and s["text_emb"].shape == (1, 256)
    side = pq.read_table(tmp_path / "o/ledger/reinforce/00000.parquet")
    assert side.num_rows == 0  # nothing missing that an earlier stage of this job wrote


def test_teacher_dims_that_change_between_shards_are_an_error_naming_the_teacher():
    from recap.pipeline.errors import UserError
    from recap.pipeline.stage import StageContext
    from recap.stages.reinforce import ReinforceConfig, ReinforceStage

    stage = ReinforceStage(ReinforceConfig(teachers=TEACHERS, aug=AUG), StageContext("j", 0, "reinforce", "/tmp", 4))
    part = {"n": 2, "coverage": {"samples": 2}, "example": None, "bytes": 10, "sha256": "0" * 64}
    ok = stage.reduce([{**part, "dims": [128, 128]}, {**part, "n": 0, "dims": [128, 128]}])
    assert [t["dim"] for t in ok["config"]["teachers"]] == [128, 128] and [e["name"] for e in ok["entries"]] == ["00000.tar"]
    with pytest.raises(UserError, match=r"teacher 1 \(recap-tiny-cnn\) gave 64-d embeddings on shard 1 but 128-d"):
        stage.reduce([{**part, "dims": [128, 128]}, {**part, "dims": [128, 64]}])


def test_config_json_generators_come_from_the_jobs_text_stages(folder_source, tmp_path, monkeypatch):
    """The captioner and rewriter in config.json are what the job's recaption and rewrite stages
    ran with (model, mode, prompt and its sha256, sampling), never their endpoint or key variable;
    the stage's own ``generators`` adds to them."""
    import hashlib

    from recap.pipeline.job import build_job
    from recap.pipeline.runner import _context
    from recap.pipeline.storage import Dataset
    from recap.stages.reinforce import ReinforceStage
    from tests.llm_server import MODEL, LLMServer

    monkeypatch.setenv("RECAP_TEST_KEY", "sk-secret-value")
    pics = tmp_path / "pics"
    make_pictures(pics, 2)
    data = job_data(pics, tmp_path / "o", texts=False, extra={"generators": {"note": "teacher from bench",
                                                                             "rewriter_prompt": "x"}})
    with LLMServer() as srv:  # the text stages' configs check that their server answers
        backend = {"kind": "openai", "base_url": srv.base_url, "model": MODEL, "api_key_env": "RECAP_TEST_KEY",
                   "temperature": 0.3}
        data["stages"][1:1] = [{"recaption": {"mode": "detailed", "k": 2, "backend": backend}},
                               {"rewrite": {"mode": "laclip", "k": 3, "backend": {**backend, "max_tokens": 60}}}]
        job = build_job(data, str(tmp_path / "rf.yaml"))
    part = {"n": 2, "coverage": {"samples": 2}, "example": None, "bytes": 10, "sha256": "0" * 64, "dims": [128, 128]}

    def generators(stage_name: str) -> dict:
        entry = next(e for e in job.stages if e.name == stage_name)
        stage = ReinforceStage(entry.config, _context(job, Dataset(str(tmp_path / "o")), stage_name, 0))
        return stage.reduce([part])["config"]["generators"]

    gens = generators("reinforce")
    recaption, rewrite = (next(e.config for e in job.stages if e.name == n) for n in ("recaption", "rewrite"))
    cap, rew = gens["captioner"], gens["rewriter"]
    assert (cap["stage"], cap["kind"], cap["model"], cap["mode"], cap["k"]) == ("recaption", "openai", MODEL,
                                                                                "detailed", 2)
    assert cap["prompt"] == recaption.prompts["template"] and cap["prompt"]
    assert cap["prompt_sha256"] == hashlib.sha256(cap["prompt"].encode()).hexdigest()
    assert cap["request_sha256"] == recaption.prompts["sha256"] and cap["sampling"]["temperature"] == 0.3
    assert (rew["mode"], rew["k"], rew["prompt"], rew["sampling"]["max_tokens"]) == \
        ("laclip", 3, rewrite.prompts["instruction"], 60)
    assert gens["note"] == "teacher from bench" and gens["rewriter_prompt_sha256"] == hashlib.sha256(b"x").hexdigest()
    text = json.dumps(gens)
    assert "127.0.0.1" not in text and "RECAP_TEST_KEY" not in text and "sk-secret" not in text
    # a stage sees only the stages before it: the negatives stage would see the text stages, the
    # clip stage (first after the source) none
    assert _context(job, Dataset(str(tmp_path / "o")), "clip", 0).earlier_config("recaption") is None
    assert _context(job, Dataset(str(tmp_path / "o")), "negatives", 0).earlier_config("rewrite")["k"] == 3


def test_overwrite_leaves_no_tar_of_the_previous_run(ray_local, folder_source, tmp_path):
    """``recap run --overwrite`` over a dataset of another input setting: the old run's reinforced
    tars (more shards than the new run makes) are gone, not read as part of the new dataset."""
    from recap.pipeline.job import build_job
    from recap.pipeline.reinforced import list_shards
    from recap.pipeline.runner import run_job

    pics, out = tmp_path / "pics", tmp_path / "o"
    make_pictures(pics, 8)
    data = job_data(pics, out, files_per_shard=2, texts=False)
    data["stages"] = [s for s in data["stages"] if "reinforce" in s]
    run(data)
    assert len(list((out / "reinforced/shards").glob("*.tar"))) == 4
    data["scan"]["files_per_shard"] = 5
    run_job(build_job(data, "rf.yaml"), progress=False, overwrite=True)
    tars = list_shards(str(out / "reinforced"))
    sizes = json.loads((out / "reinforced/sizes.json").read_text())
    assert [Path(t).name for t in tars] == sorted(sizes) == ["00000.tar", "00001.tar"]
    assert sum(sizes.values()) == 7


def test_a_resumed_run_with_another_shard_size_leaves_no_stale_tar(ray_local, folder_source, tmp_path):
    """Re-packing into fewer shards, then back to one tar per pipeline shard, on the same dataset:
    each rerun's shards/ holds exactly what its sizes.json lists (an old tar would be read as data)."""
    from recap.pipeline.reinforced import list_shards

    pics, out = tmp_path / "pics", tmp_path / "o"
    make_pictures(pics, 8)
    data = job_data(pics, out, files_per_shard=4, texts=False)
    data["stages"] = [s for s in data["stages"] if "reinforce" in s]
    for extra, want in (({"samples_per_shard": 2}, [2, 2, 2, 1]), ({"samples_per_shard": 5}, [5, 2]),
                        ({}, [3, 4])):
        data["stages"][0]["reinforce"] = {**{k: v for k, v in data["stages"][0]["reinforce"].items()
                                             if k != "samples_per_shard"}, **extra}
        run(data)
        sizes = json.loads((out / "reinforced/sizes.json").read_text())
        assert [Path(t).name for t in list_shards(str(out / "reinforced"))] == sorted(sizes), extra
        assert [sizes[k] for k in sorted(sizes)] == want, extra
        if not extra:  # one tar per pipeline shard again: no partial tar waits in parts/
            assert not any((out / "reinforced/parts").glob("*.tar"))


def test_inspect_cuts_a_huge_text_and_says_its_length():
    from recap.stages.reinforce import ReinforceStage

    huge = "spam " * 200_000
    summary = {"samples": 1, "shards": 1, "output": "reinforced", "teachers": ["t"], "n_aug": 1,
               "coverage": {"samples": 1}, "example": {"uid": "u", "txt": huge, "syn_text": [huge], "syn_source": ["x"],
                                                      "neg_text_short": [huge], "neg_type": ["knn_text"]}}
    lines = ReinforceStage.summary_lines(summary)
    assert max(len(line) for line in lines) < 300
    assert sum("(1,000,000 characters)" in line for line in lines) == 3
