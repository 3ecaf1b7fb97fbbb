"""The bundled trainer end to end on CPU: a tiny model learns the demo world, resume is exact,
torchrun runs two gloo ranks, and bad data stops before step 1 with a clear message."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from recap.trainer.config import load_train_config
from recap.trainer.train import NonFiniteLoss, train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """Two independent demo worlds: train on one's clean split, evaluate on the other's."""
    from recap.world.generate import generate_world

    base = tmp_path_factory.mktemp("worlds")
    generate_world(base / "train", samples=20, heldout=1400, seed=1, port=8765)
    generate_world(base / "eval", samples=20, heldout=280, seed=2, port=8765)
    return base / "train" / "heldout", base / "eval" / "heldout"


def _cfg(tmp_path, data, **over):
    raw = {"name": "t", "seed": 0, "output": str(tmp_path / "run"), "steps": 6, "log_every": 1, "threads": 1,
           "tensorboard": False, "data": {"path": str(data / "shards"), "batch_size": 16},
           "model": {"name": "recap-tiny"}, "optim": {"lr": 1e-3, "warmup": 2}}
    for k, v in over.items():
        node = raw
        *path, last = k.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = v
    tmp_path.mkdir(parents=True, exist_ok=True)
    f = tmp_path / "train.yaml"
    f.write_text(yaml.safe_dump(raw))
    return f


def _params(run: Path, step: int) -> dict:
    return torch.load(run / "checkpoints" / f"step_{step}.pt", map_location="cpu", weights_only=False)["state_dict"]


def test_resume_is_exact(tmp_path, worlds):
    data, _ = worlds
    # deterministic kernels: what makes this hold on GPUs too (bench/gpu_check.sh runs it on CUDA)
    full = load_train_config(_cfg(tmp_path / "a", data, deterministic=True), output=str(tmp_path / "a/run"))
    train(full)
    assert not torch.are_deterministic_algorithms_enabled()  # the process's setting is put back
    part = load_train_config(_cfg(tmp_path / "b", data, deterministic=True), output=str(tmp_path / "b/run"))
    train(part, stop_after=3)  # preempted after step 3 (its checkpoint written), then resumed
    assert sorted(p.name for p in (tmp_path / "b/run/checkpoints").glob("*.pt")) == ["step_3.pt"]
    train(part, resume="latest")
    a, b = _params(tmp_path / "a/run", 6), _params(tmp_path / "b/run", 6)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = (tmp_path / "b/run/metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and len(rows) == 1 + 6


def _first_loss(run: Path) -> float:
    header, first = (run / "metrics.csv").read_text().splitlines()[:2]
    return float(dict(zip(header.split(","), first.split(",")))["loss"])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_autocasts_and_resumes_exactly(tmp_path, worlds, precision):
    """bf16 / fp16 autocast, the code path a GPU run takes (torch autocasts on CPU too): the first
    loss is fp32's up to half-precision rounding, fp16 checkpoints its gradient scaler, and a resumed
    run ends with exactly the parameters of an uninterrupted one."""
    data, _ = worlds
    train(load_train_config(_cfg(tmp_path / "fp32", data, steps=1)))
    over = {"optim.precision": precision, "deterministic": True}
    train(load_train_config(_cfg(tmp_path / "a", data, **over)))
    part = load_train_config(_cfg(tmp_path / "b", data, **over))
    train(part, stop_after=3)
    train(part, resume="latest")
    a, b = _params(tmp_path / "a/run", 6), _params(tmp_path / "b/run", 6)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.isfinite(v).all() for v in a.values() if v.is_floating_point())
    ref, amp = _first_loss(tmp_path / "fp32/run"), _first_loss(tmp_path / "a/run")
    assert 0 < abs(amp - ref) / ref < 0.02, (ref, amp)  # autocast really ran, and only rounding differs
    ckpt = torch.load(tmp_path / "a/run/checkpoints/step_6.pt", map_location="cpu", weights_only=False)
    if precision == "fp16":
        assert ckpt["scaler"]["scale"] > 0
    else:
        assert ckpt["scaler"] is None


def _signal_after_step_3(train_file: Path, run: Path, send, *extra: str) -> tuple[dict, str]:
    """Run `recap train` (in a session of its own), `send` it a signal once metrics.csv shows step 3,
    and return its summary and stderr; it must exit 3 (preempted)."""
    p = subprocess.Popen([sys.executable, "-m", "recap.cli", "train", str(train_file), *extra], cwd=ROOT, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True)
    metrics, deadline = run / "metrics.csv", time.time() + 240
    while p.poll() is None and time.time() < deadline and (
            not metrics.exists() or len(metrics.read_text().splitlines()) < 4):  # header + 3 steps
        time.sleep(0.02)
    send(p)
    out, err = p.communicate(timeout=240)
    assert p.returncode == 3, err[-3000:]
    return json.loads(out.strip().splitlines()[-1]), err


def test_sigterm_stops_with_a_checkpoint_and_resume_is_exact(tmp_path, worlds):
    """A scheduler's preemption notice (SIGTERM) ends the run after the step in progress, with a
    checkpoint and exit code 3; resumed from it, the run ends where an uninterrupted one does."""
    data, _ = worlds
    steps = 40
    f = _cfg(tmp_path / "b", data, steps=steps, deterministic=True)
    summary, err = _signal_after_step_3(f, tmp_path / "b/run", lambda p: p.send_signal(signal.SIGTERM))
    k = summary["step"]
    assert summary["preempted"] == "SIGTERM" and 3 <= k < steps and "--resume latest" in err
    assert [c.name for c in (tmp_path / "b/run/checkpoints").glob("*.pt")] == [f"step_{k}.pt"]
    train(load_train_config(f), resume="latest")
    train(load_train_config(_cfg(tmp_path / "a", data, steps=steps, deterministic=True)))
    a, b = _params(tmp_path / "a/run", steps), _params(tmp_path / "b/run", steps)
    assert a.keys() == b.keys() and all(torch.equal(a[x], b[x]) for x in a)


def test_resume_with_another_batch_size_or_world_size_keeps_the_epoch_position(tmp_path, worlds):
    from recap.trainer.train import resume_batches

    same = {"batches": 6, "batch_size": 8, "world_size": 2}
    assert resume_batches(same, 8, 2) == 6  # the checkpoint's own layout: exact
    assert resume_batches(same, 16, 1) == 6 and resume_batches(same, 8, 4) == 3 and resume_batches(same, 4, 1) == 24
    assert resume_batches({"batches": 5}, 32, 3) == 5  # a checkpoint that does not record its layout

    data, _ = worlds
    part = load_train_config(_cfg(tmp_path, data, **{"data.batch_size": 8}))
    train(part, stop_after=4)  # 4 batches of 8 into the epoch
    train(load_train_config(_cfg(tmp_path, data, **{"data.batch_size": 16})), resume="latest")
    pos = torch.load(tmp_path / "run/checkpoints/step_6.pt", map_location="cpu", weights_only=False)["data_position"]
    assert pos == {"epoch": 0, "batches": 2 + 2, "batch_size": 16, "world_size": 1}  # 32 samples = 2 of 16, then 2 steps


def test_data_checkpoints_and_resume_on_s3(tmp_path, worlds, s3_endpoint):
    """Shards read from S3 (moto on 127.0.0.1), checkpoints, the `latest` pointer and metrics.csv
    written there; preempted after step 3 and resumed from S3, the run ends with the same
    parameters as the uninterrupted local one."""
    import fsspec

    data, _ = worlds
    fs = fsspec.filesystem("s3")
    fs.mkdir("f6-train")
    fs.put(str(data / "shards") + "/", "s3://f6-train/data/shards/", recursive=True)
    fs.invalidate_cache()
    local = load_train_config(_cfg(tmp_path / "a", data), output=str(tmp_path / "a/run"))
    train(local)
    remote = load_train_config(_cfg(tmp_path / "b", data, **{"data.path": "s3://f6-train/data/shards"}),
                               output="s3://f6-train/run")
    train(remote, stop_after=3)
    fs.invalidate_cache()
    assert fs.cat("s3://f6-train/run/checkpoints/latest").decode().strip() == "step_3.pt"
    train(remote, resume="latest")
    fs.invalidate_cache()
    fs.get("s3://f6-train/run/checkpoints/step_6.pt", str(tmp_path / "b/run/checkpoints/step_6.pt"))
    a, b = _params(tmp_path / "a/run", 6), _params(tmp_path / "b/run", 6)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = fs.cat("s3://f6-train/run/metrics.csv").decode().splitlines()
    assert rows[0].startswith("step,") and [r.split(",")[0] for r in rows[1:]] == [str(i) for i in range(1, 7)]


def test_evaluation_during_training(tmp_path, worlds):
    """eval_data / eval_every: rank 0 scores the labelled set (eval.jsonl, the summary) every N steps
    and at the end, and the run's parameters are exactly those of a run without evaluations."""
    data, held = worlds
    cnn = {"model.name": "recap-tiny-cnn"}  # batch norm: evaluation must hand the model back in train mode
    train(load_train_config(_cfg(tmp_path / "a", data, **cnn), output=str(tmp_path / "a/run")))
    cfg = load_train_config(_cfg(tmp_path / "b", data, eval_data=str(held), eval_every=4, **cnn),
                            output=str(tmp_path / "b/run"))
    summary = train(cfg)
    a, b = _params(tmp_path / "a/run", 6), _params(tmp_path / "b/run", 6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(x) for x in (tmp_path / "b/run/eval.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [4, 6]  # every 4 steps, and at the end
    for x in lines:
        assert x["n"] == 280 and x["zeroshot"]["n_classes"] == 14
        assert x["zeroshot_label_sets"]["colour"]["n"] == 280 and "R@10" in x["retrieval"]["image_to_text"]
    assert summary["eval"]["zeroshot/colour/top1"] == lines[-1]["zeroshot_label_sets"]["colour"]["top1"]

    bad = load_train_config(_cfg(tmp_path / "c", data, eval_data=str(tmp_path / "nowhere")),
                            output=str(tmp_path / "c/run"))
    with pytest.raises(ValueError, match="eval_data: no shards"):
        train(bad)
    assert not (tmp_path / "c/run/checkpoints").exists()


def test_tiny_model_learns_the_demo_world(tmp_path, worlds):
    """Within a CPU-minute the tiny model learns what the captions say about colour: zero-shot over
    the dominant colour (the held-out split's `colour` label set), held-out retrieval and the
    colour-swap negatives rise well above chance. (Shape is not learnt this fast: zero-shot over
    the shape classes stays near chance, see the README and bench/caption_content.py.)"""
    from recap.trainer.eval import evaluate
    from recap.trainer.models import create_model

    data, held = worlds
    # about 21 s of training on 2 cores (0.41-0.43 colour zero-shot over three seeds, chance 0.077)
    cfg = load_train_config(_cfg(tmp_path, data, steps=120, **{"data.batch_size": 48, "optim.warmup": 10,
                                                             "model.name": "recap-tiny-cnn", "threads": 2}))
    summary = train(cfg)
    assert summary["step"] == 120
    model, _, pre_val, tok = create_model("recap-tiny-cnn", pretrained=str(tmp_path / "run/checkpoints/step_120.pt"))
    res = evaluate(model, pre_val, tok, str(held))
    colour = res["zeroshot_label_sets"]["colour"]
    assert colour["n"] == res["n"] and colour["top1"] > 3 * colour["chance_top1"], colour
    r = res["retrieval"]
    assert r["image_to_text"]["R@10"] > 3 * r["chance"]["R@10"], r
    assert res["compositional"]["by_type"]["replace_colour"]["accuracy"] > 0.75, res["compositional"]
    untrained, _, _, _ = create_model("recap-tiny-cnn")
    base = evaluate(untrained, pre_val, tok, str(held))
    assert r["image_to_text"]["R@10"] > base["retrieval"]["image_to_text"]["R@10"] + 0.1
    assert colour["top1"] > base["zeroshot_label_sets"]["colour"]["top1"] + 0.15


def test_two_ranks_with_torchrun_and_ray_train(tmp_path, worlds):
    data, _ = worlds
    # accum 2: the exact accumulation (no_sync, then one all-reduce) on two ranks, both launchers
    f = _cfg(tmp_path, data, steps=3, **{"data.batch_size": 4, "optim.accum": 2})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "recap.cli", "train", str(f), "--nproc", "2"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["world_size"] == 2 and out["step"] == 3
    assert (tmp_path / "run/checkpoints/step_3.pt").exists()

    # the same two ranks on Ray Train's TorchTrainer (a local Ray, gloo) give the same parameters
    r = subprocess.run([sys.executable, "-m", "recap.cli", "train", str(f), "--ray", "--address", "local",
                        "--num-workers", "2", "--output", str(tmp_path / "ray")], cwd=ROOT,
                       env={**env, "RAY_USAGE_STATS_ENABLED": "0"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "world_size=2" in r.stdout + r.stderr
    a, b = _params(tmp_path / "run", 3), _params(tmp_path / "ray", 3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_ranks_stop_together_on_a_scheduler_signal(tmp_path, worlds):
    """SLURM's --signal=USR1 reaches every process of the job: both ranks stop after the same step,
    rank 0 writes the checkpoint, and the launcher above torchrun exits 3."""
    data, _ = worlds
    f = _cfg(tmp_path, data, steps=200, **{"data.batch_size": 4})
    summary, _ = _signal_after_step_3(f, tmp_path / "run", lambda p: os.killpg(p.pid, signal.SIGUSR1), "--nproc", "2")
    assert summary["preempted"] == "SIGUSR1" and summary["world_size"] == 2 and 3 <= summary["step"] < 200
    assert [c.name for c in (tmp_path / "run/checkpoints").glob("*.pt")] == [f"step_{summary['step']}.pt"]


def test_gradient_checkpointing_gives_the_same_steps(tmp_path, worlds):
    data, _ = worlds
    train(load_train_config(_cfg(tmp_path / "a", data, steps=2)))
    train(load_train_config(_cfg(tmp_path / "b", data, steps=2, **{"model.grad_checkpointing": True})))
    a, b = _params(tmp_path / "a/run", 2), _params(tmp_path / "b/run", 2)
    assert a.keys() == b.keys()
    for k in a:  # recomputed activations: the same numbers, up to float noise
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_empty_shard_list_fails_before_step_one(tmp_path):
    (tmp_path / "empty").mkdir()
    f = _cfg(tmp_path, tmp_path / "empty")
    r = subprocess.run([sys.executable, "-m", "recap.cli", "train", str(f)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and "empty" in r.stderr and "shard" in r.stderr.lower()
    assert not (tmp_path / "run/checkpoints").exists()


def test_data_smaller_than_one_batch_is_named_not_looped_over(tmp_path):
    from recap.world.generate import generate_world

    generate_world(tmp_path / "w", samples=20, heldout=10, seed=3, port=8765)
    f = _cfg(tmp_path, tmp_path / "w" / "heldout", **{"data.batch_size": 16})
    r = subprocess.run([sys.executable, "-m", "recap.cli", "train", str(f)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and "no full batch of 16" in r.stderr and "data.batch_size" in r.stderr, r.stderr[-2000:]


def test_bad_train_file_exits_2(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text("output: x\nsteps: 0\ndata: {path: y, batch_sise: 3}\n")
    r = subprocess.run([sys.executable, "-m", "recap.cli", "train", str(f)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert "steps" in r.stderr and "data.batch_sise" in r.stderr and str(f) in r.stderr


def test_non_finite_loss_stops_with_the_batch(tmp_path, worlds):
    from recap.trainer.checkpoint import save_checkpoint
    from recap.trainer.models import create_model

    data, _ = worlds
    model, *_ = create_model("recap-tiny")
    with torch.no_grad():
        model.logit_scale.fill_(float("nan"))
    bad = tmp_path / "nan.pt"
    save_checkpoint(str(bad), model=model, step=0, epoch=0, data_position={}, name="recap-tiny")
    cfg = load_train_config(_cfg(tmp_path, data, **{"model.pretrained": str(bad)}))
    with pytest.raises(NonFiniteLoss, match="step 1"):
        train(cfg)
    rec = json.loads((tmp_path / "run/nonfinite_step_1_rank0.json").read_text())
    assert len(rec["uids"]) == 16 and rec["terms"]


def _fixture(tmp_path):
    from recap.pipeline.reinforced.testing import make_fixture

    out = tmp_path / "reinforced"
    make_fixture(str(out), n_samples=64, n_shards=2, dims=(16, 8), seed=3, n_aug=2, n_syn=2, n_neg=1, image_size=64,
                 balance_prob=lambda i: 0.5 if i % 2 else 1.0)
    return out


def test_distillation_with_synthetic_texts_negatives_and_online_balancing(tmp_path):
    data = _fixture(tmp_path)
    f = _cfg(tmp_path, data, steps=3, **{"data.batch_size": 8, "data.text_choice": "uniform",
                                         "data.online_balance": True, "loss.kind": "distill",
                                         "loss.lambda_distill": 0.7, "loss.hard_negatives": True,
                                         "data.image_hard_negatives": 1, "data.shuffle_buffer": 50,
                                         "loss.teacher_dims": [16, 8]})
    summary = train(load_train_config(f))
    assert summary["step"] == 3
    assert summary["distill_loss"] > 0 and summary["contrastive_loss"] > 0
    header = (tmp_path / "run/metrics.csv").read_text().splitlines()[0].split(",")
    assert {"contrastive_loss", "distill_loss", "lr", "samples_per_s"} <= set(header)


def test_two_ranks_in_half_precision(tmp_path):
    """fp16 autocast with its gradient scaler on two gloo ranks: half-precision features, teachers
    and hard negatives go through the all-gathers, and the run ends finite on both ranks."""
    data = _fixture(tmp_path)
    f = _cfg(tmp_path, data, steps=2, **{"data.batch_size": 8, "loss.kind": "distill", "loss.lambda_distill": 0.5,
                                         "loss.hard_negatives": True, "loss.teacher_dims": [16, 8],
                                         "optim.precision": "fp16"})
    r = subprocess.run([sys.executable, "-m", "recap.cli", "train", str(f), "--nproc", "2"], cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["world_size"] == 2 and out["step"] == 2
    assert all(math.isfinite(out[k]) and out[k] > 0 for k in ("contrastive_loss", "distill_loss")), out
    ckpt = torch.load(tmp_path / "run/checkpoints/step_2.pt", map_location="cpu", weights_only=False)
    assert ckpt["scaler"]["scale"] > 0


def test_teacher_dims_that_do_not_match_fail_before_step_one(tmp_path):
    data = _fixture(tmp_path)
    f = _cfg(tmp_path, data, **{"loss.kind": "distill", "loss.teacher_dims": [32]})
    r = subprocess.run([sys.executable, "-m", "recap.cli", "train", str(f)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and "24-d" in r.stderr and "32" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "run/checkpoints").exists()


def test_coca_trains_its_captioner(tmp_path, worlds):
    """The demo trains its own captioner: CoCa's caption + contrastive losses through the same loop."""
    data, _ = worlds
    f = _cfg(tmp_path, data, steps=2, **{"data.batch_size": 8, "model.name": "recap-tiny-coca", "loss.kind": "coca"})
    summary = train(load_train_config(f))
    assert summary["step"] == 2 and summary["caption_loss"] > 0 and summary["contrastive_loss"] > 0
    from recap.trainer.models import create_model

    model, *_ = create_model("recap-tiny-coca", pretrained=str(tmp_path / "run/checkpoints/step_2.pt"))
    assert hasattr(model, "text_decoder")


def test_coca_loss_with_a_clip_model_is_a_config_error(tmp_path, worlds):
    data, _ = worlds
    f = _cfg(tmp_path, data, **{"loss.kind": "coca"})
    r = subprocess.run([sys.executable, "-m", "recap.cli", "train", str(f)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "coca" in r.stderr


def test_wandb_logging_or_a_clear_error(tmp_path, worlds):
    """`wandb:` in the train file: offline W&B logging where wandb is installed, else an error before step 1."""
    import importlib.util

    data, _ = worlds
    f = _cfg(tmp_path, data, steps=2, **{"wandb.project": "recap-test", "wandb.mode": "offline"})
    cfg = load_train_config(f)
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ValueError, match="pip install wandb"):
            train(cfg)
        assert not (tmp_path / "run/metrics.csv").exists()
        r = subprocess.run([sys.executable, "-m", "recap.cli", "train", str(f)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and "pip install wandb" in r.stderr
    else:  # offline: nothing leaves the machine
        train(cfg, stop_after=1)
        assert train(cfg, resume="latest")["step"] == 2
        runs = sorted((tmp_path / "run/wandb").glob("offline-run-*"))
        # one W&B run id per output directory: the resumed process continues the same run
        assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1, runs
        logged = b"".join(f.read_bytes() for r in runs for f in r.glob("*.wandb"))
        for key in ("contrastive_loss", "samples_per_s"):  # metrics.csv columns (not in the config) reach W&B
            assert key.encode() in logged, key
