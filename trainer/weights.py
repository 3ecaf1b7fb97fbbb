"""Reading weights files, from a local path or any fsspec URL: our checkpoints (``checkpoint.py``
writes them), a bare open_clip state dict, or safetensors.

Model building (``models.py``) and resuming (``checkpoint.py``) both read through here, so
neither has to know the other's job.
"""
from __future__ import annotations

import io
from typing import Any

import fsspec
import torch

from recap.pipeline.atomic import is_local

_WRAPPER_PREFIX = "module."  # what DDP puts before every parameter name


def read_checkpoint(path_or_url: str) -> dict[str, Any]:
    """The raw checkpoint dict (``torch.load(weights_only=True)`` on CPU) from a path or URL.
    A bare state dict (an open_clip weights file) comes back as ``{"state_dict": ...}``."""
    fs, path = fsspec.core.url_to_fs(path_or_url)
    if not fs.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path_or_url}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        with fs.open(path, "rb") as f:
            return {"state_dict": load_safetensors(f.read())}
    if is_local(fs):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    else:
        with fs.open(path, "rb") as f:
            obj = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{path_or_url} is not a checkpoint (a {type(obj).__name__})")
    if "state_dict" not in obj:
        obj = {"state_dict": obj}
    return obj


def unwrapped_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the ``module.`` prefix a wrapped model saved with, if all its keys have it."""
    if state and all(k.startswith(_WRAPPER_PREFIX) for k in state):
        return {k[len(_WRAPPER_PREFIX):]: v for k, v in state.items()}
    return state


def read_state_dict(path_or_url: str) -> dict[str, torch.Tensor]:
    """Just the model weights of a checkpoint (ours or open_clip's), ``module.`` prefixes removed."""
    return unwrapped_state(read_checkpoint(path_or_url)["state_dict"])
