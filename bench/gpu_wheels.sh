#!/usr/bin/env bash
# Fetch, here (PyPI reachable), the wheels that bench/gpu_check.sh needs on the lent GPU machine,
# which has torch, pyarrow, fsspec, PyYAML and pytest but no network: recap's remaining
# runtime deps into .whl/ (git-ignored), and open_clip_train's pinned webdataset into .whl/oc/.
# Versions are the ones in this checkout's .venv. pydantic_core is compiled: one wheel per CPython
# (3.10-3.13) in .whl/cpXY/, and gpu_check.sh installs the one for the interpreter it finds there.
set -euo pipefail
cd "$(dirname "$0")/.."
ver() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
get() {  # $1: target dir, $2: python version, rest: NAME==VERSION
  local d=$1 py=$2; shift 2
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
      "${plat[@]}" -d "$d" "$@"
}
rm -rf .whl && mkdir -p .whl/oc
for p in open_clip_torch timm ftfy wcwidth pydantic annotated_types typing_inspection typing_extensions webdataset braceexpand; do
  get .whl 3.12 "$p==$(ver "$p")"
done
for py in 3.10 3.11 3.12 3.13; do
  get ".whl/cp${py/./}" "$py" "pydantic_core==$(ver pydantic_core)"
done
get .whl/oc 3.12 "webdataset==0.2.86"
du -sh .whl && ls -R .whl
