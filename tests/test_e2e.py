"""The demo job end to end: the generated web served over real HTTP, downloaded through the guard,
filtered and deduplicated on a local Ray; every fault lands in the ledger under its own reason."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from recap.pipeline.inspect import format_report, inspect_dataset
from recap.pipeline.job import load_job
from recap.pipeline.runner import run_job
from tests.conftest import free_port
from tests.test_engine import digest
from recap.world.generate import generate_world
from recap.world.server import serve

ROOT = Path(__file__).resolve().parent.parent
RECAP = [sys.executable, "-m", "recap.cli"]
DEMO_METADATA = ROOT / "jobs" / "demo-metadata.json"
DEMO_STAGES = [next(iter(st)) if isinstance(st, dict) else st
               for st in yaml.safe_load((ROOT / "jobs" / "demo.yaml").read_text())["stages"]]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    port = free_port()
    out = tmp_path_factory.mktemp("world") / "w"
    generate_world(out, samples=400, heldout=20, seed=11, port=port)
    with serve(out, port=port) as srv:
        yield out, port, srv


def _demo_job(world_dir, port, out, *sets):
    return load_job(ROOT / "jobs/demo.yaml", [f"input.path={world_dir / 'urls.parquet'}",
                                              f"download.allow_hosts=[127.0.0.1:{port}]",
                                              "download.samples_per_shard=60", "download.timeout=2",
                                              f"stages.2.balance.metadata={DEMO_METADATA}", *sets],
                    output=str(out))


@pytest.fixture(scope="module")
def demo_run(world, tmp_path_factory, ray_local):
    """The demo job on the world with 2 CPUs, run once for the tests that read it."""
    world_dir, port, _ = world
    out = tmp_path_factory.mktemp("demo") / "ds"
    run_job(_demo_job(world_dir, port, out), progress=False)
    return out


def test_demo_job_every_fault_has_its_reason(world, demo_run):
    world_dir, port, srv = world
    out = demo_run
    rep = inspect_dataset(str(out))
    assert rep["invariant_ok"], rep["problems"]
    assert list(rep["stages"]) == ["download", *DEMO_STAGES]
    assert (out / "reinforced" / "config.json").exists()  # the demo ends with reinforced shards

    truth = pq.read_table(world_dir / "truth.parquet").to_pylist()
    inputs = pa.concat_tables([pq.read_table(p) for p in sorted((out / "input").glob("0*.parquet"))]).to_pylist()
    assert [r["url"] for r in inputs] == [t["url"].strip() for t in truth]
    ledger = pa.concat_tables([pq.read_table(p) for p in sorted((out / "ledger/download").glob("*.parquet"))])
    reason = {r["uid"]: r["reason"] for r in ledger.to_pylist() if r["action"] == "drop"}
    faults_seen = set()
    for t, inp in zip(truth, inputs):
        got = reason.get(inp["uid"])
        if inp["dup_of"] is not None:
            assert got == "duplicate_input"
            continue
        assert got == t["expected_reason"], (t["fault"], t["url"], got, t["expected_reason"])
        faults_seen.add(t["fault"])
    assert {"http_404", "hang", "truncated", "html_as_image", "bomb", "redirect_loop", "redirect_blocked",
            "opted_out", "too_large"} <= faults_seen
    # the guard never let anything reach the non-allowed loopback host, directly or via redirects
    assert sum(srv.trap_counts.values()) == 0
    # exact-duplicate images of the world are caught by dedup
    assert rep["stages"]["dedup"]["dropped"].get("duplicate_image", 0) > 0
    assert rep["stages"]["basic"]["dropped"].get("caption_language", 0) > 0
    # MetaCLIP balancing flattens the world's head-heavy concepts: the head entries lose matches,
    # the tail keeps its own, so matches spread more evenly (what `recap inspect` shows)
    bal = rep["summaries"]["balance"]
    assert rep["stages"]["balance"]["dropped"].get("balanced_out", 0) > 0
    assert bal["after"]["flatness"] > bal["before"]["flatness"]
    assert bal["after"]["tail_share"] > bal["before"]["tail_share"]
    top = bal["top_entries"][0]
    assert top["after"] / bal["after"]["matches"] < top["before"] / bal["before"]["matches"]
    assert "entry counts before -> after" in format_report(rep)


def test_one_cpu_runs_the_demo_job_as_two(world, demo_run, tmp_path):
    """--cpus 1: a task step beside an actor step in one streaming run (dedup's apply, then
    balance's partial) must both get CPUs, or the run waits forever; the bytes equal a 2-CPU run."""
    world_dir, port, _ = world
    cmd = RECAP + ["run", str(ROOT / "jobs/demo.yaml"), "--set", f"input.path={world_dir / 'urls.parquet'}",
                   "--set", f"download.allow_hosts=[127.0.0.1:{port}]", "--set", "download.samples_per_shard=60",
                   "--set", "download.timeout=2", "--set", f"stages.2.balance.metadata={DEMO_METADATA}",
                   "--output", str(tmp_path / "one"), "--cpus", "1", "--quiet"]
    p = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert digest(tmp_path / "one") == digest(demo_run)


@pytest.mark.slow
def test_kill_9_then_resume_and_cpus_1_vs_2_are_byte_identical(world, tmp_path):
    world_dir, port, _ = world
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(out, cpus, **kw):
        cmd = RECAP + ["run", str(ROOT / "jobs/demo.yaml"), "--set", f"input.path={world_dir / 'urls.parquet'}",
                       "--set", f"download.allow_hosts=[127.0.0.1:{port}]", "--set", "download.samples_per_shard=60",
                       "--set", "download.timeout=2", "--set", f"stages.2.balance.metadata={DEMO_METADATA}",
                       "--output", str(out), "--cpus", str(cpus), "--quiet"]
        return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)

    a = run(tmp_path / "A", 2)
    assert a.wait(timeout=300) == 0, a.stdout.read().decode()[-2000:]
    b = run(tmp_path / "B", 2)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((tmp_path / "B/shards").glob("*.tar"))) < 2:
        time.sleep(0.2)
    os.killpg(b.pid, signal.SIGKILL)
    b.wait()
    time.sleep(2)
    assert run(tmp_path / "B", 2).wait(timeout=300) == 0
    assert run(tmp_path / "C", 1).wait(timeout=300) == 0
    da = digest(tmp_path / "A")
    assert digest(tmp_path / "B") == da
    assert digest(tmp_path / "C") == da
    for d in "ABC":
        assert inspect_dataset(str(tmp_path / d))["invariant_ok"]


def test_csv_input_with_bad_captions_downloads_everything_else(world, tmp_path, ray_local):
    """Non-UTF-8, 1 MB and empty captions and repeated URLs, from a CSV: the samples still download,
    the repairs are ledger notes, repeats are accounted for, the tar carries the repaired caption."""
    world_dir, port, _ = world
    truth = pq.read_table(world_dir / "truth.parquet").to_pylist()
    good = [t for t in truth if t["fault"] == "none" and t["dup_kind"] == "none"][:8]
    lines = [b"url,caption,license"]
    lines.append(good[0]["url"].encode() + b",caf\xe9 cr\xe8me latin-1,cc")
    lines.append(good[1]["url"].encode() + b"," + b"big " * 262_144 + b",cc")  # 1 MiB
    lines.append(good[2]["url"].encode() + b",,cc")
    lines.append(good[3]["url"].encode() + b",a photo,cc")
    lines.append(good[3]["url"].encode() + b",a photo,cc")  # exact repeat
    lines.append(good[3]["url"].encode() + b",another caption,cc")  # same URL, other caption
    path = tmp_path / "urls.csv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    job = load_job(ROOT / "jobs/demo.yaml", [f"input.path={path}", f"download.allow_hosts=[127.0.0.1:{port}]",
                                             "stages=[]", "input.max_caption_chars=1000"], output=str(tmp_path / "ds"))
    run_job(job, progress=False)
    rep = inspect_dataset(str(tmp_path / "ds"))
    assert rep["invariant_ok"]
    dl = rep["stages"]["download"]
    assert dl == {"in": 6, "kept": 5, "dropped": {"duplicate_input": 1},
                  "notes": {"caption_not_utf8": 1, "caption_truncated": 1}}
    import tarfile
    with tarfile.open(tmp_path / "ds/shards/00000.tar") as t:
        txt = {m.name: t.extractfile(m).read().decode() for m in t.getmembers() if m.name.endswith(".txt")}
        meta = {m.name: json.loads(t.extractfile(m).read()) for m in t.getmembers() if m.name.endswith(".json")}
    caps = sorted(txt.values(), key=len)
    assert caps[0] == "" and "caf\ufffd cr\ufffdme latin-1" in caps and len(caps[-1]) == 1000
    assert all(m["license"] == "cc" and m["status"] == "success" for m in meta.values())
