"""The runner: plans input shards on the driver, then lets Ray Data stream shards through the
stages. Map stages are consecutive ``map_batches`` steps over a dataset of shard ids (one block per
shard), so shard k enters stage 2 while shard k+1 is still downloading; a global stage is a
barrier: its partials finish, a Ray task reduces them, and a new streaming run applies the result.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks PyPI on import
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from recap.pipeline.errors import UserError
from recap.pipeline.job import Job
from recap.pipeline.lease import Lease
from recap.pipeline.manifest import write_manifest
from recap.pipeline.progress import Progress
from recap.pipeline.ray_cluster import join as join_cluster, start_local
from recap.pipeline.stage import SourceStage, StageContext, get_stage_class
from recap.pipeline.stage_data import StageData, output_rel, partial_rel, state_rel
from recap.pipeline.preflight import (DERIVED, PLAN, check_address, check_dataset, check_stage_order,
                                      input_fingerprint, plan_input)
from recap.pipeline.steps import (ENGINE_PATHS, StepFailure, StepRunner, StepSpec, commit_replacing, config_hash,
                                  load_input, published)
from recap.pipeline.storage import Dataset, finite_json, json_bytes

log = logging.getLogger("recap")


class JobFailed(RuntimeError):
    pass


@dataclass
class RunResult:
    dataset: str
    n_shards: int
    steps: list[str]
    seconds: float
    counts: dict = field(default_factory=dict)


def _planned_rows(ds: Dataset) -> int:
    return int(ds.read_json(PLAN).get("rows", 0)) if ds.exists(PLAN) else 0


def _context(job: Job, ds: Dataset, stage: str, n_inputs: int) -> StageContext:
    names = [e.name for e in job.stages]
    before = job.stages[:names.index(stage)] if stage in names else []
    earlier = tuple((e.name, json.dumps(finite_json(e.config.model_dump(mode="json")), sort_keys=True))
                    for e in before)
    return StageContext(job_name=job.name, seed=job.seed, stage=stage, dataset=ds.url, n_inputs=n_inputs,
                        earlier=earlier)


def build_steps(job: Job, ds: Dataset, fingerprint: str, verify: bool = False) -> list[StepSpec]:
    steps: list[StepSpec] = []
    prev_hash, previous = fingerprint, []
    source_cls = get_stage_class(job.stages[0].name)
    n_inputs = _planned_rows(ds)  # once: each step's context carries it
    for entry in job.stages:
        cls = get_stage_class(entry.name)
        h = config_hash(prev_hash, entry.name, entry.config, cls)
        phases = {"source": ["source"], "map": ["map"], "global": ["partial", "apply"]}[cls.kind]
        for phase in phases:
            steps.append(StepSpec(ds, cls, entry.config, _context(job, ds, entry.name, n_inputs), h, phase, source_cls,
                                  list(previous), verify))
        if cls.kind != "source":
            previous.append(entry.name)
        prev_hash = h
    return steps


def init_ray(address: str | None, cpus: int | None, debug: bool = False) -> bool:
    """Start Ray on loopback, or join the cluster at ``address`` (its token checked first).
    Returns True when this call started it (and so should shut it down).
    Unless ``debug``, Ray's Python log lines (its token-auth notice) and the workers' output stay
    in Ray's log files: recap's messages say what the user needs."""
    import ray

    if ray.is_initialized():
        return False
    if not debug:
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)
    # workers' own output stays in Ray's log files unless debugging: a stage reports through the
    # ledger and logs/failures/, not by printing
    kwargs = dict(include_dashboard=False, logging_level=logging.DEBUG if debug else logging.ERROR,
                  log_to_driver=debug)
    if address and address != "local":
        join_cluster(address, **kwargs)
    else:
        start_local(num_cpus=cpus or os.cpu_count(), **kwargs)
    return True


def _configure_ray_data(debug: bool = False) -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False
    logging.getLogger("ray.data").setLevel(logging.INFO if debug else logging.CRITICAL)


def _remote_args(spec: StepSpec) -> dict:
    r = spec.stage_cls(spec.config, spec.context).resources  # resources are config, no setup()
    args = {"num_cpus": r.cpus}
    if r.gpus:
        args["num_gpus"] = r.gpus
    if r.memory:
        args["memory"] = r.memory
    return args


def _run_step(batch, spec: StepSpec):
    runner = StepRunner(spec)
    try:
        return runner(batch)
    finally:
        runner.close()


def _named_task(label: str):
    """``_run_step`` under the step's name: Ray names each operator after its function or class
    (``MapBatches(balance.apply)``), so its dashboard and stats read like the pipeline."""
    def task(batch, spec: StepSpec):
        return _run_step(batch, spec)
    task.__name__ = task.__qualname__ = label
    return task


def _named_actor(label: str) -> type:
    return type(label, (StepRunner,), {"__qualname__": label})


def _stream(steps: list[StepSpec], n_shards: int, cpus_total: float, ds: Dataset | None = None) -> None:
    """One streaming run of consecutive map-like steps over all shards."""
    import ray
    import ray.data

    if not steps or n_shards == 0:
        return
    # Shards every step of this segment has committed need no worker: deciding it here costs a
    # marker read and a size look-up per file (with --verify the workers hash, in parallel, instead).
    todo = [i for i in range(n_shards)
            if steps[0].verify or not all(s.dataset.committed(s.step, i, s.config_hash) for s in steps)]
    if not todo:
        return
    data = ray.data.from_items([{"shard": i} for i in todo], override_num_blocks=len(todo))
    # Actors hold their CPUs for the whole run: if every step's pool asked for a full share, a
    # small cluster (--cpus 1) would deadlock with later steps waiting forever. So each actor gets
    # at most an even share, and a task at most what the actors' first workers leave free.
    actor_share = cpus_total / len(steps)
    held = sum(min(_remote_args(s)["num_cpus"], actor_share) for s in steps if s.stage_cls.runs_as_actor())
    task_cap = max(cpus_total - held, actor_share)
    for spec in steps:
        args = _remote_args(spec)
        if spec.stage_cls.runs_as_actor():
            args["num_cpus"] = min(args["num_cpus"], actor_share)
            size = spec.config.concurrency or max(1, int(cpus_total // max(args["num_cpus"], 0.5)))
            data = data.map_batches(_named_actor(spec.label), batch_size=1, batch_format="pyarrow",
                                    fn_constructor_kwargs={"spec": spec},
                                    compute=ray.data.ActorPoolStrategy(min_size=1, max_size=size), **args)
        else:
            args["num_cpus"] = min(args["num_cpus"], task_cap)
            data = data.map_batches(_named_task(spec.label), batch_size=1, batch_format="pyarrow",
                                    fn_kwargs={"spec": spec}, **args)
    for _ in data.iter_batches(batch_size=None, batch_format="pyarrow"):
        pass
    if ds is not None:  # Ray's own per-operator stats, for whoever tunes a run
        try:
            ds.write_bytes(f"logs/ray/{'+'.join(s.label for s in steps)}.txt", data.stats().encode())
        except Exception as e:  # noqa: BLE001 - stats are a convenience, never a failure
            log.debug("no Ray stats: %s", e)


def _reduce(spec: StepSpec, n_shards: int) -> None:
    """A global stage's reduce, in a Ray task with the stage's resources (never on the driver)."""
    import ray

    ds = spec.dataset
    if ds.committed(f"{spec.name}.reduce", 0, spec.config_hash, verify=spec.verify) is not None:
        return

    def reduce_task(spec: StepSpec, n: int) -> None:
        import json
        stage = spec.stage_cls(spec.config, spec.context)
        # what reduce may read beyond the partials
        stage.data = StageData(spec.dataset, spec.name, n, read_inputs=lambda shard, columns: load_input(
            spec.dataset, shard, spec.source_cls, spec.previous, columns, stage.optional_reads()))
        stage.setup()
        partials = []
        for shard in range(n):
            partials.extend(json.loads(spec.dataset.read_bytes(partial_rel(spec.name, shard))))
        state = stage.reduce(partials)
        files = {output_rel(spec.name, name): data for name, data in sorted(stage.reduce_outputs(state).items())}
        files.update(published(stage, stage.publish(state), None))
        stage.teardown()
        files[state_rel(spec.name)] = json_bytes({"state": state})
        # what this run's partials published stays, whatever an older reduce listed
        fresh = frozenset(rel for shard in range(n) for rel in spec.dataset.read_json(
            Dataset.commit_rel(f"{spec.name}.partial", shard)).get("files", {}))
        commit_replacing(spec.dataset, f"{spec.name}.reduce", 0, spec.config_hash, files, {"partials": len(partials)},
                         keep=fresh)

    ray.get(ray.remote(**_remote_args(spec))(reduce_task).remote(spec, n_shards))


def published_files(ds: Dataset) -> list[str]:
    """The files stages published outside the engine's folders, as their commit markers list them."""
    out: set[str] = set()
    for step in ds.listdir("commits"):
        for name in ds.listdir(f"commits/{step}"):
            try:
                marker = ds.read_json(f"commits/{step}/{name}")
            except (OSError, ValueError):
                continue  # a marker cut short: its files were never declared complete
            out.update(rel for rel in marker.get("files", {}) if rel.split("/")[0] not in ENGINE_PATHS)
    return sorted(out)


def _failure_message(ds: Dataset, err: BaseException) -> str:
    texts = []
    for name in ds.listdir("logs/failures"):
        try:
            texts.append(ds.read_bytes(f"logs/failures/{name}").decode("utf-8", "replace").splitlines()[0])
        except OSError:
            pass
    return "\n".join(texts) or f"{type(err).__name__}: {err}"


def _note_leftovers(ds: Dataset, job: Job) -> None:
    names = {e.name for e in job.stages}
    for d in ("stages", "ledger"):
        for stage in ds.listdir(d):
            if stage not in names:
                log.warning("%s/%s is from an earlier run with a stage this job does not have; left as it is", d, stage)


def _warn_empty(n_shards: int, counts: dict) -> None:
    if n_shards == 0:
        log.warning("the input has no rows: the dataset is empty")
        return
    for name, c in counts.items():
        if c["counts"]["in"] and not c["counts"]["kept"]:
            log.warning("stage %s kept no sample (of %d): see `recap inspect` for its reasons", name, c["counts"]["in"])
            return


def run_job(job: Job, address: str | None = None, cpus: int | None = None, progress: bool = True,
            verify: bool = False, overwrite: bool = False, debug: bool = False) -> RunResult:
    """Run (or resume) a job; returns when every (stage, shard) is committed. A rerun skips what is
    committed by its markers and file sizes; ``verify`` re-hashes every committed file instead.
    Nothing is written until the output, the input and the cluster have been checked; an output
    that holds another dataset or foreign files is refused unless ``overwrite``."""
    started = time.time()
    if cpus is not None and cpus < 1:
        raise UserError(f"--cpus {cpus}: must be at least 1")
    check_address(address)
    ds = Dataset(job.output)
    ds.check_usable()
    entry = job.stages[0]
    source: SourceStage = get_stage_class(entry.name)(entry.config, _context(job, ds, entry.name, _planned_rows(ds)))
    check_stage_order(job, lambda name: _context(job, ds, name, 0))
    fingerprint = input_fingerprint(source, job)
    verdict = check_dataset(ds, job, source, fingerprint, overwrite)

    import ray

    own = init_ray(address, cpus, debug)
    lease = Lease(ds)
    steps: list[StepSpec] = []
    n_shards = 0
    try:
        lease.acquire()
        if verdict == "replace":
            log.warning("--overwrite: discarding the derived files in %s", ds.url)
            for rel in published_files(ds):  # a stage's product (shards of a dataset) is derived too
                ds.remove(rel)
            for d in DERIVED:
                ds.remove(d)
        ds.clear_tmp()
        ds.remove("logs/failures")
        n_shards = plan_input(ds, job, source, fingerprint)
        steps = build_steps(job, ds, fingerprint, verify)
        write_manifest(ds, job, steps, n_shards, status="running", seconds=0.0)
        _configure_ray_data(debug)
        _run_steps(ds, steps, n_shards, ray.cluster_resources().get("CPU", 1.0), progress)
    except KeyboardInterrupt:
        if steps:
            write_manifest(ds, job, steps, n_shards, status="interrupted", seconds=time.time() - started)
        raise
    except StepFailure as e:
        write_manifest(ds, job, steps, n_shards, status="failed", seconds=time.time() - started, error=str(e))
        raise JobFailed(str(e)) from e
    finally:
        lease.release()
        if own:
            ray.shutdown()
    ds.clear_tmp()
    seconds = time.time() - started
    counts = write_manifest(ds, job, steps, n_shards, status="done", seconds=seconds)
    _note_leftovers(ds, job)
    _warn_empty(n_shards, counts)
    return RunResult(ds.url, n_shards, [s.step for s in steps], seconds, counts)


def _run_steps(ds: Dataset, steps: list[StepSpec], n_shards: int, cpus_total: float, progress: bool) -> None:
    monitor = Progress(ds, steps, n_shards, enabled=progress, stream=sys.stderr)
    monitor.start()
    try:
        segment: list[StepSpec] = []
        for spec in steps:
            segment.append(spec)
            if spec.phase == "partial":
                _stream(segment, n_shards, cpus_total, ds)
                _reduce(spec, n_shards)
                segment = []
        _stream(segment, n_shards, cpus_total, ds)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # Ray wraps the step's exception; the step wrote what failed where
        raise StepFailure(_failure_message(ds, e)) from e
    finally:
        monitor.stop()


__all__ = ["run_job", "JobFailed", "RunResult", "StepFailure"]
