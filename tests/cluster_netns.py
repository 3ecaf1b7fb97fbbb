"""A two-node Ray cluster with token authentication, and recap runs against it, inside a network
namespace where loopback is the only interface. Started by tests/test_cluster.py as
``unshare --net --pid --fork --mount-proc python -m tests.cluster_netns SPEC.json``: this process
is the namespace's first, so every process it starts (Ray's included) dies when it ends.

Writes what it saw to SPEC["result"] for the test to judge."""
import json
import os
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


def _start(cmd: list[str], env: dict) -> tuple[subprocess.Popen, float]:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), time.time()


def _finish(started: tuple[subprocess.Popen, float], timeout: float = 240) -> dict:
    proc, t0 = started
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # a run that hangs is a finding, reported like any other
        proc.kill()
        stdout, stderr = proc.communicate()
        stderr += f"\n(killed after {timeout} s)"
    return {"rc": proc.returncode, "stdout": stdout, "stderr": stderr, "seconds": round(time.time() - t0, 2)}


def _timed(cmd: list[str], env: dict, timeout: float = 240) -> dict:
    return _finish(_start(cmd, env), timeout)


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
    # a lost node is declared dead after 3 missed 1 s health checks (Ray's default: 5 of 3 s)
    cluster = _env(base, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(tmp / "token"),
                   RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3")
    bin_ray = str(Path(sys.executable).parent / "ray")
    address = f"127.0.0.1:{RAY_PORT}"
    recap = [sys.executable, "-m", "recap.cli", "run", spec["job"], *spec["args"], "--quiet"]

    with serve(Path(spec["world"]), port=spec["world_port"]):
        out["head"] = _timed([bin_ray, "start", "--head", f"--port={RAY_PORT}", "--num-cpus=1",
                              f"--temp-dir={tmp / 'r'}", "--include-dashboard=false", "--disable-usage-stats"], cluster)
        # Ray gives a raylet 30 s to register, which a loaded machine can miss: one more try
        for _ in range(2):
            out["worker"] = _timed([bin_ray, "start", f"--address={address}", "--num-cpus=1",
                                    '--resources={"second_node": 1}', "--disable-usage-stats"], cluster)
            if out["worker"]["rc"] == 0:
                break
        # a wrong token, none at all, a dead address: side by side (each is a recap start-up)
        started = {
            "wrong_token": _start([*recap, "--address", address, "--output", str(tmp / "wrong")],
                                  _env(base, RAY_AUTH_TOKEN="not-" + token[4:])),
            "no_token": _start([*recap, "--address", address, "--output", str(tmp / "none")], base),
            "unreachable": _start([*recap, "--address", "127.0.0.1:9", "--output", str(tmp / "unreach")], base),
        }
        out.update({name: _finish(p) for name, p in started.items()})
        # the token in Ray's default place, ~/.ray/auth_token; RAY_AUTH_MODE left unset
        (home / ".ray").mkdir()
        (home / ".ray" / "auth_token").write_text(token)
        out["run"] = _timed([*recap, "--address", address, "--output", spec["output"]], base)
        out["nodes"] = _nodes(cluster, address)
        if spec.get("loss_output"):  # the same job again, and the second node dies in the middle of it
            lossy = [sys.executable, "-m", "recap.cli", "run", spec.get("loss_job", spec["job"]), "--quiet"]
            out["loss_run"] = _run_losing_a_node([*lossy, "--address", address, "--output", spec["loss_output"]],
                                                 base, Path(spec["loss_output"]), spec["kill_after_commits"])
            out["nodes_after_loss"] = _nodes(cluster, address)
    Path(spec["result"]).write_text(json.dumps(out))


def _run_losing_a_node(run: list[str], env: dict, output: Path, after: int) -> dict:
    """Start the run; once the dataset holds ``after`` commit markers, SIGKILL the second node's
    raylet and the workers it started (the node is gone, as when a machine dies); let the run finish."""
    started = _start(run, env)
    commits = output / "commits"
    killed = None
    while started[0].poll() is None and killed is None:
        markers = sum(1 for _ in commits.rglob("*.json")) if commits.exists() else 0
        if markers >= after:
            killed = {"markers": markers, "pids": _kill_second_node()}
        time.sleep(0.1)
    return {**_finish(started, timeout=240), "killed": killed}


def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _kill_second_node() -> list[int]:
    """The raylet with the ``second_node`` resource on its command line, and every process it
    started (its workers and agents), all at once."""
    import psutil

    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    raylets = [p for p in pids if (c := _cmdline(p)) and c[0].endswith(b"raylet") and any(b"second_node" in a for a in c)]
    doomed = []
    for pid in raylets:
        try:
            proc = psutil.Process(pid)
            doomed += [proc, *proc.children(recursive=True)]
        except psutil.Error:
            pass
    for proc in doomed:
        try:
            proc.kill()
        except psutil.Error:
            pass
    return sorted(p.pid for p in doomed)


if __name__ == "__main__":
    main(sys.argv[1])
