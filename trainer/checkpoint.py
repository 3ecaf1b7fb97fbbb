"""Training checkpoints: open_clip-loadable files that also carry everything a resume needs.

One file per save, ``<output>/checkpoints/step_N.pt``, a ``torch.save`` dict:

    state_dict      the model's parameters (DDP unwrapped: no ``module.`` prefix) — the key
                    open_clip's ``load_checkpoint`` reads, so ``open_clip.create_model_and_transforms(
                    name, pretrained=path)`` loads our files as they are
    name            the model name (open_clip / trainer/model_configs)
    context_length  the text context the model was trained with (Long-CLIP stretched models)
    step, epoch, data_position, config
    optimizer, scaler   their state_dicts (or None)
    rng             python, numpy (legacy global), torch CPU and every CUDA device's state

Everything in it is a tensor or a plain container of numbers/strings, so it loads with
``torch.load(weights_only=True)`` (open_clip's default).

Writes go through fsspec (a local path or any URL: ``s3://``, ``gs://``, ``memory://``) and
``pipeline.atomic.write_atomic``: a crash never leaves a half file under a ``step_N.pt`` name. On
object stores an object appears only when its upload completes; after it, a ``latest`` pointer
file (the checkpoint's file name) is written last, and ``latest_checkpoint`` trusts that pointer
there. Reading is ``weights.py``'s, shared with model building.
"""
from __future__ import annotations

import json
import logging
import random
import re
from typing import Any

import fsspec
import numpy as np
import torch

from recap.pipeline.atomic import is_local, write_atomic
from recap.trainer.models import text_context_length
from recap.trainer.weights import read_checkpoint, read_state_dict, unwrapped_state

__all__ = ["latest_checkpoint", "list_checkpoints", "load_checkpoint", "read_checkpoint", "read_state_dict",
           "rng_state", "save_checkpoint", "set_rng_state"]

log = logging.getLogger(__name__)

FORMAT = "recap-checkpoint"
VERSION = 1
POINTER = "latest"
_STEP_RE = re.compile(r"^step_(\d+)\.pt$")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module  # DDP / FSDP-style wrappers
    return model


def _plain(obj: Any) -> Any:
    """JSON-safe copy (tuples → lists, paths and other objects → str): weights_only-loadable."""
    return json.loads(json.dumps(obj, default=str))


# -- RNG ------------------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """Every global RNG stream a training step draws from, in a weights_only-loadable form."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state.get("python")
    if py is not None:
        version, internal, gauss = py
        random.setstate((version, tuple(internal), gauss))
    npst = state.get("numpy")
    if npst is not None:
        keys = np.asarray(npst["keys"].numpy() if torch.is_tensor(npst["keys"]) else npst["keys"], dtype=np.uint32)
        np.random.set_state((npst["kind"], keys, int(npst["pos"]), int(npst["has_gauss"]), float(npst["gauss"])))
    if state.get("torch") is not None:
        torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            log.warning("checkpoint has CUDA RNG states for %d devices, this machine has %d: not restored",
                        len(cuda), torch.cuda.device_count())


# -- writing --------------------------------------------------------------------------------------

def _parent(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0] if "/" in path.rstrip("/") else ""


def save_checkpoint(path_or_url: str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scaler: Any = None, step: int, epoch: int, data_position: dict | None = None,
                    rng_states: bool = True, config: dict | None = None, name: str,
                    extra: dict | None = None, heads: dict[str, torch.nn.Module] | None = None) -> str:
    """Write a checkpoint to ``path_or_url`` (atomically; see the module docstring) and update the
    ``latest`` pointer beside it. ``model`` may be DDP-wrapped. Returns the path written."""
    m = _unwrap(model)
    try:
        ctx = text_context_length(m)
    except (NotImplementedError, AttributeError):
        ctx = None
    payload: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "name": name, "context_length": ctx,
        "step": int(step), "epoch": int(epoch), "data_position": _plain(data_position or {}),
        "config": _plain(config) if config is not None else None,
        "state_dict": {k: v.detach().cpu() for k, v in m.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state() if rng_states else None,
    }
    if extra:
        payload["extra"] = _plain(extra)
    if heads:  # trained beside the model (the short-tag head): kept out of state_dict, so open_clip still loads it
        payload["heads"] = {k: {n: v.detach().cpu() for n, v in h.state_dict().items()} for k, h in heads.items()}
    fs, path = fsspec.core.url_to_fs(path_or_url)
    parent = _parent(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    write_atomic(path, lambda f: torch.save(payload, f), fs=fs)
    # the pointer goes last: whoever follows it finds a complete checkpoint
    write_atomic(f"{parent}/{POINTER}" if parent else POINTER, (path.rsplit("/", 1)[-1] + "\n").encode(), fs=fs)
    log.info("checkpoint step %d written to %s", step, path_or_url)
    return path_or_url


# -- reading --------------------------------------------------------------------------------------

def load_checkpoint(path_or_url: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scaler: Any = None, restore_rng: bool = True,
                    heads: dict[str, torch.nn.Module] | None = None) -> dict[str, Any]:
    """Restore ``model`` (DDP-wrapped or not; strict), and the optimizer, scaler and RNG streams
    when given / asked and present in the file. Returns ``{step, epoch, data_position, config,
    name}`` (zeros / empty for a bare weights file)."""
    ckpt = read_checkpoint(path_or_url)
    _unwrap(model).load_state_dict(unwrapped_state(ckpt["state_dict"]), strict=True)
    for k, h in (heads or {}).items():
        if k not in (ckpt.get("heads") or {}):
            raise ValueError(f"{path_or_url} has no {k!r} head to resume (it was trained without it)")
        h.load_state_dict(ckpt["heads"][k], strict=True)
    if optimizer is not None:
        if ckpt.get("optimizer") is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
        else:
            log.warning("%s has no optimizer state: the optimizer starts fresh", path_or_url)
    if scaler is not None and ckpt.get("scaler") is not None:
        scaler.load_state_dict(ckpt["scaler"])
    if restore_rng and ckpt.get("rng") is not None:
        set_rng_state(ckpt["rng"])
    return {"step": int(ckpt.get("step", 0)), "epoch": int(ckpt.get("epoch", 0)),
            "data_position": dict(ckpt.get("data_position") or {}), "config": ckpt.get("config"),
            "name": ckpt.get("name"), "context_length": ckpt.get("context_length")}


def _checkpoint_dir(fs: fsspec.AbstractFileSystem, path: str) -> str:
    path = path.rstrip("/")
    sub = f"{path}/checkpoints"
    return sub if fs.isdir(sub) else path


def list_checkpoints(dir_or_url: str) -> list[tuple[int, str]]:
    """``(step, url)`` of every ``step_N.pt`` under ``dir_or_url`` (a run directory or its
    ``checkpoints/``), by step."""
    fs, path = fsspec.core.url_to_fs(dir_or_url)
    if not fs.exists(path):
        return []
    cdir = _checkpoint_dir(fs, path)
    out = []
    for entry in fs.ls(cdir, detail=False):
        base = entry.rstrip("/").rsplit("/", 1)[-1]
        match = _STEP_RE.match(base)
        if match:
            out.append((int(match.group(1)), _join(dir_or_url, path, cdir, base)))
    return sorted(out)


def _join(original: str, path: str, cdir: str, base: str) -> str:
    """Re-attach the URL protocol that url_to_fs stripped, so the result opens the same store."""
    full = f"{cdir}/{base}"
    if "://" in original:
        protocol = original.split("://", 1)[0]
        return f"{protocol}://{full.lstrip('/')}" if protocol == "memory" else f"{protocol}://{full}"
    return full


def latest_checkpoint(dir_or_url: str) -> str | None:
    """The newest checkpoint under a run directory (or its ``checkpoints/``), or None.

    Locally the highest ``step_N.pt`` (files appear only complete, by rename). On object stores
    the ``latest`` pointer, written after the checkpoint, wins when it names an existing file;
    without one, the highest listed step."""
    fs, path = fsspec.core.url_to_fs(dir_or_url)
    if not fs.exists(path):
        return None
    found = list_checkpoints(dir_or_url)
    if not is_local(fs):
        cdir = _checkpoint_dir(fs, path)
        ptr = f"{cdir}/{POINTER}"
        if fs.exists(ptr):
            with fs.open(ptr, "r") as f:
                target = f.read().strip()
            if target and fs.exists(f"{cdir}/{target}"):
                return _join(dir_or_url, path, cdir, target)
            log.warning("%s names %r, which is missing: using the newest listed checkpoint", ptr, target)
    return found[-1][1] if found else None
