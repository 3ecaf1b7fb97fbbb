"""The ``recap`` command line."""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import re
import sys
import threading
import traceback
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from recap.pipeline.errors import UserError

EXIT_OK, EXIT_FAILED, EXIT_BAD_JOB, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 0, 1, 2, 130, 141
DEBUG = False  # --debug: tracebacks and Ray's own log lines reach the terminal


def _err(msg: str) -> None:
    print(f"recap: {msg}", file=sys.stderr)


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}: must be at least 1")
    return n


# Ray's C++ core logs to this process's stderr in glog's format ("[2026-01-01 10:00:00,000 E 1 1]
# core_worker.cc:..."), e.g. a notice about actor constructor arguments on every run with an actor pool.
_NATIVE_LOG = re.compile(rb"^(\x1b\[[0-9;]*m)?(\(\w+\)\s*)?(\x1b\[[0-9;]*m)?\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] ")


@contextlib.contextmanager
def _native_stderr_filtered():
    """Keep Ray's native log lines off the terminal (they are in Ray's log files too): fd 2 goes
    through a pipe whose reader passes on every other line. Python's own stderr is unaffected."""
    real = os.dup(2)
    r, w = os.pipe()
    os.dup2(w, 2)
    os.close(w)

    def pump() -> None:
        with os.fdopen(r, "rb") as src:
            for line in src:
                if not _NATIVE_LOG.match(line):
                    os.write(real, line)

    reader = threading.Thread(target=pump, name="recap-stderr", daemon=True)
    reader.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real, 2)  # closes the pipe's last write end here: the reader drains and ends
        reader.join(5)
        os.close(real)


def _run_job(job, overwrite: bool, **kwargs):
    from recap.pipeline.runner import run_job

    if DEBUG:
        return run_job(job, overwrite=overwrite, debug=True, **kwargs)
    with _native_stderr_filtered():
        return run_job(job, overwrite=overwrite, **kwargs)


def cmd_run(args) -> int:
    from recap.pipeline.job import load_job
    from recap.pipeline.runner import JobFailed

    job = load_job(args.job, args.set or [], output=args.output)
    try:
        result = _run_job(job, args.overwrite, address=args.address, cpus=args.cpus, progress=not args.quiet,
                          verify=args.verify)
    except JobFailed as e:
        _err(f"job failed: {e}\n(the full traceback is in {job.output}/logs/failures/; "
             f"fix the cause and run the same command again: finished shards are kept)")
        return EXIT_FAILED
    print(f"done: {result.dataset} ({result.n_shards} shards, {result.seconds:.1f}s)")
    return EXIT_OK


def _inspect(url: str, **kwargs) -> dict:
    from recap.pipeline.errors import OutputError
    from recap.pipeline.inspect import inspect_dataset
    from recap.pipeline.storage import Dataset

    ds = Dataset(url)
    if not ds.local:
        ds.check_usable()  # an unreachable store is named within seconds, not after botocore's retries
    elif not os.path.isdir(url):
        raise OutputError(f"{url}: no such dataset directory")
    try:
        return inspect_dataset(url, **kwargs)
    except FileNotFoundError as e:
        raise OutputError(str(e)) from None


def cmd_inspect(args) -> int:
    from recap.pipeline.inspect import exit_ok, format_report

    rep = _inspect(args.dataset, samples=args.samples, verify=args.verify)
    print(json.dumps(rep, indent=1) if args.json else format_report(rep))
    return EXIT_OK if exit_ok(rep) else EXIT_FAILED


def cmd_world(args) -> int:
    from recap.world.generate import generate_world

    try:
        summary = generate_world(args.out, samples=args.samples, heldout=args.heldout, seed=args.seed,
                                 port=args.port, min_size=args.min_size, max_size=args.max_size)
    except ValueError as e:
        raise UserError(f"world: {e}") from None
    except OSError as e:
        raise UserError(f"world: cannot write {args.out}: {e.strerror or e}") from None
    print(f"world written to {args.out}: {json.dumps(summary, sort_keys=True)}")
    return EXIT_OK


def _world_dir(path: str) -> Path:
    world = Path(path)
    if not (world / "world.json").is_file() or not (world / "routes.json").is_file():
        raise UserError(f"serve: {path} is not a demo world (no world.json and routes.json; "
                         f"make one with `recap world {path} --samples N`)")
    return world


def cmd_serve(args) -> int:
    from recap.world.server import run_server

    world = _world_dir(args.world)
    try:
        run_server(str(world), port=args.port)
    except OSError as e:
        if e.errno in (errno.EADDRINUSE, errno.EACCES):
            raise UserError(f"serve: cannot listen on port {args.port or 'from world.json'}: {e.strerror}; "
                             f"pick another with --port") from None
        raise
    return EXIT_OK


def cmd_demo(args) -> int:
    from recap.pipeline.inspect import exit_ok, format_report, inspect_dataset
    from recap.pipeline.job import load_job
    from recap.pipeline.runner import JobFailed
    from recap.world.generate import generate_world
    from recap.world.server import free_port, port_free, serve

    out = Path(args.out)
    world_dir = out / "world"
    meta = world_dir / "world.json"
    port = json.loads(meta.read_text())["port"] if meta.exists() else None
    regenerated = port is None or not port_free(port) or json.loads(meta.read_text()).get("samples") != args.samples
    if regenerated:
        port = port if port is not None and port_free(port) else free_port()
        print(f"generating the demo world ({args.samples} samples) in {world_dir} ...", flush=True)
        generate_world(world_dir, samples=args.samples, heldout=args.heldout, seed=args.seed, port=port)
    overrides = [f"input.path={world_dir / 'urls.parquet'}", f"download.allow_hosts=[127.0.0.1:{port}]"]
    from recap.demo_teacher import demo_teacher, teacher_overrides
    from recap.jobs import DEMO_JOB

    args.job = args.job or str(DEMO_JOB)
    if (world_dir / "heldout" / "shards").is_dir():
        # the teacher of the clip and reinforce stages: trained here on the world's clean split, once
        ckpt, trained = demo_teacher(world_dir, out / "teacher", seed=args.seed)
        print(f"{'trained' if trained else 'reusing'} the demo teacher {ckpt}", flush=True)
        overrides += teacher_overrides(args.job, ckpt)
    job = load_job(args.job, [*overrides, *(args.set or [])], output=str(out / "dataset"))
    print(f"serving the demo world on http://127.0.0.1:{port}; running {args.job} -> {job.output}", flush=True)
    with serve(world_dir, port=port):
        try:
            # the demo owns its output: a world made anew (another port, size) rebuilds the dataset
            _run_job(job, regenerated, cpus=args.cpus)
        except JobFailed as e:
            _err(f"job failed: {e}")
            return EXIT_FAILED
    rep = inspect_dataset(job.output)
    print(format_report(rep))
    return EXIT_OK if exit_ok(rep) else EXIT_FAILED


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
    p.add_argument("--version", action="version", version=f"recap {_version()}")
    p.add_argument("--debug", action="store_true", help="tracebacks and Ray's own log lines on the terminal")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run or resume a job file")
    r.add_argument("job")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a job field (YAML value); repeatable")
    r.add_argument("--output", help="dataset directory (local path or fsspec URL); overrides `output`")
    r.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    r.add_argument("--cpus", type=_positive, help="CPUs for the local Ray (default: all)")
    r.add_argument("--quiet", action="store_true", help="no progress lines")
    r.add_argument("--verify", action="store_true",
                   help="resume: re-hash every committed file instead of trusting markers and sizes")
    r.add_argument("--overwrite", action="store_true",
                   help="the output holds a dataset of another input or source setting, or files recap did "
                        "not write: discard recap's folders there and start again (default: refuse, exit 2)")
    r.set_defaults(fn=cmd_run)

    i = sub.add_parser("inspect", help="counts, drops by reason, and the invariant check")
    i.add_argument("dataset")
    i.add_argument("--json", action="store_true")
    i.add_argument("--samples", type=int, default=0, metavar="K", help="show K example drops per reason")
    i.add_argument("--verify", action="store_true", help="also re-hash every committed file against its marker")
    i.set_defaults(fn=cmd_inspect)

    w = sub.add_parser("world", help="generate the demo web")
    w.add_argument("out")
    w.add_argument("--samples", type=_positive, default=2000)
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
    d.add_argument("--cpus", type=_positive, default=None)
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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("recap-curate")
    except PackageNotFoundError:
        from recap import __version__

        return __version__


def _dispatch(argv: list[str]) -> int:
    global DEBUG
    if "--debug" in argv[:1]:
        DEBUG, argv = True, argv[1:]
    if argv and argv[0] in _PASSTHROUGH:
        return _PASSTHROUGH[argv[0]](argparse.Namespace(rest=argv[1:]))
    args = parser().parse_args(argv)
    DEBUG = DEBUG or args.debug
    if args.cmd == "world" and args.port is None:
        from recap.world.generate import DEFAULT_PORT
        args.port = DEFAULT_PORT
    return args.fn(args)


def main(argv: list[str] | None = None) -> int:
    """Every way a command can end, mapped to an exit code and one message: 2 for what the user can
    fix (job file, flags, inputs, output), 1 for a job that failed while running, 130 on Ctrl-C."""
    entry = argv is None
    argv = sys.argv[1:] if argv is None else argv
    rc = _main(argv)
    if entry and next((a for a in argv if not a.startswith("-")), None) == "inspect":
        # Seen under load: after everything was printed, a native thread pool (pyarrow's readers)
        # aborted the interpreter's shutdown ("terminate called without an active exception", exit
        # -6 instead of the report's code). inspect starts nothing that needs a clean shutdown.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (BrokenPipeError, ValueError):
                pass
        os._exit(rc)
    return rc


def _main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO if "--debug" in argv else logging.WARNING,
                        format="recap: %(message)s")
    try:
        return _dispatch(argv)
    except UserError as e:
        from recap.pipeline.job import JobError

        _err(f"bad job file\n{e}" if isinstance(e, JobError) else str(e))
        return EXIT_BAD_JOB
    except KeyboardInterrupt:
        _err("interrupted; run the same command again to resume (committed shards are kept)")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader went away (`recap inspect DS | head`): say nothing more, and never again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as e:  # noqa: BLE001 - a bug: one line, the traceback with --debug
        if DEBUG:
            traceback.print_exc()
        _err(f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback)")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
