"""clip_benchmark on our models: its ``eval`` run in this process with a ``recap`` model type whose
loader is ``trainer.models.create_model``."""
from __future__ import annotations

import glob
import json
import os
import sys
import tempfile
from typing import Any, Sequence


def has_clip_benchmark() -> bool:
    try:
        import clip_benchmark  # noqa: F401
    except ImportError:
        return False
    return True


def run_clip_benchmark(name: str, pretrained: str | None, extra_args: Sequence[str] = (),
                       context_length: int | None = None) -> list[dict[str, Any]]:
    """Run clip_benchmark's ``eval`` in this process on our model: a ``recap`` model type is
    registered with it whose loader is ``trainer.models.create_model`` (our configs, our
    tokenizer, stretched contexts, checkpoint paths/URLs). ``extra_args`` are its own CLI
    arguments (``--dataset``, ``--dataset_root``, ``--task``, ``--output``, ...). Returns the JSON
    dumps it wrote (one per dataset/language)."""
    if not has_clip_benchmark():
        raise RuntimeError("clip_benchmark is not installed: pip install clip_benchmark")
    import clip_benchmark.cli as cb_cli
    import clip_benchmark.models as cb_models

    from recap.trainer.models import create_model

    def load_recap(model_name: str, pretrained: str | None, cache_dir: str | None = None, device="cpu", **_):
        model, _, preprocess, tokenizer = create_model(
            model_name, pretrained=pretrained if pretrained not in ("", "none", "None") else None,
            context_length=context_length, device=device)
        return model, preprocess, tokenizer

    model_type = "open_clip"
    if hasattr(cb_models, "TYPE2FUNC") and hasattr(cb_models, "MODEL_TYPES"):
        cb_models.TYPE2FUNC["recap"] = load_recap
        if "recap" not in cb_models.MODEL_TYPES:
            cb_models.MODEL_TYPES.append("recap")  # the same list object its CLI offers as choices
        model_type = "recap"
    extra = list(extra_args)
    with tempfile.TemporaryDirectory() as tmp:
        if "--output" not in extra:
            extra += ["--output", os.path.join(tmp, "{dataset}_{language}_{task}.json")]
        argv = ["clip_benchmark", "eval", "--model", name, "--pretrained", pretrained or "none",
                "--model_type", model_type, *extra]
        saved = sys.argv
        try:
            sys.argv = argv
            base = cb_cli.get_parser_args()
        finally:
            sys.argv = saved
        cb_cli.main_eval(base)
        results = []
        pattern = base.output if "{" not in base.output else os.path.join(tmp, "*.json")
        for path in sorted(glob.glob(pattern)):
            with open(path) as f:
                results.append(json.load(f))
    return results
