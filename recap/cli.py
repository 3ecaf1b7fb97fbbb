"""The ``recap`` command line."""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

EXIT_OK, EXIT_FAILED, EXIT_BAD_JOB = 0, 1, 2


def _err(msg: str) -> None:
    print(f"recap: {msg}", file=sys.stderr)


def cmd_run(args) -> int:
    from recap.pipeline.inputs import InputError
    from recap.pipeline.job import JobError, load_job
    from recap.pipeline.runner import JobFailed, run_job

    try:
        job = load_job(args.job, args.set or [], output=args.output)
    except JobError as e:
        _err(f"bad job file\n{e}")
        return EXIT_BAD_JOB
    try:
        result = run_job(job, address=args.address, cpus=args.cpus, progress=not args.quiet, verify=args.verify)
    except InputError as e:
        _err(f"bad input: {e}")
        return EXIT_FAILED
    except JobFailed as e:
        _err(f"job failed: {e}")
        return EXIT_FAILED
    print(f"done: {result.dataset} ({result.n_shards} shards, {result.seconds:.1f}s)")
    return EXIT_OK


def cmd_inspect(args) -> int:
    from recap.pipeline.inspect import format_report, inspect_dataset

    try:
        rep = inspect_dataset(args.dataset, samples=args.samples, verify=args.verify)
    except FileNotFoundError as e:
        _err(str(e))
        return EXIT_FAILED
    print(json.dumps(rep, indent=1) if args.json else format_report(rep))
    return EXIT_OK if rep["invariant_ok"] else EXIT_FAILED


def cmd_world(args) -> int:
    from recap.world.generate import generate_world

    summary = generate_world(args.out, samples=args.samples, heldout=args.heldout, seed=args.seed, port=args.port,
                             min_size=args.min_size, max_size=args.max_size)
    print(f"world written to {args.out}: {json.dumps(summary, sort_keys=True)}")
    return EXIT_OK


def cmd_serve(args) -> int:
    from recap.world.server import run_server

    run_server(args.world, port=args.port)
    return EXIT_OK


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cmd_demo(args) -> int:
    from recap.pipeline.inspect import format_report, inspect_dataset
    from recap.pipeline.job import load_job
    from recap.pipeline.runner import JobFailed, run_job
    from recap.world.generate import generate_world
    from recap.world.server import serve

    out = Path(args.out)
    world_dir = out / "world"
    meta = world_dir / "world.json"
    port = json.loads(meta.read_text())["port"] if meta.exists() else None
    if port is None or not _port_free(port) or json.loads(meta.read_text()).get("samples") != args.samples:
        port = port if port is not None and _port_free(port) else _free_port()
        print(f"generating the demo world ({args.samples} samples) in {world_dir} ...", flush=True)
        generate_world(world_dir, samples=args.samples, heldout=args.heldout, seed=args.seed, port=port)
    overrides = [f"input.path={world_dir / 'urls.parquet'}", f"download.allow_hosts=[127.0.0.1:{port}]"]
    from recap.jobs import DEMO_JOB

    args.job = args.job or str(DEMO_JOB)
    job = load_job(args.job, [*overrides, *(args.set or [])], output=str(out / "dataset"))
    print(f"serving the demo world on http://127.0.0.1:{port}; running {args.job} -> {job.output}", flush=True)
    with serve(world_dir, port=port):
        try:
            run_job(job, cpus=args.cpus)
        except JobFailed as e:
            _err(f"job failed: {e}")
            return EXIT_FAILED
    rep = inspect_dataset(job.output)
    print(format_report(rep))
    return EXIT_OK if rep["invariant_ok"] else EXIT_FAILED


def cmd_metadata(args) -> int:
    from recap.metadata.builder import metadata_cli

    return metadata_cli(args.rest)


def cmd_train(args) -> int:
    from recap.trainer.launch import train_cli

    return train_cli(args.rest)


def cmd_eval(args) -> int:
    from recap.trainer.eval import eval_cli

    return eval_cli(args.rest)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recap", description="curate, recaption and reinforce image-text data on Ray")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run or resume a job file")
    r.add_argument("job")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a job field (YAML value); repeatable")
    r.add_argument("--output", help="dataset directory (local path or fsspec URL); overrides `output`")
    r.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    r.add_argument("--cpus", type=int, help="CPUs for the local Ray (default: all)")
    r.add_argument("--quiet", action="store_true", help="no progress lines")
    r.add_argument("--verify", action="store_true",
                   help="resume: re-hash every committed file instead of trusting markers and sizes")
    r.set_defaults(fn=cmd_run)

    i = sub.add_parser("inspect", help="counts, drops by reason, and the invariant check")
    i.add_argument("dataset")
    i.add_argument("--json", action="store_true")
    i.add_argument("--samples", type=int, default=0, metavar="K", help="show K example drops per reason")
    i.add_argument("--verify", action="store_true", help="also re-hash every committed file against its marker")
    i.set_defaults(fn=cmd_inspect)

    w = sub.add_parser("world", help="generate the demo web")
    w.add_argument("out")
    w.add_argument("--samples", type=int, default=2000)
    w.add_argument("--heldout", type=int, default=200)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--port", type=int, default=None, help="port the URLs point at (default 8765)")
    w.add_argument("--min-size", type=int, default=128)
    w.add_argument("--max-size", type=int, default=256)
    w.set_defaults(fn=cmd_world)

    s = sub.add_parser("serve", help="serve a demo world on 127.0.0.1")
    s.add_argument("world")
    s.add_argument("--port", type=int, default=None, help="default: the port in WORLD/world.json")
    s.set_defaults(fn=cmd_serve)

    d = sub.add_parser("demo", help="generate + serve the demo world, run jobs/demo.yaml, inspect")
    d.add_argument("--out", default="demo-out")
    d.add_argument("--job", default=None, help="default: the bundled demo job")
    d.add_argument("--samples", type=int, default=2000)
    d.add_argument("--heldout", type=int, default=200)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--cpus", type=int, default=None)
    d.add_argument("--set", action="append", metavar="KEY=VALUE")
    d.set_defaults(fn=cmd_demo)

    m = sub.add_parser("metadata", help="MetaCLIP metadata tools (`recap metadata build --out metadata.json`)")
    m.add_argument("rest", nargs=argparse.REMAINDER)
    m.set_defaults(fn=cmd_metadata)

    t = sub.add_parser("train", help="train a CLIP-style model on reinforced shards (`recap train TRAIN.yaml`)",
                       add_help=False)
    t.add_argument("rest", nargs=argparse.REMAINDER)
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="zero-shot, retrieval and compositional evaluation of a checkpoint", add_help=False)
    e.add_argument("rest", nargs=argparse.REMAINDER)
    e.set_defaults(fn=cmd_eval)
    return p


# subcommands with parsers of their own: everything after the name is theirs (--help included)
_PASSTHROUGH = {"metadata": cmd_metadata, "train": cmd_train, "eval": cmd_eval}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in _PASSTHROUGH:
        return _PASSTHROUGH[argv[0]](argparse.Namespace(rest=argv[1:]))
    args = parser().parse_args(argv)
    if args.cmd == "world" and args.port is None:
        from recap.world.generate import DEFAULT_PORT
        args.port = DEFAULT_PORT
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
