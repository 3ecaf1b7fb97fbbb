"""What a run checks before it writes anything, and the input's plan.

The output must be usable and must not hold something the run would destroy (a dataset of another
input or source setting, a directory recap did not make) unless the user said ``--overwrite``; the
cluster address must answer; the input must be readable. Then the input is cut into shards once.
"""
from __future__ import annotations

import json
import logging
import socket

from recap.pipeline.errors import ClusterUnreachable, DatasetConflict, OutputError, UserError
from recap.pipeline.job import Job
from recap.pipeline.lease import LEASE
from recap.pipeline.stage import SourceStage, get_stage_class
from recap.pipeline.steps import hashed_config
from recap.pipeline.storage import Dataset, finite_json, json_bytes

log = logging.getLogger("recap")
PLAN = "input/_plan.json"
SKIPPED = "input/_skipped.jsonl"
DERIVED = ("input", "shards", "stages", "ledger", "commits", "logs", "manifest.json")
OWN_FILES = {".tmp", "logs", LEASE}  # what a run may leave before it has made anything


def check_address(address: str | None, timeout: float = 5.0) -> None:
    """Fail fast, naming the address, when a cluster address does not answer (Ray itself waits)."""
    if not address or address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterUnreachable(f"--address {address}: expected HOST:PORT, ray://HOST:PORT, auto or local")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ClusterUnreachable(f"--address {address}: no Ray cluster answers there ({e.strerror or e}); "
                                 f"check the address and that the head node is up") from None


def input_fingerprint(source: SourceStage, job: Job) -> str:
    try:
        return source.input_fingerprint(job.input)
    except UserError:
        raise
    except OSError as e:  # a missing or unreadable input is the user's to fix
        from recap.pipeline.inputs import InputError

        # an object store's error names the bucket or key, not the URL the user wrote
        where = getattr(job.input, "path", None)
        name = str(getattr(e, "filename", "") or "")
        why = f"{e.strerror or e}: {name if name and name not in str(where) else ''}".rstrip(": ")
        raise InputError(f"{where}: cannot read the input: {why}" if where else f"cannot read the input: {why}") from None


def _plan_record(job: Job, fingerprint: str, source_config: dict) -> dict:
    return finite_json({"fingerprint": fingerprint, "input": job.input.model_dump(mode="json"),
                        "source": {"name": job.stages[0].name, "config": source_config}})


def _changes(old: dict, new: dict, prefix: str) -> list[str]:
    return [f"{prefix}.{k}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def check_dataset(ds: Dataset, job: Job, source: SourceStage, fingerprint: str, overwrite: bool) -> str:
    """What the output holds: ``new``, ``same`` (a dataset of this input: resume) or ``replace``
    (``overwrite`` given for a dataset of another input, or for a directory recap did not make).
    Refuses, reading only, when the output holds something this run would destroy."""
    names = [n for n in ds.listdir("") if n not in OWN_FILES]
    if not names:
        return "new"
    # a lease left behind means a recap run made this (it dies before a plan or manifest exists)
    if not (ds.exists(PLAN) or ds.exists("manifest.json") or ds.exists(LEASE)):
        if overwrite:
            return "replace"
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise OutputError(f"{ds.url}: the output directory is not empty and is not a recap dataset ({shown}). "
                          f"Choose another --output, or run with --overwrite to write into it anyway "
                          f"(recap's folders there, such as input/ and shards/, are then replaced).")
    plan = ds.read_json(PLAN) if ds.exists(PLAN) else {}
    source_config = finite_json(hashed_config(job.stages[0].config, type(source)))
    changed = []
    if plan.get("fingerprint") not in (None, fingerprint):
        changed = (_changes(plan["input"], finite_json(job.input.model_dump(mode="json")), "input")
                   if "input" in plan else ["the input or how it is read"]) or ["the input's content"]
    old_source = plan.get("source", {}).get("config")
    if old_source is not None and old_source != source_config:
        changed += _changes(old_source, source_config, type(source).section())
    if not changed:
        return "same"
    if overwrite:
        return "replace"
    raise DatasetConflict(
        f"{ds.url}: this dataset was made from another input or source setting ({', '.join(changed)} changed). "
        f"Nothing was touched. Run again with --overwrite to discard its derived files and rebuild it, "
        f"or choose another --output.")


def plan_input(ds: Dataset, job: Job, source: SourceStage, fingerprint: str) -> int:
    """Cut the input into ``input/NNNNN.parquet`` once; reuse the cut while the input and the way
    it is read are unchanged (``check_dataset`` has ruled on anything else)."""
    if ds.exists(PLAN):
        plan = ds.read_json(PLAN)
        if plan.get("fingerprint") == fingerprint:
            return plan["shards"]
    n = rows = 0
    for n, table in enumerate(source.plan(job.input), start=1):
        ds.write_table(Dataset.input_rel(n - 1), table)
        rows += table.num_rows
    skipped = source.skipped_rows()
    if skipped:  # the rows the input lost before any stage saw them, where a user can find them
        ds.write_bytes(SKIPPED, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in skipped).encode())
        log.warning("input: %d bad rows skipped (input.on_bad_row: skip), listed in %s/%s; the first: %s",
                    len(skipped), ds.url, SKIPPED, skipped[0]["detail"])
    record = _plan_record(job, fingerprint, hashed_config(job.stages[0].config, type(source)))
    ds.write_bytes(PLAN, json_bytes({**record, "shards": n, "rows": rows, "skipped": len(skipped)}))
    return n


def check_stage_order(job: Job, context) -> None:
    """A stage that reads a column a later stage of the job writes fails before any work, with the
    fix in the message (a semantic dedup listed before the clip stage that writes its embeddings)."""
    stages = [get_stage_class(e.name)(e.config, context(e.name)) for e in job.stages]
    written: set[str] = set()
    for i, stage in enumerate(stages):
        for col in stage.reads() if i else ():
            if col in written:
                continue
            later = [job.stages[j].name for j in range(i + 1, len(stages)) if col in stages[j].writes()]
            if later:
                raise UserError(f"stage {job.stages[i].name!r} reads {col!r}, which {later[0]!r} writes after it: "
                                f"list {later[0]!r} before {job.stages[i].name!r}")
        written.update(stage.writes())
