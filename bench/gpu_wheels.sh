#!/usr/bin/env bash
# Fetch, here (PyPI reachable), the wheels that bench/gpu_check.sh needs on the lent GPU machine,
# which has torch, timm, pyarrow, fsspec, PyYAML and pytest but no network: recap's remaining
# runtime deps into .whl/ (git-ignored), and open_clip_train's pinned webdataset into .whl/oc/.
# Versions are the ones in this checkout's .venv; the device's Python is 3.12 (override: PYVER=3.11).
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
ver() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
get() {  # $1: target dir, rest: NAME==VERSION
  local d=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
      "${plat[@]}" -d "$d" "$@"
}
rm -rf .whl && mkdir -p .whl/oc
for p in open_clip_torch ftfy wcwidth pydantic pydantic_core annotated_types typing_inspection webdataset braceexpand; do
  get .whl "$p==$(ver "$p")"
done
get .whl/oc "webdataset==0.2.86"
du -sh .whl && ls .whl .whl/oc
