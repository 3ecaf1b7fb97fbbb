"""The reinforced shard format: config, writer, tolerant reader and augmentation replay.

One definition shared by the reinforce stage (which writes it) and the trainer (which reads it).
DataCompDR-compatible (MobileCLIP), extended with provenance of synthetic captions and negatives.

Dataset directory (local path or any fsspec URL)::

    config.json          ReinforcedConfig: teachers (concatenation order, dims), aug config, generators
    sizes.json           {"00000.tar": n, ...}  (also copied to shards/sizes.json, where open_clip looks)
    manifest.jsonl       one line per shard: {"name", "path", "n", "bytes", "sha256"}
    shards/NNNNN.tar     deterministic tars (pipeline.shards.write_tar: members in input order,
                         mtime 0, uid/gid 0)

Members of one sample (webdataset key = uid; only ``jpg``, ``txt``, ``json`` are required):

    jpg          image bytes (the reader also accepts png/jpeg/webp from plain img2dataset shards)
    txt          primary (GT) caption, UTF-8
    url.txt      source URL
    json         {uid, sha256, width, height, scores: {...}, matched_entries, balance_prob, ...}
    paug.json    {"param_aug": [N_aug x [[i, j, h, w], [[op_idx, mag_bin] x num_ops]]]}
                 (i, j, h, w): RandomResizedCrop box (top, left, height, width) in pixels of the
                 stored image; op_idx indexes ``config.aug.ops``; mag_bin is a *signed* magnitude
                 bin: |mag_bin| indexes the op's magnitudes as torchvision's
                 ``RandAugment._augmentation_space(num_magnitude_bins, (S, S))`` computes them for
                 the output size S, and a negative bin negates a signed op's magnitude.
    syn.json     {"syn_text": [...], "syn_source": [...] (parallel: caption, rewrite, short, ...),
                  HQ-CLIP's "long_positive", "short_positive", "short_negative", ...}
    neg.json     {"neg_text_short": [...], and parallel to it: "neg_text_long", "neg_of" (index into
                  [GT] + syn_text of the text each negative was made from), "neg_type";
                  "hard_neg_uids" and parallel "hard_neg_sims" (kNN image hard negatives)}
    npz          image_emb [N_aug, D] (row i <-> param_aug[i]); text_emb [1 + n_syn, D] (row 0 = GT,
                 then syn_text in order); neg_text_emb [len(neg_text_short), D]. D = sum of teacher
                 dims, concatenated in config order, each teacher's slice L2-normalised; stored as
                 ``config.emb_dtype`` (float16 by default). The zip is written by hand with fixed
                 timestamps (np.savez stamps the current time), so equal arrays give equal bytes.
                 DataCompDR's ``pth.gz`` (bf16 torch pickles) is not written or read yet.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import lru_cache
from typing import Any, Literal

import fsspec
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from recap.pipeline import rng
from recap.pipeline.shards import sample_json, write_tar

FORMAT = "recap-reinforced"
VERSION = 1
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
EMB_FIELDS = ("image_emb", "text_emb", "neg_text_emb")

# torchvision's RandAugment op list, in its _augmentation_space order (the default op table).
RANDAUGMENT_OPS = ["Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
                   "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize"]


class ReinforcedFormatError(ValueError):
    """A sample or dataset that does not fit the format; the message names the uid/field/path."""


# -- config ------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TeacherConfig(_Strict):
    name: str = Field(..., description="open_clip model name (or a label for another encoder)")
    pretrained: str | None = Field(None, description="pretrained tag or checkpoint path")
    dim: int = Field(..., ge=1, description="embedding width of this teacher's slice")


class AugConfig(_Strict):
    image_size: int = Field(224, ge=1, description="output side the teacher embeddings were computed at")
    scale: tuple[float, float] = Field((0.08, 1.0), description="RandomResizedCrop area range")
    ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="RandomResizedCrop aspect range")
    interpolation: Literal["nearest", "bilinear", "bicubic"] = "bilinear"
    n_aug: int = Field(10, ge=1, description="stored augmentations per image")
    num_ops: int = Field(2, ge=0, description="RandAugment ops per augmentation")
    num_magnitude_bins: int = Field(31, ge=2)
    magnitude: int | None = Field(9, ge=0, description="fixed magnitude bin (torchvision's RandAugment); "
                                                        "None: a bin drawn uniformly per op")
    ops: list[str] = Field(default_factory=lambda: list(RANDAUGMENT_OPS),
                           description="op table that op_idx indexes (torchvision RandAugment names)")

    @field_validator("ops")
    @classmethod
    def _known_ops(cls, v: list[str]) -> list[str]:
        bad = [o for o in v if o not in RANDAUGMENT_OPS]
        if bad:
            raise ValueError(f"unknown RandAugment ops {bad}; known: {RANDAUGMENT_OPS}")
        if not v:
            raise ValueError("ops must not be empty")
        return v

    @model_validator(mode="after")
    def _ranges(self) -> AugConfig:
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        if self.magnitude is not None and self.magnitude >= self.num_magnitude_bins:
            raise ValueError(f"magnitude {self.magnitude} must be < num_magnitude_bins {self.num_magnitude_bins}")
        return self


class ReinforcedConfig(_Strict):
    format: Literal["recap-reinforced"] = FORMAT
    version: int = VERSION
    teachers: list[TeacherConfig] = Field(default_factory=list, description="in concatenation order")
    aug: AugConfig = Field(default_factory=AugConfig)
    emb_dtype: Literal["float16", "float32"] = "float16"
    generators: dict[str, Any] = Field(default_factory=dict,
                                       description="captioner/LLM names, generation params, prompt hashes")

    @property
    def dim(self) -> int:
        """D: the width of every embedding row (sum of teacher dims); 0 without teachers."""
        return sum(t.dim for t in self.teachers)

    def slices(self) -> list[tuple[str, slice]]:
        out, at = [], 0
        for t in self.teachers:
            out.append((t.name, slice(at, at + t.dim)))
            at += t.dim
        return out


# Augmentation of plain (non-reinforced) shards: open_clip's training RandomResizedCrop, no RandAugment.
PLAIN_AUG = AugConfig(scale=(0.9, 1.0), interpolation="bicubic", n_aug=1, num_ops=0)


# -- augmentation: sampling and replay --------------------------------------------------------------
@lru_cache(maxsize=64)
def _space(num_bins: int, size: tuple[int, int]) -> dict[str, tuple[list[float], bool]]:
    """Op -> (magnitudes per bin, signed), exactly as torchvision's RandAugment computes them."""
    from torchvision.transforms import RandAugment

    space = RandAugment()._augmentation_space(num_bins, size)
    return {k: ([float(x) for x in m.reshape(-1).tolist()] if m.ndim > 0 else [], s) for k, (m, s) in space.items()}


def _signed(op: str) -> bool:
    return _space(31, (224, 224))[op][1]


def _crop_box(g: np.random.Generator, width: int, height: int, scale: Sequence[float],
              ratio: Sequence[float]) -> list[int]:
    """torchvision's RandomResizedCrop.get_params, drawing from a numpy Generator."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * float(g.uniform(scale[0], scale[1]))
        aspect = math.exp(float(g.uniform(log_ratio[0], log_ratio[1])))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(g.integers(0, height - h + 1))
            j = int(g.integers(0, width - w + 1))
            return [i, j, h, w]
    in_ratio = width / height  # fallback: central crop
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return [(height - h) // 2, (width - w) // 2, h, w]


def sample_param_aug(width: int, height: int, aug_cfg: AugConfig, seed: int, uid: str, n_aug: int | None = None,
                     stage: str = "reinforce") -> list:
    """``n_aug`` augmentation parameters for one image of ``width`` x ``height``: a pure function of
    (seed, stage, uid) and the config, so independent of call order, batch and worker."""
    if width < 1 or height < 1:
        raise ReinforcedFormatError(f"sample {uid}: image size {width}x{height} has no pixels")
    n = aug_cfg.n_aug if n_aug is None else n_aug
    g = rng.generator(seed, f"{stage}/paug", uid)
    out = []
    for _ in range(n):
        box = _crop_box(g, width, height, aug_cfg.scale, aug_cfg.ratio)
        ops = []
        for _ in range(aug_cfg.num_ops):
            idx = int(g.integers(len(aug_cfg.ops)))
            mag = aug_cfg.magnitude if aug_cfg.magnitude is not None else int(g.integers(aug_cfg.num_magnitude_bins))
            if _signed(aug_cfg.ops[idx]) and int(g.integers(2)):
                mag = -mag
            ops.append([idx, int(mag)])
        out.append([box, ops])
    return out


def _interp(name: str):
    from torchvision.transforms import InterpolationMode

    return {"nearest": InterpolationMode.NEAREST, "bilinear": InterpolationMode.BILINEAR,
            "bicubic": InterpolationMode.BICUBIC}[name]


def check_param(param: Any, aug_cfg: AugConfig, where: str = "param_aug") -> None:
    """Raise ReinforcedFormatError unless ``param`` is ``[[i, j, h, w], [[op_idx, mag_bin], ...]]``."""
    try:
        box, ops = param
        ok = len(box) == 4 and all(isinstance(x, int) for x in box) and box[2] > 0 and box[3] > 0
        for op in ops:
            idx, mag = op
            ok = ok and isinstance(idx, int) and isinstance(mag, int) and 0 <= idx < len(aug_cfg.ops) \
                and abs(mag) < aug_cfg.num_magnitude_bins and (mag >= 0 or _signed(aug_cfg.ops[idx]))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ReinforcedFormatError(f"{where}: expected [[i, j, h, w], [[op_idx, mag_bin], ...]] with op_idx < "
                                    f"{len(aug_cfg.ops)} and |mag_bin| < {aug_cfg.num_magnitude_bins}, got {param!r}")


def apply_param_aug(img, param: Sequence, aug_cfg: AugConfig, image_size: int | None = None):
    """Replay one stored augmentation on a PIL image; returns a PIL image of ``image_size`` (default
    ``aug_cfg.image_size``) square. Crop: torchvision ``resized_crop(i, j, h, w)`` with the config's
    interpolation (antialiased); then each op through torchvision's ``_apply_op`` with the magnitude
    torchvision's RandAugment would use for that bin at the output size (NEAREST, fill 0, as
    RandAugment's defaults). Pure: the same (image, param) gives the same pixels every time."""
    import torchvision.transforms.functional as F
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.autoaugment import _apply_op

    size = int(image_size or aug_cfg.image_size)
    (i, j, h, w), ops = param
    out = F.resized_crop(img, int(i), int(j), int(h), int(w), [size, size], interpolation=_interp(aug_cfg.interpolation),
                         antialias=True)
    space = _space(aug_cfg.num_magnitude_bins, (size, size))
    for idx, mag in ops:
        name = aug_cfg.ops[int(idx)]
        mags, _ = space[name]
        magnitude = mags[abs(int(mag))] if mags else 0.0
        if mag < 0:
            magnitude = -magnitude
        out = _apply_op(out, name, magnitude, interpolation=InterpolationMode.NEAREST, fill=None)
    return out


# -- npz with deterministic bytes ----------------------------------------------------------------
def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Like np.savez (loadable by np.load), but with a fixed zip timestamp: same arrays, same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.create_system = 3
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def load_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# -- sample encoding (writer side) --------------------------------------------------------------
def _json_bytes(obj: Any) -> bytes:
    return sample_json(obj)


def _check_rows(uid: str, name: str, arr: Any, rows: int, dim: int, config: ReinforcedConfig,
                why: str) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim != 2:
        raise ReinforcedFormatError(f"sample {uid}: {name} must be 2-D [rows, D], got shape {a.shape}")
    if a.shape[0] != rows:
        raise ReinforcedFormatError(f"sample {uid}: {name} has {a.shape[0]} rows but {why} needs {rows}")
    if a.shape[1] != dim:
        raise ReinforcedFormatError(f"sample {uid}: {name} has width {a.shape[1]} but the teachers' dims sum to {dim}")
    if not np.issubdtype(a.dtype, np.floating):
        raise ReinforcedFormatError(f"sample {uid}: {name} must be floating point, got {a.dtype}")
    if not np.isfinite(a).all():
        raise ReinforcedFormatError(f"sample {uid}: {name} has non-finite values")
    for tname, sl in config.slices():
        if rows and not np.allclose(np.linalg.norm(a[:, sl].astype(np.float64), axis=1), 1.0, atol=1e-2):
            raise ReinforcedFormatError(f"sample {uid}: {name}: teacher {tname!r} slice is not L2-normalised")
    return a.astype(config.emb_dtype)


def _str_list(uid: str, field: str, v: Any) -> list:
    if not isinstance(v, list):
        raise ReinforcedFormatError(f"sample {uid}: {field} must be a list, got {type(v).__name__}")
    return v


def encode_sample(sample: dict, config: ReinforcedConfig) -> tuple[str, dict[str, bytes]]:
    """Validate one sample dict and turn it into tar members ``(key, {ext: bytes})``.

    Keys: ``uid`` (str), ``jpg`` (bytes), ``txt`` (str) required; optional ``url`` (str),
    ``json`` (dict), ``param_aug`` (list), ``syn`` (dict), ``neg`` (dict), ``image_emb``,
    ``text_emb``, ``neg_text_emb`` (arrays). Errors name the uid and the field."""
    uid = sample.get("uid")
    if not isinstance(uid, str) or not uid or any(c in uid for c in "./\\") or uid != uid.strip():
        raise ReinforcedFormatError(f"sample uid {uid!r}: must be a non-empty string without '.', '/' or spaces")
    jpg, txt = sample.get("jpg"), sample.get("txt")
    if not isinstance(jpg, (bytes, bytearray)) or not jpg:
        raise ReinforcedFormatError(f"sample {uid}: jpg must be non-empty image bytes")
    if not isinstance(txt, str):
        raise ReinforcedFormatError(f"sample {uid}: txt must be a string, got {type(txt).__name__}")
    meta = dict(sample.get("json") or {})
    if meta.get("uid", uid) != uid:
        raise ReinforcedFormatError(f"sample {uid}: json.uid is {meta['uid']!r}")
    meta["uid"] = uid
    members: dict[str, bytes] = {"jpg": bytes(jpg), "txt": txt.encode("utf-8"), "json": _json_bytes(meta)}
    if sample.get("url") is not None:
        members["url.txt"] = str(sample["url"]).encode("utf-8")

    paug = sample.get("param_aug")
    if paug is not None:
        _str_list(uid, "param_aug", paug)
        for k, p in enumerate(paug):
            check_param(p, config.aug, f"sample {uid}: param_aug[{k}]")
        members["paug.json"] = _json_bytes({"param_aug": paug})
    syn = sample.get("syn")
    n_syn = 0
    if syn is not None:
        syn_text = _str_list(uid, "syn.syn_text", syn.get("syn_text", []))
        if not all(isinstance(t, str) for t in syn_text):
            raise ReinforcedFormatError(f"sample {uid}: syn.syn_text must hold strings")
        if "syn_source" in syn and len(_str_list(uid, "syn.syn_source", syn["syn_source"])) != len(syn_text):
            raise ReinforcedFormatError(f"sample {uid}: syn.syn_source has {len(syn['syn_source'])} entries, "
                                        f"syn_text {len(syn_text)}")
        n_syn = len(syn_text)
        members["syn.json"] = _json_bytes(syn)
    neg = sample.get("neg")
    n_neg = 0
    if neg is not None:
        short = _str_list(uid, "neg.neg_text_short", neg.get("neg_text_short", []))
        n_neg = len(short)
        for f in ("neg_text_long", "neg_of", "neg_type"):
            if f in neg and len(_str_list(uid, f"neg.{f}", neg[f])) != n_neg:
                raise ReinforcedFormatError(f"sample {uid}: neg.{f} has {len(neg[f])} entries, neg_text_short {n_neg}")
        if len(neg.get("hard_neg_uids", [])) != len(neg.get("hard_neg_sims", neg.get("hard_neg_uids", []))):
            raise ReinforcedFormatError(f"sample {uid}: neg.hard_neg_uids and neg.hard_neg_sims differ in length")
        members["neg.json"] = _json_bytes(neg)

    arrays: dict[str, np.ndarray] = {}
    present = [f for f in EMB_FIELDS if sample.get(f) is not None]
    if present and not config.teachers:
        raise ReinforcedFormatError(f"sample {uid}: {present[0]} given but the config lists no teachers")
    D = config.dim
    if sample.get("image_emb") is not None:
        if paug is None:
            raise ReinforcedFormatError(f"sample {uid}: image_emb needs param_aug (row i <-> param_aug[i])")
        arrays["image_emb"] = _check_rows(uid, "image_emb", sample["image_emb"], len(paug), D, config,
                                          "param_aug's length")
    if sample.get("text_emb") is not None:
        arrays["text_emb"] = _check_rows(uid, "text_emb", sample["text_emb"], 1 + n_syn, D, config,
                                         "1 + len(syn_text)")
    if sample.get("neg_text_emb") is not None:
        arrays["neg_text_emb"] = _check_rows(uid, "neg_text_emb", sample["neg_text_emb"], n_neg, D, config,
                                             "len(neg_text_short)")
    if arrays:
        members["npz"] = npz_bytes(arrays)
    for ext, data in (sample.get("extra") or {}).items():
        members.setdefault(ext, bytes(data))
    return uid, members


def encode_shard(samples: Iterable[dict], config: ReinforcedConfig) -> tuple[bytes, int]:
    """Tar bytes of the samples (in order; duplicate uids are an error) and the sample count."""
    seen: set[str] = set()
    encoded = []
    for s in samples:
        key, members = encode_sample(s, config)
        if key in seen:
            raise ReinforcedFormatError(f"sample {key}: uid appears twice in one shard")
        seen.add(key)
        encoded.append((key, members))
    return write_tar(encoded), len(encoded)


# -- dataset files ------------------------------------------------------------------------------
def shard_file(index: int) -> str:
    return f"{index:05d}.tar"


def _join(url: str, rel: str) -> str:
    return f"{url.rstrip('/')}/{rel}"


def _write(url: str, data: bytes) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        import os
        import uuid

        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def _read(url: str) -> bytes:
    with fsspec.open(url, "rb") as f:
        return f.read()


def write_index(out: str, config: ReinforcedConfig, entries: Sequence[dict]) -> None:
    """Write config.json, sizes.json (top level and shards/, where open_clip looks) and
    manifest.jsonl from shard entries ``{"name", "n", ...}`` (sorted by name)."""
    entries = sorted(entries, key=lambda e: e["name"])
    sizes = json.dumps({e["name"]: int(e["n"]) for e in entries}, indent=1, sort_keys=True).encode()
    _write(_join(out, "sizes.json"), sizes)
    _write(_join(out, "shards/sizes.json"), sizes)
    _write(_join(out, "manifest.jsonl"), "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries).encode())
    _write(_join(out, "config.json"), json.dumps(config.model_dump(mode="json"), indent=1, sort_keys=True).encode())


class ReinforcedWriter:
    """Writes a reinforced dataset: ``write_shard`` per shard, then ``close`` for the index files.

    Shards may be written by several writers (e.g. Ray workers) if one of them, or the caller, then
    calls ``write_index`` with all entries."""

    def __init__(self, out: str, config: ReinforcedConfig | dict):
        self.out = str(out).rstrip("/")
        self.config = config if isinstance(config, ReinforcedConfig) else ReinforcedConfig.model_validate(config)
        self.entries: dict[str, dict] = {}
        self.closed = False

    def write_shard(self, index: int, samples: Iterable[dict]) -> dict:
        """Validate and write ``shards/{index:05d}.tar``; returns its manifest entry."""
        if self.closed:
            raise RuntimeError("ReinforcedWriter is closed")
        data, n = encode_shard(samples, self.config)
        name = shard_file(index)
        _write(_join(self.out, f"shards/{name}"), data)
        entry = {"name": name, "path": f"shards/{name}", "n": n, "bytes": len(data),
                 "sha256": hashlib.sha256(data).hexdigest()}
        self.entries[name] = entry
        return entry

    def close(self) -> None:
        if not self.closed:
            write_index(self.out, self.config, list(self.entries.values()))
            self.closed = True

    def __enter__(self) -> ReinforcedWriter:
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()


# -- reading ------------------------------------------------------------------------------------
def read_config(url: str) -> ReinforcedConfig:
    """The dataset's config.json (``url`` is the dataset directory, or config.json itself)."""
    path = url if url.rstrip("/").endswith(".json") else _join(url, "config.json")
    try:
        raw = json.loads(_read(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no config.json (not a reinforced dataset?)") from None
    except ValueError as e:
        raise ReinforcedFormatError(f"{path}: not valid JSON ({e})") from None
    try:
        return ReinforcedConfig.model_validate(raw)
    except Exception as e:  # pydantic ValidationError: name the file
        raise ReinforcedFormatError(f"{path}: {e}") from None


def find_config(url: str) -> tuple[ReinforcedConfig | None, str | None]:
    """Config of a dataset given by its directory, its shards/ directory, or one of its shard URLs
    (looked up in the directory and its parent). (None, None) for plain shards."""
    base = url.rstrip("/")
    if base.endswith(".tar") or "{" in base:
        base = base.rsplit("/", 1)[0]
    for cand in (base, base.rsplit("/", 1)[0] if "/" in base else None):
        if not cand:
            continue
        fs, path = fsspec.core.url_to_fs(_join(cand, "config.json"))
        if fs.exists(path):
            return read_config(cand), cand
    return None, None


def read_sizes(url: str) -> dict[str, int]:
    """sizes.json of a dataset directory (or of a shards/ directory); {} when absent."""
    for rel in ("sizes.json", "shards/sizes.json"):
        try:
            return {k: int(v) for k, v in json.loads(_read(_join(url, rel))).items()}
        except (FileNotFoundError, ValueError):
            continue
    return {}


def _expand(url: str) -> list[str]:
    import braceexpand

    return list(braceexpand.braceexpand(url))


def list_shards(url: str | Sequence[str]) -> list[str]:
    """Shard URLs, sorted by name within a directory: a reinforced dataset's ``shards/*.tar``, a
    directory of tars (plain img2dataset output, or its ``shards/``), a tar URL, a brace pattern
    (``.../{00000..00009}.tar``), ``::``-separated URLs, or a list of any of these. Never raises
    for an empty result: callers decide (the trainer raises, naming the path)."""
    if not isinstance(url, str):
        return [s for u in url for s in list_shards(u)]
    if "::" in url and not url.startswith("simplecache::"):
        return [s for u in url.split("::") if u for s in list_shards(u)]
    out: list[str] = []
    for u in _expand(url):
        fs, path = fsspec.core.url_to_fs(u)
        if path.endswith(".tar"):
            out.append(fs.unstrip_protocol(path) if "://" in u else path)
            continue
        for sub in ("shards/", ""):
            found = sorted(fs.glob(f"{path.rstrip('/')}/{sub}*.tar"))
            if found:
                out.extend(fs.unstrip_protocol(p) if "://" in u else p for p in found)
                break
    return out


def _split_name(name: str) -> tuple[str, str]:
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower() if dot else ""


def iter_raw(url: str, stats: Counter | None = None, expected_n: int | None = None,
             count_shard_errors: bool = True) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` groups of one tar (webdataset grouping: consecutive members with the
    same key). A missing shard, or a truncated/corrupt tar, ends the shard with a counted
    ``missing_shard`` / ``truncated_shard``, and the group being read is dropped. A tar cut at a
    block boundary is caught too: a complete tar ends with a zero block, which the reader checks
    (tarfile's own iteration stops there silently). Fewer groups than ``expected_n`` (sizes.json)
    in an otherwise sound tar counts ``short_shard``. Never raises for bad data."""
    stats = stats if stats is not None else Counter()
    n = 0
    group: dict[str, bytes] = {}
    key = None
    try:
        with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = _split_name(member.name)
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} cut short")
                if key is not None and k != key:
                    n += 1
                    yield key, group
                    group = {}
                key = k
                group[ext] = data
            tar.fileobj.seek(tar.offset)
            end = tar.fileobj.read(tarfile.BLOCKSIZE)
            if len(end) != tarfile.BLOCKSIZE or end.count(0) != tarfile.BLOCKSIZE:
                raise tarfile.ReadError("no end-of-archive block: cut short")
    except FileNotFoundError:
        if count_shard_errors:
            stats["missing_shard"] += 1
        return
    except (tarfile.TarError, OSError, EOFError, zipfile.BadZipFile, ValueError):
        if count_shard_errors:
            stats["truncated_shard"] += 1
        return
    if key is not None and group:
        n += 1
        yield key, group
    if expected_n is not None and n < expected_n and count_shard_errors:
        stats["short_shard"] += 1


def _json(data: bytes) -> Any:
    return json.loads(data.decode("utf-8"))


def decode_sample(key: str, members: dict[str, bytes], stats: Counter | None = None,
                  required: Sequence[str] = ("jpg", "txt", "json"), config: ReinforcedConfig | None = None,
                  decode_npz: bool = True) -> dict | None:
    """Decode one group into a sample dict (the writer's input shape, plus ``shard_key``), or None
    with the reason counted in ``stats``: ``missing_<member>``, ``bad_<member>`` (undecodable),
    ``bad_shapes`` (rows disagree with param_aug/syn/neg), ``bad_emb_dim`` (width != config dim)."""
    stats = stats if stats is not None else Counter()
    image_ext = next((e for e in IMAGE_EXTS if e in members), None)
    for r in required:
        have = image_ext is not None if r == "jpg" else r in members
        if not have:
            stats[f"missing_{r.replace('.', '_')}"] += 1
            return None
    s: dict[str, Any] = {"uid": key, "jpg": members[image_ext] if image_ext else None}
    try:
        field = "txt"
        s["txt"] = members["txt"].decode("utf-8") if "txt" in members else None
        field = "url"
        s["url"] = members["url.txt"].decode("utf-8") if "url.txt" in members else None
        field = "json"
        s["json"] = _json(members["json"]) if "json" in members else {}
        if not isinstance(s["json"], dict):
            raise ValueError("not an object")
        field = "paug"
        s["param_aug"] = _json(members["paug.json"])["param_aug"] if "paug.json" in members else None
        field = "syn"
        s["syn"] = _json(members["syn.json"]) if "syn.json" in members else None
        field = "neg"
        s["neg"] = _json(members["neg.json"]) if "neg.json" in members else None
        field = "npz"
        arrays = load_npz(members["npz"]) if "npz" in members and decode_npz else {}
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, zipfile.BadZipFile, OSError, EOFError):
        stats[f"bad_{field}"] += 1
        return None
    for f in EMB_FIELDS:
        s[f] = arrays.get(f)
    s["extra"] = {e: d for e, d in members.items()
                  if e not in (image_ext, "txt", "url.txt", "json", "paug.json", "syn.json", "neg.json", "npz")}
    # rows must agree with what they index
    n_syn = len((s["syn"] or {}).get("syn_text", []))
    n_neg = len((s["neg"] or {}).get("neg_text_short", []))
    want = {"image_emb": len(s["param_aug"]) if s["param_aug"] is not None else None, "text_emb": 1 + n_syn,
            "neg_text_emb": n_neg}
    for f in EMB_FIELDS:
        a = s[f]
        if a is None:
            continue
        if a.ndim != 2 or want[f] is None or a.shape[0] != want[f]:
            stats["bad_shapes"] += 1
            return None
        if config is not None and a.shape[1] != config.dim:
            stats["bad_emb_dim"] += 1
            return None
    return s


def iter_shard(url: str, stats: Counter | None = None, required: Sequence[str] = ("jpg", "txt", "json"),
               config: ReinforcedConfig | None = None, expected_n: int | None = None) -> Iterator[dict]:
    """Decoded samples of one shard, in tar order. Tolerant: samples that lack a required member or
    do not decode are skipped and counted in ``stats`` (reason -> n); a truncated tar ends the shard
    with a counted error. Never raises for bad data."""
    stats = stats if stats is not None else Counter()
    for key, members in iter_raw(url, stats, expected_n):
        s = decode_sample(key, members, stats, required, config)
        if s is not None:
            yield s


# -- fixtures -----------------------------------------------------------------------------------
def _unit_rows(rows: np.ndarray, config: ReinforcedConfig) -> np.ndarray:
    out = rows.astype(np.float64).copy()
    for _, sl in config.slices():
        out[:, sl] /= np.maximum(np.linalg.norm(out[:, sl], axis=1, keepdims=True), 1e-12)
    return out.astype(np.float32)


def _index_rows(n: int, config: ReinforcedConfig) -> np.ndarray:
    """Row k = the unit vector e_k in every teacher slice (so a row's argmax names its index)."""
    out = np.zeros((n, config.dim), np.float32)
    for _, sl in config.slices():
        width = sl.stop - sl.start
        if n > width:
            raise ValueError(f"encode_index needs every teacher dim >= {n} rows, got {width}")
        out[np.arange(n), sl.start + np.arange(n)] = 1.0
    return out


def _fixture_image(g: np.random.Generator, min_size: int, max_size: int) -> bytes:
    from PIL import Image, ImageDraw

    w, h = (int(x) for x in g.integers(min_size, max_size + 1, size=2))
    img = Image.new("RGB", (w, h), tuple(int(c) for c in g.integers(0, 256, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = int(g.integers(0, w // 2)), int(g.integers(0, h // 2))
        x1, y1 = int(g.integers(x0 + 4, w + 1)), int(g.integers(y0 + 4, h + 1))
        d.rectangle([x0, y0, x1, y1], fill=tuple(int(c) for c in g.integers(0, 256, 3)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_fixture(out: str, n_samples: int, n_shards: int = 1, dims: Sequence[int] = (16,), seed: int = 0,
                 images_from: str | None = None, *, n_aug: int = 3, n_syn: int = 2, n_neg: int = 2,
                 image_size: int = 32, balance_prob: float | Callable[[int], float] | None = None,
                 encode_index: bool = False, min_size: int = 40, max_size: int = 96,
                 aug: dict | None = None) -> dict:
    """A small reinforced dataset (the reinforce stage's writer, minus the models): images drawn at
    random (or the files of ``images_from``, cycled in name order), ``n_syn`` synthetic captions and
    ``n_neg`` negatives per sample, random L2-normalised teacher embeddings (or, with
    ``encode_index``, row k = e_k in every teacher slice, so tests can check row <-> index).
    Returns ``{"config", "uids" (in write order), "shards": {name: [uids]}, "samples": {uid: dict}}``."""
    from PIL import Image

    from recap.pipeline.uid import make_uid

    config = ReinforcedConfig(
        teachers=[TeacherConfig(name=f"teacher{k}", pretrained=None, dim=int(d)) for k, d in enumerate(dims)],
        aug=AugConfig(**{"image_size": image_size, "n_aug": n_aug, **(aug or {})}),
        emb_dtype="float32",
        generators={"captioner": {"name": "fixture"}, "rewriter": {"name": "fixture"}})
    files: list[bytes] = []
    if images_from:
        fs, root = fsspec.core.url_to_fs(images_from)
        for p in sorted(fs.find(root)):
            if p.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
                files.append(fs.cat_file(p))
        if not files:
            raise FileNotFoundError(f"no images under {images_from}")
    g = rng.generator(seed, "fixture", "images")
    sources = ["caption", "rewrite", "short", "long"]
    samples: list[dict] = []
    for i in range(n_samples):
        url = f"https://fixture.invalid/{seed}/{i}.jpg"
        caption = f"fixture image {i} of seed {seed}"
        uid = make_uid(url, caption)
        jpg = files[i % len(files)] if files else _fixture_image(g, min_size, max_size)
        with Image.open(io.BytesIO(jpg)) as im:
            width, height = im.size
        syn_text = [f"synthetic {sources[k % len(sources)]} {k} of image {i}" for k in range(n_syn)]
        neg_short = [f"negative {k} of image {i}" for k in range(n_neg)]
        bp = balance_prob(i) if callable(balance_prob) else balance_prob
        meta = {"uid": uid, "sha256": hashlib.sha256(jpg).hexdigest(), "width": width, "height": height,
                "scores": {"clip": round(float(g.uniform(0.1, 0.4)), 6)}, "matched_entries": []}
        if bp is not None:
            meta["balance_prob"] = float(bp)
        s = {"uid": uid, "jpg": jpg, "txt": caption, "url": url, "json": meta,
             "param_aug": sample_param_aug(width, height, config.aug, seed, uid, n_aug),
             "syn": {"syn_text": syn_text, "syn_source": [sources[k % len(sources)] for k in range(n_syn)]},
             "neg": {"neg_text_short": neg_short, "neg_text_long": [t + ", described at length" for t in neg_short],
                     "neg_of": [k % (1 + n_syn) for k in range(n_neg)], "neg_type": ["swap"] * n_neg,
                     "hard_neg_uids": [], "hard_neg_sims": []}}
        if config.teachers:
            eg = rng.generator(seed, "fixture/emb", uid)
            for f, rows in (("image_emb", n_aug), ("text_emb", 1 + n_syn), ("neg_text_emb", n_neg)):
                s[f] = _index_rows(rows, config) if encode_index else \
                    _unit_rows(eg.standard_normal((rows, config.dim)), config)
        samples.append(s)
    shards: dict[str, list[str]] = {}
    with ReinforcedWriter(out, config) as w:
        for k in range(n_shards):
            part = samples[k * n_samples // n_shards:(k + 1) * n_samples // n_shards]
            w.write_shard(k, part)
            shards[shard_file(k)] = [s["uid"] for s in part]
    return {"config": config, "uids": [s["uid"] for s in samples], "shards": shards,
            "samples": {s["uid"]: s for s in samples}}
