"""recap's trainer vs open_clip_train on the same model, data, batch size, workers and threads, in
one run. Prints samples/s for both and the ratio recap/open_clip (goal: >= 1.0).

    .venv/bin/python bench/train.py [--steps 60] [--warmup 10] [--batch-size 64] [--workers 2]
                                    [--threads 2] [--repeat 3] [--model recap-tiny]
    # on GPUs (torchrun for both, NCCL when --nproc > 1; bf16 autocast for both by default):
    .venv/bin/python bench/train.py --device cuda --nproc 8 --batch-size 256 --steps 200 --workers 6

What is compared
- data: a demo world's held-out split (world.generate), rewritten as --shards plain webdataset tars
  with only jpg + txt members (what img2dataset writes; no config.json: recap reads them as plain
  shards, i.e. GT caption + open_clip's RandomResizedCrop(0.9, 1), the same as open_clip's train
  transform). open_clip_train reads them with `--dataset-type webdataset`.
- model: the same open_clip config for both (default recap-tiny from trainer/model_configs; open_clip
  learns it through `open_clip.add_model_config`, see the --_openclip-main wrapper below), same seed.
- optimisation: AdamW(lr 5e-4, betas (0.9, 0.98), eps 1e-6, wd 0.2), cosine with --warmup linear
  steps, grad clip 1.0, fp32 on CPU; on CUDA bf16 autocast for both (open_clip: amp_bf16; note
  open_clip_train also turns on TF32 matmuls and cudnn.benchmark, recap does not).
- threads: OMP_NUM_THREADS=--threads for both processes, plus recap's `threads:` field (the same
  torch.set_num_threads). DataLoader workers: --workers for both (torch gives each worker 1 thread).
- each run is a fresh process training --steps optimizer steps of --batch-size per rank, logging
  every step; both write a final checkpoint (each trainer's default).

How it is measured
- steady samples/s: samples of steps (warmup, steps] over the wall time between the end of step
  `warmup` and the end of the last step, taken from each trainer's own per-step logs: recap's
  metrics.csv (cumulative `samples_per_s` since the loop started -> elapsed time at each step) and
  open_clip_train's "Batch (t): ..., X/s" lines (X = global batch / that step's wall time, which
  includes waiting for data). The first --warmup steps (workers starting, shuffle buffers filling)
  are excluded for both. This is the headline ratio.
- end-to-end: fresh process start to exit (imports, model build, data start, all steps, checkpoint)
  for the same number of samples; printed too, so nobody is misled by either number alone.
- the two trainers run alternately --repeat times; the best of each counts.
- open_clip's "Data (t)" (time waiting for the loader per step) is printed for its runs; with
  --profile the bench also times each data pipeline alone (loader only, no model) and one
  training step alone (fixed batch, no loader), to show where the time goes.

open_clip_train's environment: open_clip_torch 3.x ships it as the top-level package
`open_clip_train` in the same wheel, so it runs on recap's interpreter and torch. Its one conflicting
pin is `webdataset<=0.2.86` (open_clip_torch[training]): with newer webdataset (recap's venv has
0.2.111) its tar reader gets an end-of-tar marker `{}` and dies with KeyError 'fname'. So the open_clip
processes run with an overlay put first on PYTHONPATH that holds only webdataset==0.2.86 (pure
Python; `pip install --no-deps --target`, made on first use in bench/.openclip-deps/, which ignores
itself through its own .gitignore; --openclip-deps elsewhere). recap's processes never see it. For
a machine without PyPI access, carry that directory along. If open_clip_train ever needs more than
that, install it in its own venv and pass `--openclip-python /path/to/venv/bin/python` (that
interpreter only runs this file in its --_openclip-main mode, which imports nothing from recap;
pass --openclip-deps none to skip the overlay).
"""
from __future__ import annotations

import sys

if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--_openclip-main":
    # wrapper: register extra model configs with open_clip, then run open_clip_train's main
    # (argv: --_openclip-main CONFIG_DIR -- open_clip_train args...). Used under torchrun too.
    import open_clip
    from open_clip_train.main import main as _oc_main

    _dir, _rest = sys.argv[2], sys.argv[sys.argv.index("--") + 1:]
    open_clip.add_model_config(_dir)
    sys.exit(_oc_main(_rest) or 0)

import argparse
import csv
import io
import json
import math
import os
import re
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.report import record  # noqa: E402
CONFIG_DIR = ROOT / "trainer" / "model_configs"


# -- data -------------------------------------------------------------------------------------------
def make_data(out: Path, samples: int, shards: int, seed: int = 1) -> tuple[Path, int, int]:
    """Demo-world held-out samples as `shards` plain jpg/txt tars: (dir, n_samples, n_shards)."""
    from recap.world.generate import generate_world

    generate_world(out / "w", samples=20, heldout=samples, seed=seed, port=8765)
    src = out / "w" / "heldout" / "shards"
    groups: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    for tar in sorted(src.glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t:
                if not m.isfile():
                    continue
                key, _, ext = m.name.partition(".")
                if ext in ("jpg", "txt"):
                    if key not in groups:
                        groups[key] = {}
                        order.append(key)
                    groups[key][ext] = t.extractfile(m).read()
    keys = [k for k in order if {"jpg", "txt"} <= groups[k].keys() and groups[k]["txt"].strip()]
    dst = out / "shards"
    dst.mkdir(parents=True, exist_ok=True)
    per = math.ceil(len(keys) / shards)
    n_shards = 0
    for i in range(shards):
        part = keys[i * per:(i + 1) * per]
        if not part:
            break
        with tarfile.open(dst / f"{i:05d}.tar", "w") as t:
            for k in part:
                for ext in ("jpg", "txt"):
                    data = groups[k][ext]
                    info = tarfile.TarInfo(f"{k}.{ext}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    t.addfile(info, io.BytesIO(data))
        n_shards += 1
    shutil.rmtree(out / "w")
    return dst, len(keys), n_shards


# -- running the two trainers -------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


OC_WEBDATASET = "0.2.86"  # open_clip_torch[training] pins webdataset<=0.2.86


def openclip_deps(where: str) -> Path | None:
    """The PYTHONPATH overlay for open_clip_train (webdataset==0.2.86 only), made if missing."""
    if where == "none":
        return None
    d = Path(where)
    if (d / f"webdataset-{OC_WEBDATASET}.dist-info").is_dir():
        return d
    d.mkdir(parents=True, exist_ok=True)
    (d / ".gitignore").write_text("*\n")
    print(f"installing webdataset=={OC_WEBDATASET} for open_clip_train into {d} (pip --no-deps --target)", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade", "--target", str(d),
                    f"webdataset=={OC_WEBDATASET}"], check=True)
    return d


def _env(args, overlay: Path | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # both trainers pick CUDA when they see it
    paths = ([str(overlay)] if overlay else []) + [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _steady(points: list[tuple[int, float]], warmup: int, samples_per_step: int) -> float:
    """samples/s over steps (warmup, last] from [(step, elapsed seconds at its end)]."""
    d = dict(points)
    last = max(d)
    w = warmup if warmup in d else min(d)
    return (last - w) * samples_per_step / (d[last] - d[w])


def run_recap(args, data: Path, work: Path, tag: str) -> dict:
    import yaml

    out = work / f"recap-{tag}"
    shutil.rmtree(out, ignore_errors=True)  # --keep: a second bench run would append to metrics.csv
    cfg = {"name": "bench", "seed": 0, "output": str(out), "steps": args.steps, "log_every": 1,
           "threads": args.threads, "tensorboard": False,
           "data": {"path": str(data), "batch_size": args.batch_size, "workers": args.workers},
           "model": {"name": args.model},
           "optim": {"lr": 5e-4, "warmup": args.warmup, "weight_decay": 0.2, "betas": [0.9, 0.98], "eps": 1e-6,
                     "grad_clip": 1.0, "precision": args.precision}}
    f = work / f"recap-{tag}.yaml"
    f.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "recap.trainer.launch", str(f)]
    if args.nproc > 1:
        cmd += ["--nproc", str(args.nproc)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=_env(args), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"recap run failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    gbs = args.batch_size * args.nproc
    pts = [(int(r["step"]), int(r["step"]) * gbs / float(r["samples_per_s"])) for r in rows]
    return {"steady": _steady(pts, args.warmup, gbs), "wall": wall, "steps": max(s for s, _ in pts),
            "data_t": None}


OC_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+ .*?Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+), ([\d.eE+-]+)/s")


def run_openclip(args, data: Path, n_shards: int, work: Path, tag: str) -> dict:
    gbs = args.batch_size * args.nproc
    oc = [f"--train-data={data}/{{00000..{n_shards - 1:05d}}}.tar", "--dataset-type=webdataset",
          f"--train-num-samples={args.steps * gbs}", "--epochs=1", f"--model={args.model}", "--seed=0",
          f"--batch-size={args.batch_size}", f"--workers={args.workers}", f"--device={args.device}",
          "--precision=" + {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp"}[args.precision],
          "--lr=5e-4", "--beta1=0.9", "--beta2=0.98", "--eps=1e-6", "--wd=0.2", f"--warmup={args.warmup}",
          "--grad-clip-norm=1.0", "--log-every-n-steps=1", f"--logs={work}", f"--name=openclip-{tag}",
          "--report-to=", "--zeroshot-frequency=0", "--val-frequency=0"]
    shutil.rmtree(work / f"openclip-{tag}", ignore_errors=True)  # else "Experiment already exists"
    me = [str(Path(__file__).resolve()), "--_openclip-main", str(args.model_config_dir), "--", *oc]
    py = args.openclip_python or sys.executable
    if args.nproc > 1:
        cmd = [py, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *me]
    else:
        cmd = [py, *me]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=work, env=_env(args, args.oc_overlay), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    text = p.stdout + p.stderr
    if p.returncode:
        sys.exit(f"open_clip_train run failed ({p.returncode}):\n{text[-4000:]}")
    pts, elapsed, data_avg = [], 0.0, {}
    for m in OC_LINE.finditer(text):
        step = int(m.group(1)) // gbs
        elapsed += gbs / float(m.group(4))  # this step's wall time (batch_time.val)
        pts.append((step, elapsed))
        data_avg[step] = float(m.group(2))
    if not pts:
        sys.exit(f"open_clip_train printed no step lines:\n{text[-4000:]}")
    last, w = max(data_avg), args.warmup if args.warmup in data_avg else min(data_avg)
    data_t = (last * data_avg[last] - w * data_avg[w]) / max(1, last - w)  # mean over steps (w, last]
    return {"steady": _steady(pts, args.warmup, gbs), "wall": wall, "steps": last, "data_t": data_t}


# -- profile: each data pipeline alone, one training step alone ---------------------------------------
def profile(args, data: Path, n_shards: int) -> None:
    """Loader-only samples/s for both pipelines and compute-only samples/s (this process, with
    --threads torch threads; loaders with --workers workers), to show where the time goes."""
    import torch

    torch.set_num_threads(args.threads)
    import open_clip
    from types import SimpleNamespace

    from open_clip_train.data import get_wds_dataset
    from recap.trainer.data import ReinforcedDataset, make_loader
    from recap.trainer.models import create_model
    from recap.trainer.train import _image_size

    open_clip.add_model_config(str(args.model_config_dir))
    model, pre_train, _, tok = create_model(args.model, output_dict=True)
    n = args.steps

    def time_loader(it) -> float:
        t, got = None, 0
        for i, b in enumerate(it):
            if i == args.warmup:
                t = time.perf_counter()
            if i > args.warmup:
                got += args.batch_size
            if i + 1 >= n:
                break
        return got / (time.perf_counter() - t)

    ds = ReinforcedDataset(str(data), image_size=_image_size(model), tokenizer=tok)
    rec = time_loader(make_loader(ds, args.batch_size, args.workers))
    oargs = SimpleNamespace(train_data=f"{data}/{{00000..{n_shards - 1:05d}}}.tar", val_data=None,
                            dataset_resampled=False, train_num_samples=n * args.batch_size,
                            train_data_upsampling_factors=None, seed=0, batch_size=args.batch_size,
                            workers=args.workers, world_size=1)
    oc = time_loader(get_wds_dataset(oargs, pre_train, True, tokenizer=tok).dataloader)

    from recap.trainer.losses import build_loss

    images = torch.randn(args.batch_size, 3, _image_size(model), _image_size(model))
    texts = torch.randint(1, 1000, (args.batch_size, 77))
    loss_fn = build_loss("clip")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(max(10, n // 2)):
        t = time.perf_counter()
        out = model(images, texts)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - t)
    step = args.batch_size / (sum(times[3:]) / len(times[3:]))
    print(f"\nprofile ({args.workers} loader workers, {args.threads} torch threads here):")
    print(f"  loader only   recap {rec:8.1f} samples/s   open_clip {oc:8.1f} samples/s   ratio {rec / oc:.2f}")
    print(f"  step only     {step:8.1f} samples/s (forward+backward+clip+AdamW, fixed batch)")


# -- main -------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--nproc", type=int, default=1, help="ranks (torchrun for both when > 1)")
    ap.add_argument("--model", default="recap-tiny")
    ap.add_argument("--model-config-dir", type=Path, default=CONFIG_DIR,
                    help="extra open_clip model configs (registered in both trainers)")
    ap.add_argument("--batch-size", type=int, default=64, help="per rank")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10, help="first steps left out of the steady rate")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank, both")
    ap.add_argument("--threads", type=int, default=2, help="torch/OMP threads per process, both")
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                    help="autocast for both trainers (default: fp32 on CPU, bf16 on CUDA)")
    ap.add_argument("--samples", type=int, default=None, help="data size (default: 1.3x what the run reads)")
    ap.add_argument("--shards", type=int, default=None, help="tars (default: max(4, 2 x workers x nproc))")
    ap.add_argument("--repeat", type=int, default=3, help="alternate the two this many times; best counts")
    ap.add_argument("--openclip-python", help="interpreter with open_clip_train (a separate venv)")
    ap.add_argument("--openclip-deps", default=str(ROOT / "bench" / ".openclip-deps"),
                    help="PYTHONPATH overlay with webdataset==0.2.86 for open_clip_train ('none': skip)")
    ap.add_argument("--profile", action="store_true", help="also time each loader alone and a step alone")
    ap.add_argument("--keep", type=Path, help="work in this directory and keep it (default: a temp dir)")
    ap.add_argument("--_profile-only", nargs=2, metavar=("DATA", "N_SHARDS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._profile_only:  # the profile's own process, with open_clip_train's webdataset first on the path
        profile(args, Path(args._profile_only[0]), int(args._profile_only[1]))
        return
    if args.precision is None:
        args.precision = "bf16" if args.device == "cuda" else "fp32"
    if args.warmup >= args.steps:
        ap.error("--warmup must be below --steps")
    need = args.steps * args.batch_size * args.nproc
    samples = args.samples or int(need * 1.3) + args.batch_size * args.nproc * max(1, args.workers)
    shards = args.shards or max(4, 2 * max(1, args.workers) * args.nproc)

    args.oc_overlay = openclip_deps(args.openclip_deps)
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        data, n, n_shards = make_data(work / "data", samples, shards)
        print(f"data: {n} samples in {n_shards} plain jpg/txt shards ({time.perf_counter() - t:.1f}s); "
              f"{args.steps} steps x {args.batch_size} x {args.nproc} rank(s) = {need} samples per run, "
              f"device {args.device}, {args.precision}, workers {args.workers}, threads {args.threads}, "
              f"model {args.model}", flush=True)
        if n < need * 1.1:
            sys.exit(f"only {n} samples for {need} per run: raise --samples")
        results: dict[str, list[dict]] = {"recap": [], "open_clip": []}
        for r in range(args.repeat):
            for name in ("recap", "open_clip"):
                res = run_recap(args, data, work, str(r)) if name == "recap" \
                    else run_openclip(args, data, n_shards, work, str(r))
                results[name].append(res)
                extra = f"  data wait {res['data_t'] * 1e3:.0f} ms/step" if res["data_t"] is not None else ""
                print(f"  run {r + 1}/{args.repeat} {name:9s} steady {res['steady']:8.1f} samples/s   "
                      f"process {res['wall']:6.1f}s ({need / res['wall']:6.1f} samples/s end to end){extra}",
                      flush=True)
        best = {k: max(v, key=lambda x: x["steady"]) for k, v in results.items()}
        best_wall = {k: min(x["wall"] for x in v) for k, v in results.items()}
        print(f"\n{'trainer':10s} {'steady samples/s':>17s} {'end-to-end samples/s':>21s} {'process s':>10s}")
        for k in ("recap", "open_clip"):
            print(f"{k:10s} {best[k]['steady']:17.1f} {need / best_wall[k]:21.1f} {best_wall[k]:10.1f}")
        ratio = best["recap"]["steady"] / best["open_clip"]["steady"]
        print(f"\nratio recap/open_clip = {ratio:.2f} (steady, steps {args.warmup + 1}..{args.steps}; "
              f"end to end {best_wall['open_clip'] / best_wall['recap']:.2f}); goal >= 1.0")
        record("trainer samples/s", ratio, goal=">= 1.0", value=best["recap"]["steady"],
               baseline=best["open_clip"]["steady"], unit="samples/s", against="open_clip_train, same data and model",
               model=args.model, device=args.device)
        if args.profile:
            # open_clip's loader needs its webdataset (the overlay): time both loaders in a child
            # process that has it first on sys.path (recap's reader does not use webdataset).
            subprocess.run([sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--_profile-only",
                            str(data), str(n_shards)], env=_env(args, args.oc_overlay), check=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
