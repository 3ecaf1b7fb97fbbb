"""Text backends the text stages share: one interface for captioners (image [+ alt-text] ->
texts) and one for text generators (prompt -> texts), in ``base``; implementations for
OpenAI-compatible HTTP endpoints (``openai_compat``), vLLM's offline engine (``vllm_engine``),
small local ``transformers`` models (``transformers_local``),
CoCa checkpoints of our trainer (``coca``) and the rule-based EDA baseline (``eda``); the replay
cache of finished requests (``cache``) and the checks on what goes in and comes out (``safety``).
Heavy libraries (torch models, vLLM) load only when a backend of theirs is built.
"""
from __future__ import annotations

from typing import Any

from recap.models.textgen.base import (BackendConfig, BackendUnavailable, Captioner, Reply, Request,
                                       TextGenerator)

DEFAULT_WORDNET = "/usr/share/wordnet"


def load_backend(cfg: BackendConfig, **kwargs: Any) -> Any:
    """The backend ``cfg`` names, ready to use (models loaded): call it in a stage's setup()."""
    if cfg.kind == "openai":
        from recap.models.textgen.openai_compat import OpenAIBackend

        return OpenAIBackend(cfg)
    if cfg.kind == "vllm":
        from recap.models.textgen.vllm_engine import VllmBackend

        return VllmBackend(cfg, **kwargs)
    if cfg.kind == "coca":
        from recap.models.textgen.coca import CocaCaptioner

        return CocaCaptioner(cfg, **kwargs)
    if cfg.kind == "eda":
        from recap.models.textgen.eda import EdaBackend

        return EdaBackend(kwargs.get("wordnet_dir", DEFAULT_WORDNET))
    if cfg.kind == "transformers":
        from recap.models.textgen.transformers_local import TransformersBackend

        return TransformersBackend(cfg)
    raise BackendUnavailable(f"unknown backend.kind {cfg.kind!r}")


def check_backend(cfg: BackendConfig) -> None:
    """Before any shard, on the driver: raise ``BackendUnavailable`` with the fix when the backend
    cannot serve (endpoint down, key variable unset, checkpoint not a CoCa). Cheap: no model loads."""
    if cfg.kind == "openai":
        from recap.models.textgen.openai_compat import OpenAIBackend

        OpenAIBackend(cfg).preflight()
    elif cfg.kind == "coca":
        from recap.models.textgen.coca import checkpoint_model_name

        checkpoint_model_name(cfg.model)
    elif cfg.kind == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise BackendUnavailable("backend.kind vllm needs vLLM installed (pip install 'recap-curate[gpu]')")
    elif cfg.kind == "transformers":
        from recap.models.textgen.transformers_local import check_local_model

        check_local_model(cfg)


def validate_backend(cfg: BackendConfig) -> None:
    """``check_backend`` inside a stage config's validator: its reason becomes the job error."""
    try:
        check_backend(cfg)
    except BackendUnavailable as e:
        raise ValueError(str(e)) from None


__all__ = ["BackendConfig", "BackendUnavailable", "Captioner", "Reply", "Request", "TextGenerator",
           "check_backend", "load_backend", "validate_backend"]
