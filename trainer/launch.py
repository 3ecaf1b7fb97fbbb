"""``recap train TRAIN.yaml``: single process, ``--nproc N`` through torchrun (DDP: NCCL on GPUs,
gloo on CPU), or ``--ray`` on Ray Train's TorchTrainer over an existing cluster."""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys

EXIT_OK, EXIT_FAILED, EXIT_BAD_CONFIG, EXIT_PREEMPTED = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recap train", description="train a CLIP-style model on reinforced shards")
    p.add_argument("config", help="train YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field (YAML value)")
    p.add_argument("--output", help="run directory; overrides `output`")
    p.add_argument("--resume", help="'latest' or a checkpoint path")
    p.add_argument("--stop-after", type=int, help="stop (with a checkpoint) after this step; resume later")
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine (torchrun)")
    p.add_argument("--ray", action="store_true", help="run on Ray Train (TorchTrainer) on the cluster at --address")
    p.add_argument("--address", help="Ray cluster address (with --ray)")
    p.add_argument("--num-workers", type=int, default=2, help="Ray Train workers (with --ray)")
    p.add_argument("--gpus-per-worker", type=float, default=0, help="with --ray")
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PREEMPTED_MARKER = "RECAP_PREEMPTED_MARKER"
SHUTDOWN_TIMEOUT = 300  # seconds torchrun waits for the ranks' checkpoint after a notice (its default: 30)


def _torchrun(args, argv: list[str]) -> int:
    """Re-run this command under torchrun, without --nproc (each child is one rank). torchrun puts
    the ranks in sessions of their own and passes the signals it handles on to them: SIGUSR1 is
    added to those, so a scheduler's notice to the process group (SIGTERM, or SLURM's USR1) reaches
    every rank once, through torchrun, which then gives them SHUTDOWN_TIMEOUT seconds to write the
    checkpoint. This launcher waits and exits EXIT_PREEMPTED, whatever torchrun's own exit code."""
    import signal
    import tempfile

    child = [a for a in argv]
    i = child.index("--nproc") if "--nproc" in child else None
    if i is not None:
        del child[i:i + 2]
    else:
        child = [a for a in child if not a.startswith("--nproc=")]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", f"--shutdown-timeout={SHUTDOWN_TIMEOUT}",
           "-m", "recap.trainer.launch", *child]
    with tempfile.TemporaryDirectory() as d:
        marker = os.path.join(d, "preempted")
        # the notice reaches the ranks (and torchrun) through the process group: here it only must not kill us
        previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            rc = subprocess.call(cmd, env={**os.environ, PREEMPTED_MARKER: marker})
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        return EXIT_PREEMPTED if os.path.exists(marker) else rc


def _ray(cfg, args) -> int:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from recap.pipeline.preflight import check_address
    from recap.pipeline.ray_cluster import join, start_local

    # a cluster named by --address (or RAY_ADDRESS), its address and token checked; else a new one on loopback only
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        check_address(address)
        join(address)
    else:
        start_local()

    def loop(conf: dict) -> None:
        from recap.trainer.config import TrainConfig
        from recap.trainer.train import train

        train(TrainConfig.model_validate(conf["cfg"]), resume=conf["resume"])

    trainer = TorchTrainer(loop, train_loop_config={"cfg": cfg.model_dump(), "resume": args.resume},
                           scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=args.gpus_per_worker > 0,
                                                        resources_per_worker={"GPU": args.gpus_per_worker} if args.gpus_per_worker else None),
                           run_config=RunConfig(name=cfg.name, storage_path=os.path.abspath(cfg.output) if "://" not in cfg.output else cfg.output))
    trainer.fit()
    return EXIT_OK


def train_cli(argv: list[str]) -> int:
    from recap.trainer.config import TrainConfigError, load_train_config
    from recap.trainer.train import NonFiniteLoss, train

    args = _parser().parse_args(argv)
    try:
        cfg = load_train_config(args.config, args.set, output=args.output)
    except TrainConfigError as e:
        print(f"recap: bad train file\n{e}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    if args.ray:
        return _ray(cfg, args)
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _torchrun(args, argv)
    try:
        summary = train(cfg, resume=args.resume, stop_after=args.stop_after)
    except (NonFiniteLoss, ValueError, FileNotFoundError) as e:
        print(f"recap: training failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    if summary.get("rank", 0) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "rank"}, sort_keys=True))
    if summary.get("preempted"):
        if summary.get("rank", 0) == 0:
            print(f"recap: stopped by {summary['preempted']} after step {summary['step']} with a checkpoint; "
                  "run again with --resume latest", file=sys.stderr)
            if os.environ.get(PREEMPTED_MARKER):  # tell the launcher above torchrun
                open(os.environ[PREEMPTED_MARKER], "w").close()
        return EXIT_PREEMPTED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(train_cli(sys.argv[1:]))
