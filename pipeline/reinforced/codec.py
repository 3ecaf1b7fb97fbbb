"""One sample <-> its tar members ``{ext: bytes}``: validation on the way in, a tolerant decode on
the way out, and the embeddings (npz, or DataCompDR's bf16 ``pth.gz``) with deterministic bytes."""
from __future__ import annotations

import gzip
import io
import json
import zipfile
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from recap.pipeline.reinforced.augment import check_param, upgrade_v1
from recap.pipeline.reinforced.config import VERSION, ReinforcedConfig, ReinforcedFormatError
from recap.pipeline.shards import sample_json, write_tar

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
EMB_FIELDS = ("image_emb", "text_emb", "neg_text_emb")
EMB_MEMBERS = ("npz", "pth.gz")


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


def pth_gz_bytes(arrays: dict[str, np.ndarray], dtype: str = "bfloat16") -> bytes:
    """DataCompDR's ``pth.gz``: a gzipped ``torch.save`` of ``{name: tensor}`` (bfloat16 by default).
    torch's zip records carry no time and gzip's mtime is fixed: same arrays, same bytes."""
    import torch

    tensors = {k: torch.from_numpy(np.ascontiguousarray(arrays[k], dtype=np.float32)).to(getattr(torch, dtype))
               for k in sorted(arrays)}
    buf = io.BytesIO()
    torch.save(tensors, buf)
    return gzip.compress(buf.getvalue(), compresslevel=6, mtime=0)


def load_pth_gz(data: bytes) -> dict[str, np.ndarray]:
    """The arrays of a ``pth.gz`` member (tensors or nested lists); bfloat16 comes back as float32,
    which numpy can hold. Only plain tensors and containers are unpickled (``weights_only``).
    ValueError for anything that is not such a file."""
    import torch

    try:
        obj = torch.load(io.BytesIO(gzip.decompress(data)), map_location="cpu", weights_only=True)
        if not isinstance(obj, dict):
            raise ValueError(f"a {type(obj).__name__}, not a dict")
        out = {}
        for k, v in obj.items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            out[str(k)] = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
        return out
    except Exception as e:  # gzip, zip, unpickling and torch errors all mean "not a pth.gz"
        raise ValueError(f"not a pth.gz of tensors: {e}") from None


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
    # bfloat16 exists only in torch: the pth.gz writer casts
    return a.astype(np.float32 if config.emb_dtype == "bfloat16" else config.emb_dtype)


def _str_list(uid: str, field: str, v: Any) -> list:
    if not isinstance(v, list):
        raise ReinforcedFormatError(f"sample {uid}: {field} must be a list, got {type(v).__name__}")
    return v


def encode_sample(sample: dict, config: ReinforcedConfig) -> tuple[str, dict[str, bytes]]:
    """Validate one sample dict and turn it into tar members ``(key, {ext: bytes})``.

    Keys: ``uid`` (str), ``jpg`` (bytes), ``txt`` (str) required; optional ``url`` (str),
    ``json`` (dict), ``param_aug`` (list), ``syn`` (dict), ``neg`` (dict), ``image_emb``,
    ``text_emb``, ``neg_text_emb`` (arrays). Errors name the uid and the field."""
    if config.version != VERSION:
        raise ReinforcedFormatError(f"config version {config.version}: only version {VERSION} is written")
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
    members: dict[str, bytes] = {"jpg": bytes(jpg), "txt": txt.encode("utf-8"), "json": sample_json(meta)}
    if sample.get("url") is not None:
        members["url.txt"] = str(sample["url"]).encode("utf-8")

    paug = sample.get("param_aug")
    if paug is not None:
        _str_list(uid, "param_aug", paug)
        for k, p in enumerate(paug):
            check_param(p, config.aug, f"sample {uid}: param_aug[{k}]")
        members["paug.json"] = sample_json({"param_aug": paug})
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
        members["syn.json"] = sample_json(syn)
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
        members["neg.json"] = sample_json(neg)

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
        members[config.emb_format] = npz_bytes(arrays) if config.emb_format == "npz" else \
            pth_gz_bytes(arrays, config.emb_dtype)
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


def _json(data: bytes) -> Any:
    return json.loads(data.decode("utf-8"))


def decode_sample(key: str, members: dict[str, bytes], stats: Counter | None = None,
                  required: Sequence[str] = ("jpg", "txt", "json"), config: ReinforcedConfig | None = None,
                  decode_npz: bool = True) -> dict | None:
    """Decode one group into a sample dict (the writer's input shape, plus ``shard_key``), or None
    with the reason counted in ``stats``: ``missing_<member>``, ``bad_<member>`` (undecodable),
    ``bad_shapes`` (rows disagree with param_aug/syn/neg), ``bad_emb_dim`` (width != config dim).

    With ``config``, param_aug comes in the current layout: a version-1 dataset's entries are
    converted (one it refused counts ``bad_paug``). Embeddings come from ``npz``, else ``pth.gz``
    (as DataCompDR's loader prefers); ``decode_npz=False`` skips both."""
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
        paug = _json(members["paug.json"])["param_aug"] if "paug.json" in members else None
        if isinstance(paug, str):  # the Hub's DataCompDR loader hands it over as a JSON string
            paug = json.loads(paug)
        if paug is not None and config is not None and config.version == 1:
            paug = [upgrade_v1(p, config.aug) for p in paug]
        s["param_aug"] = paug
        field = "syn"
        s["syn"] = _json(members["syn.json"]) if "syn.json" in members else None
        field = "neg"
        s["neg"] = _json(members["neg.json"]) if "neg.json" in members else None
        field = "npz"
        arrays = load_npz(members["npz"]) if "npz" in members and decode_npz else {}
        field = "pth_gz"
        if not arrays and "pth.gz" in members and decode_npz:
            arrays = load_pth_gz(members["pth.gz"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, zipfile.BadZipFile, OSError, EOFError):
        stats[f"bad_{field}"] += 1
        return None
    for f in EMB_FIELDS:
        s[f] = arrays.get(f)
    s["extra"] = {e: d for e, d in members.items()
                  if e not in (image_ext, "txt", "url.txt", "json", "paug.json", "syn.json", "neg.json", *EMB_MEMBERS)}
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
