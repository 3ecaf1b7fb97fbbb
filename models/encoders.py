"""Image–text encoders: one small interface for every stage that embeds images and texts (CLIP
scoring now; the reinforce stage's teachers later).

A spec names a model and its weights:

- an open_clip model by name (``ViT-B-32``) or one of the trainer's bundled configs
  (``recap-tiny``), with ``pretrained`` an open_clip tag (``laion2b_s34b_b79k``), a checkpoint
  path or fsspec URL (our trainer's ``step_N.pt``, or any open_clip state dict), or None (random
  init: tests and the demo);
- an ``hf-hub:org/name`` model, which brings its own weights (``pretrained`` stays None);
- ``model_config``: an open_clip model-config JSON (a custom small model; ``model`` is then only
  a label), with ``pretrained`` a checkpoint or None.

Named models and checkpoints load through ``recap.trainer.models.create_model``: one loader for
the trainer and the stages. Tags and ``hf-hub:`` weights are downloaded by open_clip, a cluster's
business; nothing here downloads by itself, and no test does.

An encoder returns L2-normalised float32 rows: ``encode_images`` (PIL images through
``preprocess``, the model's own eval transform), ``encode_texts`` (with a mask of the texts the
tokenizer truncated), ``dim``. An ensemble concatenates its members' normalised embeddings, each
scaled by 1/sqrt(members) so the whole row is unit-norm too: a dot product of two ensemble rows is
the mean of the members' cosines.

Device: ``cuda`` only inside a Ray worker that Ray gave a GPU (and only if torch sees one);
everywhere else, the driver included, ``cpu`` unless the caller says otherwise. Precision: the
weights stay fp32 and ``bf16``/``fp16`` run the forward pass under autocast (on CPU too), which
keeps the numerically fragile parts (norms, softmax) in fp32.
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import math
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp16"]
HF_HUB = "hf-hub:"
_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


class EncoderError(ValueError):
    """A spec that names no model, or weights that do not load. ``field`` is the spec's field at
    fault (``model``, ``pretrained``, ``model_config``), so a stage can name its own config key."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class EncoderSpec:
    model: str
    pretrained: str | None = None
    model_config: str | None = None


# -- checking a spec without building anything (job validation, on the driver) --------------------

def _is_url(value: str) -> bool:
    return "://" in value


def read_model_config(path_or_url: str) -> dict[str, Any]:
    """An open_clip model-config JSON (``{embed_dim, vision_cfg, text_cfg}``, or a hub-style
    ``{"model_cfg": ...}``), from a local path or fsspec URL."""
    import fsspec

    try:
        with fsspec.open(path_or_url, "rt", encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise EncoderError("model_config", f"no model config at {path_or_url}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EncoderError("model_config", f"{path_or_url} is not a JSON model config: {e}") from None
    if isinstance(cfg, dict) and isinstance(cfg.get("model_cfg"), dict):
        cfg = cfg["model_cfg"]
    missing = [k for k in _CONFIG_KEYS if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise EncoderError("model_config", f"{path_or_url} is not an open_clip model config: it lacks {missing}")
    return cfg


def checkpoint_problem(path: str) -> str | None:
    """Why a local file cannot be a checkpoint, or None. Reads headers only (a zip's directory,
    a safetensors header), never the weights: job validation runs on the driver."""
    p = Path(path)
    if not p.is_file():
        return f"no checkpoint at {path}"
    if p.suffix == ".safetensors":
        with p.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")  # the JSON header's length, then the header
            header = f.read(n) if 0 < n <= 100_000_000 else b""
        try:
            return None if isinstance(json.loads(header), dict) else f"{path} has no safetensors header"
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"{path} is not a safetensors file (unreadable header)"
    if zipfile.is_zipfile(p):  # torch.save's format since 1.6
        try:
            with zipfile.ZipFile(p) as z:
                if any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist()):
                    return None
        except zipfile.BadZipFile as e:
            return f"{path} is a damaged zip archive: {e}"
        return f"{path} is a zip archive but not a torch checkpoint"
    with p.open("rb") as f:
        if f.read(1) == b"\x80":  # torch.save's legacy pickle format
            return None
    return f"{path} is not a torch checkpoint (nor a complete one: torch writes a zip archive) or a safetensors file"


def known_models() -> list[str]:
    """open_clip's model names, with the trainer's bundled configs registered among them."""
    import open_clip

    import recap.trainer.models  # noqa: F401 - registers the bundled configs with open_clip

    return open_clip.list_models()


def check_model(model: str, model_config: str | None) -> None:
    """Raise EncoderError unless ``model`` names a model (any label will do with a model config)."""
    if model_config is not None:
        return
    if model.startswith(HF_HUB):
        repo = model[len(HF_HUB):]
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise EncoderError("model", f"{model!r} is not a hub name: expected {HF_HUB}ORG/NAME")
        return
    names = known_models()
    if model not in names:
        import difflib

        close = difflib.get_close_matches(model, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise EncoderError("model", f"unknown model {model!r}: not an open_clip model nor a bundled config "
                                    f"(or give model_config for a custom one){hint}")


def check_pretrained(model: str, pretrained: str | None, model_config: str | None) -> str | None:
    """``pretrained`` as the workers should see it (a local checkpoint made absolute), or an
    EncoderError naming what it is not. URLs are left to the workers."""
    if pretrained is None:
        return None
    if model.startswith(HF_HUB) and model_config is None:
        raise EncoderError("pretrained", f"{model} brings its own weights from the hub: leave pretrained null")
    if _is_url(pretrained):
        return pretrained
    path = Path(pretrained).expanduser()
    if path.is_file():
        problem = checkpoint_problem(str(path))
        if problem:
            raise EncoderError("pretrained", problem)
        return str(path.resolve())
    looks_like_path = "/" in pretrained or path.suffix in (".pt", ".pth", ".bin", ".safetensors")
    if model_config is None:
        import open_clip

        tags = open_clip.list_pretrained_tags_by_model(model)
        if pretrained in tags:
            return pretrained
        if not looks_like_path:
            raise EncoderError("pretrained", f"{pretrained!r} is neither a pretrained tag of {model} "
                                             f"(known: {', '.join(tags) or 'none'}) nor a checkpoint file")
    elif not looks_like_path:
        raise EncoderError("pretrained", f"{pretrained!r} is not a checkpoint file: with model_config, pretrained "
                                         "is a checkpoint path or URL (or null)")
    raise EncoderError("pretrained", f"no checkpoint at {pretrained}")


def checked_spec(spec: EncoderSpec) -> EncoderSpec:
    """The spec validated without loading a model, local paths made absolute."""
    config = spec.model_config
    if config is not None:
        if not _is_url(config):
            config = str(Path(config).expanduser().resolve())
        read_model_config(config)
    check_model(spec.model, config)
    return EncoderSpec(spec.model, check_pretrained(spec.model, spec.pretrained, config), config)


# -- the device ------------------------------------------------------------------------------------

def default_device() -> str:
    """``cuda`` iff torch sees a GPU and this process is a Ray worker that Ray gave one."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return "cpu"  # the driver, or no Ray at all: a GPU nobody reserved is not ours to take
    return "cuda" if ray.get_gpu_ids() else "cpu"


# -- encoders ----------------------------------------------------------------------------------------

class Encoder:
    """What every encoder offers; see the module docstring."""

    dim: int
    context_length: int

    def preprocess(self, image: Any) -> Any:
        """One PIL image -> the model input (the model's own eval transform)."""
        raise NotImplementedError

    def encode_preprocessed(self, items: list[Any]) -> np.ndarray:
        """``preprocess`` outputs -> ``(n, dim)`` float32, unit rows (NaN where the model gave NaN)."""
        raise NotImplementedError

    def encode_texts(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(embeddings (n, dim) float32, truncated (n,) bool)``: which texts lost tokens."""
        raise NotImplementedError

    def encode_images(self, images: list[Any]) -> np.ndarray:
        return self.encode_preprocessed([self.preprocess(im) for im in images])

    def close(self) -> None:
        """Free the weights (and the GPU memory they held)."""


def _unit_rows(z) -> np.ndarray:
    z = z.float()
    # a zero or non-finite row stays non-finite (0/0): its cosine means nothing, and callers drop it
    return (z / z.norm(dim=-1, keepdim=True)).cpu().numpy().astype(np.float32, copy=False)


def token_counts(tokenizer: Any, texts: list[str]) -> np.ndarray:
    """Tokens each text needs, start and end included, before any truncation. open_clip's BPE
    tokenizer: exact. Hugging Face tokenizers: what they make of the text without open_clip's
    cleaning (a close count). Anything else: zeros (never reported as truncated)."""
    hf = getattr(tokenizer, "tokenizer", None)
    if hf is not None and callable(hf):
        return np.array([len(ids) for ids in hf(texts, truncation=False)["input_ids"]], np.int64)
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "sot_token_id"):
        return np.array([len(tokenizer.encode(t)) + 2 for t in texts], np.int64)
    return np.zeros(len(texts), np.int64)


class ClipEncoder(Encoder):
    """One open_clip model."""

    def __init__(self, model: Any, preprocess: Any, tokenizer: Any, device: str, precision: Precision, label: str):
        import torch

        from recap.trainer.models import embed_dim

        self.model = model.eval()
        self._preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.precision = precision
        self.label = label
        self.dim = embed_dim(model)
        self.context_length = int(getattr(tokenizer, "context_length", 0) or 77)

    def preprocess(self, image: Any) -> Any:
        return self._preprocess(image)

    def _autocast(self):
        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def encode_preprocessed(self, items: list[Any]) -> np.ndarray:
        import torch

        if not items:
            return np.zeros((0, self.dim), np.float32)
        x = torch.stack(items).to(self.device)
        with torch.inference_mode(), self._autocast():
            return _unit_rows(self.model.encode_image(x))

    def encode_texts(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        import torch

        texts = [t or "" for t in texts]
        if not texts:
            return np.zeros((0, self.dim), np.float32), np.zeros(0, bool)
        truncated = token_counts(self.tokenizer, texts) > self.context_length
        tokens = self.tokenizer(texts).to(self.device)
        with torch.inference_mode(), self._autocast():
            return _unit_rows(self.model.encode_text(tokens)), truncated

    def close(self) -> None:
        import torch

        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class EnsembleEncoder(Encoder):
    """Several encoders as one: per-model unit embeddings, concatenated, scaled to a unit row."""

    def __init__(self, members: Sequence[Encoder]):
        self.members = list(members)
        self.dims = [m.dim for m in self.members]
        self.dim = sum(self.dims)
        self.context_length = min(m.context_length for m in self.members)
        self._scale = np.float32(1.0 / math.sqrt(len(self.members)))

    def preprocess(self, image: Any) -> tuple:
        return tuple(m.preprocess(image) for m in self.members)

    def encode_preprocessed(self, items: list[tuple]) -> np.ndarray:
        parts = [m.encode_preprocessed([it[k] for it in items]) for k, m in enumerate(self.members)]
        return np.concatenate(parts, axis=1) * self._scale

    def encode_texts(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        parts = [m.encode_texts(texts) for m in self.members]
        emb = np.concatenate([p[0] for p in parts], axis=1) * self._scale
        return emb, np.logical_or.reduce([p[1] for p in parts])

    def close(self) -> None:
        for m in self.members:
            m.close()


# -- loading ---------------------------------------------------------------------------------------

_config_dir: Path | None = None


def _register_config(path_or_url: str) -> str:
    """Register a custom model config with open_clip under a name made from its content, so two
    configs never collide and none can shadow a real model's name."""
    import open_clip

    global _config_dir
    cfg = read_model_config(path_or_url)
    name = "recap-custom-" + hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
    if name not in open_clip.list_models():
        if _config_dir is None:
            _config_dir = Path(tempfile.mkdtemp(prefix="recap-model-configs-"))
            atexit.register(shutil.rmtree, _config_dir, ignore_errors=True)
        file = _config_dir / f"{name}.json"
        file.write_text(json.dumps(cfg))
        open_clip.add_model_config(file)
    return name


def _load_one(spec: EncoderSpec, device: str, precision: Precision) -> ClipEncoder:
    import open_clip

    from recap.trainer.models import create_model

    if spec.model.startswith(HF_HUB) and spec.model_config is None:
        model, _, preprocess = open_clip.create_model_and_transforms(spec.model, device=device)
        tokenizer = open_clip.get_tokenizer(spec.model)
    else:
        name = _register_config(spec.model_config) if spec.model_config else spec.model
        try:
            if spec.pretrained is None:
                # random init: every worker must build the same model, or scores from different
                # shards would come from different models
                import torch

                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(0)
                    model, _, preprocess, tokenizer = create_model(name, pretrained=None, device=device)
            else:
                model, _, preprocess, tokenizer = create_model(name, pretrained=spec.pretrained, device=device)
        except Exception as e:
            if spec.pretrained is None:
                raise
            raise EncoderError("pretrained", f"{spec.pretrained} does not load into {spec.model}: "
                                             f"{type(e).__name__}: {e}"[:2000]) from e
    return ClipEncoder(model, preprocess, tokenizer, device, precision, spec.model)


def load_encoder(spec: EncoderSpec | Sequence[EncoderSpec], device: str | None = None,
                 precision: Precision = "fp32") -> Encoder:
    """Build the encoder of ``spec`` (a list: an ensemble). ``device`` None: ``default_device()``.
    Call it where the model is used (a worker's setup()), never on the driver."""
    specs = [spec] if isinstance(spec, EncoderSpec) else list(spec)
    if not specs:
        raise ValueError("an ensemble needs at least one model")
    device = device or default_device()
    members = [_load_one(s, device, precision) for s in specs]
    log.info("encoder %s on %s (%s)", "+".join(m.label for m in members), device, precision)
    return members[0] if len(members) == 1 else EnsembleEncoder(members)
