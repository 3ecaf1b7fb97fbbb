#!/usr/bin/env bash
# Submit a recap job to a running Ray cluster through Ray's job server, and follow its log.
#
#   jobs/cluster/ray-job-submit.sh JOB.yaml [recap run options: --output URL, --set KEY=VALUE ...]
#
# The job runs on the cluster's head as `recap run JOB.yaml --address auto`: recap must be
# installed in the cluster's image (docker/). The job file's folder is uploaded as the working
# directory, so files the job names beside it (MetaCLIP metadata) travel with it.
#
# Where: RAY_ADDRESS, the head's job server (default http://127.0.0.1:8265). The head's dashboard
# listens on its own loopback unless started with --dashboard-host: reach it with
# `ssh -N -L 8265:127.0.0.1:8265 HEAD` or `kubectl port-forward svc/HEAD-svc 8265`.
# Auth: Ray's token authentication, from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token
# (`ray get-auth-token` on the head prints it). The token never goes on the command line.
set -euo pipefail

usage() {
  sed -n '2,15s/^# \{0,1\}//p' "$0" >&2
  exit 2
}

[[ $# -ge 1 && $1 != -h && $1 != --help ]] || usage
job=$1
shift
[[ -f $job ]] || { echo "ray-job-submit: no job file at $job" >&2; exit 2; }

export RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
if [[ $RAY_AUTH_MODE == token && -z ${RAY_AUTH_TOKEN:-} && -z ${RAY_AUTH_TOKEN_PATH:-} && ! -s $HOME/.ray/auth_token ]]; then
  echo "ray-job-submit: no Ray auth token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or put it in ~/.ray/auth_token" >&2
  exit 2
fi

dir=$(cd "$(dirname "$job")" && pwd)
name=$(basename "$job")
# the submission id names the job in `ray job status/logs/stop`
id=recap-${name%.*}-$(date -u +%Y%m%dT%H%M%S)

exec ray job submit --submission-id "$id" --working-dir "$dir" -- \
  recap run "$name" --address auto "$@"
