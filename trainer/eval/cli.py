"""``recap eval``: evaluate a checkpoint, a run directory's latest checkpoint or an open_clip model
on a labelled set, optionally with a linear probe and clip_benchmark."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import fsspec
import torch

from recap.trainer.eval.clip_benchmark import has_clip_benchmark, run_clip_benchmark
from recap.trainer.eval.embed import PRECISIONS
from recap.trainer.eval.probe import linear_probe
from recap.trainer.eval.report import format_table
from recap.trainer.eval.tasks import TASKS, evaluate

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recap eval",
        description="Zero-shot, retrieval and compositional evaluation of a checkpoint (or an open_clip model) "
                    "on a labelled set (shards/*.tar + classnames.txt + templates.txt, and further label sets in "
                    "label_sets/NAME/).",
        epilog="Arguments after `--` go to clip_benchmark's `eval` (with --clip-benchmark), e.g. "
               "`-- --dataset cifar10 --dataset_root DIR`.")
    p.add_argument("target", metavar="CHECKPOINT_OR_MODEL",
                   help="a checkpoint (path or URL), a run directory (its latest checkpoint), or a model name")
    p.add_argument("--model", help="model name (default: the name stored in the checkpoint)")
    p.add_argument("--pretrained", help="an open_clip pretrained tag (when the target is a model name)")
    p.add_argument("--data", help="labelled set directory (local or fsspec URL)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--linear-probe", metavar="TRAIN_DIR",
                   help="also fit a linear probe on this labelled set's frozen image embeddings, scored on --data")
    p.add_argument("--probe-labels", metavar="NAME",
                   help="with --linear-probe: probe the further label set NAME (label_sets/NAME/), not the main labels")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="run the encoders under autocast (bf16 / fp16), as open_clip's eval on GPUs")
    p.add_argument("--context-length", type=int, default=None, help="text context (above the model's: Long-CLIP stretch)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", help="also write the JSON result to this file (local or URL)")
    p.add_argument("--clip-benchmark", action="store_true",
                   help="also run clip_benchmark (pip install clip_benchmark) on the checkpoint")
    return p


def _resolve_target(target: str, model_name: str | None, pretrained: str | None) -> tuple[str, str | None, int | None]:
    """→ (model name, pretrained (tag or checkpoint path), stored context length)."""
    from recap.trainer.checkpoint import latest_checkpoint
    from recap.trainer.weights import read_checkpoint

    fs, path = fsspec.core.url_to_fs(target)
    ckpt = None
    if fs.exists(path):
        ckpt = latest_checkpoint(target) if fs.isdir(path) else target
        if ckpt is None:
            raise FileNotFoundError(f"no checkpoints/step_N.pt under {target}")
    if ckpt is None and ("://" in target or target.endswith((".pt", ".pth", ".bin", ".safetensors"))):
        raise FileNotFoundError(f"no checkpoint at {target}")
    if ckpt is None and ("/" in target or os.sep in target or target.startswith(("~", "."))):
        raise FileNotFoundError(f"{target}: no such checkpoint or run directory")
    if ckpt is None:  # a model name
        if model_name and model_name != target:
            raise ValueError(f"{target!r} is neither a checkpoint nor a directory, and --model says {model_name!r}")
        return target, pretrained, None
    if pretrained:
        raise ValueError("--pretrained goes with a model name, not with a checkpoint")
    meta = read_checkpoint(ckpt)
    name = model_name or meta.get("name")
    if not name:
        raise ValueError(f"{ckpt} does not record its model name: pass --model")
    return name, ckpt, meta.get("context_length")


def eval_cli(argv: list[str]) -> int:
    """``recap eval CHECKPOINT_OR_MODEL --data DIR [--model NAME] [--pretrained TAG] [--json]
    [--out FILE] [--clip-benchmark [-- CLIP_BENCHMARK_ARGS]]``. Exit 0 ok, 1 failed, 2 usage."""
    argv = list(argv)
    cb_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, cb_args = argv[:i], argv[i + 1:]
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return EXIT_OK if e.code == 0 else EXIT_USAGE
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    if set(tasks) - set(TASKS):
        print(f"recap eval: unknown tasks {sorted(set(tasks) - set(TASKS))}; choose from {','.join(TASKS)}", file=sys.stderr)
        return EXIT_USAGE
    if args.linear_probe and not args.data:
        print("recap eval: --linear-probe TRAIN_DIR needs --data DIR to score on", file=sys.stderr)
        return EXIT_USAGE
    if args.probe_labels and not args.linear_probe:
        print("recap eval: --probe-labels NAME goes with --linear-probe TRAIN_DIR", file=sys.stderr)
        return EXIT_USAGE
    if not args.data and not args.clip_benchmark:
        print("recap eval: --data DIR is required (or --clip-benchmark)", file=sys.stderr)
        return EXIT_USAGE
    if args.clip_benchmark and not has_clip_benchmark():
        print("recap eval: --clip-benchmark needs the clip_benchmark package: pip install clip_benchmark",
              file=sys.stderr)
        return EXIT_FAILED
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        from recap.trainer.models import create_model

        name, pretrained, ctx = _resolve_target(args.target, args.model, args.pretrained)
        context_length = args.context_length or ctx
        model, _, preprocess, tokenizer = create_model(name, pretrained=pretrained, context_length=context_length,
                                                       device=device)
        result: dict[str, Any] = {"model": name, "pretrained": pretrained}
        if args.data:
            result.update(evaluate(model, preprocess, tokenizer, args.data, batch_size=args.batch_size,
                                   device=device, tasks=tasks, precision=args.precision))
            if args.linear_probe:
                result["linear_probe"] = linear_probe(model, preprocess, args.linear_probe, args.data,
                                                      batch_size=args.batch_size, device=device,
                                                      label_set=args.probe_labels, precision=args.precision)
        if args.clip_benchmark:
            result["clip_benchmark"] = run_clip_benchmark(name, pretrained, cb_args, context_length=context_length)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        print(f"recap eval: {e}", file=sys.stderr)
        return EXIT_FAILED
    text = json.dumps(result, indent=1, default=str)
    if args.out:
        with fsspec.open(args.out, "w") as f:
            f.write(text + "\n")
    if args.json:
        print(text)
    else:
        print(f"model: {name}   weights: {pretrained or 'random init'}")
        if args.data:
            print(format_table(result))
        if args.clip_benchmark:
            print(f"clip_benchmark: {json.dumps(result['clip_benchmark'], default=str)}")
    return EXIT_OK

