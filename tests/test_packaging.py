"""What `pip install` gives a user: one top-level import package, the demo's files as package data,
and a `recap demo` that runs from any directory; images that copy every packaged folder."""
import re
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # no build isolation: the build backend is already in this environment, and no index is needed
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    (whl,) = out.glob("*.whl")
    return whl


def test_the_wheel_installs_one_import_package_with_the_demo_files(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"recap"}
    assert wheel.name.startswith("recap_curate-")  # `recap` is another project's name on PyPI
    for member in ("recap/jobs/demo.yaml", "recap/jobs/demo-metadata.json", "recap/trainer/model_configs/recap-tiny.json",
                   "recap/cli.py", "recap/pipeline/reinforced/__init__.py", "recap/trainer/eval/__init__.py"):
        assert member in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "recap = recap.cli:main" in entry_points and "download = recap.stages.download:DownloadStage" in entry_points


def test_the_installed_wheel_runs_the_demo_from_any_directory(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # the dependencies come from this environment (a path entry, not its .pth files: so not its
    # editable recap); recap itself only from the wheel
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(py), "-c", "import recap.pipeline; print(recap.pipeline.__file__)"], cwd=elsewhere,
                           check=True, capture_output=True, text=True).stdout
    assert where.startswith(site)
    # --heldout 0: no teacher to train, the model stages use their seeded random init (what is tested
    # here is the installed package, not the teacher)
    r = subprocess.run([str(venv / "bin" / "recap"), "demo", "--samples", "150", "--heldout", "0", "--out", "out"],
                       cwd=elsewhere, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "invariant ok" in r.stdout and re.search(r"balance\s+in\s+\d+\s+kept\s+[1-9]", r.stdout)
    assert (elsewhere / "out/dataset/manifest.json").exists()


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_the_images_copy_every_packaged_folder(dockerfile):
    text = (ROOT / "docker" / dockerfile).read_text()
    copied = set(re.findall(r"^COPY (\S+) \1$", text, flags=re.M))
    assert set(PACKAGE_DIRS.values()) <= copied
    if dockerfile.endswith("cuda"):
        assert "gpu" in re.search(r"pip install [^\n]*'\.\[([^\]]*)\]'", text).group(1)
