"""CLIP scoring and score filtering: stored scores equal a direct open_clip computation (a tiny
model trained for two steps by our trainer), every bad input leaves with its own reason, the
quantile is exact (ceil(f·N), ties by uid, DataComp's rule) and independent of the sharding, and
a job runs source -> clip -> filter on a local Ray with the invariant intact."""
import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from recap.pipeline.job import JobError, build_job
from recap.pipeline.stage import StageContext
from recap.pipeline.stage_data import StageData, carry_rel
from recap.pipeline.steps import run_stage, with_carry
from recap.pipeline.storage import Dataset, table_bytes
from recap.pipeline.uid import make_uid
from recap.stages.clip import ClipConfig, ClipStage
from recap.stages.filter import FilterConfig, FilterStage

MODEL = "recap-tiny"


def _bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A recap-tiny checkpoint our trainer writes after two steps on a small reinforced fixture."""
    from recap.pipeline.reinforced.testing import make_fixture
    from recap.trainer.config import load_train_config
    from recap.trainer.train import train

    tmp = tmp_path_factory.mktemp("ckpt")
    make_fixture(str(tmp / "data"), n_samples=16, dims=(8,), seed=3, n_aug=1, n_syn=1, n_neg=1, image_size=64)
    raw = {"name": "t", "seed": 0, "output": str(tmp / "run"), "steps": 2, "log_every": 1, "threads": 1,
           "tensorboard": False, "data": {"path": str(tmp / "data"), "batch_size": 8},
           "model": {"name": MODEL}, "optim": {"lr": 1e-3, "warmup": 1}}
    (tmp / "train.yaml").write_text(yaml.safe_dump(raw))
    train(load_train_config(tmp / "train.yaml"))
    return str(tmp / "run/checkpoints/step_2.pt")


@pytest.fixture(scope="module")
def direct(checkpoint):
    """open_clip itself, loading the same file: the reference every stored score is checked against."""
    import open_clip
    import torch

    import recap.trainer.models  # noqa: F401 - registers recap-tiny with open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(MODEL, pretrained=checkpoint)
    model.eval()
    tokenizer = open_clip.get_tokenizer(MODEL)

    def embed(images: list[Image.Image], texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            i = model.encode_image(torch.stack([preprocess(im) for im in images]))
            t = model.encode_text(tokenizer(texts))
        i, t = i / i.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
        return i.numpy(), t.numpy()

    return embed


def _clip(**cfg) -> ClipStage:
    stage = ClipStage(ClipConfig(**{"model": MODEL, "pretrained": None, **cfg}), StageContext("j", 0, "clip", "/tmp", 0))
    stage.setup()
    return stage


@pytest.fixture(scope="module")
def stage(checkpoint) -> ClipStage:
    return _clip(pretrained=checkpoint)


def _process(stage: ClipStage, images: list[bytes | None], captions: list[str]) -> list[dict]:
    uids = [make_uid(f"u{i}", c) for i, c in enumerate(captions)]
    batch = pa.table({"uid": uids, "jpg": pa.array(images, pa.binary()), "caption": captions})
    return stage.process(batch).to_pylist()


# -- clip: scores and embeddings ------------------------------------------------------------------

def test_scores_and_embeddings_equal_open_clip_on_the_same_inputs(stage, direct):
    images = [_noise(w, h, s) for s, (w, h) in enumerate([(64, 64), (80, 50), (33, 97), (200, 120), (64, 64)])]
    files = [_bytes(images[0]), _bytes(images[1], "JPEG", quality=95), _bytes(images[2]), _bytes(images[3], "WEBP"),
             _bytes(images[4])]
    decoded = [Image.open(io.BytesIO(f)).convert("RGB") for f in files]  # JPEG/WEBP are lossy: compare what decodes
    long = " ".join(f"word{i}" for i in range(120))
    captions = ["a red circle", "two blue squares on grey", "", long, "a " * 3]
    out = _process(stage, files, captions)
    img, txt = direct(decoded, captions)
    assert [r["_drop"] for r in out] == [None] * 5
    for r, i, t in zip(out, img, txt):
        assert r["clip_score"] == pytest.approx(float(i @ t), abs=1e-3)
        np.testing.assert_allclose(np.asarray(r["image_emb"], np.float32), i, atol=1e-3)
        np.testing.assert_allclose(np.asarray(r["text_emb"], np.float32), t, atol=1e-3)
        assert np.linalg.norm(np.asarray(r["image_emb"], np.float32)) == pytest.approx(1, abs=1e-2)
    # open_clip truncates the long caption too; the ledger says so, the sample stays
    assert [r["_note"] for r in out] == [None, None, None, "caption_truncated_tokens", None]
    assert out[3]["_detail"] == "more than 77 tokens"
    # the sidecar's types: float32 score, float16 fixed-size lists of the model's width
    batch = pa.table({"uid": ["0" * 32], "jpg": pa.array([files[0]], pa.binary()), "caption": ["x"]})
    t = stage.process(batch)
    assert t.schema.field("clip_score").type == pa.float32()
    assert t.schema.field("image_emb").type == pa.list_(pa.float16(), 128)


def test_no_embeddings_when_not_stored(checkpoint):
    s = _clip(pretrained=checkpoint, store_embeddings=False)
    assert s.writes() == ("clip_score",)
    out = s.process(pa.table({"uid": ["0" * 32], "jpg": pa.array([_bytes(_noise(40, 40, 1))]), "caption": ["x"]}))
    assert out.column_names == ["uid", "clip_score", "_drop", "_detail", "_note"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_autocasts_close_to_fp32(stage, checkpoint, precision):
    half = _clip(pretrained=checkpoint, precision=precision)
    files = [_bytes(_noise(50 + 9 * i, 60, 20 + i)) for i in range(4)]
    captions = ["a red circle", "a blue star", "", "two squares"]
    full, low = _process(stage, files, captions), _process(half, files, captions)
    for a, b in zip(full, low):
        assert b["_drop"] is None and b["clip_score"] == pytest.approx(a["clip_score"], abs=2e-2)


def test_a_checkpoint_url_loads_like_the_file(checkpoint):
    import fsspec

    from recap.models.encoders import EncoderSpec, load_encoder

    with fsspec.open("memory://models/step_2.pt", "wb") as f:
        f.write(Path(checkpoint).read_bytes())
    ClipConfig(model=MODEL, pretrained="memory://models/step_2.pt")  # a URL is the workers' to read
    images = [_noise(40, 40, 9)]
    by_url = load_encoder(EncoderSpec(MODEL, "memory://models/step_2.pt"), device="cpu").encode_images(images)
    by_path = load_encoder(EncoderSpec(MODEL, checkpoint), device="cpu").encode_images(images)
    np.testing.assert_array_equal(by_url, by_path)


def test_image_modes_become_what_the_file_shows(stage, direct):
    """Grayscale, CMYK, alpha, 16-bit, palette and 1xN images are scored as the RGB image they
    show: alpha matted on white, 16 bits scaled to 8 (PIL's convert would clip them to white)."""
    rng = np.random.default_rng(5)
    gray8 = rng.integers(0, 256, (48, 40), dtype=np.uint8)
    rgb = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    alpha = np.where(rng.random((48, 40)) < 0.5, 0, 255).astype(np.uint8)
    matted = np.where(alpha[..., None] == 0, 255, rgb).astype(np.uint8)
    cmyk = _bytes(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    palette = Image.fromarray(rgb).quantize(64)
    banner = rng.integers(0, 256, (1, 300, 3), dtype=np.uint8)
    cases = {  # file -> the RGB image it must score as
        "gray": (_bytes(Image.fromarray(gray8, "L")), Image.fromarray(gray8, "L").convert("RGB")),
        "gray16": (_bytes(Image.fromarray(gray8.astype(np.uint16) * 257)), Image.fromarray(gray8, "L").convert("RGB")),
        "cmyk": (cmyk, Image.open(io.BytesIO(cmyk)).convert("RGB")),
        "rgba_opaque": (_bytes(Image.fromarray(np.dstack([rgb, np.full_like(alpha, 255)]), "RGBA")), Image.fromarray(rgb)),
        "rgba": (_bytes(Image.fromarray(np.dstack([rgb, alpha]), "RGBA")), Image.fromarray(matted)),
        "la": (_bytes(Image.fromarray(np.dstack([gray8, alpha]), "LA")),
               Image.fromarray(np.where(alpha == 0, 255, gray8).astype(np.uint8), "L").convert("RGB")),
        "palette": (_bytes(palette), palette.convert("RGB")),
        "bilevel": (_bytes(Image.fromarray(gray8 > 127)), Image.fromarray(gray8 > 127).convert("RGB")),
        "1xN": (_bytes(Image.fromarray(banner)), Image.fromarray(banner)),
        "Nx1": (_bytes(Image.fromarray(banner.transpose(1, 0, 2).copy())), Image.fromarray(banner.transpose(1, 0, 2).copy())),
    }
    assert Image.open(io.BytesIO(cases["gray16"][0])).mode == "I;16"
    out = _process(stage, [f for f, _ in cases.values()], ["a picture"] * len(cases))
    img, txt = direct([ref for _, ref in cases.values()], ["a picture"] * len(cases))
    for name, r, i, t in zip(cases, out, img, txt):
        assert r["_drop"] is None, (name, r["_detail"])
        assert r["clip_score"] == pytest.approx(float(i @ t), abs=1e-3), name
        np.testing.assert_allclose(np.asarray(r["image_emb"], np.float32), i, atol=2e-3, err_msg=name)
    # what PIL's own convert("RGB") makes of them is another picture, and the check tells them apart
    naive, _ = direct([Image.open(io.BytesIO(cases[k][0])).convert("RGB") for k in ("gray16", "rgba")], ["x"] * 2)
    assert np.abs(naive - img[[1, 4]]).max() > 0.05


def test_bad_images_leave_with_their_own_reasons(stage):
    good = _bytes(_noise(40, 40, 3))
    float_nan = np.full((8, 8), 0.5, np.float32)
    float_nan[2, 3] = np.nan
    files = {
        "garbage": (b"<html>not an image</html>", "decode_error"),
        "truncated": (good[: len(good) // 2], "decode_error"),
        "missing": (None, "decode_error"),
        "empty": (b"", "decode_error"),
        "float_nan": (_bytes(Image.fromarray(float_nan), "TIFF"), "transform_error"),
        "ok": (good, None),
    }
    out = _process(stage, [f for f, _ in files.values()], ["a caption"] * len(files))
    assert [r["_drop"] for r in out] == [why for _, why in files.values()]
    details = [r["_detail"] for r in out]
    assert details[0] == "no decoder accepts the data"  # never a memory address: ledgers are stable bytes
    assert details[2] == details[3] == "no image bytes"
    assert "NaN" in details[4]
    assert all(r["clip_score"] is None and r["image_emb"] is None for r in out[:-1])
    assert math.isfinite(out[-1]["clip_score"])
    empty = stage.process(pa.table({"uid": pa.array([], pa.string()), "jpg": pa.array([], pa.binary()),
                                    "caption": pa.array([], pa.string())}))
    assert empty.num_rows == 0 and {"clip_score", "image_emb", "text_emb"} <= set(empty.column_names)


def test_nonfinite_embeddings_are_dropped(checkpoint, tmp_path):
    """A model whose embedding of one token is NaN: captions with it give NaN text embeddings."""
    import torch

    from recap.trainer.checkpoint import save_checkpoint
    from recap.trainer.models import create_model

    model, _, _, tokenizer = create_model(MODEL, pretrained=checkpoint)
    token = tokenizer.encode("zebra")
    with torch.no_grad():
        model.token_embedding.weight[token[0]] = float("nan")
    bad = tmp_path / "step_9.pt"
    save_checkpoint(str(bad), model=model, step=9, epoch=0, name=MODEL, rng_states=False)
    s = _clip(pretrained=str(bad))
    image = _bytes(_noise(50, 50, 8))
    out = _process(s, [image, image, image], ["a zebra", "a horse", "zebra zebra"])
    assert [r["_drop"] for r in out] == ["nonfinite_embedding", None, "nonfinite_embedding"]
    assert out[0]["_detail"] == "text" and out[0]["clip_score"] is None
    assert math.isfinite(out[1]["clip_score"])


def test_an_ensemble_concatenates_normalised_embeddings(checkpoint):
    from recap.models.encoders import EncoderSpec, load_encoder

    both = load_encoder([EncoderSpec(MODEL, checkpoint), EncoderSpec("recap-tiny-cnn", None)], device="cpu")
    one, other = both.members
    images, texts = [_noise(40, 60, 1), _noise(70, 30, 2)], ["a red star", "word " * 40]
    e = both.encode_images(images)
    assert e.shape == (2, one.dim + other.dim) and both.dim == 256
    np.testing.assert_allclose(e[:, :128] * math.sqrt(2), one.encode_images(images), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    t, truncated = both.encode_texts(texts)
    # recap-tiny-cnn's context is 32 tokens: the 40-word text is truncated for it, so for the ensemble
    assert truncated.tolist() == [False, True] and one.encode_texts(texts)[1].tolist() == [False, False]
    # a dot product of ensemble rows is the mean of the members' cosines
    cos = [float(a @ b) for a, b in zip(one.encode_images(images), one.encode_texts(texts)[0])]
    cos2 = [float(a @ b) for a, b in zip(other.encode_images(images), other.encode_texts(texts)[0])]
    np.testing.assert_allclose((e * t).sum(1), (np.array(cos) + np.array(cos2)) / 2, atol=1e-5)


def test_model_config_json_builds_a_custom_model(tmp_path):
    from recap.trainer.models import model_config

    cfg = model_config("recap-tiny-cnn")
    cfg["embed_dim"] = 48
    path = tmp_path / "mini.json"
    path.write_text(json.dumps(cfg))
    s = _clip(model="my-mini", model_config=str(path))
    assert s.encoder.dim == 48 and s.config.model_dump(mode="json")["model_config"] == str(path)
    out = _process(s, [_bytes(_noise(40, 40, 4))], ["a circle"])
    assert out[0]["_drop"] is None and len(out[0]["image_emb"]) == 48


def test_the_device_is_never_chosen_on_the_driver():
    from recap.models.encoders import default_device

    assert default_device() == "cpu"  # this test process is no Ray worker given a GPU


# -- clip: errors at job validation ---------------------------------------------------------------

def _job(stage: dict, tmp_path) -> None:
    build_job({"name": "c", "input": {"path": str(tmp_path / "u.parquet")}, "output": str(tmp_path / "o"),
               "stages": [stage]}, "c.yaml")


@pytest.mark.parametrize("cfg, field, says", [
    ({"model": "ViT-B-33", "pretrained": None}, "model", "unknown model 'ViT-B-33'"),
    ({"model": "recap-tiny", "pretrained": "/nowhere/step_3.pt"}, "pretrained", "no checkpoint at /nowhere/step_3.pt"),
    ({"model": "ViT-B-32", "pretrained": "laion_nope"}, "pretrained", "neither a pretrained tag of ViT-B-32"),
    ({"model": "hf-hub:apple/DFN2B-CLIP-ViT-B-16", "pretrained": "x.pt"}, "pretrained", "brings its own weights"),
    ({"model": "hf-hub:nope", "pretrained": None}, "model", "not a hub name"),
    ({"model": "mine", "model_config": "/nowhere/m.json", "pretrained": None}, "model_config", "no model config at"),
    ({"model": "recap-tiny"}, "pretrained", "field required"),
    ({"model": "recap-tiny", "pretrained": None, "precision": "fp8"}, "precision", "fp32"),
])
def test_bad_model_settings_are_job_errors_naming_the_field(tmp_path, cfg, field, says):
    with pytest.raises(JobError) as e:
        _job({"clip": cfg}, tmp_path)
    assert f"c.yaml: stages[0].clip.{field}" in str(e.value) and says in str(e.value), str(e.value)


def test_named_models_validate_without_downloading(tmp_path):
    # the weights of a tag or hub model are the workers' to fetch; validation only checks names
    _job({"clip": {"model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}}, tmp_path)
    _job({"clip": {"model": "hf-hub:apple/DFN2B-CLIP-ViT-B-16", "pretrained": None}}, tmp_path)


def test_a_checkpoint_that_does_not_load(tmp_path, checkpoint):
    data = Path(checkpoint).read_bytes()
    for name, content, says in [("garbage.pt", b"not a checkpoint at all", "is not a torch checkpoint"),
                                ("cut.pt", data[: len(data) // 2], "is not a torch checkpoint"),
                                ("zip.pt", _zip(), "a zip archive but not a torch checkpoint")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(JobError) as e:
            _job({"clip": {"model": MODEL, "pretrained": str(tmp_path / name)}}, tmp_path)
        assert "stages[0].clip.pretrained" in str(e.value) and says in str(e.value), str(e.value)
    # a real checkpoint of another architecture passes the cheap check and fails in setup(),
    # before any shard's output, with a message that names the field
    from recap.models.encoders import EncoderError

    with pytest.raises(EncoderError, match=r"clip.pretrained: .*step_2.pt does not load into recap-tiny-cnn"):
        _clip(model="recap-tiny-cnn", pretrained=checkpoint)


def _zip() -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("readme.txt", "hello")
    return buf.getvalue()


# -- filter: the exact quantile -------------------------------------------------------------------

def _uids(n: int, seed: int) -> list[str]:
    return [make_uid(f"http://h/{seed}/{i}", "c") for i in range(n)]


def _run_filter(cfg: dict, parts: list[pa.Table], root: Path, collect_limit: int | None = None) -> tuple[set, dict, dict]:
    """partial -> reduce -> apply over ``parts`` (one per shard), through the engine's own step
    functions and files: carried rows committed as parquet and read back by the reduce through
    StageData, partials and state through JSON, as a run does them."""
    st = FilterStage(FilterConfig(**cfg), StageContext("j", 0, "filter", str(root), sum(p.num_rows for p in parts)))
    if collect_limit is not None:
        st.collect_limit = collect_limit
    ds = Dataset(str(root))
    summaries = []
    for shard, part in enumerate(parts):
        _, out = run_stage(st, part, "partial")
        if st.carry():
            ds.write_bytes(carry_rel("filter", shard), table_bytes(out.pop()))
        summaries.extend(json.loads(json.dumps(out)))
    st.data = StageData(ds, "filter", len(parts))
    state = json.loads(json.dumps(st.reduce(summaries)))
    kept, reasons = set(), {}
    for shard, part in enumerate(parts):
        table = with_carry(st, part, ds.read_table(carry_rel("filter", shard))) if st.carry() else part
        out, _ = run_stage(st, table, "apply", state)
        for r in out.to_pylist():
            if r["_drop"] is None:
                kept.add(r["uid"])
            else:
                reasons[r["uid"]] = (r["_drop"], r["_detail"])
    return kept, state, reasons


def _shardings(table: pa.Table, seed: int) -> list[list[pa.Table]]:
    """The same rows as 1, 2 and 4 shards (the 4 in a shuffled order of rows), and between empty shards."""
    n = table.num_rows
    perm = np.random.default_rng(seed).permutation(n)
    shuffled = table.take(pa.array(perm))
    cuts = [i * n // 4 for i in range(5)]
    out = [[table], [table.slice(0, n // 3), table.slice(n // 3)],
           [shuffled.slice(a, b - a) for a, b in zip(cuts[:-1], cuts[1:])],
           [table.slice(0, 0), shuffled, table.slice(0, 0)]]  # shards an earlier stage emptied
    assert all(sorted(u for p in parts for u in p.column("uid").to_pylist()) == sorted(table.column("uid").to_pylist())
               for parts in out)
    return out


def _exact_by_sort(uids: list[str], x: np.ndarray, f: float) -> set:
    finite = [(float(v), u) for u, v in zip(uids, x) if math.isfinite(v)]
    finite.sort(key=lambda p: (-p[0], p[1]))
    return {u for _, u in finite[: math.ceil(round(f * len(finite), 9))]}


def _datacomp(uids: list[str], x: np.ndarray, f: float) -> set:
    """DataComp's get_threshold and filter (baselines/apply_filter.py), on the same scores."""
    n = int(len(x) * f)
    threshold = -np.sort(-x)[n]
    return {u for u, v in zip(uids, x) if v >= threshold}


@pytest.fixture(scope="module")
def tied_scores():
    """1000 float32 scores with heavy ties (0.001 steps) and one large group of equal scores."""
    rng = np.random.default_rng(0)
    x = np.round(rng.normal(0.25, 0.05, 1000), 3).astype(np.float32)
    x[::7] = np.float32(0.25)
    uids = _uids(len(x), 0)
    return uids, x, pa.table({"uid": uids, "clip_score": pa.array(x, pa.float32())})


@pytest.mark.parametrize("f", [0.001, 0.1, 0.3, 0.5, 0.77, 0.9999, 1.0])
def test_top_fraction_keeps_exactly_ceil_fn_whatever_the_sharding(tmp_path, tied_scores, f):
    uids, x, table = tied_scores
    want = _exact_by_sort(uids, x, f)
    assert len(want) == math.ceil(round(f * 1000, 9))
    results = [_run_filter({"top_fraction": f}, parts, tmp_path / f"s{i}") for i, parts in enumerate(_shardings(table, 1))]
    for kept, state, _ in results:
        assert kept == want
        assert state["keep"] == len(want) and state["finite"] == 1000
    assert all(r[1] == results[0][1] for r in results)  # the same state, threshold and cut uid


def test_deep_passes_and_uid_ties_give_the_same_cut(tmp_path, tied_scores):
    """A tiny collect limit forces the reduce through every 16-bit level, uid digits included."""
    uids, x, table = tied_scores
    for f in (0.5, 0.4, 0.05):
        want = _exact_by_sort(uids, x, f)
        for i, parts in enumerate(_shardings(table, 2)):
            kept, state, reasons = _run_filter({"top_fraction": f}, parts, tmp_path / f"{f}-{i}", collect_limit=2)
            assert kept == want, (f, i)
        if f == 0.5:  # 0.25 is the median: the cut falls inside its group of 140-odd equal scores
            tied = [u for u, v in zip(uids, x) if v == state["threshold"]]
            assert state["threshold"] == 0.25 and state["cut_uid"] in tied and len(tied) > 100
            lost = [reasons[u] for u in tied if u not in kept]
            assert lost and all(r == "below_threshold" and "tie, broken by uid" in d for r, d in lost)


@pytest.mark.parametrize("f", [0.001, 0.1, 0.3, 0.29, 0.5, 0.77, 0.9999])
def test_datacomp_rule_equals_datacomp(tmp_path, tied_scores, f):
    uids, x, table = tied_scores
    want = _datacomp(uids, x, f)
    for i, parts in enumerate(_shardings(table, 3)):
        kept, state, _ = _run_filter({"top_fraction": f, "rule": "datacomp"}, parts, tmp_path / str(i), collect_limit=3)
        assert kept == want
    assert state["threshold"] == float(-np.sort(-x)[int(1000 * f)])
    # at f = 1 DataComp's index runs past the end; here every finite score stays
    kept, _, _ = _run_filter({"top_fraction": 1.0, "rule": "datacomp"}, [table], tmp_path / "all")
    assert kept == set(uids)


def test_threshold_keeps_scores_at_least_it(tmp_path, tied_scores):
    uids, x, table = tied_scores
    kept, state, reasons = _run_filter({"threshold": 0.25}, _shardings(table, 4)[2], tmp_path)
    assert kept == {u for u, v in zip(uids, x) if v >= np.float32(0.25)}
    assert state["threshold"] == 0.25 and state["rule"] == "threshold"
    some = next(u for u, v in zip(uids, x) if v < 0.25)
    assert reasons[some][0] == "below_threshold" and "< threshold 0.25" in reasons[some][1]


def test_nonfinite_scores_never_enter_the_quantile(tmp_path):
    """NaN, inf, -inf and null scores are dropped as nonfinite_score; N counts the finite ones."""
    rng = np.random.default_rng(7)
    x = rng.random(200)
    x[[3, 50, 51]] = np.nan
    x[7], x[8] = np.inf, -np.inf
    uids = _uids(200, 7)
    col = pa.array([None if i == 9 else v for i, v in enumerate(x.tolist())], pa.float64())
    table = pa.table({"uid": uids, "clip_score": col})
    x[9] = np.nan
    for rule in ("exact", "datacomp"):
        for i, parts in enumerate(_shardings(table, 5)):
            kept, state, reasons = _run_filter({"top_fraction": 0.3, "rule": rule}, parts, tmp_path / f"{rule}{i}")
            assert state["finite"] == 194 and state["nonfinite"] == 6
            for j in (3, 7, 8, 9, 50, 51):
                assert reasons[uids[j]][0] == "nonfinite_score"
            finite_uids = [u for u, v in zip(uids, x) if math.isfinite(v)]
            fx = x[np.isfinite(x)]
            assert kept == (_exact_by_sort(uids, x, 0.3) if rule == "exact" else _datacomp(finite_uids, fx, 0.3))
    assert len(_exact_by_sort(uids, x, 0.3)) == math.ceil(0.3 * 194)


def test_keys_order_like_the_scores(tmp_path):
    """Negative scores, -0.0 = 0.0, and float64 values that round to the same float32 (the
    partial's coarse bin) still order exactly."""
    a = 0.1
    b = np.nextafter(a, 1.0)  # equal in float32, not in float64
    x = np.array([-0.5, -0.0, 0.0, a, b, b, -1e-30, 2.0, -3.0, 1e300, -1e300], np.float64)
    uids = _uids(len(x), 9)
    table = pa.table({"uid": uids, "s": pa.array(x)})
    for f in (0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 0.9):
        want = _exact_by_sort(uids, x, f)
        for parts in _shardings(table, 6):
            assert _run_filter({"column": "s", "top_fraction": f}, parts, tmp_path / str(f), collect_limit=1)[0] == want


@pytest.mark.parametrize("cfg, says", [
    ({"top_fraction": 0}, "greater than 0"),
    ({"top_fraction": 1.5}, "less than or equal to 1"),
    ({"top_fraction": -0.2}, "greater than 0"),
    ({"top_fraction": float("nan")}, "top_fraction"),
    ({}, "exactly one of threshold and top_fraction"),
    ({"threshold": 0.2, "top_fraction": 0.5}, "exactly one of threshold and top_fraction"),
    ({"top_fraction": 0.5, "rule": "median"}, "rule"),
])
def test_bad_filter_settings_are_job_errors(tmp_path, cfg, says):
    with pytest.raises(JobError) as e:
        _job({"filter": cfg}, tmp_path)
    assert "stages[0].filter" in str(e.value) and says in str(e.value), str(e.value)


# -- a job on the engine --------------------------------------------------------------------------

def _sidecar(out: Path, stage: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted((out / "stages" / stage).glob("*.parquet"))])


def test_source_clip_filter_job_on_ray(tmp_path, ray_local, folder_source, checkpoint, direct):
    from recap.pipeline.inspect import format_report, inspect_dataset
    from recap.pipeline.runner import run_job

    pics = tmp_path / "pics"
    pics.mkdir()
    images = {}
    for i in range(13):
        img = _noise(30 + 7 * i, 64 - 2 * i, 100 + i)
        data = _bytes(img)
        if i == 4:
            data = b""  # the source drops it
        elif i == 9:
            data = b"GIF89a broken"  # clip drops it: decode_error
        else:
            images[f"p{i}"] = img
        (pics / f"p{i}.png").write_bytes(data)
        (pics / f"p{i}.txt").write_text(f"a picture of noise number {i}" + (" and more" * 40 if i == 6 else ""))

    def run(out, files_per_shard, concurrency):
        job = build_job({"name": "cf", "seed": 1, "input": {"kind": "folder", "path": str(pics)}, "output": str(out),
                         "scan": {"files_per_shard": files_per_shard},
                         "stages": [{"clip": {"model": MODEL, "pretrained": checkpoint, "batch_size": 1,
                                              "concurrency": concurrency}},
                                    {"filter": {"top_fraction": 0.5}}]}, "cf.yaml")
        run_job(job, progress=False)
        rep = inspect_dataset(str(out))
        assert rep["invariant_ok"], rep["problems"]
        return rep

    rep = run(tmp_path / "a", 4, 2)
    assert rep["stages"]["folder"]["dropped"] == {"empty_file": 1}
    assert rep["stages"]["clip"] == {"in": 12, "kept": 11, "dropped": {"decode_error": 1},
                                     "notes": {"caption_truncated_tokens": 1}}
    assert rep["stages"]["filter"]["kept"] == math.ceil(0.5 * 11) == 6
    assert rep["summaries"]["filter"]["keep"] == 6 and "threshold" in rep["summaries"]["filter"]
    text = format_report(rep)
    assert "filter: top 0.5 of clip_score (exact: 6 of 11)" in text and "clip: clip_score of 11 kept samples" in text

    index = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "a/shards").glob("*.parquet"))])
    name = dict(zip(index.column("uid").to_pylist(), index.column("name").to_pylist()))
    caption = dict(zip(index.column("uid").to_pylist(), index.column("caption").to_pylist()))
    side = _sidecar(tmp_path / "a", "clip").to_pylist()
    img, txt = direct([images[name[r["uid"]]] for r in side], [caption[r["uid"]] for r in side])
    for r, i, t in zip(side, img, txt):
        assert r["clip_score"] == pytest.approx(float(i @ t), abs=1e-3)
    scores = {r["uid"]: r["clip_score"] for r in side}
    kept = set(_sidecar(tmp_path / "a", "filter").column("uid").to_pylist())
    assert pq.read_schema(tmp_path / "a/stages/filter/carry/00000.parquet").field("filter_score").type == pa.float32()
    assert kept == set(sorted(scores, key=lambda u: (-scores[u], u))[:6])

    # another sharding and one clip worker: the same scores and the same kept samples
    run(tmp_path / "b", 7, 1)
    side_b = {r["uid"]: r["clip_score"] for r in _sidecar(tmp_path / "b", "clip").to_pylist()}
    assert side_b.keys() == scores.keys() and all(side_b[u] == pytest.approx(scores[u], abs=1e-6) for u in scores)
    assert set(_sidecar(tmp_path / "b", "filter").column("uid").to_pylist()) == kept


def test_random_init_is_the_same_model_in_every_worker():
    import torch

    from recap.models.encoders import EncoderSpec, load_encoder

    torch.manual_seed(1)
    a = load_encoder(EncoderSpec(MODEL, None), device="cpu")
    torch.manual_seed(2)
    b = load_encoder(EncoderSpec(MODEL, None), device="cpu")
    for (name, pa_), (_, pb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(pa_, pb), name
    assert torch.initial_seed() == 2  # the caller's generator is left as it was
