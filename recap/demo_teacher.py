"""The demo's teacher: a tiny CLIP our own trainer makes on the demo world's clean held-out split,
cached under the demo's output so a second `recap demo` reuses it (never a download).

`recap demo` points the job's clip stage and the reinforce stage's teachers whose ``pretrained``
is null at this checkpoint; run by hand (`recap run jobs/demo.yaml`), those stages use a seeded
random-init model instead.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

MODEL = "recap-tiny-cnn"  # the bundled model that learns the world's colours fastest on a CPU
STEPS = 60
BATCH = 48


def _key(world_dir: Path, steps: int, batch: int, seed: int) -> str:
    world = json.loads((world_dir / "world.json").read_text())
    index = (world_dir / "heldout" / "index.parquet").read_bytes()
    payload = {"model": MODEL, "steps": steps, "batch": batch, "seed": seed, "world_seed": world.get("seed"),
               "heldout": world.get("heldout"), "index": hashlib.sha256(index).hexdigest()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def demo_teacher(world_dir: Path, out: Path, *, steps: int = STEPS, batch: int = BATCH, seed: int = 0,
                 threads: int = 2) -> tuple[str, bool]:
    """(checkpoint path, trained now?): the cached checkpoint when it was made from this world with
    these settings, else a new one trained by ``recap.trainer``."""
    # a held-out split smaller than a batch still trains, in batches of the whole split
    batch = max(1, min(batch, int(json.loads((world_dir / "world.json").read_text()).get("heldout") or batch)))
    key = _key(world_dir, steps, batch, seed)
    record = out / "teacher.json"
    if record.is_file():
        rec = json.loads(record.read_text())
        ckpt = out / rec.get("checkpoint", "")
        if rec.get("key") == key and ckpt.is_file():
            return str(ckpt.resolve()), False
    from recap.trainer.config import TrainConfig
    from recap.trainer.train import train

    run = out / f"run-{key}"
    cfg = TrainConfig.model_validate({
        "name": "demo-teacher", "seed": seed, "output": str(run), "steps": steps, "log_every": max(1, steps // 4),
        "threads": threads, "tensorboard": False,
        "data": {"path": str(world_dir / "heldout" / "shards"), "batch_size": batch},
        "model": {"name": MODEL}, "optim": {"lr": 1e-3, "warmup": max(1, steps // 6)}})
    summary = train(cfg)
    ckpt = run / "checkpoints" / f"step_{summary['step']}.pt"
    record.write_text(json.dumps({"key": key, "model": MODEL, "checkpoint": str(ckpt.relative_to(out))}, indent=1))
    return str(ckpt.resolve()), True


def teacher_overrides(job_file: str, checkpoint: str) -> list[str]:
    """``--set`` overrides that give the job's clip stage and reinforce teachers the checkpoint,
    where they name the teacher's model with ``pretrained: null``."""
    data: Any = yaml.safe_load(Path(job_file).read_text())
    out = []
    for i, entry in enumerate((data or {}).get("stages") or []):
        if not isinstance(entry, dict) or len(entry) != 1:
            continue
        (name, cfg), = entry.items()
        cfg = cfg or {}
        if name == "clip" and cfg.get("model") == MODEL and cfg.get("pretrained", "") is None:
            out.append(f"stages.{i}.clip.pretrained={checkpoint}")
        if name == "reinforce":
            for k, t in enumerate(cfg.get("teachers") or []):
                if isinstance(t, dict) and t.get("model") == MODEL and t.get("pretrained", "") is None:
                    out.append(f"stages.{i}.reinforce.teachers.{k}.pretrained={checkpoint}")
    return out
