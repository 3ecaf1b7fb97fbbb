"""The training loop: one process per rank (torchrun, Ray Train, or alone), reading reinforced shards.

Exact resume: the data order is a pure function of (seed, epoch), so a checkpoint records the
epoch and the number of micro-batches consumed in it; resuming rebuilds that epoch's stream and
skips them, with model, optimizer, scaler and RNG states restored.
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any

import fsspec
import torch
import torch.distributed as dist

from recap.trainer.config import TrainConfig
from recap.trainer.step import backward_step

log = logging.getLogger("recap.train")


class NonFiniteLoss(RuntimeError):
    pass


# -- distributed ---------------------------------------------------------------------------------
def dist_setup() -> tuple[int, int, torch.device]:
    """Join the process group torchrun or Ray Train prepared (or none): (rank, world, device)."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def _all_true(flag: bool, device: torch.device) -> bool:
    """True iff the flag holds on every rank (ranks must agree before a collective op)."""
    return _agree([flag], device)[0]


def _agree(flags: list[bool], device: torch.device) -> list[bool]:
    """For each flag, True iff it holds on every rank: one collective for several decisions."""
    if not dist.is_initialized():
        return list(flags)
    t = torch.tensor([0 if f else 1 for f in flags], device=device)
    dist.all_reduce(t)
    return [int(v) == 0 for v in t.tolist()]


# A scheduler's notice (SIGTERM on preemption, SIGUSR1 with SLURM's --signal): the loop ends after
# the step in progress, with a checkpoint, and `recap train` exits EXIT_PREEMPTED.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_stop = {"signal": None}


def _note_signal(signum, frame) -> None:
    _stop["signal"] = signal.Signals(signum).name


@contextlib.contextmanager
def _stop_on_signals():
    _stop["signal"] = None
    if threading.current_thread() is not threading.main_thread():  # Ray Train's loop thread: Ray's own handling
        yield
        return
    previous = {s: signal.signal(s, _note_signal) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# -- optimisation ----------------------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig) -> float:
    o = cfg.optim
    if step < o.warmup:
        return o.lr * (step + 1) / o.warmup
    if o.schedule == "constant":
        return o.lr
    span = max(1, cfg.steps - o.warmup)
    return 0.5 * o.lr * (1 + math.cos(math.pi * min(1.0, (step - o.warmup) / span)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # open_clip's split: no weight decay on gains, biases, norms and the temperature
    def exclude(n: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
              {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": cfg.optim.weight_decay}]
    o = cfg.optim
    device = next(model.parameters()).device.type
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=o.fused and device in ("cpu", "cuda"))


# -- one step's loss -----------------------------------------------------------------------------
def _to(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


# -- the loop ------------------------------------------------------------------------------------
class MetricsLog:
    """metrics.csv (always) and TensorBoard (when installed) on rank 0."""

    def __init__(self, output: str, enabled: bool, tensorboard: bool, wandb_cfg=None, name: str = "train",
                 config: dict | None = None):
        self.enabled, self.fields, self.tb, self.wb = enabled, None, None, None
        self.path = f"{output.rstrip('/')}/metrics.csv"
        if enabled and wandb_cfg is not None:
            import hashlib

            import wandb  # train() checked that it is installed

            local = "://" not in output
            # one W&B run per output directory: --resume continues it
            run_id = hashlib.sha256(output.rstrip("/").encode()).hexdigest()[:16]
            self.wb = wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, mode=wandb_cfg.mode,
                                 tags=wandb_cfg.tags or None, name=name, config=config, id=run_id, resume="allow",
                                 dir=output if local else None)
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(f"{output.rstrip('/')}/tensorboard")
            except ImportError:
                log.info("tensorboard is not installed: metrics go to metrics.csv only")

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        fs, path = fsspec.core.url_to_fs(self.path)
        new = not fs.exists(path)
        if self.fields is None:
            self.fields = list(row) if new else _csv_header(fs, path) or list(row)
        fs.makedirs(fs._parent(path), exist_ok=True)
        with fs.open(path, "a") as f:  # on S3, s3fs appends by rewriting the object: fine for a CSV this small
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)
        self.scalars({k: v for k, v in row.items() if k != "step"}, row["step"])

    def scalars(self, values: dict, step: int) -> None:
        """Numbers to TensorBoard and W&B only (metrics.csv keeps its columns)."""
        values = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wb is not None:
            self.wb.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()
            self.wb = None


def _csv_header(fs, path) -> list[str] | None:
    with fs.open(path, "r") as f:
        line = f.readline().strip()
    return line.split(",") if line else None


def train(cfg: TrainConfig, resume: str | None = None, stop_after: int | None = None) -> dict:
    """Train to ``cfg.steps`` optimizer steps (or stop, with a checkpoint, after step
    ``stop_after``: a time-sliced or preempted job); returns a summary (rank 0's view)."""
    with _determinism(cfg.deterministic), _stop_on_signals():
        return _train(cfg, resume, stop_after)


@contextlib.contextmanager
def _determinism(on: bool):
    """Deterministic kernels for the run, the process's previous settings back afterwards (tests and
    notebooks call ``train`` more than once in one process)."""
    if not on:
        yield
        return
    # cuBLAS reads this when its first handle is made: set before any CUDA matmul of the run
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


def _train(cfg: TrainConfig, resume: str | None, stop_after: int | None) -> dict:
    from recap.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from recap.trainer.data import ReinforcedDataset, make_loader
    from recap.trainer.losses import build_loss
    from recap.trainer.models import create_model

    if cfg.wandb is not None:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:  # every rank stops here, before any collective
            raise ValueError("wandb: the train file asks for Weights & Biases logging but wandb is not "
                             "installed (pip install wandb), or remove `wandb:`")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world, device = dist_setup()
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model, _, preprocess_val, tokenizer = create_model(cfg.model.name, pretrained=cfg.model.pretrained,
                                                       context_length=cfg.model.context_length, device=str(device),
                                                       output_dict=True)
    if cfg.eval_data:  # a wrong path fails now, not after hours of training
        _check_eval_data(cfg.eval_data)
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    tag_loss, heads = _short_tags(cfg, model, rank, world, device)
    optimizer = make_optimizer(torch.nn.ModuleDict({"model": model, **heads}) if heads else model, cfg)
    # autocast on CPU too: the code path a GPU run takes, so it is tested here
    use_amp = cfg.optim.precision != "fp32"
    amp_dtype = torch.bfloat16 if cfg.optim.precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if cfg.optim.precision == "fp16" else None

    step, epoch, consumed = 0, 0, 0
    ckpt = latest_checkpoint(cfg.output) if resume == "latest" else resume
    if ckpt:
        state = load_checkpoint(ckpt, model, optimizer, scaler, heads=heads)
        step, epoch = int(state["step"]), int(state["epoch"])
        consumed = resume_batches(state.get("data_position", {}), cfg.data.batch_size, world)
        if rank == 0:
            log.info("resumed from %s at step %d (epoch %d, %d batches in)", ckpt, step, epoch, consumed)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    metrics = MetricsLog(cfg.output, rank == 0, cfg.tensorboard, cfg.wandb, cfg.name, cfg.model_dump())
    # the teachers' dims this run was configured for: shards made with other teachers fail before step 1
    dim = sum(cfg.loss.teacher_dims) if cfg.loss.kind == "distill" and cfg.loss.teacher_dims else None

    def dataset(ep: int) -> ReinforcedDataset:
        return ReinforcedDataset(cfg.data.path, epoch=ep, seed=cfg.seed, rank=rank, world_size=world,
                                 image_size=_image_size(model), tokenizer=tokenizer, text_choice=cfg.data.text_choice,
                                 syn_weights=cfg.data.syn_weights, online_balance=cfg.data.online_balance,
                                 use_teacher=cfg.loss.kind == "distill", hard_negatives=cfg.loss.hard_negatives,
                                 negatives_per_sample=cfg.loss.negatives_per_sample,
                                 resampled=cfg.data.resampled, expected_dim=dim,
                                 tag_index=tag_loss.index if tag_loss is not None else None,
                                 image_hard_negatives=cfg.data.image_hard_negatives,
                                 long_negatives=cfg.loss.hard_negatives and cfg.loss.long_negatives,
                                 shuffle_buffer=cfg.data.shuffle_buffer)

    first = dataset(epoch)  # bad data (no shards, wrong embedding dims) fails here, before step 1
    opts = _loss_options(cfg)
    if cfg.loss.kind == "distill" and first.config is not None:
        found = [t.dim for t in first.config.teachers]
        if cfg.loss.teacher_dims and list(cfg.loss.teacher_dims) != found:
            raise ValueError(f"{cfg.data.path}: teachers are {found}-d, loss.teacher_dims says {cfg.loss.teacher_dims}")
        opts["teacher_dims"] = found  # one KL per teacher, averaged
    loss_fn = build_loss(cfg.loss.kind, rank=rank, world_size=world, **opts)
    t0, seen = time.time(), 0
    summary: dict[str, Any] = {"rank": rank, "world_size": world}
    last = min(cfg.steps, stop_after) if stop_after else cfg.steps
    saved_at = step if ckpt else None

    def checkpoint() -> None:
        nonlocal saved_at
        if rank == 0:
            save_checkpoint(f"{cfg.output.rstrip('/')}/checkpoints/step_{step}.pt", model=model,
                            optimizer=optimizer, scaler=scaler, step=step, epoch=epoch,
                            data_position={"epoch": epoch, "batches": consumed, "batch_size": cfg.data.batch_size,
                                           "world_size": world}, config=cfg.model_dump(),
                            name=cfg.model.name, heads=heads)
        if dist.is_initialized():
            dist.barrier()
        saved_at = step

    while step < last:
        fresh, epoch_start = consumed == 0, step
        ds = dataset(epoch)
        it = iter(make_loader(ds, cfg.data.batch_size, cfg.data.workers))
        for _ in range(consumed):  # resume inside an epoch: the same stream, minus what was used
            next(it, None)
        while step < last:
            micro = [b for b in (next(it, None) for _ in range(cfg.optim.accum)) if b is not None]
            have_data, carry_on = _agree([len(micro) == cfg.optim.accum, _stop["signal"] is None], device)
            if not carry_on:  # any rank's notice stops every rank at the same step
                summary["preempted"] = _stop["signal"] or "another rank's signal"
                break
            if not have_data:
                break  # some rank ran out: the epoch ends for all (no rank waits in a collective)
            consumed += len(micro)
            lr = lr_at(step, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            terms_sum, bad = backward_step(
                ddp, loss_fn, [_to(b, device) for b in micro], cfg, tag_loss=tag_loss, heads=heads, device=device,
                autocast=lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp),
                backward=lambda t: (scaler.scale(t) if scaler else t).backward(),
                no_sync=ddp.no_sync if world > 1 else None)
            finite = bad is None
            if not finite:
                _write_nonfinite(cfg, step, rank, bad, terms_sum)
            if not _all_true(finite, device):
                metrics.close()
                raise NonFiniteLoss(f"non-finite loss at step {step + 1}; batch uids and loss terms written to "
                                    f"{cfg.output}/nonfinite_step_{step + 1}_rank*.json")
            if heads and world > 1:  # DDP averages the model's gradients; the heads live outside it
                for p in (p for h in heads.values() for p in h.parameters() if p.grad is not None):
                    dist.all_reduce(p.grad)
                    p.grad /= world
            if scaler:
                scaler.unscale_(optimizer)
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.optim.grad_clip)
            (scaler.step(optimizer), scaler.update()) if scaler else optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            seen += sum(b["image"].shape[0] for b in micro) * world
            if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
                now = time.time()
                row = {"step": step, "epoch": epoch, "lr": lr, "samples_per_s": seen / max(now - t0, 1e-9),
                       "loss": sum(terms_sum.values()), **terms_sum,
                       "logit_scale": float(model.logit_scale.detach().exp())}
                metrics.write(row)
                summary.update(row)
            if cfg.eval_data and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                if rank == 0:
                    summary["eval"] = _evaluate(cfg, model, preprocess_val, tokenizer, device, step, metrics)
                if dist.is_initialized():
                    dist.barrier()
            if (cfg.save_every and step % cfg.save_every == 0) or step == last:
                checkpoint()
        else:
            continue
        if "preempted" in summary:
            if saved_at != step:
                checkpoint()
            log.warning("stopped by %s after step %d, checkpoint written: resume with --resume latest",
                        summary["preempted"], step)
            break
        if fresh and step == epoch_start:
            # Every batch is whole (drop_last): data smaller than one batch would loop over empty
            # epochs for ever.
            metrics.close()
            raise ValueError(f"{cfg.data.path}: a whole epoch gives no full batch of {cfg.data.batch_size} samples "
                             f"x {cfg.optim.accum} micro-batches per rank ({world} ranks); lower data.batch_size")
        epoch, consumed = epoch + 1, 0
        summary.setdefault("skipped", {})
        for k, v in getattr(ds, "stats", {}).items():
            summary["skipped"][k] = summary["skipped"].get(k, 0) + v
    metrics.close()
    summary.update(step=step, epoch=epoch, seconds=time.time() - t0)
    return summary


def resume_batches(position: dict, batch_size: int, world: int) -> int:
    """Loader batches per rank to skip on resume. With the checkpoint's batch size and world size:
    its own count, so the epoch continues exactly. With others (resumed on another number of GPUs,
    say): the same number of samples of the epoch, as batches of this run; the ranks split the
    shards differently then, so within this epoch some samples repeat and others are left out."""
    batches = int(position.get("batches", 0))
    old_bs, old_world = int(position.get("batch_size", batch_size)), int(position.get("world_size", world))
    if (old_bs, old_world) == (batch_size, world):
        return batches
    scaled = round(batches * old_bs * old_world / (batch_size * world))
    log.warning("resuming with batch size %d on %d ranks from a checkpoint of batch size %d on %d ranks: "
                "the epoch goes on after %d samples (%d batches per rank), not exactly where it stopped",
                batch_size, world, old_bs, old_world, batches * old_bs * old_world, scaled)
    return scaled


def _check_eval_data(path: str) -> None:
    from recap.trainer.eval import list_shards

    try:
        list_shards(path)
    except FileNotFoundError as e:
        raise ValueError(f"eval_data: {e} (a labelled set as `recap eval --data` takes)") from None


def _evaluate(cfg: TrainConfig, model, preprocess, tokenizer, device, step: int, metrics: MetricsLog) -> dict:
    """``recap eval`` on ``cfg.eval_data`` (rank 0): one line of eval.jsonl, the flat metrics to
    TensorBoard/W&B as ``eval/...``. The RNG states are put back, so a run with evaluations trains
    exactly as one without."""
    from recap.trainer.eval import evaluate, flatten

    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        result = evaluate(model, preprocess, tokenizer, cfg.eval_data, device=device, precision=cfg.optim.precision)
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)
    flat = flatten(result)
    fs, path = fsspec.core.url_to_fs(f"{cfg.output.rstrip('/')}/eval.jsonl")
    fs.makedirs(fs._parent(path), exist_ok=True)
    with fs.open(path, "a") as f:
        f.write(json.dumps({"step": step, **result}, default=str) + "\n")
    metrics.scalars({f"eval/{k}": v for k, v in flat.items()}, step)
    log.info("step %d eval on %s: %s", step, cfg.eval_data,
             ", ".join(f"{k} {v:.3f}" for k, v in flat.items() if k.endswith("top1") or k.endswith("R@1")))
    return flat


def _image_size(model) -> int:
    size = getattr(getattr(model, "visual", None), "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _short_tags(cfg: TrainConfig, model, rank: int, world: int, device: torch.device):
    """HQ-CLIP's short-tag loss and its head, or (None, {}); the vocabulary goes to OUTPUT/tag_vocab.json."""
    st = cfg.loss.short_tags
    if st is None:
        return None, {}
    from recap.pipeline.reinforced import list_shards
    from recap.trainer.losses import ShortTagLoss
    from recap.trainer.models import image_dim
    from recap.trainer.tags import build_tag_vocab, load_tag_vocab

    vocab = load_tag_vocab(st.vocab) if st.vocab else build_tag_vocab(list_shards(cfg.data.path), st.max_tags, st.min_count)
    if rank == 0:
        with fsspec.open(f"{cfg.output.rstrip('/')}/tag_vocab.json", "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
    torch.manual_seed(cfg.seed + 1)  # the head's init: the same on every rank, whatever the model drew
    dim = image_dim(model)  # timm towers have no visual.output_dim
    loss = ShortTagLoss(dim, len(vocab), rank=rank, world_size=world, weight=st.weight, input_scale=math.sqrt(dim)).to(device)
    loss.index = {t: i for i, t in enumerate(vocab)}
    return loss, {"short_tags": loss}


def _loss_options(cfg: TrainConfig) -> dict:
    lc = cfg.loss
    if lc.kind == "distill":
        return {"lambda_distill": lc.lambda_distill, "teacher_logit_scale": lc.teacher_logit_scale}
    if lc.kind == "coca":
        return {"caption_loss_weight": lc.caption_loss_weight, "clip_loss_weight": lc.clip_loss_weight}
    return {}


def _write_nonfinite(cfg: TrainConfig, step: int, rank: int, batch: dict, terms: dict) -> None:
    rec = {"step": step + 1, "rank": rank, "uids": list(batch.get("uid", [])),
           "terms": {k: float(v) for k, v in terms.items()}}
    with fsspec.open(f"{cfg.output.rstrip('/')}/nonfinite_step_{step + 1}_rank{rank}.json", "w") as f:
        json.dump(rec, f, indent=1)
