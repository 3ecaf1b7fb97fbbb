#!/usr/bin/env bash
# Submit a recap job to a running Ray cluster (its dashboard address), writing to object storage.
# Usage: jobs/cluster/ray-job-submit.sh http://HEAD:8265 jobs/demo.yaml s3://bucket/datasets/run1 [--set ...]
set -euo pipefail
addr=$1 job=$2 out=$3; shift 3
ray job submit --address "$addr" --working-dir . --runtime-env-json '{"pip": ["-e ."]}' -- \
  recap run "$job" --address auto --output "$out" "$@"
