"""A two-node Ray cluster with token authentication, and recap runs against it, inside a network
namespace where loopback is the only interface. Started by tests/test_cluster.py as
``unshare --net --pid --fork --mount-proc python -m tests.cluster_netns SPEC.json``: this process
is the namespace's first, so every process it starts (Ray's included) dies when it ends.

Writes what it saw to SPEC["result"] for the test to judge."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

RAY_PORT = 6379


def _env(base: dict, **changes) -> dict:
    env = dict(base)
    for k, v in changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def _timed(cmd: list[str], env: dict, timeout: float = 240) -> dict:
    started = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return {"rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr, "seconds": round(time.time() - started, 2)}


def _nodes(env: dict, address: str) -> dict:
    """Ray node id -> its resources and liveness, asked of the cluster."""
    code = ("import json, ray; ray.init(address=%r, logging_level='ERROR'); "
            "print(json.dumps({n['NodeID']: {'alive': n['Alive'], 'resources': n['Resources']} for n in ray.nodes()}))"
            % address)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip() else {}


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    tmp = Path(spec["tmp"])
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    out: dict = {"interfaces": subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout}

    from recap.world.server import serve

    home = tmp / "home"  # no ~/.ray/auth_token of the machine's user: the test controls every token
    home.mkdir()
    token = spec["token"]
    (tmp / "token").write_text(token)
    base = _env(os.environ, HOME=str(home), RAY_USAGE_STATS_ENABLED="0", RAY_ADDRESS=None,
                RAY_AUTH_TOKEN=None, RAY_AUTH_TOKEN_PATH=None, RAY_AUTH_MODE=None)
    cluster = _env(base, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(tmp / "token"))
    bin_ray = str(Path(sys.executable).parent / "ray")
    address = f"127.0.0.1:{RAY_PORT}"
    recap = [sys.executable, "-m", "recap.cli", "run", spec["job"], *spec["args"], "--quiet"]

    with serve(Path(spec["world"]), port=spec["world_port"]):
        out["head"] = _timed([bin_ray, "start", "--head", f"--port={RAY_PORT}", "--num-cpus=1",
                              f"--temp-dir={tmp / 'r'}", "--include-dashboard=false", "--disable-usage-stats"], cluster)
        out["worker"] = _timed([bin_ray, "start", f"--address={address}", "--num-cpus=1",
                                '--resources={"second_node": 1}', "--disable-usage-stats"], cluster)
        # a wrong token, and none at all: named within seconds
        out["wrong_token"] = _timed([*recap, "--address", address, "--output", str(tmp / "wrong")],
                                    _env(base, RAY_AUTH_TOKEN="not-" + token[4:]))
        out["no_token"] = _timed([*recap, "--address", address, "--output", str(tmp / "none")], base)
        out["unreachable"] = _timed([*recap, "--address", "127.0.0.1:9", "--output", str(tmp / "unreach")], base)
        # the token in Ray's default place, ~/.ray/auth_token; RAY_AUTH_MODE left unset
        (home / ".ray").mkdir()
        (home / ".ray" / "auth_token").write_text(token)
        run = [*recap, "--address", address, "--output", spec["output"]]
        if spec.get("kill_second_node_after_commits"):
            out["run"] = _run_losing_a_node(run, base, cluster, address, spec)
        else:
            out["run"] = _timed(run, base)
        out["nodes"] = _nodes(cluster, address)
        out["listening"] = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
    Path(spec["result"]).write_text(json.dumps(out))


def _run_losing_a_node(run: list[str], env: dict, cluster_env: dict, address: str, spec: dict) -> dict:
    """Start the run, kill the second node's raylet (and with it its workers) once the dataset
    holds ``kill_second_node_after_commits`` commit markers, and let the run finish."""
    started = time.time()
    proc = subprocess.Popen(run, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    commits = Path(spec["output"]) / "commits"
    killed = None
    while proc.poll() is None and killed is None:
        n = sum(1 for _ in commits.rglob("*.json")) if commits.exists() else 0
        if n >= spec["kill_second_node_after_commits"]:
            killed = _kill_second_node(cluster_env, address)
        time.sleep(0.2)
    stdout, stderr = proc.communicate(timeout=600)
    return {"rc": proc.returncode, "stdout": stdout, "stderr": stderr, "seconds": round(time.time() - started, 2),
            "killed": killed}


def _kill_second_node(env: dict, address: str) -> dict | None:
    """SIGKILL the raylet of the node with the ``second_node`` resource: its pid is in
    /proc, found by the resource on the raylet's command line."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"raylet") and any(b"second_node" in part for part in cmd):
            os.kill(int(pid), signal.SIGKILL)
            return {"pid": int(pid), "at": time.time()}
    return None


if __name__ == "__main__":
    main(sys.argv[1])
