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
DEMO = str(ROOT / "jobs" / "demo.yaml")
BIN = Path(sys.executable).parent


def test_is_loopback_reads_every_form_a_socket_shows():
    for host in ("127.0.0.1", "127.3.2.1", "::1", "::ffff:127.0.0.1"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.0.2.2", "::ffff:192.0.2.2", "fe80::1%eth0", "localhost", ""):
        assert not is_loopback(host), host


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from recap.world.generate import generate_world
    from recap.world.server import serve

    port = free_port()
    out = tmp_path_factory.mktemp("world") / "w"
    generate_world(out, samples=120, heldout=5, seed=3, port=port)
    with serve(out, port=port):
        yield out, port


def world_args(world_dir: Path, port: int) -> list[str]:
    return ["--set", f"input.path={world_dir / 'urls.parquet'}", "--set", f"download.allow_hosts=[127.0.0.1:{port}]",
            "--set", "download.samples_per_shard=30", "--set", "download.timeout=2"]


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
    """A local `recap run` of the demo job, with every listening socket any of its processes
    opened, sampled all through the run."""
    world_dir, port = world
    cwd = tmp_path_factory.mktemp("local")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "recap.cli", "run", DEMO, *world_args(world_dir, port),
                             "--output", str(cwd / "ds"), "--quiet", "--cpus", "2"],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    seen: dict[tuple[str, int], str] = {}
    root = psutil.Process(proc.pid)
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        seen.update(_listening(_session(root)))
        time.sleep(0.3)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    return cwd / "ds", seen


def test_a_local_run_listens_on_loopback_only(local_run):
    """Every socket any process of a local `recap run` opens for listening is on 127.0.0.0/8 (or
    ::1); and the sample did see Ray's servers, so it could fail."""
    ds, seen = local_run
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


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the multi-node tests need root (unshare --net) to run Ray in a network namespace of its own"
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"the multi-node tests need `{tool}`"
    r = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, text=True)
    if r.returncode:
        return f"unshare --net --pid is refused here: {r.stderr.strip()}"
    return None


NETNS = _netns_unavailable()
needs_netns = pytest.mark.skipif(NETNS is not None, reason=NETNS or "")


def _in_netns(world, output: Path, **extra) -> dict:
    """Run tests/cluster_netns.py in a network and pid namespace of its own; its report."""
    import secrets

    world_dir, port = world
    tmp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths live under it
    try:
        spec = {"tmp": str(tmp), "token": "tok-" + secrets.token_hex(16), "world": str(world_dir), "world_port": port,
                "job": DEMO, "args": world_args(world_dir, port), "output": str(output),
                "result": str(tmp / "result.json"), **extra}
        (tmp / "spec.json").write_text(json.dumps(spec))
        r = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", sys.executable, "-m",
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
    for name in ("wrong_token", "no_token", "unreachable", "run"):
        assert token[4:] not in report[name]["stdout"] + report[name]["stderr"], name
    for d, _, files in os.walk(dataset):
        for f in files:
            assert token[4:].encode() not in (Path(d) / f).read_bytes(), Path(d) / f


@needs_netns
def test_two_nodes_with_token_auth_give_the_local_bytes(world, local_run, tmp_path):
    """`ray start --head` plus a second `ray start --address` node with a custom resource, token
    auth on: a wrong token, no token and a dead address are each named within seconds; with the
    token in ~/.ray/auth_token the demo job runs with shards on both nodes (the manifest says which
    node ran each (step, shard)) and its files are byte-identical to the local run's."""
    from tests.test_engine import digest

    report = _in_netns(world, tmp_path / "cluster")
    assert [line.split()[1] for line in report["interfaces"].splitlines()] == ["lo", "lo"], report["interfaces"]
    assert report["head"]["rc"] == 0 and report["worker"]["rc"] == 0, (report["head"], report["worker"])

    _says(report["wrong_token"], "token authentication", "RAY_AUTH_TOKEN", "is not this cluster's")
    _says(report["no_token"], "token authentication", "no token was found", "~/.ray/auth_token")
    _says(report["unreachable"], "127.0.0.1:9", "no Ray cluster answers")
    for name in ("wrong_token", "no_token", "unreachable"):
        assert report[name]["seconds"] < 30, (name, report[name]["seconds"])  # recap's start-up included

    run = report["run"]
    assert run["rc"] == 0, run["stderr"][-3000:]
    manifest = json.loads((tmp_path / "cluster" / "manifest.json").read_text())
    second = [n for n, info in report["nodes"].items() if "second_node" in info["resources"]]
    assert len(report["nodes"]) == 2 and len(second) == 1, report["nodes"]
    ran_on = {node for by_node in manifest["nodes"].values() for node in by_node}
    assert ran_on == set(report["nodes"]), (manifest["nodes"], report["nodes"])  # both nodes worked
    for step, by_node in manifest["nodes"].items():
        shards = sorted(s for ss in by_node.values() for s in ss)
        assert shards == list(range(manifest["shards"])), (step, by_node)  # each shard once, on one node

    assert digest(tmp_path / "cluster") == digest(local_run[0])
    _no_secret(report["token"], report, tmp_path / "cluster")
