"""Ray beyond one process, safely: a local run listens on loopback only; a run on a cluster
(`--address`) uses Ray's token authentication, names a wrong or missing token within seconds, and
gives the same bytes as a local run while its shards run on two nodes.

The multi-node tests start real Ray nodes (`ray start`) inside a network namespace of their own
(`unshare --net`, as root), where loopback is the only interface: Ray then has no other address to
bind, and nothing a test starts is reachable from outside the namespace. A pid namespace around it
means every process the test started dies with it."""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from recap.pipeline.ray_cluster import is_loopback
from tests.conftest import free_port

psutil = pytest.importorskip("psutil")

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_is_loopback_reads_every_form_a_socket_shows():
    for host in ("127.0.0.1", "127.3.2.1", "::1", "::ffff:127.0.0.1"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.0.2.2", "::ffff:192.0.2.2", "fe80::1%eth0", "localhost", ""):
        assert not is_loopback(host), host


def job_file(path: Path, world: Path, port: int, cpus: float | None = None) -> Path:
    """The demo job's first half (download, a map stage, two global stages), fixed here so these
    tests do not change when the demo job grows; ``cpus``: what each stage asks Ray for (not part
    of the config hash: the output is the same)."""
    import yaml

    res = {"resources": {"cpus": cpus}} if cpus else {}
    path.write_text(yaml.safe_dump({
        "name": "cluster-test", "seed": 0, "output": "unused",
        "input": {"path": f"{world}/urls.parquet", "url_col": "url", "caption_col": "caption"},
        "download": {"image_size": 64, "samples_per_shard": 30, "timeout": 2, "retries": 1,
                     "allow_hosts": [f"127.0.0.1:{port}"], **res},
        "stages": [{"basic": {"min_image_size": 32, "min_caption_words": 2, **res}}, {"dedup": {**res}},
                   {"balance": {"metadata": str(ROOT / "jobs" / "demo-metadata.json"), "t": 40, **res}}]}))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The demo world's web on 127.0.0.1, and JOB over it; (job file, world folder, port)."""
    from recap.world.generate import generate_world
    from recap.world.server import serve

    port = free_port()
    out = tmp_path_factory.mktemp("world") / "w"
    generate_world(out, samples=120, heldout=5, seed=3, port=port)
    job = job_file(out.parent / "job.yaml", out, port)
    with serve(out, port=port):
        yield job, out, port


def _listening(pids: set[int]) -> dict[tuple[str, int], str]:
    """(address, port) -> process name, for every TCP/UDP socket of ``pids`` that accepts traffic."""
    out = {}
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            name, conns = proc.name(), proc.net_connections(kind="inet")
        except psutil.Error:
            continue
        for c in conns:
            if not c.laddr:
                continue
            if c.type == socket.SOCK_STREAM and c.status != psutil.CONN_LISTEN:
                continue
            if c.type != socket.SOCK_STREAM and c.raddr:
                continue  # a connected UDP socket answers its peer only
            out[(c.laddr.ip, c.laddr.port)] = name
    return out


def _session(root: psutil.Process) -> set[int]:
    """The run's processes: its descendants and whatever else shares its session (Ray re-parents
    some of its daemons)."""
    pids = {root.pid}
    try:
        pids |= {p.pid for p in root.children(recursive=True)}
        sid = os.getsid(root.pid)
    except (psutil.Error, ProcessLookupError):
        return pids
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                pids.add(p.pid)
        except (ProcessLookupError, PermissionError):
            pass
    return pids


@pytest.fixture(scope="module")
def local_run(world, tmp_path_factory):
    """A local `recap run` of JOB, with every listening socket any of its processes
    opened, sampled all through the run."""
    job, _, _ = world
    cwd = tmp_path_factory.mktemp("local")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "recap.cli", "run", str(job),
                             "--output", str(cwd / "ds"), "--quiet", "--cpus", "2"],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    seen: dict[tuple[str, int], str] = {}
    root = psutil.Process(proc.pid)
    deadline = time.time() + 240
    probe = None
    while proc.poll() is None and time.time() < deadline:
        seen.update(_listening(_session(root)))
        gcs = [addr for addr, name in seen.items() if name == "gcs_server"]
        if gcs and probe is None:  # knock on the GCS with a wrong token while the run is on
            probe = subprocess.Popen([sys.executable, "-c", WRONG_TOKEN_PROBE, f"127.0.0.1:{gcs[0][1]}"],
                                     env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"},
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        time.sleep(0.3)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    answer = probe.communicate(timeout=120)[0].strip() if probe else None
    return cwd / "ds", seen, answer


WRONG_TOKEN_PROBE = """\
import sys
from ray._raylet import GcsClient
try:
    GcsClient(address=sys.argv[1]).internal_kv_get(b"probe", None, timeout=5)
    print("accepted")
except Exception as e:
    print(type(e).__name__)
"""


def test_a_local_run_listens_on_loopback_only(local_run):
    """Every socket any process of a local `recap run` opens for listening is on 127.0.0.0/8 (or
    ::1); and the sample did see Ray's servers, so it could fail."""
    ds, seen, _ = local_run
    names = set(seen.values())
    assert {"gcs_server", "raylet"} <= names, f"the sample missed Ray's servers: {seen}"
    exposed = {addr: name for addr, name in seen.items() if not is_loopback(addr[0])}
    assert not exposed, f"listening outside loopback: {exposed}"
    manifest = json.loads((ds / "manifest.json").read_text())
    assert manifest["status"] == "done"
    # one node ran every (step, shard), and the manifest says so
    ran = manifest["nodes"]
    assert set(ran) >= {"download", "basic"}
    assert {len(by_node) for by_node in ran.values()} == {1}
    assert sorted(next(iter(ran["download"].values()))) == list(range(manifest["shards"]))


def test_a_local_run_also_refuses_a_wrong_token(local_run):
    """Loopback is reachable by the machine's other users: Ray's token authentication (on by
    default for a new local cluster in Ray 2.60) refuses a client with the wrong token."""
    assert local_run[2] == "AuthenticationError"


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the multi-node tests need root (unshare --net) to run Ray in a network namespace of its own"
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"the multi-node tests need `{tool}`"
    r = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child", "true"], capture_output=True, text=True)
    if r.returncode:
        return f"unshare --net --pid is refused here: {r.stderr.strip()}"
    return None


NETNS = _netns_unavailable()
needs_netns = pytest.mark.skipif(NETNS is not None, reason=NETNS or "")


def _in_netns(world, output: Path, **extra) -> dict:
    """Run tests/cluster_netns.py in a network and pid namespace of its own; its report."""
    import secrets

    job, world_dir, port = world
    tmp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths live under it
    try:
        spec = {"tmp": str(tmp), "token": "tok-" + secrets.token_hex(16), "world": str(world_dir), "world_port": port,
                "job": str(job), "args": [], "output": str(output),
                "result": str(tmp / "result.json"), **extra}
        (tmp / "spec.json").write_text(json.dumps(spec))
        # --kill-child: should the test time out, the namespace's first process dies, and every other with it
        r = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child", sys.executable, "-m",
                            "tests.cluster_netns", str(tmp / "spec.json")], cwd=ROOT, capture_output=True, text=True,
                           timeout=420, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert r.returncode == 0 and (tmp / "result.json").exists(), r.stderr[-3000:]
        return {**json.loads((tmp / "result.json").read_text()), "token": spec["token"]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _says(r: dict, *words: str) -> None:
    assert r["rc"] == 2, r
    assert "Traceback" not in r["stderr"], r["stderr"][-2000:]
    for w in words:
        assert w in r["stderr"], (w, r["stderr"][-2000:])


def _no_secret(token: str, report: dict, dataset: Path) -> None:
    for name in ("wrong_token", "no_token", "unreachable", "run", "loss_run"):
        assert token[4:] not in report[name]["stdout"] + report[name]["stderr"], name
    for d, _, files in os.walk(dataset):
        for f in files:
            assert token[4:].encode() not in (Path(d) / f).read_bytes(), Path(d) / f


@pytest.fixture(scope="module")
def cluster(world, tmp_path_factory):
    """One two-node cluster for the module: the error cases, a run, and a run that loses a node."""
    out = tmp_path_factory.mktemp("cluster")
    # The run that loses a node asks 1/4 CPU per stage: the head alone (1 CPU) then still holds one
    # actor of each pool and a task. The engine sizes its pools from the CPUs at the start, so a
    # loss that leaves less than that waits for a node to come back (see doc of test below).
    _, world_dir, port = world
    lossy = job_file(out / "quarter-cpu.yaml", world_dir, port, cpus=0.25)
    report = _in_netns(world, out / "ds", loss_output=str(out / "lost"), loss_job=str(lossy), kill_after_commits=3)
    return report, out


@needs_netns
def test_two_nodes_with_token_auth_give_the_local_bytes(cluster, local_run):
    """`ray start --head` plus a second `ray start --address` node with a custom resource, token
    auth on: a wrong token, no token and a dead address are each named within seconds; with the
    token in ~/.ray/auth_token the demo job runs with shards on both nodes (the manifest says which
    node ran each (step, shard)) and its files are byte-identical to the local run's."""
    from tests.test_engine import digest

    report, out = cluster
    assert [line.split()[1] for line in report["interfaces"].splitlines()] == ["lo", "lo"], report["interfaces"]
    assert report["head"]["rc"] == 0 and report["worker"]["rc"] == 0, (report["head"], report["worker"])

    _says(report["wrong_token"], "token authentication", "RAY_AUTH_TOKEN", "is not this cluster's")
    _says(report["no_token"], "token authentication", "no token was found", "~/.ray/auth_token")
    _says(report["unreachable"], "127.0.0.1:9", "no Ray cluster answers")
    for name in ("wrong_token", "no_token", "unreachable"):
        assert report[name]["seconds"] < 30, (name, report[name]["seconds"])  # recap's start-up included

    run = report["run"]
    assert run["rc"] == 0, run["stderr"][-3000:]
    manifest = json.loads((out / "ds" / "manifest.json").read_text())
    second = [n for n, info in report["nodes"].items() if "second_node" in info["resources"]]
    assert len(report["nodes"]) == 2 and len(second) == 1, report["nodes"]
    ran_on = {node for by_node in manifest["nodes"].values() for node in by_node}
    assert ran_on == set(report["nodes"]), (manifest["nodes"], report["nodes"])  # both nodes worked
    for step, by_node in manifest["nodes"].items():
        shards = sorted(s for ss in by_node.values() for s in ss)
        assert shards == list(range(manifest["shards"])), (step, by_node)  # each shard once, on one node

    assert digest(out / "ds") == digest(local_run[0])
    _no_secret(report["token"], report, out / "ds")


@needs_netns
def test_losing_a_node_mid_stage_still_gives_the_local_bytes(cluster, local_run):
    """The second node's raylet and its workers are SIGKILLed while the first streaming segment
    runs: Ray retries the lost work on the head and the (stage, shard) commits keep what was
    done, so the job finishes with the same bytes as a local run. (With stages asking 1 CPU, the
    head's single CPU cannot hold the restarted actors of two pools and a task: the run then waits
    until a node joins again, as an autoscaling cluster or a scheduler's replacement would.)"""
    from tests.test_engine import digest

    report, out = cluster
    run = report["loss_run"]
    assert run["killed"] and run["killed"]["pids"], run.get("killed")
    assert run["rc"] == 0, run["stderr"][-3000:]
    second = [n for n, info in report["nodes"].items() if "second_node" in info["resources"]]
    dead = [n for n, info in report["nodes_after_loss"].items() if not info["alive"]]
    assert dead == second, (report["nodes"], report["nodes_after_loss"])  # Ray saw that node die
    manifest = json.loads((out / "lost" / "manifest.json").read_text())
    assert manifest["status"] == "done"
    total = sum(len(shards) for step in manifest["nodes"].values() for shards in step.values())
    assert run["killed"]["markers"] < total  # the node died with work left
    assert digest(out / "lost") == digest(local_run[0])


def test_the_token_comes_from_rays_places_in_rays_order(tmp_path, monkeypatch):
    from recap.pipeline.ray_cluster import ClusterAuthError, token_source

    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert token_source() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("")
    assert token_source() is None  # an empty file is no token
    (tmp_path / ".ray" / "auth_token").write_text("t1")
    assert token_source() == str(tmp_path / ".ray" / "auth_token")
    (tmp_path / "tok").write_text("t2\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert token_source() == f"RAY_AUTH_TOKEN_PATH={tmp_path / 'tok'}"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t3")
    assert token_source() == "RAY_AUTH_TOKEN"  # what is named, never the token itself
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(ClusterAuthError, match="RAY_AUTH_TOKEN_PATH=.*missing"):
        token_source()


def test_an_address_where_no_ray_cluster_answers_is_named_within_seconds(world, tmp_path):
    """A port that answers, but is no Ray GCS (the world's HTTP server): named, exit 2, long before
    Ray's own client would give up (40 s)."""
    job, _, port = world
    started = time.time()
    r = subprocess.run([sys.executable, "-m", "recap.cli", "run", str(job), "--output", str(tmp_path / "ds"),
                        "--address", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "RAY_AUTH_TOKEN": "some-token"})
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"--address 127.0.0.1:{port}" in r.stderr and "no Ray cluster answered" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "some-token" not in r.stderr + r.stdout
    assert time.time() - started < 60
    assert not (tmp_path / "ds").exists()  # nothing written before the cluster was checked
