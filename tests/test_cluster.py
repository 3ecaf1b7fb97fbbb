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
    for c in psutil.net_connections(kind="inet"):
        if c.pid not in pids or not c.laddr:
            continue
        if c.type == __import__("socket").SOCK_STREAM and c.status != psutil.CONN_LISTEN:
            continue
        if c.type != __import__("socket").SOCK_STREAM and c.raddr:
            continue  # a connected UDP socket answers its peer only
        try:
            name = psutil.Process(c.pid).name()
        except psutil.Error:
            name = "?"
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


def test_a_local_run_listens_on_loopback_only(world, tmp_path):
    """Every socket any process of a local `recap run` opens for listening, sampled all through
    the run, is on 127.0.0.0/8 (or ::1); and the sample did see Ray's servers, so it could fail."""
    world_dir, port = world
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "recap.cli", "run", DEMO, *world_args(world_dir, port),
                             "--output", str(tmp_path / "ds"), "--quiet", "--cpus", "2"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    seen: dict[tuple[str, int], str] = {}
    root = psutil.Process(proc.pid)
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        seen.update(_listening(_session(root)))
        time.sleep(0.2)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    names = set(seen.values())
    assert {"gcs_server", "raylet"} <= names, f"the sample missed Ray's servers: {seen}"
    exposed = {addr: name for addr, name in seen.items() if not is_loopback(addr[0])}
    assert not exposed, f"listening outside loopback: {exposed}"
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["status"] == "done"
    # one node ran every (step, shard), and the manifest says so
    ran = manifest["nodes"]
    assert set(ran) >= {"download", "basic"}
    assert {len(by_node) for by_node in ran.values()} == {1}
    assert sorted(next(iter(ran["download"].values()))) == list(range(manifest["shards"]))
