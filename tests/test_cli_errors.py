"""A user's mistakes, through the `recap` command, in a directory outside the repository: each
gets its exit code and one message naming the file, field, URL or line, never a traceback, and a
run never destroys what it did not make."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port
from tests.test_engine import digest

ROOT = Path(__file__).resolve().parent.parent
RECAP = [sys.executable, "-m", "recap.cli"]
DEMO = str(ROOT / "jobs" / "demo.yaml")


def recap(*args, cwd, timeout=300, env=None, **kw):
    return subprocess.run([*RECAP, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, **kw)


def no_traceback(r):
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr[-3000:]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from recap.world.generate import generate_world
    from recap.world.server import serve

    port = free_port()
    out = tmp_path_factory.mktemp("world") / "w"
    generate_world(out, samples=240, heldout=10, seed=4, port=port)
    with serve(out, port=port):
        yield out, port


def _curation_stages() -> str:
    """The demo job's stages up to balancing, as a --set value: what these tests need of a job,
    without the model stages the demo ends with (the finished fixture runs the whole demo)."""
    stages = yaml.safe_load(Path(DEMO).read_text())["stages"][:3]
    stages[2]["balance"]["metadata"] = str(ROOT / "jobs" / "demo-metadata.json")  # --set paths: from the cwd
    return "stages=" + json.dumps(stages)


def world_args(world, *extra, full: bool = False):
    w, port = world
    stages = [] if full else ["--set", _curation_stages()]
    return ["--set", f"input.path={w / 'urls.parquet'}", "--set", f"download.allow_hosts=[127.0.0.1:{port}]",
            "--set", "download.samples_per_shard=60", "--set", "download.timeout=2", *stages, *extra]


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory):
    """A finished demo dataset, made from an unrelated directory with the repository's job file."""
    cwd = tmp_path_factory.mktemp("user")
    r = recap("run", DEMO, *world_args(world, full=True), "--output", "ds", "--quiet", cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    return cwd, cwd / "ds", r


def test_a_finished_dataset_is_never_discarded_for_another_input(finished, world, tmp_path):
    cwd, ds, _ = finished
    other = tmp_path / "other.tsv"
    other.write_text("url\tcaption\nhttp://127.0.0.1:9/x.jpg\ta red circle\n")
    before = digest(ds)
    r = recap("run", DEMO, *world_args(world), "--set", f"input.path={other}", "--output", ds, cwd=cwd)
    assert r.returncode == 2 and "input.path" in r.stderr and "--overwrite" in r.stderr, r.stderr
    no_traceback(r)
    assert digest(ds) == before
    r = recap("run", DEMO, *world_args(world, "--set", "download.image_size=64"), "--output", ds, cwd=cwd)
    assert r.returncode == 2 and "download.image_size" in r.stderr
    assert digest(ds) == before


def test_a_directory_recap_did_not_make_is_refused(world, tmp_path):
    out = tmp_path / "mine"
    (out / "input").mkdir(parents=True)
    (out / "logs/failures").mkdir(parents=True)
    (out / "input/00000.parquet").write_bytes(b"my own parquet")
    (out / "logs/failures/notes.txt").write_text("my notes")
    before = digest(out) | {"logs/failures/notes.txt": (out / "logs/failures/notes.txt").read_text()}
    r = recap("run", DEMO, *world_args(world), "--output", out, cwd=tmp_path)
    assert r.returncode == 2 and "not a recap dataset" in r.stderr and "input" in r.stderr
    no_traceback(r)
    assert digest(out) | {"logs/failures/notes.txt": (out / "logs/failures/notes.txt").read_text()} == before


def test_the_demo_job_runs_from_any_directory_and_quiet_is_quiet(finished):
    _, ds, r = finished
    assert (ds / "stages/balance/state.json").exists()  # the metadata beside the job file was found
    for noise in ("Token authentication", "core_worker", "WARNING", "Traceback"):
        assert noise not in r.stderr, r.stderr
    manifest = (ds / "manifest.json").read_text()
    json.loads(manifest, parse_constant=lambda c: pytest.fail(f"manifest.json holds {c}, not JSON"))


def test_user_mistakes_exit_2_with_a_message(tmp_path, world):
    (tmp_path / "afile").write_text("x")
    cases = [
        (["run", DEMO, "--set", "input.path=missing.tsv", "--output", "o"], "missing.tsv"),
        (["run", DEMO, *world_args(world), "--output", "afile/sub"], "afile is a file"),
        (["run", DEMO, "--cpus", "-1"], "--cpus"),
        (["run", DEMO, "--cpus", "0"], "--cpus"),
        (["world", "w0", "--samples", "0"], "--samples"),
        (["serve", str(tmp_path)], "is not a demo world"),
        (["inspect", "nowhere"], "nowhere: no such dataset"),
    ]
    for args, expect in cases:
        r = recap(*args, cwd=tmp_path, timeout=120)
        assert r.returncode == 2, (args, r.returncode, r.stderr)
        assert expect in r.stderr, (args, r.stderr)
        no_traceback(r)
    assert not (tmp_path / "o").exists()


def test_a_busy_port_and_a_missing_checkpoint(tmp_path, world):
    w, port = world
    r = recap("serve", w, "--port", port, cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and f"port {port}" in r.stderr
    no_traceback(r)
    r = recap("eval", tmp_path / "no-such-run", "--data", w / "heldout", cwd=tmp_path, timeout=120)
    assert r.returncode == 1 and "no-such-run: no such checkpoint or run directory" in r.stderr, r.stderr
    no_traceback(r)


def test_an_unreachable_cluster_or_store_fails_fast_naming_it(tmp_path, world):
    dead = free_port()
    started = time.monotonic()
    r = recap("run", DEMO, *world_args(world), "--output", "o", "--address", f"127.0.0.1:{dead}", cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and f"127.0.0.1:{dead}" in r.stderr and time.monotonic() - started < 30
    assert not (tmp_path / "o").exists()
    no_traceback(r)
    env = {"FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{dead}", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"}
    for args in (["run", DEMO, *world_args(world), "--output", "s3://bucket/ds"], ["inspect", "s3://bucket/ds"]):
        started = time.monotonic()
        r = recap(*args, cwd=tmp_path, env=env, timeout=90)
        assert r.returncode == 2 and "s3://bucket/ds" in r.stderr and f"127.0.0.1:{dead}" in r.stderr, r.stderr
        assert time.monotonic() - started < 40
        no_traceback(r)


def test_inspect_tells_damaged_from_interrupted(finished, tmp_path):
    import shutil

    _, ds, _ = finished
    copy = tmp_path / "copy"
    shutil.copytree(ds, copy)
    tar = copy / "shards/00002.tar"
    with open(tar, "r+b") as f:
        f.truncate(20000)
    (copy / "ledger/basic/00001.parquet").unlink()
    r = recap("inspect", copy, cwd=tmp_path)
    assert r.returncode == 1
    assert "shards/00002.tar is damaged" in r.stdout and "ledger/basic/00001.parquet is damaged (missing)" in r.stdout
    assert "`recap run` again redoes it" in r.stdout
    no_traceback(r)
    # head -1: the reader goes away, no BrokenPipeError
    p = subprocess.run(f"{sys.executable} -m recap.cli inspect {ds} | head -1", shell=True, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert p.stdout.startswith("dataset ") and p.stderr == ""
    r = recap("inspect", ds, "--samples", "1", cwd=tmp_path)
    assert r.returncode == 0 and "http://127.0.0.1:" in r.stdout  # examples show where a sample came from


def _small_shards(world):
    """Download only, in many small shards: the runs below are interrupted, and what they test
    (signals, the writer's lease) happens between shards, whatever the stages."""
    return world_args(world, "--set", "download.samples_per_shard=20", "--set", "stages=[]")


def _start(world, out, cwd, *extra):
    return subprocess.Popen([*RECAP, "run", DEMO, *_small_shards(world), "--output", str(out), "--quiet", *extra],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for(path_glob, root, n, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(list(root.glob(path_glob))) >= n:
            return True
        time.sleep(0.2)
    return False


def test_ctrl_c_interrupts_with_one_line_and_inspect_says_interrupted(world, tmp_path):
    out = tmp_path / "ds"
    p = _start(world, out, tmp_path)
    assert _wait_for("commits/download/*.json", out, 2)
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "run the same command again to resume" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    r = recap("inspect", out, cwd=tmp_path)
    assert r.returncode == 1 and "INCOMPLETE" in r.stdout and "recap run" in r.stdout
    assert "INVARIANT BROKEN" not in r.stdout


def test_one_writer_per_dataset_and_a_dead_writer_does_not_block(world, tmp_path):
    out = tmp_path / "ds"
    p = _start(world, out, tmp_path)
    assert _wait_for("_lease.json", out, 1)
    r = recap("run", DEMO, *_small_shards(world), "--output", out, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "another recap run is writing this dataset" in r.stderr, r.stderr
    no_traceback(r)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(60)
    r = recap("run", DEMO, *_small_shards(world), "--output", out, "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (out / "_lease.json").exists()


def test_nothing_kept_and_empty_input_are_said(world, tmp_path):
    r = recap("run", DEMO, *world_args(world, "--set", "stages=[{basic: {languages: [xx]}}]"), "--output", "none",
              "--quiet", cwd=tmp_path)
    assert r.returncode == 0 and "stage basic kept no sample" in r.stderr, r.stderr
    (tmp_path / "empty.csv").write_text("url,caption\n")
    r = recap("run", DEMO, *world_args(world), "--set", f"input.path={tmp_path / 'empty.csv'}", "--set", "stages=[]",
              "--output", "empty", "--quiet", cwd=tmp_path)
    assert r.returncode == 0 and "the input has no rows" in r.stderr, r.stderr
    r = recap("--version", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("recap ")


def test_tsv_captions_with_quotes_and_a_broken_csv(world, tmp_path):
    import pyarrow.parquet as pq

    w, _ = world
    urls = [r["url"] for r in pq.read_table(w / "urls.parquet").to_pylist() if r["url"].startswith("http://127.0.0.1")][:6]
    captions = ["a red circle", "a blue square", '"Look at this" a green star', "two circles", '"unclosed quote',
                "a white disc"]
    tsv = tmp_path / "urls.tsv"
    tsv.write_text("url\tcaption\n" + "".join(f"{u}\t{c}\n" for u, c in zip(urls, captions)))
    r = recap("run", DEMO, *world_args(world), "--set", f"input.path={tsv}", "--set", "stages=[]", "--output", "t",
              "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rep = json.loads(recap("inspect", tmp_path / "t", "--json", cwd=tmp_path).stdout)
    assert rep["stages"]["download"]["in"] == 6
    csv = tmp_path / "urls.csv"
    csv.write_text("url,caption\n" + "".join(f'{u},"{c}"\n' for u, c in zip(urls[:3], ["a, b", "c", "d"]))
                   + f'{urls[3]},"never closed\n{urls[4]},fine\n')
    r = recap("run", DEMO, *world_args(world), "--set", f"input.path={csv}", "--output", "c", cwd=tmp_path)
    assert r.returncode == 2 and "urls.csv: line 5" in r.stderr, r.stderr
    no_traceback(r)


def test_stages_left_from_an_earlier_run_are_named(finished, world, tmp_path):
    import shutil

    _, ds, _ = finished
    copy = tmp_path / "copy"
    shutil.copytree(ds, copy)
    r = recap("run", DEMO, *world_args(world), "--set", "stages=[basic]", "--output", copy, "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "stages/balance is from an earlier run" in r.stderr and "stages/dedup is from an earlier run" in r.stderr
    assert (copy / "stages/balance/state.json").exists()
